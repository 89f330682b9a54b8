"""Encoders × tasks (cellssl_jax.compare): which images each task reads, features of just those images, and the
whole comparison ranking an encoder that knows the drugs above one that does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellssl_jax.compare import compare_encoders, compare_feature_files, read_features
from cellssl_jax.compare.selection import select_compare_rows, task_rows

ROOT = Path(__file__).resolve().parents[1]


def _meta(cell_lines=("HT29", "ACHN"), drugs=("Cladribine", "Everolimus", "Metformin"), wells=4, frames=30,
          concentrations=(0.1, 1.0), dmso_wells=6, pbs_wells=2) -> pd.DataFrame:
    """A plate's metadata: drugs at two concentrations × ``wells`` replicates, DMSO and PBS wells, ``frames`` time
    points 4 h apart; well names unique per plate (one plate per cell line)."""
    rows = []
    for p, cell_line in enumerate(cell_lines):
        n = 0

        def add(drug, conc, effect):
            nonlocal n
            n += 1
            for t in range(frames):
                rows.append({"Metadata_Plate": f"P{p + 1}", "Metadata_Well": f"W{n:02d}", "Metadata_Site": 1,
                             "Metadata_CellLine": cell_line, "Metadata_Drug": drug,
                             "Metadata_Concentration_uM": conc, "Metadata_Time_h": 4.0 * t - 4,
                             "Metadata_Effect": effect})

        for drug in drugs:
            for conc in concentrations:
                for _ in range(wells):
                    add(drug, conc, "no_effect" if conc < max(concentrations) else f"effect_{drug}")
        for _ in range(dmso_wells):
            add("DMSO", 0.0, "control")
        for _ in range(pbs_wells):
            add("PBS", 0.0, "control")
    return pd.DataFrame(rows)


def test_selection_takes_the_authors_frames_of_the_top_concentration_wells():
    meta = _meta()
    sel = select_compare_rows(meta)
    assert (sel.Metadata_Concentration_uM.isin([1.0, 0.0])).all()  # top concentration of each drug; controls at 0
    last_time = meta.Metadata_Time_h.max()
    per_well = sel.groupby(["Metadata_Plate", "Metadata_Well"])
    drug = sel.is_drug
    # Task A: the last 5 frames of every top-concentration well, drugs and controls.
    rep = task_rows(sel, "replicates").groupby(["Metadata_Plate", "Metadata_Well"]).Metadata_Time_h
    assert (rep.count() == 5).all() and (rep.max() == last_time).all() and (rep.min() == last_time - 16).all()
    # Task B: drugs' last 15, controls' last 23.
    ctl = sel[sel.controls]
    counts = ctl.groupby(["Metadata_Plate", "Metadata_Well"]).agg(n=("is_drug", "size"), drug=("is_drug", "first"))
    assert (counts[counts.drug].n == 15).all() and (counts[~counts.drug].n == 23).all()
    # Task C: drugs only, last 10.
    clu = task_rows(sel, "clustering")
    assert clu.is_drug.all() and (clu.groupby(["Metadata_Plate", "Metadata_Well"]).size() == 10).all()
    assert set(clu.Metadata_Drug) == {"Cladribine", "Everolimus", "Metformin"}
    # Every selected row is read by some task; per-well frames are the last ones (no gaps).
    assert (sel.replicates | sel.controls | sel.clustering).all()
    assert (per_well.Metadata_Time_h.max() == last_time).all()
    assert drug.any() and (~drug).any()


def test_controls_task_splits_whole_wells_and_every_drug_reaches_each_part():
    sel = select_compare_rows(_meta(), seed=3)
    ctl = sel[sel.controls]
    parts_per_well = ctl.groupby(["Metadata_Plate", "Metadata_Well"]).split.nunique()
    assert (parts_per_well == 1).all()  # no well on two sides
    assert sel[~sel.controls].split.isna().all()
    for (cell_line, drug), group in ctl.groupby(["Metadata_CellLine", "Metadata_Drug"]):
        parts = set(group.split)
        assert {"train", "test"} <= parts, (cell_line, drug, parts)
    # A different seed deals the wells differently; the same seed the same way.
    again = select_compare_rows(_meta(), seed=3)
    other = select_compare_rows(_meta(), seed=4)
    assert again.split.equals(sel.split) and not other.split.equals(sel.split)


def test_selection_and_task_rows_do_not_depend_on_the_table_row_order():
    """The same rows in another order (a shuffled or re-sorted features file) give the same wells to each split under
    one seed, and each task the same sequence of images."""
    meta = _meta()
    meta = pd.concat([meta, meta.assign(Metadata_Site=2)], ignore_index=True)  # two fields of view per well
    shuffled = meta.sample(frac=1.0, random_state=7).reset_index(drop=True)
    key = ["Metadata_CellLine", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Time_h"]
    a, b = select_compare_rows(meta, seed=3), select_compare_rows(shuffled, seed=3)
    split_a = a[a.controls].groupby(key[:3]).split.first()
    split_b = b[b.controls].groupby(key[:3]).split.first()
    pd.testing.assert_series_equal(split_a, split_b.reindex(split_a.index))
    for task in ("replicates", "controls", "clustering"):
        pd.testing.assert_frame_equal(task_rows(a, task)[key + ["split"]].reset_index(drop=True),
                                      task_rows(b, task)[key + ["split"]].reset_index(drop=True))


def test_selection_errors_name_what_is_missing():
    meta = _meta()
    with pytest.raises(ValueError, match="Metadata_Time_h"):
        select_compare_rows(meta.drop(columns="Metadata_Time_h"))
    with pytest.raises(ValueError, match="no control wells"):
        select_compare_rows(meta[~meta.Metadata_Drug.isin(["DMSO", "PBS"])])
    with pytest.raises(ValueError, match="every row is a control"):
        select_compare_rows(meta[meta.Metadata_Drug.isin(["DMSO", "PBS"])])


def _write_features(path: Path, meta: pd.DataFrame, features: np.ndarray, mode: str = "pooled") -> Path:
    table = pd.concat([meta.reset_index(drop=True),
                       pd.DataFrame(features, columns=[f"f{i:04d}" for i in range(features.shape[1])])], axis=1)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    record = json.dumps({"mode": mode}).encode()
    pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                   b"cellssl_jax.features": record}), path)
    return path


@pytest.mark.slow
def test_an_encoder_that_sees_the_drugs_beats_one_that_does_not(tmp_path):
    """Features carrying each drug's identity (a per-drug centre + noise, controls at the origin) against pure noise:
    every one of our headline figures must rank them, and the authors' replicate similarity must not be fooled into
    preferring the noise."""
    meta = _meta(frames=26)
    rng = np.random.default_rng(0)
    names = sorted(meta.Metadata_Drug.unique())
    centres = {d: (np.zeros(16) if d in ("DMSO", "PBS") else rng.normal(0, 3, 16)) for d in names}
    top = meta.Metadata_Concentration_uM == meta.groupby(["Metadata_CellLine", "Metadata_Drug"]
                                                         ).Metadata_Concentration_uM.transform("max")
    signal = np.stack([centres[d] if t else np.zeros(16) for d, t in zip(meta.Metadata_Drug, top)])
    oracle = (signal + rng.normal(0, 1, (len(meta), 16))).astype(np.float32)
    noise = rng.normal(0, 1, (len(meta), 16)).astype(np.float32)
    files = {"oracle": {"pooled": _write_features(tmp_path / "oracle.parquet", meta, oracle)},
             "noise": {"pooled": _write_features(tmp_path / "noise.parquet", meta, noise)}}
    summary = compare_feature_files(files, tmp_path / "out", progress=False)
    table = pd.DataFrame(summary["table"]).set_index("encoder")
    o, n = table.loc["oracle"], table.loc["noise"]
    assert o["replicate/other distance (euclidean, median)"] < 0.8 < n["replicate/other distance (euclidean, median)"]
    assert o["probe test balanced accuracy (val-chosen, mean over cell lines)"] > 0.9
    assert n["probe test balanced accuracy (val-chosen, mean over cell lines)"] < 0.7
    assert o["clustering ARI vs drug (best mcs)"] > 0.5 > n["clustering ARI vs drug (best mcs)"] + 0.3
    for name in ("summary.csv", "summary.json", "replicates.csv", "probe_grid.csv", "clustering.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    for figure in summary["figures"]:
        assert (tmp_path / "out" / figure["path"]).is_file()


def test_read_features_refuses_a_file_without_feature_columns(tmp_path):
    path = tmp_path / "meta_only.parquet"
    _meta(frames=2).to_parquet(path)
    with pytest.raises(ValueError, match="no feature columns"):
        read_features(path)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """One cell line: 3 drugs at 2 concentrations × 4 wells, 4 DMSO and 2 PBS wells, 6 frames, built at 64 px; a
    small ConvAE checkpoint."""
    from cellssl_jax.models.convae import ConvAE
    from cellssl_jax.training.checkpoint import save_params_checkpoint
    from data_pipelines.build import BuildOptions, build_dataset
    from data_pipelines.synthetic import render_plate

    root = tmp_path_factory.mktemp("compare_plate")
    manifest = render_plate(root / "plate", "demo", seed=0, progress=False, cell_lines=["HT29"],
                            drugs=["Cladribine", "Everolimus", "Metformin"], n_concentrations=2,
                            active_concentrations=1, replicates=4, n_dmso=4, n_pbs=2, frame_interval_h=20.0)
    build_dataset(manifest, root / "dataset", BuildOptions(image_size=64), progress=False)
    cfg = {"in_channels": 1, "encoder_widths": [8, 8, 8], "latent_channels": 4, "decoder_widths": [8, 8, 8],
           "formulation": "subpixel", "dtype": "float32", "image_size": 64}
    model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))
    params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 1), np.float32))["params"]
    save_params_checkpoint(root / "small", params, cfg)
    return root


@pytest.mark.slow
def test_compare_encoders_extracts_only_the_selected_images_and_equals_full_extraction(small_dataset, tmp_path):
    from cellssl_jax.features import extract_from_checkpoint
    from data_pipelines.source import load_dataset_manifest, readable_rows

    data = small_dataset / "dataset"
    summary = compare_encoders({"small": small_dataset / "small", "init": "random:1"}, data, tmp_path / "cmp",
                               modes=("pooled",), progress=False)
    assert [(r["encoder"], r["mode"]) for r in summary["table"]] == [("small", "pooled"), ("init", "pooled")]
    sel = select_compare_rows(readable_rows(load_dataset_manifest(data)))
    feats, meta = read_features(tmp_path / "cmp" / "features" / "small_pooled.parquet")
    assert len(meta) == len(sel) < len(load_dataset_manifest(data))
    # The rows of the selection only, with the same features a full extraction gives them.
    full = pd.read_parquet(extract_from_checkpoint(small_dataset / "small", data, tmp_path / "full.parquet",
                                                   mode="pooled", progress=False))
    key = ["Metadata_Plate", "Metadata_Well", "Metadata_Time_h"]
    fcols = [c for c in full.columns if c.startswith("f")]
    joined = meta.assign(_i=np.arange(len(meta))).merge(full, on=key, suffixes=("", "_full"))
    assert len(joined) == len(meta)
    np.testing.assert_allclose(feats[joined._i.to_numpy()], joined[fcols].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_cli_compares_feature_files(small_dataset, tmp_path):
    from cellssl_jax.features import extract_from_checkpoint

    path = extract_from_checkpoint(small_dataset / "small", small_dataset / "dataset", tmp_path / "f.parquet",
                                   mode="pooled", progress=False)
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "evaluate.py", "compare", "--features", f"small={path}",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "small" in result.stdout and (out / "summary.json").is_file()
    bad = subprocess.run([sys.executable, "evaluate.py", "compare", "--features", f"a b={path}", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "encoder name" in bad.stderr


def test_strategy_scores_rescale_the_authors_parts_over_the_encoders_of_a_mode():
    from cellssl_jax.compare.evaluate import strategy_scores

    def row(encoder, mode, eu, bc, acc, sil, ch, inv_db):
        return {"encoder": encoder, "mode": mode, "_euclidean": eu, "_braycurtis": bc, "_max_accuracy": acc,
                "authors: silhouette (median, filtered)": sil, "_calinski_harabasz": ch,
                "authors: 1/DB (median, filtered)": inv_db}

    rows = [row("a", "pooled", 1.0, 2.0, 0.9, 0.5, 100.0, 1.0), row("b", "pooled", 2.0, 4.0, 0.7, 0.25, 50.0, 0.5),
            row("c", "pooled", 4.0, 2.0, 0.8, 0.5, 100.0, 0.5), row("a", "latent", 1.0, 1.0, 0.5, 1.0, 1.0, 1.0)]
    out = pd.DataFrame(strategy_scores(rows)).set_index(["encoder", "mode"])
    assert not any(c.startswith("_") for c in out.columns)
    sim = out["authors: similarity score (0–1 over encoders)"]
    # raw similarity 1 / mean(eu/max, bc/max): a 1/((0.25+0.5)/2) = 2.667, b 1/((0.5+1)/2) = 1.333, c 1/((1+0.5)/2) = 1.333
    assert sim[("a", "pooled")] == pytest.approx(1.0) and sim[("b", "pooled")] == pytest.approx(0.0)
    assert sim[("c", "pooled")] == pytest.approx(0.0)
    cls = out["authors: classification score (0–1 over encoders)"]
    assert cls[("c", "pooled")] == pytest.approx(0.5)
    clu = out["authors: clustering score (0–1 over encoders)"]
    # raw a 1, b 0.5, c (1 + 1 + 0.5) / 3 = 0.833 → 1, 0, 0.667
    assert clu[("c", "pooled")] == pytest.approx(2 / 3)
    assert np.isnan(sim[("a", "latent")])  # one encoder in its mode: nothing to rank


@pytest.mark.slow
def test_training_runs_the_compare_evaluator_on_its_schedule(small_dataset, tmp_path):
    """config.evals.compare.every_steps: the loop hands its parameters to the evaluator at steps 2 and 3 (the last),
    and the scalars land in metrics.jsonl beside the tables the evaluator wrote."""
    import importlib.util

    from cellssl_jax.training.loop import train_and_evaluate

    spec = importlib.util.spec_from_file_location("training_config", ROOT / "tests" / "training_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.dataset_dir = str(small_dataset / "dataset")
    cfg.total_steps, cfg.checkpoint.every_steps, cfg.image_every = 3, 3, 0
    cfg.evals.compare.every_steps = 2
    summary = train_and_evaluate(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in rows if any(k.startswith("eval/compare/") for k in r)}
    assert sorted(evaluated) == [2, 3]
    last = evaluated[3]
    for key in ("replicate_other_ratio", "probe_test_balanced_accuracy", "ari_effect", "authors_probe_train_accuracy"):
        assert np.isfinite(last[f"eval/compare/pooled/{key}"]), key
    assert 0.0 <= last["eval/compare/pooled/probe_test_balanced_accuracy"] <= 1.0
    assert summary["evals"]["compare"] == {k[len("eval/compare/"):]: v for k, v in last.items()
                                           if k.startswith("eval/compare/")}
    step_dir = tmp_path / "run" / "evals" / "compare" / "step_3"
    assert (step_dir / "summary.json").is_file() and (step_dir / "features" / "run_pooled.parquet").is_file()


def test_evaluators_refuse_unknown_names_and_the_lens_objective():
    from cellssl_jax.training.loop import build_evaluators
    from configs.common import base_config

    cfg = base_config()
    assert build_evaluators(cfg, "autoencoder") == {}  # every_steps 0: off
    cfg.evals.compare.every_steps = 5
    with pytest.raises(ValueError, match="dataset_dir"):
        build_evaluators(cfg, "autoencoder")
    with pytest.raises(ValueError, match="lens"):
        build_evaluators(cfg, "lens")
    cfg.evals.other = {"every_steps": 1}
    with pytest.raises(ValueError, match="unknown evaluator"):
        build_evaluators(cfg, "autoencoder")
