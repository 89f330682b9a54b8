"""Tests of the lens evaluation's linear probes (cellssl_jax.lens.probe) on generated data with known answers.

The data: Gaussian class clusters recorded as wells (one class and one cell line per well, 10 frames each), split by
well, so the split mimics the lead's well-level split. All datasets share one shape, so the jitted fit compiles once
per (batch geometry, loss) for the whole file.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pandas as pd
import pytest

from cellssl_jax.lens import probe as P

N_CLASSES, N_FEATURES, FRAMES, WELLS_PER_CLASS = 6, 32, 10, 12
CFG = P.ProbeConfig(lr=1e-2, batch_size=64, epochs=10, seed=0)


def make_plate(separation: float, seed: int = 0, scale: float = 1.0):
    """Class means ~ N(0, I) * separation plus unit noise. Per class: wells 0-7 train, 8-9 val, 10-11 test."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(N_CLASSES, N_FEATURES)) * separation
    wells = np.arange(N_CLASSES * WELLS_PER_CLASS)
    well_label, well_rank = wells % N_CLASSES, wells // N_CLASSES
    well_split = np.where(well_rank < 8, "train", np.where(well_rank < 10, "val", "test"))
    well_group = np.array(["A549", "HT29", "MCF7"])[well_rank % 3]
    y = np.repeat(well_label, FRAMES)
    x = ((means[y] + rng.normal(size=(len(y), N_FEATURES))) * scale).astype(np.float32)
    return x, y, np.repeat(well_split, FRAMES), np.repeat(well_group, FRAMES)


@pytest.fixture(scope="module")
def plate():
    return make_plate(separation=0.6)


def _split(x, y, split, name):
    mask = split == name
    return x[mask], y[mask]


# ----------------------------------------------------------------------------------------------------------------------
# Learning, chance, determinism

def test_probe_separates_clusters_and_shuffled_labels_stay_at_chance(plate):
    x, y, split, _ = plate
    (x_tr, y_tr), (x_te, y_te) = _split(x, y, split, "train"), _split(x, y, split, "test")
    params = P.train_probe(x_tr, y_tr, N_CLASSES, CFG)
    assert P.topk_accuracy(P.predict_proba(params, x_te), y_te, 1) > 0.9
    assert params.history["top1"][-1] > params.history["top1"][0]  # the running training accuracy rose

    shuffled = np.random.default_rng(1).permutation(y_tr)
    control = P.train_probe(x_tr, shuffled, N_CLASSES, CFG)
    chance = 1 / N_CLASSES
    # 120 test rows: binomial sd at chance is ~0.034; 0.1 is about 3 sd.
    assert abs(P.topk_accuracy(P.predict_proba(control, x_te), y_te, 1) - chance) < 0.1


def test_same_seed_is_identical_and_other_seed_differs(plate):
    x, y, split, _ = plate
    x_tr, y_tr = _split(x, y, split, "train")
    a = P.train_probe(x_tr, y_tr, N_CLASSES, CFG)
    b = P.train_probe(x_tr, y_tr, N_CLASSES, CFG)
    c = P.train_probe(x_tr, y_tr, N_CLASSES, P.ProbeConfig(CFG.lr, CFG.batch_size, CFG.epochs, seed=1))
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.array_equal(a.weight, c.weight)


def test_init_is_torch_linear_uniform():
    params = P._torch_linear_init(jax.random.key(0), 400, 33)
    bound = 1 / np.sqrt(400)
    w = np.asarray(params["weight"])
    assert w.shape == (400, 33) and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.02 * bound  # the sd of U(-b, b)


def test_grid_equals_single_probes_and_honest_metrics_are_dataset_level(plate):
    x, y, split, _ = plate
    lrs = (1e-3, 1e-2)
    grid = P.probe_grid({"no_lens": x}, y, split, lrs=lrs, batch_sizes=(CFG.batch_size,), epochs=CFG.epochs,
                        progress=False)
    assert list(grid.columns) == list(P.GRID_COLUMNS) and len(grid) == 2
    x_tr, y_tr = _split(x, y, split, "train")
    for lr, row in zip(lrs, grid.itertuples()):
        single = P.train_probe(x_tr, y_tr, N_CLASSES, P.ProbeConfig(lr, CFG.batch_size, CFG.epochs))
        for name in P.SPLITS:
            xs, ys = _split(x, y, split, name)
            probs = P.predict_proba(single, xs)
            for k in (1, 3):
                assert getattr(row, f"top{k}_{name}") == pytest.approx(P.topk_accuracy(probs, ys, k), abs=1 / len(ys))


