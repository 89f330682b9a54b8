"""Tests of feature-quality task B (cellssl_jax.compare.probe): drugs vs controls with the authors' MLP probe.

Generated data with known answers: frames recorded as wells (one class per well, 8 frames each), split by well as
the caller does. The plates share one geometry, so the compiled 27-config fit is built once for the file's main
tests; the torch-parity and grid-vs-single tests share a second, smaller geometry with a partial last batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, multilabel_confusion_matrix, precision_score,
                             recall_score)

from cellssl_jax.compare import probe as Q

N_FEATURES, FRAMES, DRUG_WELLS, CONTROL_WELLS = 16, 8, 30, 30
BATCH = 128  # 288 train rows: 2 full batches + a partial one of 32, which the authors' loader keeps


def make_plate(shift: float, seed: int = 0):
    """Unit Gaussian noise; drug rows moved by ``shift`` along one random unit direction (0 → label-independent).
    Per class, wells are split 60/20/20 into train/val/test."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=N_FEATURES)
    direction /= np.linalg.norm(direction)
    well_is_drug = np.r_[np.ones(DRUG_WELLS, int), np.zeros(CONTROL_WELLS, int)]
    rank = np.r_[np.arange(DRUG_WELLS), np.arange(CONTROL_WELLS)]
    well_split = np.where(rank < 18, "train", np.where(rank < 24, "val", "test"))
    is_drug = np.repeat(well_is_drug, FRAMES)
    x = rng.normal(size=(len(is_drug), N_FEATURES)) + shift * is_drug[:, None] * direction
    return x.astype(np.float32), is_drug, np.repeat(well_split, FRAMES)


@pytest.fixture(scope="module")
def separable():
    x, y, split = make_plate(shift=6.0)
    return (x, y, split), Q.controls_probe(x, y, split, batch_size=BATCH)


@pytest.fixture(scope="module")
def null():
    x, y, split = make_plate(shift=0.0, seed=1)
    return (x, y, split), Q.controls_probe(x, y, split, batch_size=BATCH)


# ----------------------------------------------------------------------------------------------------------------------
# Learning and chance

def test_separable_drugs_are_found_on_test(separable):
    (x, y, split), df = separable
    assert list(df.columns) == list(Q.CONTROLS_COLUMNS) and len(df) == 27
    assert df[["lr", "momentum", "weight_decay"]].apply(tuple, axis=1).tolist() == list(Q.PAPER_GRID)
    assert df["finite"].all()
    best = Q.best_config(df)
    # Bayes error at a 6-sd shift is 0.13%; 96 test rows.
    assert best["accuracy_test"] >= 0.98 and best["balanced_accuracy_test"] >= 0.98
    assert (df["accuracy_test"] >= 0.95).mean() > 0.9  # nearly every config, not just the chosen one
    assert (df["n_train"].iloc[0], df["n_val"].iloc[0], df["n_test"].iloc[0]) == (288, 96, 96)
    assert df["pos_frac_test"].iloc[0] == pytest.approx(0.5)


def test_label_independent_features_stay_at_chance_on_test(null):
    _, df = null
    best = Q.best_config(df)
    # 48 + 48 test rows: the sd of a balanced accuracy at chance is ~0.05; 0.15 is 3 sd.
    assert abs(best["balanced_accuracy_test"] - 0.5) < 0.15
    assert abs(df["balanced_accuracy_test"].median() - 0.5) < 0.15
    # The authors' number is a training-set fit: it sits well above chance on features that carry no label.
    assert df["acc_train_best"].median() > df["balanced_accuracy_test"].median() + 0.15


def test_train_best_columns_are_the_running_history_at_the_best_training_f1_epoch(separable):
    (x, y, split), df = separable
    train = split == "train"
    _, history = Q.fit_probes(Q.standardise(x, train)[train], y[train], batch_size=BATCH)
    for i, row in df.iterrows():
        at = int(np.argmax(history["f1"][i]))
        assert row["best_epoch"] == at + 1
        assert row["f1_train_best"] == pytest.approx(history["f1"][i].max(), abs=1e-7)
        assert row["acc_train_best"] == pytest.approx(history["accuracy"][i][at], abs=1e-7)
        assert row["loss_last_epoch"] == pytest.approx(history["loss"][i][-1], abs=1e-7)
    # The authors' F1 from batch-averaged P and R: 2PR/(P+R).
    p, r = history["precision"], history["recall"]
    np.testing.assert_allclose(history["f1"], 2 * p * r / (p + r), rtol=1e-6)


