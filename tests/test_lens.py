"""The lens task: image selection and split (data_pipelines.lens_data), the objective's gradients and optimizer
(training/objectives/lens.py), and the whole path train.py → evaluate.py lens on a small rendered plate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from cellssl_jax.models.convae import ConvAE
from cellssl_jax.training.objectives.autoencoder import bce_with_logits
from cellssl_jax.training.objectives.lens import (
    LensObjective, cross_entropy, feature_norm, flat_latent, lens_optimizer, standardize,
)
from data_pipelines.lens_data import LabelledSource, class_order, load_masks, select_lens_images

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ selection, split


def _manifest(n_wells=(("DMSO", 6), ("PBS", 2), ("Cladribine", 5), ("Metformin", 1)), frames=8, lines=("A", "B")):
    rows, row_id = [], 0
    for line in lines:
        for drug, wells in n_wells:
            for conc in (0.1, 1.0):
                for w in range(wells):
                    for t in range(frames):
                        rows.append({"row_id": row_id, "Metadata_Plate": f"{line}_P1",
                                     "Metadata_Well": f"{drug[:3]}{conc}{w:02d}", "Metadata_Site": 1,
                                     "Metadata_CellLine": line, "Metadata_Drug": drug,
                                     "Metadata_Concentration_uM": conc, "Metadata_Time_h": 4.0 * t,
                                     "quarantine_reason": None})
                        row_id += 1
    return pd.DataFrame(rows)


def test_selection_takes_top_concentration_capped_wells_and_last_frames():
    manifest = _manifest()
    sel = select_lens_images(manifest, last_n=3, max_wells=4)
    t = sel.table
    assert sel.classes == ("DMSO", "PBS", "Metformin", "Cladribine")  # controls first, then the authors' order
    assert (t.label == t.class_name.map({c: i for i, c in enumerate(sel.classes)})).all()
    top = manifest.set_index("row_id").loc[t.row_id]
    assert (top.Metadata_Concentration_uM == 1.0).all()
    assert t.groupby(["cell_line", "class_name"]).well.nunique().max() == 4  # DMSO's 6 and Cladribine's 5 capped
    assert (t.groupby(["plate", "well"]).size() == 3).all()
    assert set(top.Metadata_Time_h) == {20.0, 24.0, 28.0}  # the last 3 of 8 frames
    assert (t.source_index == t.row_id).all()  # nothing quarantined: source order = manifest order


def test_split_by_well_never_shares_a_well_and_keeps_train_and_test_per_class():
    sel = select_lens_images(_manifest(), last_n=3, max_wells=4, seed=3)
    t = sel.table
    assert (t.groupby(["plate", "well"]).split.nunique() == 1).all()
    parts = t.groupby(["cell_line", "class_name"]).split.agg(set)
    for key, splits in parts.items():
        wells = t[(t.cell_line == key[0]) & (t.class_name == key[1])].well.nunique()
        if wells >= 2:
            assert {"train", "test"} <= splits, key
        else:
            assert splits == {"train"}, key  # one well: it trains, nothing to hold out
    # 4 wells: one test, one val, two train
    dmso = t[(t.cell_line == "A") & (t.class_name == "DMSO")].groupby("split").well.nunique().to_dict()
    assert dmso == {"test": 1, "val": 1, "train": 2}
    again = select_lens_images(_manifest(), last_n=3, max_wells=4, seed=3).table
    pd.testing.assert_frame_equal(t, again)


def test_paper_faithful_split_is_image_level_ten_percent():
    t = select_lens_images(_manifest(), last_n=3, paper_faithful=True).table
    assert set(t.split) == {"train", "test"}
    assert abs((t.split == "test").mean() - 0.1) < 0.02
    assert (t.groupby(["plate", "well"]).split.nunique() == 2).any()  # frames of one well on both sides


def test_quarantined_rows_are_skipped_and_source_index_follows_the_kept_rows():
    manifest = _manifest()
    manifest.loc[0, "quarantine_reason"] = "unreadable"
    t = select_lens_images(manifest, last_n=8, max_wells=6).table
    assert 0 not in set(t.row_id)
    assert (t.source_index == t.row_id - 1).all()


def test_class_order_puts_controls_first_then_catalogue_then_others():
    assert class_order(["Zeta", "Topotecan", "PBS", "Cladribine", "DMSO"]) == (
        "DMSO", "PBS", "Cladribine", "Topotecan", "Zeta")


def test_missing_columns_and_masks_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Metadata_Time_h"):
        select_lens_images(_manifest().drop(columns="Metadata_Time_h"))
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        load_masks([str(tmp_path / "nowhere.png")])


def test_labelled_source_adds_labels_and_keeps_the_element():
    base = [{"image": np.full((2, 2, 1), i, np.uint8), "row_id": np.int64(i)} for i in range(5)]
    src = LabelledSource(base, [4, 1], [7, 2])
    assert len(src) == 2
    assert src[0]["row_id"] == 4 and src[0]["label"] == 7 and src[1]["label"] == 2


def test_train_batches_carry_the_labels_of_their_rows():
    from data_pipelines.input_pipeline import create_train_dataset, one_crop_config

    base = [{"image": np.full((16, 16, 1), i * 10, np.uint8), "row_id": np.int64(100 + i)} for i in range(12)]
    labels = np.arange(12) % 5
    cfg = one_crop_config()
    cfg.size_crops, cfg.batch_size, cfg.augment = (16,), 4, False
    batch = next(iter(create_train_dataset(LabelledSource(base, np.arange(12), labels), cfg, seed=0,
                                           process_index=0, process_count=1)))
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], labels[batch["row_id"] - 100])


# --------------------------------------------------------------------------------------------- objective gradients


@pytest.fixture(scope="module")
def small_lens():
    model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8), formulation="plain")
    key = jax.random.key(0)
    x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
    pretrained = model.init(key, x[:1])["params"]
    norm = feature_norm(np.asarray(flat_latent(model, pretrained, x)))
    labels = jnp.array([0, 1, 2, 3, 1, 2])
    return model, pretrained, norm, x, labels


def _parts(model, params, x, labels, paper_faithful=False):
    """The three terms computed plainly, each as a function of the one part it should move."""
    def lens_recon(lens):
        return jax.nn.sigmoid(model.apply({"params": lens}, x, method=lambda m, v: m.decode_logits(m.encode(v))))

    def ce(classifier, lens):
        obj = LensObjective(model, 4)
        feats = standardize(flat_latent(model, params["pretrained"], lens_recon(lens)), params["feature_norm"])
        return cross_entropy(obj.classifier.apply({"params": classifier}, feats), labels, paper_faithful=paper_faithful)

    def bce(lens):
        logits = model.apply({"params": lens}, x, method=lambda m, v: m.decode_logits(m.encode(v)))
        return bce_with_logits(logits, x)

    return bce, ce


@pytest.mark.parametrize("paper_faithful", [False, True])
def test_each_part_gets_exactly_its_own_gradient(small_lens, paper_faithful):
    model, pretrained, norm, x, labels = small_lens
    coef = -7.0
    obj = LensObjective(model, 4, coef=coef, paper_faithful=paper_faithful)
    params = obj.init_params(pretrained, norm, jax.random.key(2), 16)
    grads = jax.grad(lambda p: obj.loss(p, {"image": x, "label": labels}, None)[0])(params)
    bce, ce = _parts(model, params, x, labels, paper_faithful)

    for frozen in ("pretrained", "feature_norm"):
        assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads[frozen]))
    want_classifier = jax.grad(ce, argnums=0)(params["classifier"], params["lens"])
    for got, want in zip(jax.tree_util.tree_leaves(grads["classifier"]), jax.tree_util.tree_leaves(want_classifier)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if paper_faithful:  # the authors' detached term: reconstruction alone reaches the lens
        want_lens = jax.grad(bce)(params["lens"])
    else:
        ce_live = lambda lens: cross_entropy(  # noqa: E731  the lens's view: logits, not the double softmax
            obj.classifier.apply({"params": params["classifier"]}, standardize(
                flat_latent(model, pretrained, jax.nn.sigmoid(obj.lens_logits({"lens": lens}, x))), norm)), labels)
        want_lens = jax.grad(lambda lens: bce(lens) - coef * ce_live(lens))(params["lens"])
    for got, want in zip(jax.tree_util.tree_leaves(grads["lens"]), jax.tree_util.tree_leaves(want_lens)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # and the classifier term does reach the lens when it should (the test above could pass with coef ignored)
    only_bce = jax.grad(bce)(params["lens"])
    differs = any(not np.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in
                  zip(jax.tree_util.tree_leaves(grads["lens"]), jax.tree_util.tree_leaves(only_bce)))
    assert differs != paper_faithful


def test_optimizer_moves_lens_and_classifier_only(small_lens):
    model, pretrained, norm, x, labels = small_lens
    obj = LensObjective(model, 4, coef=-1.0)
    params = obj.init_params(pretrained, norm, jax.random.key(2), 16)
    tx = lens_optimizer(1e-3, 1e-2)
    state = tx.init(params)
    grads = jax.grad(lambda p: obj.loss(p, {"image": x, "label": labels}, None)[0])(params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for part, moved in (("lens", True), ("classifier", True), ("pretrained", False), ("feature_norm", False)):
        changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new[part]),
                                                                jax.tree_util.tree_leaves(params[part])))
        assert changed == moved, part
    # the lens starts as a copy of the pretrained AE (the authors' initialize_lens=True), not as the same buffers
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params["lens"]),
                                                    jax.tree_util.tree_leaves(pretrained)))


def test_double_softmax_loss_has_the_floor_the_docstring_states():
    k = 33
    logits = jnp.full((1, k), -1e4).at[0, 0].set(1e4)
    floor = float(cross_entropy(logits, jnp.array([0]), paper_faithful=True))
    assert abs(floor - (np.log(np.e + k - 1) - 1)) < 1e-5
    assert float(cross_entropy(logits, jnp.array([0]))) < 1e-3


def test_feature_norm_standardises_and_is_identity_when_disabled():
    rng = np.random.default_rng(0)
    f = rng.normal(5.0, [0.001, 1.0, 10.0], (500, 3))
    norm = feature_norm(f)
    z = (f - norm["mean"]) / norm["scale"]
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    assert np.all(z.std(0)[1:] > 0.9) and np.all(z.std(0) < 1.0)
    assert z.std(0)[0] < 0.05  # sd 0.001 against the floor of 1% of the mean sd (0.037): not blown up into noise
    raw = feature_norm(f, enabled=False)
    assert np.all(raw["mean"] == 0) and np.all(raw["scale"] == 1)


# ------------------------------------------------------------------------------ train.py → evaluate.py lens, small


def _run(cmd, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "CELLSSL_"))}
    full_env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **env)
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def small_plate(tmp_path_factory):
    """One cell line, DMSO + PBS + 3 drugs at 2 concentrations × 4 wells, 6 frames; built at 64 px; a small random
    ConvAE as the 'pretrained' model (the lens path does not care how good it is)."""
    from cellssl_jax.training.checkpoint import save_params_checkpoint
    from data_pipelines.build import BuildOptions, build_dataset
    from data_pipelines.synthetic import render_plate

    root = tmp_path_factory.mktemp("lens_plate")
    manifest = render_plate(root / "plate", "demo", seed=0, progress=False, cell_lines=["HT29"],
                            drugs=["Cladribine", "Everolimus", "Metformin"], n_concentrations=2, active_concentrations=1, replicates=4,
                            n_dmso=4, n_pbs=2, frame_interval_h=20.0)
    build_dataset(manifest, root / "dataset", BuildOptions(image_size=64), progress=False)
    model_cfg = {"in_channels": 1, "encoder_widths": [8, 8, 8], "latent_channels": 4, "decoder_widths": [8, 8, 8],
                 "formulation": "subpixel", "dtype": "float32"}
    model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    save_params_checkpoint(root / "pretrained", params, model_cfg)
    return root


def _lens_cmd(root: Path, workdir: Path, *flags: str):
    return [sys.executable, "train.py", "--config=configs/lens.py", f"--workdir={workdir}",
            f"--config.dataset_dir={root / 'dataset'}", f"--config.lens.pretrained={root / 'pretrained'}",
            "--config.input.size_crops=(32,)", "--config.input.batch_size=8", "--config.lens.last_n=3",
            "--config.checkpoint.every_steps=3", "--config.log_every=1", "--config.image_every=0",
            "--config.lens.coef=-5.0", *flags]


@pytest.mark.slow
def test_lens_trains_resumes_and_evaluates_on_held_out_wells(small_plate, tmp_path):
    workdir = tmp_path / "lens"
    _run(_lens_cmd(small_plate, workdir, "--config.total_steps=4"))
    _run(_lens_cmd(small_plate, workdir, "--config.total_steps=6"))  # resumes from step 4
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r[k]) for r in rows for k in ("bce", "ce", "top1", "top3"))

    from cellssl_jax.lens import evaluate_lens, load_lens

    bundle = load_lens(workdir)
    assert bundle.classes == ("DMSO", "PBS", "Everolimus", "Metformin", "Cladribine")
    assert bundle.image_size == 32 and bundle.objective.coef == -5.0
    out = tmp_path / "eval"
    summary = evaluate_lens(workdir, small_plate / "dataset", out, probe_epochs=3, lrs=(1e-3, 1e-2),
                            batch_sizes=(8,), n_examples=2, paper_protocol=True, progress=False)
    selection = pd.read_csv(out / "selection.csv")
    # the evaluation scores wells the lens never trained on
    train_wells = set(selection[selection.split == "train"].well)
    assert not train_wells & set(selection[selection.split == "test"].well)
    assert summary["images"] == selection.split.value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    grid = pd.read_csv(out / "probe_grid.csv")
    assert set(grid.features) == {"no_lens", "lens"} and len(grid) == 4
    assert 0.0 <= summary["best_probe"]["lens"]["top3_test"] <= 1.0
    assert set(summary["comparison_test"]) == {"lens"}
    # the authors' figure beside ours: their probes on the same images, scored on the TRAIN split
    assert summary["comparison_paper_protocol"]["lens"]["split"] == "train"
    assert len(pd.read_csv(out / "probe_grid_paper_protocol.csv")) == len(grid)
    scores = pd.read_csv(out / "map_scores.csv")
    n_test = int((selection.split == "test").sum())
    assert len(scores) == 3 * n_test  # three maps per held-out image
    # Cladribine rounds cells, Everolimus makes them granular; controls and Metformin carry nothing
    assert set(scores.signature) == {"none", "rounding", "granularity"}
    assert scores[scores.signature == "none"].auroc.isna().all()  # empty masks are not scored
    for fig in summary["figures"]:
        assert (out / fig["path"]).stat().st_size > 1000

    # the lens exports like any ConvAE, in the authors' Autoencoder layout
    from cellssl_jax.interop import export_checkpoint
    from cellssl_jax.interop.convert import torch_to_flax
    from cellssl_jax.interop.export import load_export

    (exported,) = export_checkpoint(workdir, tmp_path / "lens.safetensors")
    state_dict, config = load_export(exported)
    assert config["input_size"] == 32
    back = torch_to_flax(state_dict)
    for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(bundle.params["lens"])):
        np.testing.assert_array_equal(got, want)
    assert json.loads((out / "summary.json").read_text())["classes"] == list(bundle.classes)


@pytest.mark.slow
def test_a_two_class_lens_task_evaluates_with_top3_as_top_k(tmp_path):
    """DMSO and one drug: 2 classes. Top-3 of 2 classes is top-2 (1.0), as chance_top3 and the probe grid count it;
    the evaluation must not stop on "k=3 must be in [1, K=2]" after the whole grid, and selects probes on top-1."""
    from ml_collections import ConfigDict

    from cellssl_jax.lens import evaluate_lens
    from cellssl_jax.training.checkpoint import save_params_checkpoint
    from cellssl_jax.training.loop import train_and_evaluate
    from configs.lens import get_config
    from data_pipelines.build import BuildOptions, build_dataset
    from data_pipelines.synthetic import render_plate

    manifest = render_plate(tmp_path / "plate", "demo", seed=0, progress=False, cell_lines=["HT29"],
                            drugs=["Cladribine"], n_concentrations=2, active_concentrations=1, replicates=4, n_dmso=4,
                            n_pbs=0, frame_interval_h=20.0)
    build_dataset(manifest, tmp_path / "dataset", BuildOptions(image_size=64), progress=False)
    model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    save_params_checkpoint(tmp_path / "pretrained", params,
                           {"in_channels": 1, "encoder_widths": [8, 8, 8], "latent_channels": 4,
                            "decoder_widths": [8, 8, 8], "formulation": "subpixel", "dtype": "float32"})
    cfg = get_config()
    cfg.dataset_dir, cfg.lens.pretrained = str(tmp_path / "dataset"), str(tmp_path / "pretrained")
    cfg.input.size_crops, cfg.input.batch_size, cfg.lens.last_n = (32,), 8, 3
    cfg.total_steps, cfg.image_every, cfg.log_every, cfg.checkpoint = 2, 0, 1, ConfigDict(
        {"every_steps": 2, "keep": 1, "async": False})
    train_and_evaluate(cfg, tmp_path / "lens")
    summary = evaluate_lens(tmp_path / "lens", tmp_path / "dataset", tmp_path / "eval", probe_epochs=2, lrs=(1e-3,),
                            batch_sizes=(8,), n_examples=2, progress=False)
    assert summary["classes"] == ["DMSO", "Cladribine"] and summary["chance_top3"] == 1.0
    assert summary["joint_classifier"]["top3_test"] == 1.0
    assert {b["selected_on"] for b in summary["best_probe"].values()} == {"top1_val"}
    assert all(b["top3_test"] == 1.0 for b in summary["best_probe"].values())
    assert set(pd.read_csv(tmp_path / "eval" / "per_cell_line.csv").columns) >= {"top1", "top3"}


@pytest.mark.parametrize("override", [("loss", "mse"), ("optimizer.name", "adamw")])
def test_autoencoder_only_switches_are_refused_for_the_lens_not_ignored(override):
    """--config.loss=mse or --config.optimizer.name=adamw on configs/lens.py would otherwise train the same BCE lens
    with Adam and say nothing."""
    from cellssl_jax.training.objectives import setup_objective
    from configs.lens import get_config

    cfg = get_config("demo")
    section, _, name = override[0].rpartition(".")
    (cfg[section] if section else cfg)[name] = override[1]
    with pytest.raises(ValueError, match=override[0].replace(".", r"\.") + f"='{override[1]}'"):
        setup_objective(cfg, source=None)
