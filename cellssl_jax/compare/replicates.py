"""Task A of the encoder comparison: are biological replicates close in feature space? (original_method.md §4.2)

The authors' measure, per (cell line, drug): the median distance between the features of the k-th image of one
replicate well and the k-th image of another, over all replicate pairs and k, with four scipy metrics (euclidean,
cosine, correlation, braycurtis). For the plot each metric is divided by its max over all (cell line, drug) rows and
inverted ("similarity"), then summarised by the median and pandas' old ``mad()`` (the MEAN absolute deviation).

What differs from the authors' code, and why:

- **Exact wells.** The authors matched a well by substring (``'C1' in name`` also hits C10–C19) and ignored the
  plate. Here a well is the exact key (cell line, plate, well): C1 and C10 are two wells, and C3 on two plates are two
  replicate wells.
- **Fields of view.** When ``Metadata_Site`` is present, frame k is ranked within each (well, site) and images are
  paired on (site, k), so two sites of one well are never mixed up as one time series.
- **A chance level.** A collapsed encoder (every image mapped to one point) makes every distance 0 and scores a
  "perfect" (infinite) similarity under the authors' measure. So each row also gets the same median over pairs of
  wells of the same cell line but OTHER drugs (same slot k), and ``ratio = replicate / other``: below 1 replicates are
  closer than unrelated wells, 1 is chance. **0/0 is NaN**: an encoder that puts every image at the same point says
  nothing about replicates, so it gets no score rather than a "better" or a "chance" one; summaries count the NaNs.
- **Undefined distances** (cosine of a zero vector, correlation of a constant vector) are NaN in scipy; they are
  left out of the medians (an all-NaN set gives NaN).
- **Normalisation across models.** "Divide by the max" is relative to the set compared, so ``compare_similarity``
  divides every model's rows by the max over ALL models' rows, which is what one plot of several methods amounts to.

Pure functions on ``features [N, F]`` and a metadata table; the caller has already selected the rows (highest
concentration wells of each (cell line, drug), last n frames per well, controls kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist

from cellssl_jax.arrays import mean_abs_deviation

CELL_LINE, DRUG, PLATE, WELL, TIME = ("Metadata_CellLine", "Metadata_Drug", "Metadata_Plate", "Metadata_Well",
                                      "Metadata_Time_h")
SITE, EFFECT = "Metadata_Site", "Metadata_Effect"
REQUIRED_COLUMNS = (CELL_LINE, DRUG, PLATE, WELL, TIME)
METRICS = ("euclidean", "cosine", "correlation", "braycurtis")


# ----------------------------------------------------------------------------------------------------------------------
# Input checks (shared with clustering.py)

def _describe_row(meta: pd.DataFrame, i: int) -> str:
    """'row i (cell line …, plate …, well …, t=… h)' with whichever of those columns exist."""
    parts = [f"{name} {meta[col].iloc[i]}" for name, col in
             (("cell line", CELL_LINE), ("drug", DRUG), ("plate", PLATE), ("well", WELL)) if col in meta.columns]
    if TIME in meta.columns:
        parts.append(f"t={meta[TIME].iloc[i]} h")
    return f"row {i} ({', '.join(parts)})" if parts else f"row {i}"


def check_inputs(features, meta: pd.DataFrame, required: Iterable[str] = REQUIRED_COLUMNS
                 ) -> tuple[np.ndarray, pd.DataFrame]:
    """Validate the task input contract and return ``(features as a 2-D array, meta with a 0..N-1 index)``.

    Raises ValueError naming the first offending row: non-finite features, missing values in a required column,
    a non-numeric time; and on a shape or length mismatch or missing columns.
    """
    if not isinstance(meta, pd.DataFrame):
        raise TypeError(f"meta must be a pandas DataFrame, got {type(meta).__name__}")
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty [N, F] array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"features must be real numbers, got dtype {x.dtype}")
    missing = [c for c in required if c not in meta.columns]
    if missing:
        raise ValueError(f"meta lacks the columns {missing} (has {list(meta.columns)})")
    if len(meta) != x.shape[0]:
        raise ValueError(f"features has {x.shape[0]} rows but meta has {len(meta)}; they must be row-aligned")
    meta = meta.reset_index(drop=True)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"features {_describe_row(meta, i)} is not finite ({bad.size} bad rows in all); "
                         "the encoder output must be finite")
    for col in required:
        null = np.flatnonzero(meta[col].isna().to_numpy())
        if null.size:
            raise ValueError(f"meta column {col} is missing at {_describe_row(meta, int(null[0]))}")
    if TIME in required and not pd.api.types.is_numeric_dtype(meta[TIME]):
        raise ValueError(f"meta column {TIME} must be numeric hours, got dtype {meta[TIME].dtype}")
    return x, meta


# ----------------------------------------------------------------------------------------------------------------------
# Distances

def _slots(meta: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the well id (exact (cell line, plate, well) key), the (cell line, drug) group id, and the slot
    (site, k) id within the cell line, where k is the frame's rank by time in its field of view."""
    well_id = meta.groupby([CELL_LINE, PLATE, WELL], sort=True).ngroup().to_numpy()
    group_id = meta.groupby([CELL_LINE, DRUG], sort=True).ngroup().to_numpy()
    drugs_per_well = pd.Series(group_id).groupby(well_id).nunique()
    if (drugs_per_well > 1).any():
        w = int(drugs_per_well.index[np.argmax(drugs_per_well.to_numpy() > 1)])
        rows = np.flatnonzero(well_id == w)
        raise ValueError(f"well {meta[PLATE].iloc[rows[0]]}/{meta[WELL].iloc[rows[0]]} of cell line "
                         f"{meta[CELL_LINE].iloc[rows[0]]} holds several drugs "
                         f"{sorted(meta[DRUG].iloc[rows].astype(str).unique())}; a well has one treatment")
    site = meta[SITE].to_numpy() if SITE in meta.columns else np.zeros(len(meta), dtype=int)
    fov = pd.DataFrame({"well": well_id, "site": site, "time": meta[TIME].to_numpy()})
    dup = np.flatnonzero(fov.duplicated().to_numpy())
    if dup.size:
        raise ValueError(f"two images of one field of view share a time: {_describe_row(meta, int(dup[0]))}; "
                         "the frame index k would be ambiguous")
    k = fov.groupby(["well", "site"]).time.rank(method="first").astype(int).to_numpy() - 1
    slot_id = pd.DataFrame({"site": site, "k": k}).groupby(["site", "k"], sort=True).ngroup().to_numpy()
    return well_id, group_id, slot_id


