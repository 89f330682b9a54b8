"""Task C of the encoder comparison: do the features cluster within a cell line? (original_method.md §4.4)

The authors, per cell line and per ``min_cluster_size`` mcs in ``range(10, 160, 10)``: ``umap.UMAP(n_neighbors=mcs)``
to 2-D, then ``hdbscan.HDBSCAN(min_samples=1, min_cluster_size=mcs, allow_single_cluster=False)``; recorded the number
of clusters, the noise %, and silhouette, Calinski–Harabasz and Davies–Bouldin on the 2-D embedding with the noise
points kept as a cluster labelled −1 (a failure recorded as −1); plotted after dropping noise > 33 %,
silhouette == −1, CH > 9999 and DB < 0.33.

Our stack has neither umap nor hdbscan, so:

- **Embedding.** ``sklearn.manifold.SpectralEmbedding(n_components=2, affinity='nearest_neighbors',
  n_neighbors=mcs)`` on standardised features. UMAP initialises its layout with exactly this, the spectral embedding
  of the (symmetrised) kNN graph, then refines it with a force layout that we do not run; sklearn's kNN graph
  counts the point itself among its neighbours, as UMAP's ``n_neighbors`` does. Clusters that are separate in the
  kNN graph are separate in both; the within-cluster spread differs, so the absolute CH / DB values are not the
  authors' and only comparisons between encoders run here mean something. Where the kNN graph falls apart into
  pieces (``note``: "Graph is not fully connected"), the spectral layout puts each piece on about one point (UMAP
  would lay the pieces out one by one), so CH explodes and DB goes to 0: the authors' CH > 9999 / DB < 0.33 filters
  drop those rows, while the ARIs stay meaningful.
- **Clustering.** ``sklearn.cluster.HDBSCAN`` is the same algorithm as the ``hdbscan`` package (same parameter
  names ``min_cluster_size``, ``min_samples``, ``allow_single_cluster``; ``cluster_selection_method='eom'``).
- **Ground truth (our addition).** On synthetic plates the planted effects are known, so each row also gets
  ``ari_drug`` (adjusted Rand index of clusters vs drug) and ``ari_effect`` (vs ``Metadata_Effect``; NaN when absent),
  both over all points with the noise as one more label. The internal indices above reward any tight blobs, even
  blobs that have nothing to do with the treatments; the ARIs say whether the clusters are the biology.

Pure functions on ``features [N, F]`` and a metadata table; the caller has already selected the rows (drug wells at
their highest concentration, last n frames per well, no controls).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence
from sklearn.cluster import HDBSCAN
from sklearn.manifold import SpectralEmbedding
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from cellssl_jax.compare.replicates import CELL_LINE, DRUG, EFFECT, check_inputs, mean_abs_deviation

PAPER_MIN_CLUSTER_SIZES = range(10, 160, 10)
FAILED = -1.0  # the authors' value for an index that could not be computed (e.g. fewer than 2 labels)
COLUMNS = ("mcs", "n_points", "n_clusters", "noise_pct", "silhouette", "calinski_harabasz", "davies_bouldin",
           "ari_drug", "ari_effect", "note")
# The authors' plot filters (§4.4).
MAX_NOISE_PCT, MAX_CALINSKI_HARABASZ, MIN_DAVIES_BOULDIN = 33, 9999, 0.33
SUMMARY_MEASURES = ("silhouette", "inv_davies_bouldin", "calinski_harabasz", "not_noise_pct", "ari_effect",
                    "ari_drug")


def _index_or_failed(score, embedding: np.ndarray, labels: np.ndarray) -> float:
    """One sklearn cluster index, or −1 where it is undefined (fewer than 2 labels, or one label per point)."""
    try:
        return float(score(embedding, labels))
    except ValueError:
        return FAILED


def _effect_labels(meta: pd.DataFrame) -> np.ndarray | None:
    """The planted effect per row, or None when the column is absent or empty. Rows without an effect are an error:
    an ARI over a subset would not be comparable between cell lines."""
    if EFFECT not in meta.columns or meta[EFFECT].isna().all():
        return None
    null = np.flatnonzero(meta[EFFECT].isna().to_numpy())
    if null.size:
        raise ValueError(f"meta column {EFFECT} is missing at row {int(null[0])} but present elsewhere")
    return meta[EFFECT].astype(str).to_numpy()


def _row(mcs: int, n: int, note: str, **values) -> dict:
    row = dict.fromkeys(COLUMNS, np.nan)
    row.update(mcs=mcs, n_points=n, note=note, **values)
    return row


def knn_graph(neighbours: np.ndarray, n_neighbors: int) -> sparse.csr_matrix:
    """The affinity ``SpectralEmbedding(affinity='nearest_neighbors', n_neighbors=k)`` builds, from a precomputed
    neighbour table (``neighbours[i]``: nearest first, the point itself included): 0/1 kNN connectivity with the
    point counted among its neighbours, symmetrised as 0.5 (A + Aᵀ)."""
    n = neighbours.shape[0]
    cols = neighbours[:, :n_neighbors].ravel()
    connectivity = sparse.csr_matrix((np.ones(cols.size), (np.repeat(np.arange(n), n_neighbors), cols)), shape=(n, n))
    return 0.5 * (connectivity + connectivity.T)


def _embed(neighbours: np.ndarray, mcs: int, seed: int) -> tuple[np.ndarray | None, str]:
    """2-D spectral embedding of the mcs-NN graph, and a note (the embedding's warnings, or why it failed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            embedding = SpectralEmbedding(n_components=2, affinity="precomputed",
                                          random_state=seed).fit_transform(knn_graph(neighbours, mcs))
        except (ValueError, np.linalg.LinAlgError, ArpackError, ArpackNoConvergence) as error:
            return None, f"embedding failed: {type(error).__name__}: {error}"
    return embedding, "; ".join(sorted({str(w.message).splitlines()[0] for w in caught}))


