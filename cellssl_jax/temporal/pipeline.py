"""The temporal analysis end to end: ``run_temporal`` is what ``python evaluate.py temporal …`` calls.

features Parquet ─► distances.csv ─► series.csv ─► DTW matrix ─► a clustering per k in k_range ─► k_selection.csv
  (or a distances CSV) ┘                                          └─► chosen k ─► cluster_effects.csv, clusters.csv,
                                                                                  summary.json, figures/*.png

Every series is clustered, controls included (PBS like a drug, as the original did, and the DMSO-vs-DMSO noise
curves as known no-effect members); controls are left out of the figures and the score, and the summary says which
effect they were given, a built-in check that noise lands in "no_effect".
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellssl_jax.temporal import clustering, dtw, effects, plots
from cellssl_jax.temporal import distances as curves

log = logging.getLogger(__name__)

# The level unit of the effect rules when no noise level is known: this percentile of all drug-series values
# (controls excluded), so the rules read any scale alike.
LEVEL_UNIT_PERCENTILE = 95.0


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def run_temporal(features=None, distances=None, out_dir=None, *, metric: str = "euclidean",
                 feature_scale: str = curves.DEFAULT_FEATURE_SCALE, scale: str = curves.DEFAULT_SCALE,
                 method: str = "kmeans", k: int | None = None,
                 k_range: tuple[int, int] = (2, 9), window: int | None = None, paper_faithful: bool = False,
                 ground_truth=None, mapping=None, seed: int = 0, figures: bool = True, progress: bool = True,
                 control_concentration_uM: float | None = None
                 ) -> dict:
    """Run the temporal drug-effect analysis and write its outputs under ``out_dir``; returns the summary.

    features: a features Parquet path (or a DataFrame with ``Metadata_*`` and ``f0000…`` columns).
    distances: instead of features, a CSV (or DataFrame) of ``cell_line, drug, concentration_uM, time_h,
        distance[, plate]``, e.g. the ``distances.csv`` of an earlier run.
    metric: feature-space distance to control (euclidean = paper; cosine, correlation, braycurtis).
    feature_scale: 'dmso' (default): every feature in units of its DMSO replicate spread on the plate, features
        without spread dropped; 'none': raw features (paper). Ignored for ``distances`` input.
    control_concentration_uM: the DMSO concentration of the control wells (the original's: 367); None = each
        plate's most common (``distances.control_rows``). Ignored for ``distances`` input.
    scale: 'noise' (default: units of the plate's DMSO-vs-DMSO noise), 'plate', 'cell_drug' (paper), 'none';
        see ``distances.scale_series``; None = the default.
    method: 'kmeans' (DTW + DBA, paper), 'kmedoids', 'average_linkage'.
    k: the number of clusters; None chooses it in ``k_range`` (inclusive) by the DTW silhouette.
    window: Sakoe–Chiba radius of every DTW; None = unconstrained (paper).
    paper_faithful: floor control-time matching, and the original's dropped first and last points.
    ground_truth: CSV of planted effects (``cell_line, drug, concentration_uM, effect``) to score against.
    mapping: JSON/CSV cluster → effect overriding the rules (needs ``k``, since ids refer to one clustering).
    figures: write the PNGs under ``out_dir/figures`` (the slowest step on a small machine).
    """
    scale = curves.DEFAULT_SCALE if scale is None else scale
    if (features is None) == (distances is None):
        raise ValueError("give exactly one of features (Parquet) or distances (CSV)")
    if out_dir is None:
        raise ValueError("out_dir is required")
    if mapping is not None and k is None:
        raise ValueError("a cluster → effect mapping refers to one clustering: give k with it")
    if method not in clustering.METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {clustering.METHODS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 1. distances
    t0 = time.perf_counter()
    if features is not None:
        if isinstance(features, pd.DataFrame):
            raw = curves.distances_from_features(features, metric=metric, paper_faithful=paper_faithful,
                                                 progress=progress, feature_scale=feature_scale,
                                                 control_concentration_uM=control_concentration_uM)
            input_desc = {"features": "DataFrame"}
        else:
            raw = curves.distances_from_parquet(features, metric=metric, paper_faithful=paper_faithful,
                                                progress=progress, feature_scale=feature_scale,
                                                control_concentration_uM=control_concentration_uM)
            input_desc = {"features": str(features)}
    else:
        if isinstance(distances, pd.DataFrame):
            raw = curves.check_distance_table(distances)
            input_desc = {"distances": "DataFrame"}
        else:
            raw = curves.read_distances(distances)
            input_desc = {"distances": str(distances)}
    raw = raw[curves.DISTANCE_COLUMNS]
    raw.to_csv(out / "distances.csv", index=False)
    timings["distances_s"] = time.perf_counter() - t0

    # 2. series
    series = curves.build_series(raw, scale=scale, paper_faithful=paper_faithful)
    series.to_frame().to_csv(out / "series.csv", index=False)
    series.reference.to_csv(out / "scale_reference.csv", index=False)
    values = series.values
    is_control = series.is_control()
    log.info("%d series of %d points (%d controls)", len(values), values.shape[1], int(is_control.sum()))

    # 3. DTW matrix and clustering
    t0 = time.perf_counter()
    dist = np.asarray(dtw.distance_matrix(values, window=window))
    timings["dtw_matrix_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k_values = [k] if k is not None else list(range(k_range[0], k_range[1] + 1))
    k_table, results, best_k = clustering.select_k(values, k_values, method=method, dist=dist, window=window,
                                                   seed=seed, progress=progress)
    timings["clustering_s"] = time.perf_counter() - t0
    k_table.to_csv(out / "k_selection.csv", index=False)
    chosen = results[best_k]

    # 4. effects
    drug_values = values[~is_control] if (~is_control).any() else values
    level_unit = float(np.percentile(drug_values, LEVEL_UNIT_PERCENTILE))
    noise = curves.noise_level(series)
    hand_mapping = effects.load_mapping(mapping, chosen.k) if mapping is not None else None
    cluster_table = effects.map_clusters(chosen.centroids, level_unit=level_unit, noise_level=noise,
                                         mapping=hand_mapping)
    cluster_table.insert(1, "n_series", np.bincount(chosen.labels, minlength=chosen.k))
    cluster_table.to_csv(out / "cluster_effects.csv", index=False)
    effect_of = cluster_table["effect"].to_numpy()

    assigned = series.meta.copy()
    assigned["cluster"] = chosen.labels
    assigned["effect"] = effect_of[chosen.labels]
    assigned["is_control"] = is_control

    # 5. score
    score = None
    if ground_truth is not None:
        truth = (ground_truth if isinstance(ground_truth, pd.DataFrame)
                 else effects.read_ground_truth(ground_truth))
        score = effects.score_effects(assigned, truth)
        lookup = dict(zip(zip(truth["cell_line"].astype(str), truth["drug"].astype(str),
                              effects.concentration_key(truth["concentration_uM"])), truth["effect"]))
        assigned["effect_true"] = [lookup.get((c, d, x)) for c, d, x in zip(
            assigned["cell_line"], assigned["drug"], effects.concentration_key(assigned["concentration_uM"]))]
    assigned.to_csv(out / "clusters.csv", index=False)

    # 6. figures (controls left out); an earlier run's PNGs in the same folder go first, so that what lies in
    # figures/ (and the summary's file list) is this run's alone
    figure_paths = []
    for stale in sorted((out / "figures").glob("*.png")):
        stale.unlink()
    if figures:
        figure_paths = _write_figures(out / "figures", values, chosen, cluster_table, k_table, best_k, assigned,
                                      score, seed=seed, title=f"{method}, k={chosen.k}, scale={scale}, metric={metric}",
                                      noise_multiple=effects.NOISE_MULTIPLE if noise is not None else None)

    control_effects = (assigned[assigned["is_control"]].groupby(["drug", "effect"]).size()
                       .unstack(fill_value=0).to_dict(orient="index"))
    summary = dict(
        input=input_desc,
        options=dict(metric=metric, feature_scale=feature_scale if features is not None else None,
                     control_concentration_uM=control_concentration_uM if features is not None else None, scale=scale,
                     method=method, k=k, k_range=list(k_range), window=window,
                     paper_faithful=paper_faithful, seed=seed, mapping=None if mapping is None else str(mapping),
                     ground_truth=None if ground_truth is None or isinstance(ground_truth, pd.DataFrame)
                     else str(ground_truth)),
        n_series=int(len(values)), series_length=int(values.shape[1]), n_control_series=int(is_control.sum()),
        chosen_k=int(best_k), k_chosen_by="given" if k is not None else "silhouette_dtw",
        level_unit=level_unit, noise_level=noise,
        cluster_effects=dict(zip(map(str, cluster_table["cluster"]), cluster_table["effect"])),
        effect_counts=assigned.loc[~assigned["is_control"], "effect"].value_counts().to_dict(),
        control_effects=control_effects,
        score=score,
        timings_s={key: round(val, 3) for key, val in timings.items()},
        files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) + ["summary.json"],
        figures=[str(Path(f).relative_to(out)) for f in figure_paths],
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return summary


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _write_figures(fig_dir: Path, values, chosen, cluster_table, k_table, best_k, assigned, score, *, seed, title,
                   noise_multiple=None):
    drugs_only = ~assigned["is_control"].to_numpy()
    written = [
        plots.plot_clusters(values[drugs_only], chosen.labels[drugs_only], chosen.centroids,
                            list(cluster_table["effect"]), fig_dir / "clusters.png", title=title, seed=seed),
        plots.plot_k_selection(k_table, fig_dir / "k_selection.png", chosen_k=best_k),
    ]
    table = assigned[drugs_only]
    if len(table):
        for cell_line in sorted(table["cell_line"].unique()):
            written.append(plots.plot_effect_grid(table, cell_line, fig_dir / f"effects_{_slug(cell_line)}.png"))
        written.append(plots.plot_top_concentration_heatmap(table, fig_dir / "effects_top_concentration.png"))
    if score is not None and score["n_scored"] and "effect_true" in assigned.columns:
        scored = drugs_only & assigned["effect_true"].notna().to_numpy()
        noise = values[(assigned["drug"] == curves.CONTROL_DRUG).to_numpy()]
        written.append(plots.plot_series_by_truth(values[scored], assigned[scored], noise,
                                                  fig_dir / "series_by_truth.png", noise_multiple=noise_multiple,
                                                  title=f"series by planted effect ({title})"))
    if score is not None and score["n_scored"]:
        written.append(plots.plot_confusion(score["confusion_matrix"], score["confusion_labels"],
                                            fig_dir / "confusion.png",
                                            title=f"planted vs recovered (ARI {score['adjusted_rand_index']:.2f})"))
    return written
