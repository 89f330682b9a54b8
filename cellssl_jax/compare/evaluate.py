"""Encoders × tasks: the authors' comparison of feature extractors (../shared/docs/original_method.md §4), as the
yardstick for ablations of augmentation and crop settings and for our ConvAE against theirs.

    compare_encoders({"ours": "runs/demo/train", "authors": "runs/demo/authors", "random": "random"},
                     "runs/demo/dataset", "runs/demo/compare")

1. ``selection.select_compare_rows`` picks each task's images from the dataset's manifest (top-concentration wells,
   the last frames of each well; the controls task's wells split into train / val / test).
2. The features room extracts, for those images only, the features of every encoder in every feature mode (one pass
   per encoder) into ``out_dir/features/<encoder>_<mode>.parquet``. An encoder is a checkpoint (trained, imported,
   or a lens run's ConvAE) or ``random[:SEED]``: the paper's ConvAE at its initialisation, the floor any training must
   clear (a random convolutional network's features are not nothing).
3. Per (encoder, mode): task A, replicate similarity (``replicates``); task B, drugs against controls with the
   authors' MLP probe over their SGD grid, per cell line (``probe``); task C, clustering within cell lines
   (``clustering``).
4. Tables, figures and ``summary.json`` under ``out_dir``, with the authors' own figures of merit beside ours.

Where the authors' numbers mislead, ours stand beside them. Their similarity (1 / normalised replicate distance)
rewards a collapsed encoder, so the replicate distance is also given relative to the distance between wells of
other drugs (``ratio``: 1 = replicates no closer than other drugs). Their probe was scored on its training images at
the best training epoch; ours is chosen on val wells and scored on test wells. Their clustering scores (silhouette,
CH, DB on a 2-D embedding) say how clumpy the embedding is, not whether the clumps are drugs; on a synthetic plate the
planted effects say that (``ari_effect``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellssl_jax.arrays import json_default
from cellssl_jax.compare import clustering, probe, replicates
from cellssl_jax.compare.selection import select_compare_rows, task_rows

log = logging.getLogger(__name__)

FEATURE_MODES = ("pooled", "latent")  # compared by default, the project's default first


def check_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The feature modes as a tuple, or a ValueError naming the ones the features room does not know."""
    from cellssl_jax.features import FEATURE_MODES as KNOWN

    bad = [m for m in modes if m not in KNOWN]
    if bad or not modes:
        raise ValueError(f"feature modes must be among {KNOWN}, got {list(modes)}")
    return tuple(modes)
RANDOM = "random"


def load_encoder(spec: str | Path, image_size: int = 128):
    """``(params, model, description)`` for a checkpoint folder or ``random[:SEED]`` (the paper's ConvAE at init)."""
    import jax

    from cellssl_jax.models.convae import init_params, model_from_config
    from cellssl_jax.training.checkpoint import load_encoder_params

    text = str(spec)
    if text == RANDOM or text.startswith(RANDOM + ":"):
        seed = int(text.split(":", 1)[1]) if ":" in text else 0
        model = model_from_config({})
        return init_params(model, jax.random.key(seed), image_size), model, f"paper ConvAE at init (seed {seed})"
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"encoder {text!r}: no such checkpoint folder (or use 'random[:SEED]')")
    params, model_cfg, description = load_encoder_params(path)
    return params, model_from_config(model_cfg), description


def extract_encoder_features(encoders: Mapping[str, str | Path], dataset_dir: str | Path, out_dir: str | Path,
                             selection: pd.DataFrame, *, modes: Sequence[str] = FEATURE_MODES,
                             batch_size: int = 128, progress: bool = True) -> dict[str, dict[str, Path]]:
    """Features of the selected images for every encoder: ``{encoder: {mode: parquet}}``."""
    files: dict[str, dict[str, Path]] = {}
    for name, spec in encoders.items():
        params, model, description = load_encoder(spec)
        log.info("encoder %s (%s): features of %d images", name, description, len(selection))
        files[name] = extract_selected(params, model, dataset_dir, out_dir, selection, name=name, modes=modes,
                                       batch_size=batch_size, progress=progress, description=description)
    return files


def extract_selected(params, model, dataset_dir: str | Path, out_dir: str | Path, selection: pd.DataFrame, *,
                     name: str, modes: Sequence[str] = FEATURE_MODES, batch_size: int = 128, progress: bool = True,
                     description: str = "") -> dict[str, Path]:
    """One encoder's features of the selected images, one pass for every mode: ``{mode: out_dir/features/<name>_<mode>
    .parquet}``. Every process must call it (the extraction is sharded); process 0 writes."""
    from cellssl_jax.features import extract_features

    paths = {m: Path(out_dir) / "features" / f"{name}_{m}.parquet" for m in modes}
    extract_features(params, model, dataset_dir, paths, batch_size=batch_size, progress=progress,
                     source_indices=np.sort(selection.source_index.to_numpy()),
                     provenance={"encoder": name, "checkpoint": description})
    return paths