def _pairs_in_slot(rows: np.ndarray, group_id: np.ndarray):
    """Condensed upper-triangle pairs (i < j) of one slot's rows (pdist order) and whether they share a drug."""
    a, b = np.triu_indices(rows.size, k=1)
    ga, gb = group_id[rows[a]], group_id[rows[b]]
    return a, b, ga, gb, ga == gb


def replicate_distances(features, meta: pd.DataFrame, metrics: Iterable[str] = METRICS) -> pd.DataFrame:
    """Per (cell line, drug): median distance between replicate wells' k-th images, and the same for other drugs.

    Columns: ``cell_line, drug, [effect], n_wells, n_images, n_replicate_pairs`` (well pairs that shared at least
    one slot), ``n_replicate_distances, n_other_distances`` (image pairs), then per metric ``replicate_<m>``,
    ``other_<m>`` and ``ratio_<m> = replicate / other`` (NaN at 0/0; see the module docstring). Drugs with one
    well keep their row with NaN replicate values and ``n_replicate_pairs = 0``.

    One ``pdist`` per (cell line, slot) over the wells holding that slot: every replicate and every other-drug pair
    of the slot at once, so the cost is (slots) × (wells per cell line)² × F.
    """
    x, meta = check_inputs(features, meta)
    metrics = tuple(metrics)
    if not metrics:
        raise ValueError("give at least one metric")
    well_id, group_id, slot_id = _slots(meta)
    n_wells_total = int(well_id.max()) + 1

    rep_parts: list[pd.DataFrame] = []
    other_parts: list[pd.DataFrame] = []
    for _, rows in pd.Series(np.arange(len(meta))).groupby([meta[CELL_LINE].to_numpy(), slot_id]):
        rows = rows.to_numpy()
        if rows.size < 2:
            continue
        rows = rows[np.argsort(well_id[rows], kind="stable")]  # so that a < b means well a < well b
        a, b, ga, gb, same = _pairs_in_slot(rows, group_id)
        dist = {m: pdist(x[rows], metric=m) for m in metrics}
        if same.any():
            rep_parts.append(pd.DataFrame({"group": ga[same],
                                           "pair": well_id[rows[a[same]]] * n_wells_total + well_id[rows[b[same]]],
                                           **{m: d[same] for m, d in dist.items()}}))
        if (~same).any():
            other = ~same  # an other-drug pair counts for both of its drugs
            other_parts.append(pd.DataFrame({"group": np.concatenate([ga[other], gb[other]]),
                                             **{m: np.concatenate([d[other], d[other]]) for m, d in dist.items()}}))

    groups = pd.DataFrame({"group": group_id, "well": well_id, "cell_line": meta[CELL_LINE], "drug": meta[DRUG]})
    if EFFECT in meta.columns:
        groups["effect"] = meta[EFFECT]
    by_group = groups.groupby("group", sort=True)
    table = pd.DataFrame({"cell_line": by_group.cell_line.first(), "drug": by_group.drug.first()})
    if EFFECT in meta.columns:
        table["effect"] = by_group.effect.agg(lambda s: "/".join(sorted(s.dropna().astype(str).unique())) or None)
    table["n_wells"] = by_group.well.nunique()
    table["n_images"] = by_group.size()

    rep = pd.concat(rep_parts, ignore_index=True) if rep_parts else pd.DataFrame(columns=["group", "pair", *metrics])
    oth = pd.concat(other_parts, ignore_index=True) if other_parts else pd.DataFrame(columns=["group", *metrics])
    table["n_replicate_pairs"] = rep.groupby("group").pair.nunique().reindex(table.index, fill_value=0)
    table["n_replicate_distances"] = rep.groupby("group").size().reindex(table.index, fill_value=0)
    table["n_other_distances"] = oth.groupby("group").size().reindex(table.index, fill_value=0)
    rep_median = rep.groupby("group")[list(metrics)].median().reindex(table.index)
    oth_median = oth.groupby("group")[list(metrics)].median().reindex(table.index)
    for m in metrics:
        r = rep_median[m].to_numpy(dtype=np.float64)
        o = oth_median[m].to_numpy(dtype=np.float64)
        table[f"replicate_{m}"] = r
        table[f"other_{m}"] = o
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 -> NaN and r/0 -> inf, both on purpose
            table[f"ratio_{m}"] = r / o
    return table.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------------------