def test_batch_larger_than_train_set_runs_one_full_batch(plate):
    x, y, split, _ = plate
    x_tr, y_tr = _split(x, y, split, "train")
    params = P.train_probe(x_tr, y_tr, N_CLASSES, P.ProbeConfig(1e-2, batch_size=10_000, epochs=3))
    assert params.history["loss"].shape == (3,)
    assert np.all(np.isfinite(params.history["loss"])) and params.history["loss"][-1] < params.history["loss"][0]


# ----------------------------------------------------------------------------------------------------------------------
# The authors' double softmax

def test_double_softmax_has_smaller_gradients(plate):
    x, y, split, _ = plate
    x_tr, y_tr = _split(x, y, split, "train")
    params = P._torch_linear_init(jax.random.key(0), N_FEATURES, N_CLASSES)

    @functools.partial(jax.jit, static_argnames="paper")
    def weight_grad(p, xs, ys, paper):
        return jax.grad(lambda q: P.probe_loss(q, xs, ys, paper_faithful=paper)[0])(p)["weight"]

    def grad_norm(p, xs, ys, paper):
        return float(np.linalg.norm(np.asarray(weight_grad(p, xs, ys, paper))))

    # At init the extra softmax's Jacobian (diag(p) - pp^T, entries ~1/K) shrinks the gradient several-fold.
    assert grad_norm(params, x_tr, y_tr, True) < 0.5 * grad_norm(params, x_tr, y_tr, False)
    # A confidently wrong probe: logits favour class 0 by 20 for every row whose label is 1. Cross-entropy on logits
    # pushes hard; through the saturated softmax almost nothing comes back.
    rows = y_tr == 1
    confident = {"weight": np.zeros((N_FEATURES, N_CLASSES), np.float32),
                 "bias": np.eye(N_CLASSES, dtype=np.float32)[0] * 20}
    x_wrong, y_wrong = x_tr[rows], y_tr[rows]
    assert grad_norm(confident, x_wrong, y_wrong, True) < 1e-3 * grad_norm(confident, x_wrong, y_wrong, False)


def test_double_softmax_learns_slower_on_saturating_features():
    # Features on a large scale (like raw ConvAE codes) saturate the softmax early; Adam rescales the step but the
    # double softmax still loses the signal of confidently wrong rows. (On unit-scale features Adam hides the effect:
    # both losses then learn about equally fast, so this test picks the regime where the quirk matters.)
    x, y, split, _ = make_plate(separation=0.6, scale=30.0)
    x_tr, y_tr = _split(x, y, split, "train")
    cfg = P.ProbeConfig(1e-3, CFG.batch_size, CFG.epochs)
    honest = P.topk_accuracy(P.predict_proba(P.train_probe(x_tr, y_tr, N_CLASSES, cfg), x_tr), y_tr, 1)
    faithful = P.topk_accuracy(
        P.predict_proba(P.train_probe(x_tr, y_tr, N_CLASSES, cfg, paper_faithful=True), x_tr), y_tr, 1)
    assert honest > faithful + 0.1, (honest, faithful)


def test_paper_faithful_grid_reports_training_top3_at_best_training_f1(plate):
    x, y, split, _ = plate
    grid = P.probe_grid({"no_lens": x}, y, split, lrs=(1e-3,), batch_sizes=(CFG.batch_size,), epochs=CFG.epochs,
                        paper_faithful=True, progress=False)
    row = grid.iloc[0]
    x_tr, y_tr = _split(x, y, split, "train")
    history = P.train_probe(x_tr, y_tr, N_CLASSES, P.ProbeConfig(1e-3, CFG.batch_size, CFG.epochs),
                            paper_faithful=True).history
    # Micro top-3 F1 = 2·acc/(k+1): the best-F1 epoch is the best running top-3 epoch.
    assert row["top3_train"] == pytest.approx(history["top3"].max(), abs=1e-6)
    assert row["f1_train"] == pytest.approx(row["top3_train"] / 2, abs=1e-6)
    for column in ("top1_val", "top3_val", "top1_test", "top3_test"):
        assert 0.0 <= row[column] <= 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def test_topk_accuracy_hand_computed():
    probs = np.array([[0.1, 0.6, 0.3],  # y=1: top-1
                      [0.5, 0.2, 0.3],  # y=2: second
                      [0.2, 0.2, 0.6],  # y=0: tied second with class 1, the lower index goes first -> second
                      [1 / 3, 1 / 3, 1 / 3]])  # y=2: all tied -> third
    y = np.array([1, 2, 0, 2])
    assert P.topk_accuracy(probs, y, 1) == 0.25
    assert P.topk_accuracy(probs, y, 2) == 0.75
    assert P.topk_accuracy(probs, y, 3) == 1.0