def feature_file_mode(path: str | Path) -> str:
    """The feature mode a features Parquet was written with (``pooled``, ``latent``; ``features`` if unrecorded)."""
    from cellssl_jax.features import read_feature_metadata

    if not Path(path).is_file():
        raise FileNotFoundError(f"features file {path} not found")
    return str(read_feature_metadata(path).get("mode", "features"))


def read_features(path: str | Path) -> tuple[np.ndarray, pd.DataFrame]:
    """``(features float32 [N, F], metadata)`` of a features Parquet (``evaluate.py features`` writes them)."""
    table = pd.read_parquet(path)
    feature_cols = [c for c in table.columns if c.startswith("f") and c[1:].isdigit()]
    if not feature_cols:
        raise ValueError(f"{path}: no feature columns (f0000, …); write one with `evaluate.py features`")
    meta = table[[c for c in table.columns if c.startswith("Metadata_")]]
    return table[feature_cols].to_numpy(np.float32), meta


def compare_feature_files(files: Mapping[str, Mapping[str, str | Path]], out_dir: str | Path, *, seed: int = 0,
                          paper_faithful: bool = False, frames: dict[str, int] | None = None,
                          progress: bool = True, provenance: dict | None = None) -> dict[str, Any]:
    """Run the three tasks on feature files ``{encoder: {mode: parquet}}`` (full-plate files from ``evaluate.py
    features`` work too: each task selects its rows from the files' ``Metadata_*`` columns); write everything under
    ``out_dir``; return the summary."""
    _check_names(files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep_tables, probe_grids, cluster_tables = {}, {}, {}
    rows = []
    for encoder, by_mode in files.items():
        for mode, path in by_mode.items():
            label = f"{encoder} · {mode}"
            features, meta = read_features(path)
            # The selection keeps the table's index: after reset_index, a row's position in the file, so each task
            # picks its feature rows with features[rows.index].
            selection = select_compare_rows(meta.reset_index(drop=True), frames=frames, seed=seed)

            rep = task_rows(selection, "replicates")
            rep_tables[label] = replicates.replicate_distances(features[rep.index.to_numpy()], rep)

            grids = []
            ctl = task_rows(selection, "controls")
            for cell_line, part in ctl.groupby("Metadata_CellLine", sort=True):
                grid = probe.controls_probe(features[part.index.to_numpy()], part.is_drug.to_numpy(),
                                            part.split.to_numpy().astype(str), seed=seed,
                                            paper_faithful=paper_faithful)
                grids.append(grid.assign(cell_line=cell_line))
            probe_grids[label] = pd.concat(grids, ignore_index=True)

            clu = task_rows(selection, "clustering")
            cluster_tables[label] = clustering.cluster_all(features[clu.index.to_numpy()], clu, seed=seed,
                                                            progress=progress)
            rows.append({"encoder": encoder, "mode": mode, "label": label, "images": int(len(selection)),
                         "features": int(features.shape[1])})
            log.info("compared %s", label)

    _write_tidy(rep_tables, out / "replicates.csv")
    _write_tidy(probe_grids, out / "probe_grid.csv")
    _write_tidy(cluster_tables, out / "clustering.csv")
    summary = {"encoders": rows, "paper_faithful": paper_faithful, "seed": seed, **(provenance or {})}
    summary["table"] = _headline(rep_tables, probe_grids, cluster_tables, rows)
    pd.DataFrame(summary["table"]).to_csv(out / "summary.csv", index=False)
    figures = [
        {"path": replicates.plot_replicates(rep_tables, out / "replicates.png"),
         "caption": "task A: replicate wells against wells of other drugs (ratio of median distances; 1 = no closer)"},
        {"path": probe.plot_probe(probe_grids, out / "probe.png"),
         "caption": "task B: drugs against controls, MLP probes over the authors' SGD grid, held-out wells"},
        {"path": clustering.plot_clustering(cluster_tables, out / "clustering.png"),
         "caption": "task C: clustering within cell lines over min_cluster_size (spectral 2-D embedding + HDBSCAN)"},
    ]
    summary["figures"] = [{"path": str(Path(f["path"]).relative_to(out)), "caption": f["caption"]} for f in figures]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    return summary


def compare_encoders(encoders: Mapping[str, str | Path], dataset_dir: str | Path, out_dir: str | Path, *,
                     modes: Sequence[str] = FEATURE_MODES, seed: int = 0, paper_faithful: bool = False,
                     frames: dict[str, int] | None = None, batch_size: int = 128,
                     progress: bool = True) -> dict[str, Any]:
    """Extract the features the tasks need for every encoder, then ``compare_feature_files``."""
    from data_pipelines.source import load_dataset_manifest, readable_rows

    modes = check_modes(modes)
    if not encoders:
        raise ValueError("no encoder to compare")
    _check_names(encoders)
    selection = select_compare_rows(readable_rows(load_dataset_manifest(dataset_dir)), frames=frames, seed=seed)
    files = extract_encoder_features(encoders, dataset_dir, out_dir, selection, modes=modes, batch_size=batch_size,
                                     progress=progress)
    return compare_feature_files(files, out_dir, seed=seed, paper_faithful=paper_faithful, frames=frames,
                                 progress=progress, provenance={"dataset": str(dataset_dir), "encoder_specs": {
                                     k: str(v) for k, v in encoders.items()}})


def _check_names(names) -> None:
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"encoder name {name!r}: use letters, digits and _ . + - (it names files and tables)")