def cluster_cell_line(features, meta: pd.DataFrame, *, min_cluster_sizes: Iterable[int] = PAPER_MIN_CLUSTER_SIZES,
                      seed: int = 0) -> pd.DataFrame:
    """The authors' sweep for ONE cell line: one row per ``min_cluster_size`` (columns ``COLUMNS``).

    ``mcs >= N`` is skipped (a kNN graph needs more points than neighbours) and recorded with NaN values and a
    ``note``; so is an embedding that fails. Warnings of the embedding (e.g. a kNN graph in several pieces) go to
    ``note`` too. Identical feature vectors everywhere (a collapsed encoder) give, by decision, 0 clusters, 100 %
    noise, failed (−1) indices and ARI 0, rather than a layout of arbitrary ties. ``noise_pct`` is a float percent
    (the authors stored ``int()`` of it; ``paper_filter`` applies their cut to the truncated value).

    The nearest neighbours are searched once, for the largest mcs, and every graph is cut from that table: the same
    graph ``SpectralEmbedding(affinity='nearest_neighbors')`` builds (checked in the tests), without one search in
    the 4096-dim feature space per mcs. Rows are shuffled (``seed``) first, so that distance ties are not broken by
    the caller's row order (grouped by drug). Deterministic for a given ``seed``.
    """
    x, meta = check_inputs(features, meta, required=(CELL_LINE, DRUG))
    lines = meta[CELL_LINE].unique()
    if len(lines) != 1:
        raise ValueError(f"cluster_cell_line takes one cell line, got {len(lines)}: {sorted(map(str, lines))[:5]}; "
                         "use cluster_all")
    sizes = [int(mcs) for mcs in min_cluster_sizes]
    if any(mcs < 2 for mcs in sizes):
        raise ValueError(f"min_cluster_size must be >= 2 (HDBSCAN's minimum), got {sizes}")
    n = len(meta)
    drug = meta[DRUG].astype(str).to_numpy()
    effect = _effect_labels(meta)
    collapsed = bool(np.all(np.ptp(x, axis=0) == 0))
    order = np.random.default_rng(seed).permutation(n)
    drug, effect = drug[order], (effect[order] if effect is not None else None)
    standardised = StandardScaler().fit_transform(x[order].astype(np.float64))
    usable = [mcs for mcs in sizes if mcs < n]
    neighbours = None
    if usable and not collapsed:
        neighbours = NearestNeighbors(n_neighbors=max(usable)).fit(standardised).kneighbors(
            standardised, return_distance=False)

    rows = []
    for mcs in sizes:
        if mcs >= n:
            rows.append(_row(mcs, n, f"skipped: min_cluster_size {mcs} >= {n} points"))
            continue
        if collapsed:  # one point N times: no structure to find, whatever a graph layout would make of the ties
            rows.append(_row(mcs, n, "all feature vectors identical (collapsed encoder)", n_clusters=0,
                             noise_pct=100.0, silhouette=FAILED, calinski_harabasz=FAILED, davies_bouldin=FAILED,
                             ari_drug=0.0, ari_effect=0.0 if effect is not None else np.nan))
            continue
        embedding, note = _embed(neighbours, mcs, seed)
        if embedding is None:
            rows.append(_row(mcs, n, note))
            continue
        labels = HDBSCAN(min_cluster_size=mcs, min_samples=1, metric="euclidean", allow_single_cluster=False,
                         copy=True).fit_predict(embedding)
        rows.append(_row(
            mcs, n, note,
            n_clusters=int(np.unique(labels[labels >= 0]).size),
            noise_pct=100.0 * float(np.mean(labels == -1)),
            silhouette=_index_or_failed(silhouette_score, embedding, labels),
            calinski_harabasz=_index_or_failed(calinski_harabasz_score, embedding, labels),
            davies_bouldin=_index_or_failed(davies_bouldin_score, embedding, labels),
            ari_drug=float(adjusted_rand_score(drug, labels)),
            ari_effect=float(adjusted_rand_score(effect, labels)) if effect is not None else np.nan))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def cluster_all(features, meta: pd.DataFrame, *, progress: bool = True, **kwargs) -> pd.DataFrame:
    """``cluster_cell_line`` for every cell line in ``meta`` (tqdm over lines), with a leading ``cell_line``
    column. Keyword arguments go to ``cluster_cell_line``."""
    x, meta = check_inputs(features, meta, required=(CELL_LINE, DRUG))
    parts = []
    for line, rows in tqdm(meta.groupby(CELL_LINE, sort=True).indices.items(), desc="clustering cell lines",
                            disable=not progress):
        table = cluster_cell_line(x[rows], meta.iloc[rows], **kwargs)
        table.insert(0, "cell_line", line)
        parts.append(table)
    return pd.concat(parts, ignore_index=True)