def test_grid_ranks_without_softmax_underflow_and_nan_scores_never_hit():
    """A confident probe: logits [0, -300, -350, -200, -400] put the true class 3 second, so it is in the top-3. In
    float32 its probability (and those of classes 1, 2, 4) is exactly 0: ranked on probabilities, the tie goes to
    classes 1 and 2 and the hit is lost. The grid ranks on log-probabilities."""
    row = np.array([0.0, -300.0, -350.0, -200.0, -400.0], np.float32)
    params = P.ProbeParams(weight=np.tile(row, (2, 1)) / 2, bias=np.zeros(5, np.float32))
    x, y = np.ones((1, 2), np.float32), np.array([3])
    assert (P.predict_proba(params, x)[0, 1:] == 0).all()  # the underflow this guards against
    assert P.topk_accuracy(P.predict_log_proba(params, x), y, 3) == 1.0
    assert P.topk_accuracy(P.predict_log_proba(params, x), y, 2) == 1.0
    assert P.topk_accuracy(P.predict_log_proba(params, x), y, 1) == 0.0
    # A diverged probe (NaN scores) scores no hit, not a perfect one.
    assert P.topk_accuracy(np.full((2, 5), np.nan), np.array([0, 3]), 1) == 0.0


def test_batch_averaged_topk_drops_the_last_partial_batch():
    probs = np.eye(3)[[0, 0, 0, 1, 1]]
    y = np.array([0, 0, 0, 0, 0])  # top-1 hits: 1, 1, 1, 0, 0
    assert P.topk_accuracy(probs, y, 1) == pytest.approx(0.6)
    # Batches [1, 1] and [1, 0]; the fifth row is dropped: (1 + 0.5) / 2.
    assert P.batch_averaged_topk(probs, y, 1, batch_size=2) == pytest.approx(0.75)
    assert P.batch_averaged_topk(probs, y, 1, batch_size=10) == pytest.approx(0.6)  # one full batch, not none
    shuffled = P.batch_averaged_topk(probs, y, 1, batch_size=2, seed=3)
    assert shuffled == P.batch_averaged_topk(probs, y, 1, batch_size=2, seed=3)
    assert shuffled in {0.5, 0.75, 1.0, 0.25}


def test_micro_top3_f1_is_a_monotone_function_of_top3_accuracy():
    rng = np.random.default_rng(0)
    probs, y = rng.dirichlet(np.ones(8), size=200), rng.integers(0, 8, 200)
    acc = P.topk_accuracy(probs, y, 3)
    assert P.micro_topk_f1(probs, y, 3) == pytest.approx(2 * acc / 4)


def test_per_group_counts_add_up_and_match_subsets(plate):
    x, y, split, groups = plate
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(N_CLASSES), size=len(y))
    table = P.per_group_accuracy(probs, y, groups)
    assert list(table.columns) == ["group", "n", "top1", "top3"]
    assert table["n"].sum() == len(y) and set(table["group"]) == set(groups)
    for row in table.itertuples():
        mask = groups == row.group
        assert row.top1 == pytest.approx(P.topk_accuracy(probs[mask], y[mask], 1))
        assert row.top3 == pytest.approx(P.topk_accuracy(probs[mask], y[mask], 3))