def _write_tidy(tables: Mapping[str, pd.DataFrame], path: Path) -> None:
    frames = []
    for label, df in tables.items():
        encoder, mode = label.split(" · ")
        frames.append(df.assign(encoder=encoder, mode=mode))
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)


def _headline(rep_tables, probe_grids, cluster_tables, rows) -> list[dict]:
    """One row per (encoder, mode): our figures first, then the authors'."""
    ratios = replicates.ratio_summary(rep_tables)
    paper_sim = replicates.compare_similarity(rep_tables)  # normalised over every encoder compared, as their plot
    # The authors' indices after their plot filters (which also drop clean separations: a strongly clustered
    # embedding has CH > 9999).
    clusters_paper = clustering.summarise(cluster_tables, apply_filter=True)

    def best_ari(label, column):
        """ARI at the sweep's best min_cluster_size, per cell line, averaged: a median over the sweep would be
        decided by sizes larger than a drug's image count, where no drug can form a cluster of its own."""
        df = cluster_tables[label]
        return float(df[df.n_clusters.notna()].groupby("cell_line")[column].max().mean())

    def pick(df, label, column, value, field="median"):
        hit = df[(df.model == label) & (df[column] == value)]
        return float(hit[field].iloc[0]) if len(hit) else float("nan")

    table = []
    for r in rows:
        label = r["label"]
        grid = probe_grids[label]
        best = pd.DataFrame([probe.best_config(g) for _, g in grid.groupby("cell_line")])
        paper = probe.paper_summary(grid)
        table.append({
            "encoder": r["encoder"], "mode": r["mode"], "features": r["features"],
            "replicate/other distance (euclidean, median)": pick(ratios, label, "metric", "euclidean"),
            "probe test balanced accuracy (val-chosen, mean over cell lines)": float(best.balanced_accuracy_test.mean()),
            "probe test F1": float(best.f1_test.mean()),
            "clustering ARI vs planted effect (best mcs)": best_ari(label, "ari_effect"),
            "clustering ARI vs drug (best mcs)": best_ari(label, "ari_drug"),
            "authors: replicate similarity (euclidean)": pick(paper_sim, label, "metric", "euclidean"),
            "authors: probe train accuracy (median, lr > 0.01)": float(paper["acc_median"]),
            "authors: silhouette (median, filtered)": pick(clusters_paper, label, "measure", "silhouette"),
            "authors: 1/DB (median, filtered)": pick(clusters_paper, label, "measure", "inv_davies_bouldin"),
            "authors: sweep rows kept by their filters": pick(clusters_paper, label, "measure", "silhouette", "n_kept"),
            # Raw parts of the authors' cropping-strategy summary (strategy_scores)
            "_euclidean": float(np.nanmedian(rep_tables[label].replicate_euclidean)),
            "_braycurtis": float(np.nanmedian(rep_tables[label].replicate_braycurtis)),
            "_max_accuracy": float(grid.acc_train_best.max()),
            "_calinski_harabasz": pick(clusters_paper, label, "measure", "calinski_harabasz"),
        })
    return strategy_scores(table)


def strategy_scores(table: list[dict]) -> list[dict]:
    """The authors' cropping-strategy summary (../shared/docs/original_method.md §4.4), per feature mode over the
    encoders compared: similarity = 1 / mean(euclidean / max, braycurtis / max) of the median replicate distances;
    classification = the best training accuracy of any probe config; clustering = mean(silhouette / max, CH / max,
    (1/DB) / max); each then rescaled to [0, 1] over the encoders (the best 1, the worst 0). Relative numbers: they
    rank the encoders of one comparison and mean nothing alone (NaN when all encoders score the same, e.g. one
    encoder, or every probe fitting its training set)."""
    df = pd.DataFrame(table)
    parts = {"similarity": lambda g: 1.0 / ((g._euclidean / g._euclidean.max() + g._braycurtis / g._braycurtis.max())
                                            / 2),
             "classification": lambda g: g._max_accuracy,
             "clustering": lambda g: (g["authors: silhouette (median, filtered)"]
                                      / g["authors: silhouette (median, filtered)"].max()
                                      + g._calinski_harabasz / g._calinski_harabasz.max()
                                      + g["authors: 1/DB (median, filtered)"]
                                      / g["authors: 1/DB (median, filtered)"].max()) / 3}
    for name, score in parts.items():
        column = f"authors: {name} score (0–1 over encoders)"
        df[column] = np.nan
        for _, group in df.groupby("mode"):
            raw = score(group)
            span = raw.max() - raw.min()
            df.loc[group.index, column] = (raw - raw.min()) / span if span > 0 else np.nan
    return df.drop(columns=[c for c in df.columns if c.startswith("_")]).to_dict(orient="records")