# The authors' similarity and our ratio, summarised per model

def _metrics_of(tables: Mapping[str, pd.DataFrame], prefix: str) -> list[str]:
    if not tables:
        raise ValueError("give at least one model's table")
    per_model = [[c[len(prefix):] for c in t.columns if c.startswith(prefix)] for t in tables.values()]
    common = [m for m in per_model[0] if all(m in other for other in per_model[1:])]
    if not common:
        raise ValueError(f"the tables share no '{prefix}<metric>' column; were they made by replicate_distances?")
    return common


def similarity_scores(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The authors' per-row similarity, tidy: ``model, cell_line, drug, metric, replicate, similarity``.

    ``similarity = 1 / (replicate / max)``, with the max per metric over ALL models' rows (NaNs skipped). A model
    whose replicate distance is 0 (a collapsed encoder) gets ``inf``: that is the flaw ``ratio_<m>`` is there for.
    """
    metrics = _metrics_of(tables, "replicate_")
    frames = []
    for m in metrics:
        overall_max = pd.concat([t[f"replicate_{m}"] for t in tables.values()]).max()  # NaNs skipped
        for model, t in tables.items():
            values = t[f"replicate_{m}"].to_numpy(dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                similarity = 1.0 / (values / overall_max)
            frames.append(pd.DataFrame({"model": model, "cell_line": t["cell_line"].to_numpy(),
                                        "drug": t["drug"].to_numpy(), "metric": m, "replicate": values,
                                        "similarity": similarity}))
    return pd.concat(frames, ignore_index=True)


def _summarise(long: pd.DataFrame, value: str) -> pd.DataFrame:
    """median, mean abs deviation and counts of ``value`` per (model, metric), NaNs skipped as pandas does."""
    rows = []
    for (model, metric), part in long.groupby(["model", "metric"], sort=False):
        v = part[value].to_numpy(dtype=np.float64)
        kept = v[~np.isnan(v)]
        rows.append({"model": model, "metric": metric,
                     "median": float(np.median(kept)) if kept.size else float("nan"),
                     "mad": mean_abs_deviation(kept), "n": int(kept.size), "n_rows": int(v.size)})
    return pd.DataFrame(rows)


def compare_similarity(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The authors' plot numbers for several models normalised together: ``model, metric, median, mad, n, n_rows``
    (``n``: rows with a replicate value, i.e. drugs with two wells or more)."""
    return _summarise(similarity_scores(tables), "similarity")


def paper_similarity(table: pd.DataFrame) -> pd.DataFrame:
    """The authors' numbers for one model alone: ``metric, median, mad, n, n_rows``. Only comparable with other
    models' numbers when they are normalised together (``compare_similarity``)."""
    return compare_similarity({"_": table}).drop(columns="model")


def ratio_summary(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Our chance-referenced measure per model and metric: ``model, metric, median, mad, n, n_rows`` of
    ``ratio_<m>`` over (cell line, drug) rows; NaN ratios (single-well drugs, 0/0) are counted in ``n_rows`` only."""
    metrics = _metrics_of(tables, "ratio_")
    long = pd.concat([pd.DataFrame({"model": model, "metric": m, "ratio": t[f"ratio_{m}"].to_numpy(np.float64)})
                      for m in metrics for model, t in tables.items()], ignore_index=True)
    return _summarise(long, "ratio")


# ----------------------------------------------------------------------------------------------------------------------
# Plot

def _bars(ax, summary: pd.DataFrame, models: list[str], metrics: list[str], title: str, reference: float | None):
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        part = summary[summary.model == model].set_index("metric").reindex(metrics)
        xs = np.arange(len(metrics)) + (j - (len(models) - 1) / 2) * width
        med, mad = part["median"].to_numpy(np.float64), part["mad"].to_numpy(np.float64)
        finite = np.isfinite(med)
        ax.bar(xs[finite], med[finite], width, yerr=np.where(np.isfinite(mad), mad, 0)[finite], capsize=3,
               color=f"C{j % 10}")  # fixed colour per model, even when it has no finite bar
        for x_pos, v in zip(xs[~finite], med[~finite]):  # inf (collapsed encoder) or NaN (no data): say so
            ax.annotate("inf" if np.isinf(v) else "n/a", (x_pos, 0), ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="grey", lw=1, ls="--")
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_title(title)


def plot_replicates(tables: Mapping[str, pd.DataFrame], path) -> Path:
    """Two panels of bars per metric and model (median ± mean abs deviation): the authors' similarity, normalised
    across the models given, and our replicate / other-drug ratio (dashed line: chance). Returns the PNG path."""
    from matplotlib.patches import Patch

    from cellssl_jax.plotting import plt, save

    models = list(tables)
    similarity, ratio = compare_similarity(tables), ratio_summary(tables)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _bars(left, similarity, models, _metrics_of(tables, "replicate_"),
          "replicate similarity (authors: 1 / (d / max)), higher = closer", None)
    _bars(right, ratio, models, _metrics_of(tables, "ratio_"),
          "replicate / other-drug distance, lower = better", 1.0)
    # explicit handles: a model with no finite bar (collapsed) would otherwise get a legend patch of the wrong colour
    right.legend(handles=[Patch(color=f"C{j % 10}", label=model) for j, model in enumerate(models)], fontsize=8)
    return save(fig, path)