def test_bad_inputs_name_the_row(plate):
    x, y, split, _ = plate
    x_tr, y_tr = _split(x, y, split, "train")
    bad_y = y_tr.copy()
    bad_y[3] = N_CLASSES
    with pytest.raises(ValueError, match="row 3"):
        P.train_probe(x_tr, bad_y, N_CLASSES, CFG)
    bad_x = x_tr.copy()
    bad_x[5, 2] = np.nan
    with pytest.raises(ValueError, match="row 5"):
        P.train_probe(bad_x, y_tr, N_CLASSES, CFG)
    bad_split = split.copy()
    bad_split[7] = "holdout"
    with pytest.raises(ValueError, match="row 7"):
        P.probe_grid({"no_lens": x}, y, bad_split, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Comparison, selection, figures

@pytest.fixture(scope="module")
def lens_grid():
    """A paired grid: 'lens' features are more separable than 'no_lens'; 'no_lens_copy' is the same array."""
    x_hard, y, split, _ = make_plate(separation=0.15, seed=0)
    x_easy, y_easy, _, _ = make_plate(separation=0.4, seed=0)
    assert np.array_equal(y, y_easy)
    return P.probe_grid({"no_lens": x_hard, "lens": x_easy, "no_lens_copy": x_hard.copy()}, y, split,
                        lrs=(1e-3, 1e-2), batch_sizes=(CFG.batch_size, 128), epochs=CFG.epochs, seeds=(0, 1),
                        progress=False)


def test_compare_detects_a_real_shift_and_not_a_null_one(lens_grid):
    result = P.compare(lens_grid, baseline="no_lens", metric="top3_test")
    assert set(result) == {"lens", "no_lens_copy"}
    shift, null = result["lens"], result["no_lens_copy"]
    assert shift["n_baseline"] == shift["n_method"] == shift["paired_n"] == 8
    assert shift["p_less"] < 0.01 and shift["p_times_2"] == pytest.approx(2 * shift["p_less"])
    assert shift["mean_diff"] > 0.1 and shift["median_diff"] > 0.1 and shift["paired_wins"] == 8
    assert null["p_less"] > 0.3 and null["mean_diff"] == 0 and null["paired_ties"] == 8 and null["paired_wins"] == 0
    assert shift["split"] == "test"


def test_compare_keeps_lr_at_most_0_01_like_the_authors(lens_grid):
    extra = lens_grid[lens_grid["lr"] == 1e-2].assign(lr=0.05)
    result = P.compare(pd.concat([lens_grid, extra]), metric="top3_train")
    assert result["lens"]["n_baseline"] == 8 and result["lens"]["split"] == "train"
    assert P.compare(pd.concat([lens_grid, extra]), metric="top3_train", max_lr=None)["lens"]["n_baseline"] == 12


def test_best_config_selects_on_val_never_test():
    grid = pd.DataFrame([
        # lr, bs: config A is best on test, config B is best on val.
        {"features": "lens", "lr": 1e-3, "batch_size": 256, "seed": 0, "top3_val": 0.60, "top3_test": 0.90},
        {"features": "lens", "lr": 1e-2, "batch_size": 512, "seed": 0, "top3_val": 0.80, "top3_test": 0.70},
        {"features": "no_lens", "lr": 1e-3, "batch_size": 256, "seed": 0, "top3_val": 0.99, "top3_test": 0.99},
    ]).reindex(columns=P.GRID_COLUMNS, fill_value=0.0)
    best = P.best_config(grid, "lens")
    assert (best["lr"], best["batch_size"], best["top3_test"]) == (1e-2, 512, 0.70)
    with pytest.raises(ValueError, match="test"):
        P.best_config(grid, "lens", metric="top3_test")


def test_best_config_averages_seeds(lens_grid):
    best = P.best_config(lens_grid, "lens")
    rows = lens_grid[(lens_grid["features"] == "lens") & (lens_grid["lr"] == best["lr"])
                     & (lens_grid["batch_size"] == best["batch_size"])]
    assert best["n_seeds"] == 2 and best["top3_val"] == pytest.approx(rows["top3_val"].mean())
    means = lens_grid[lens_grid["features"] == "lens"].groupby(["lr", "batch_size"])["top3_val"].mean()
    assert best["top3_val"] == pytest.approx(means.max())


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_plots_write_pngs(lens_grid, plate, tmp_path):
    out = P.plot_probe_comparison(lens_grid, tmp_path / "probe.png")
    assert out == tmp_path / "probe.png" and _is_png(out)
    x, y, split, groups = plate
    rng = np.random.default_rng(0)
    tables = {name: P.per_group_accuracy(rng.dirichlet(np.ones(N_CLASSES), size=len(y)), y, groups)
              for name in ("no_lens", "lens")}
    assert _is_png(P.plot_per_group(tables, tmp_path / "sub" / "per_group.png"))