def paper_filter(df: pd.DataFrame) -> pd.DataFrame:
    """The authors' plot filters: drop noise > 33 % (on ``int(noise_pct)``, as they stored it), silhouette == −1,
    CH > 9999, DB < 0.33; skipped or failed rows (NaN) go too."""
    computed = df["n_clusters"].notna()
    keep = (computed & ~(np.floor(df["noise_pct"]) > MAX_NOISE_PCT) & (df["silhouette"] != FAILED)
            & ~(df["calinski_harabasz"] > MAX_CALINSKI_HARABASZ) & ~(df["davies_bouldin"] < MIN_DAVIES_BOULDIN))
    return df[keep]


def _with_derived(df: pd.DataFrame) -> pd.DataFrame:
    with np.errstate(divide="ignore"):
        return df.assign(inv_davies_bouldin=1.0 / df["davies_bouldin"], not_noise_pct=100.0 - df["noise_pct"])


def summarise(df_by_model: Mapping[str, pd.DataFrame], *, apply_filter: bool = True) -> pd.DataFrame:
    """Per model and measure (``SUMMARY_MEASURES``): median and mean abs deviation over the sweep rows kept by
    ``paper_filter``; columns ``model, measure, median, mad, n_kept, n_rows``."""
    rows = []
    for model, df in df_by_model.items():
        kept = _with_derived(paper_filter(df) if apply_filter else df[df["n_clusters"].notna()])
        for measure in SUMMARY_MEASURES:
            v = kept[measure].to_numpy(np.float64)
            v = v[~np.isnan(v)]
            rows.append({"model": model, "measure": measure,
                         "median": float(np.median(v)) if v.size else np.nan, "mad": mean_abs_deviation(v),
                         "n_kept": len(kept), "n_rows": len(df)})
    return pd.DataFrame(rows)


def plot_clustering(df_by_model: Mapping[str, pd.DataFrame], path, *, apply_filter: bool = True) -> Path:
    """Boxplots per model of not-noise %, CH, silhouette, 1/DB and ari_effect over the (filtered) sweep rows.
    Returns the PNG path."""
    from cellssl_jax.plotting import plt, save

    panels = (("not_noise_pct", "not noise %"), ("calinski_harabasz", "Calinski–Harabasz"),
              ("silhouette", "silhouette"), ("inv_davies_bouldin", "1 / Davies–Bouldin"),
              ("ari_effect", "ARI vs planted effect"))
    kept = {m: _with_derived(paper_filter(df) if apply_filter else df[df["n_clusters"].notna()])
            for m, df in df_by_model.items()}
    models = list(kept)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), layout="constrained")
    for ax, (column, title) in zip(axes, panels):
        values = [kept[m][column].dropna().to_numpy(np.float64) for m in models]
        data = [v[np.isfinite(v)] for v in values]  # 1/DB is inf where DB = 0 (unfiltered degenerate layouts)
        positions = [i for i, d in enumerate(data) if d.size]
        if positions:
            ax.boxplot([data[i] for i in positions], positions=positions)
        for i, (v, d) in enumerate(zip(values, data)):
            text = "n/a" if not d.size else (f"+{v.size - d.size} inf" if v.size > d.size else "")
            if text:
                ax.annotate(text, (i, 0.02), xycoords=("data", "axes fraction"), ha="center", fontsize=8)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.set_title(title, fontsize=10)
    fig.suptitle("clustering within cell lines" + (" (authors' filters)" if apply_filter else ""), fontsize=10)
    return save(fig, path)