def test_empty_val_gives_nan_and_best_config_refuses(separable):
    (x, y, split), _ = separable
    no_val = np.where(split == "val", "test", split)  # same train rows: the compiled fit is reused
    df = Q.controls_probe(x, y, no_val, batch_size=BATCH, grid=Q.PAPER_GRID)
    assert (df["n_val"] == 0).all() and df["f1_val"].isna().all() and df["pos_frac_val"].isna().all()
    assert df["f1_test"].notna().all()
    with pytest.raises(ValueError, match="val"):
        Q.best_config(df)


# ----------------------------------------------------------------------------------------------------------------------
# The fit: one compiled grid, torch semantics

SMALL_N, SMALL_BATCH, SMALL_EPOCHS = 150, 64, 3  # 2 full batches + 22 rows per epoch


def _small_data(seed: int = 3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, SMALL_N)
    x = (rng.normal(size=(SMALL_N, N_FEATURES)) + 0.8 * y[:, None]).astype(np.float32)
    return x, y


def test_grid_equals_each_config_trained_alone():
    x, y = _small_data()
    grid = [(0.1, 0.9, 1e-3), (0.05, 0.8, 1e-4), (0.01, 0.7, 1e-5)]
    together, hist = Q.fit_probes(x, y, grid, seed=7, epochs=SMALL_EPOCHS, batch_size=SMALL_BATCH)
    for i, config in enumerate(grid):
        alone, hist_alone = Q.fit_probes(x, y, [config], seed=7, epochs=SMALL_EPOCHS, batch_size=SMALL_BATCH)
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[i], b[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(hist["loss"][i], hist_alone["loss"][0], rtol=1e-5)
    # The configs really differ: otherwise the comparison above proves nothing.
    assert not np.allclose(together["out"]["weight"][0], together["out"]["weight"][2], atol=1e-3)


def test_batches_keep_the_last_partial_batch_and_cover_every_row_once_per_epoch():
    full, last = Q._shuffled_batches(SMALL_N, SMALL_BATCH, epochs=2, seed=0)
    assert full.shape == (2, 2, SMALL_BATCH) and last.shape == (2, SMALL_N % SMALL_BATCH)
    for e in range(2):
        assert sorted(np.r_[full[e].ravel(), last[e]].tolist()) == list(range(SMALL_N))
    assert not np.array_equal(full[0], full[1])  # a fresh shuffle per epoch
    full, last = Q._shuffled_batches(10, 1024, epochs=1, seed=0)  # batch larger than the data: one batch of 10
    assert full.shape == (1, 0, 1024) and last.shape == (1, 10)


@pytest.mark.parametrize("paper_faithful", [False, True])
def test_matches_torch_sgd_with_momentum_and_weight_decay(paper_faithful):
    """Same init, same batches (including the partial one): torch.optim.SGD vs our optax chain. The weight decay is
    large here so that decaying before vs after the momentum buffer would differ far beyond the tolerance."""
    torch = pytest.importorskip("torch")
    x, y = _small_data()
    lr, momentum, weight_decay, seed = 0.05, 0.9, 0.1, 5
    params, history = Q.fit_probes(x, y, [(lr, momentum, weight_decay)], seed=seed, epochs=SMALL_EPOCHS,
                                   batch_size=SMALL_BATCH, paper_faithful=paper_faithful)

    init = Q.init_probe(seed, N_FEATURES)
    layers = [torch.nn.Linear(N_FEATURES, Q.HIDDEN), torch.nn.LeakyReLU(0.01), torch.nn.Linear(Q.HIDDEN, 2)]
    model = torch.nn.Sequential(*layers, *([torch.nn.Softmax(dim=1)] if paper_faithful else []))
    with torch.no_grad():
        for layer, name in ((layers[0], "hidden"), (layers[2], "out")):
            layer.weight.copy_(torch.from_numpy(np.asarray(init[name]["weight"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.array(init[name]["bias"])))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    full, last = Q._shuffled_batches(SMALL_N, SMALL_BATCH, SMALL_EPOCHS, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    epoch_loss, epoch_acc = [], []
    for e in range(SMALL_EPOCHS):
        losses, accs = [], []
        for rows in [*full[e], last[e]]:
            rows = torch.from_numpy(rows).long()
            optimizer.zero_grad()
            out = model(xt[rows])
            loss = loss_fn(out, yt[rows])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            accs.append(accuracy_score(yt[rows].numpy(), out.argmax(1).numpy()))
        epoch_loss.append(np.mean(losses))
        epoch_acc.append(np.mean(accs))  # per batch, then the mean over batches (the partial one weighs fully)

    for layer, name in ((layers[0], "hidden"), (layers[2], "out")):
        np.testing.assert_allclose(params[name]["weight"][0], layer.weight.detach().numpy().T, rtol=1e-4, atol=2e-6)
        np.testing.assert_allclose(params[name]["bias"][0], layer.bias.detach().numpy(), rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(history["loss"][0], epoch_loss, rtol=1e-5)
    np.testing.assert_allclose(history["accuracy"][0], epoch_acc, atol=1e-6)


def test_double_softmax_loss_by_hand():
    params = {"hidden": {"weight": jnp.eye(2, Q.HIDDEN), "bias": jnp.zeros(Q.HIDDEN)},
              "out": {"weight": jnp.eye(Q.HIDDEN, 2), "bias": jnp.zeros(2)}}
    x = jnp.array([[2.0, -1.0], [0.5, 3.0]])  # logits (2, -0.01) and (0.5, 3): LeakyReLU slope on the negative one
    y = jnp.array([0, 0])
    logits = np.array([[2.0, -0.01], [0.5, 3.0]])
    np.testing.assert_allclose(np.asarray(Q.probe_logits(params, x)), logits, rtol=1e-6)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    double = np.mean([np.log(np.exp(p[i]).sum()) - p[i, 0] for i in range(2)])
    single = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, 0] for i in range(2)])
    assert float(Q.probe_loss(params, x, y, paper_faithful=True)[0]) == pytest.approx(double, rel=1e-6)
    assert float(Q.probe_loss(params, x, y)[0]) == pytest.approx(single, rel=1e-6)
    # Two classes: the double softmax loss is confined to [log(1+e^-1), log(1+e)] whatever the logits.
    assert np.log1p(np.exp(-1)) < double < np.log1p(np.e)


def test_init_is_torch_linear_uniform_per_layer():
    params = Q.init_probe(0, 400)
    for name, fan_in in (("hidden", 400), ("out", Q.HIDDEN)):
        bound = 1 / np.sqrt(fan_in)
        weight, bias = np.asarray(params[name]["weight"]), np.asarray(params[name]["bias"])
        assert np.abs(weight).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(weight).max() > 0.99 * bound  # uniform over the whole range, not a narrower one
        assert abs(weight.std() - bound / np.sqrt(3)) < 0.02 * bound  # the sd of U(-b, b)
    assert params["hidden"]["weight"].shape == (400, Q.HIDDEN) and params["out"]["weight"].shape == (Q.HIDDEN, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def _specificity_macro(y_true, y_pred):
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=[0, 1])  # [class, [[tn, fp], [fn, tp]]]
    return np.mean([m[0, 0] / (m[0, 0] + m[0, 1]) for m in mcm])


@pytest.mark.parametrize("y_true, y_pred", [
    ([1, 1, 1, 0, 0, 1, 0, 1, 1, 0], [1, 0, 1, 0, 1, 1, 0, 1, 0, 0]),
    ([1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]),
    ([0, 1, 0, 1, 1], [1, 1, 1, 1, 1]),  # a class never predicted: its precision is 0
])
def test_metrics_match_sklearn(y_true, y_pred):
    m = Q.binary_metrics(y_true, y_pred)
    p = precision_score(y_true, y_pred, average="weighted", zero_division=0)
    r = recall_score(y_true, y_pred, average="weighted")
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["recall"] == pytest.approx(r) and m["recall"] == pytest.approx(m["accuracy"])
    assert m["precision"] == pytest.approx(p)
    assert m["specificity"] == pytest.approx(_specificity_macro(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))
    assert m["n"] == len(y_true) and m["pos_frac"] == pytest.approx(np.mean(y_true))


def test_metrics_with_an_absent_class():
    # Dataset level: a specificity that needs the missing class is undefined.
    m = Q.binary_metrics([1, 1, 1], [1, 0, 1])
    assert np.isnan(m["specificity"]) and np.isnan(m["balanced_accuracy"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["pos_frac"] == 1.0
    assert all(np.isnan(v) for k, v in Q.binary_metrics([], []).items() if k in Q.METRICS)
    # Running (torchmetrics) rules: 0/0 counts 0 and a class with tp + fp + fn = 0 leaves the macro mean.
    counts = Q._confusion(jnp.array([1, 1, 1]), jnp.array([1, 1, 1]), jnp)
    running = Q._metrics_from_counts(counts, jnp, torchmetrics_rules=True)
    assert float(running["accuracy"]) == 1.0 and float(running["specificity"]) == 0.0
    counts = Q._confusion(jnp.array([1, 1, 1, 1]), jnp.array([1, 0, 1, 1]), jnp)
    assert float(Q._metrics_from_counts(counts, jnp, torchmetrics_rules=True)["specificity"]) == pytest.approx(0.375)


def test_running_and_dataset_rules_agree_when_both_classes_are_present():
    y_true, y_pred = np.array([1, 1, 0, 0, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 0, 1])
    data = Q.binary_metrics(y_true, y_pred)
    running = Q._metrics_from_counts(Q._confusion(jnp.asarray(y_true), jnp.asarray(y_pred), jnp), jnp,
                                     torchmetrics_rules=True)
    for name in Q.METRICS:
        assert float(running[name]) == pytest.approx(data[name], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Scaling, selection and the authors' summary

def test_standardise_uses_train_rows_only_and_centres_constant_features():
    x = np.array([[1.0, 5.0], [3.0, 5.0], [100.0, 7.0]], np.float32)
    train = np.array([True, True, False])
    z = Q.standardise(x, train)
    np.testing.assert_allclose(z[:2, 0], [-1.0, 1.0], rtol=1e-6)
    assert z[2, 0] == pytest.approx((100 - 2) / 1)  # scaled by the train std, not pulled in by the test row
    np.testing.assert_allclose(z[:, 1], [0.0, 0.0, 2.0])  # constant on train: centred only, not divided by ~0


def _toy_grid(rows):
    return pd.DataFrame(rows).reindex(columns=Q.CONTROLS_COLUMNS)


def test_best_config_selects_on_val_and_breaks_ties_towards_lower_lr():
    df = _toy_grid([
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "f1_val": 0.80, "f1_test": 0.70},
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3, "f1_val": 0.80, "f1_test": 0.60},
        {"lr": 0.05, "momentum": 0.8, "weight_decay": 1e-4, "f1_val": 0.70, "f1_test": 0.99},
        {"lr": 0.01, "momentum": 0.7, "weight_decay": 1e-5, "f1_val": 0.80, "f1_test": 0.50},
    ])
    best = Q.best_config(df)
    # The tie at 0.80 goes to lr 0.01, first in grid order; the test-best config (0.99) is never chosen.
    assert (best["lr"], best["momentum"], best["f1_test"]) == (0.01, 0.9, 0.60)


def test_paper_summary_drops_lr_0_01_and_reports_median_and_mean_absolute_deviation():
    acc = [0.9, 0.7, 0.8, 0.6]
    f1 = [0.5, 0.9, 0.7, 0.8]
    rows = [{"lr": lr, "acc_train_best": a, "recall_train_best": a, "specificity_train_best": a,
             "f1_train_best": f} for lr, a, f in zip((0.1, 0.1, 0.05, 0.05), acc, f1)]
    rows += [{"lr": 0.01, "acc_train_best": 0.0, "recall_train_best": 0.0, "specificity_train_best": 0.0,
              "f1_train_best": 0.0}] * 2
    summary = Q.paper_summary(_toy_grid(rows))
    assert summary["n_configs"] == 4
    assert summary["acc_median"] == pytest.approx(0.75) and summary["acc_mad"] == pytest.approx(0.1)
    assert summary["f1_median"] == pytest.approx(0.75)
    assert summary["f1_mad"] == pytest.approx(np.mean(np.abs(np.array(f1) - np.mean(f1))))


def test_plot_writes_a_png(separable, null, tmp_path):
    out = Q.plot_probe({"separable": separable[1], "label_independent": null[1]}, tmp_path / "b" / "probe.png")
    data = out.read_bytes()
    assert out == tmp_path / "b" / "probe.png" and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs

def test_bad_inputs_are_named():
    x, y, split = make_plate(shift=1.0)
    with pytest.raises(ValueError, match=r"is_drug: expected shape \(480,\)"):
        Q.controls_probe(x, y[:-1], split)
    with pytest.raises(ValueError, match=r"split: expected shape \(480,\)"):
        Q.controls_probe(x, y, split[:-1])
    bad_split = split.astype(object)
    bad_split[7] = "holdout"
    with pytest.raises(ValueError, match="'holdout' at row 7"):
        Q.controls_probe(x, y, bad_split)
    bad_y = y.copy()
    bad_y[9] = 2
    with pytest.raises(ValueError, match="row 9"):
        Q.controls_probe(x, bad_y, split)
    bad_x = x.copy()
    bad_x[11, 3] = np.inf
    with pytest.raises(ValueError, match="row 11"):
        Q.controls_probe(bad_x, y, split)
    only_drugs = np.where((split == "train") & (y == 0), "test", split)
    with pytest.raises(ValueError, match="no controls"):
        Q.controls_probe(x, y, only_drugs)
    with pytest.raises(ValueError, match="grid: config 1"):
        Q.controls_probe(x, y, split, grid=[(0.1, 0.9, 0.0), (0.1, 1.5, 0.0)])
    with pytest.raises(ValueError, match="batch_size"):
        Q.controls_probe(x, y, split, batch_size=0)
