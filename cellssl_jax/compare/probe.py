"""Feature-quality task B (``../shared/docs/original_method.md`` §4.3): can a small probe tell drug-treated frames from
control frames (DMSO / PBS) using an encoder's features? One of the paper's three yardsticks for comparing encoders.

Pure functions on arrays: features ``[N, F]``, ``is_drug`` (1 = any drug at its max concentration, 0 = control) and a
per-row ``split`` of ``'train' / 'val' / 'test'`` that the caller draws **by well**, so frames of one well never sit
on both sides. Nothing here reads files or knows about images.

The authors' probe is ``Linear(F, 256) → LeakyReLU(0.01) → Linear(256, 2) → Softmax`` trained with
``CrossEntropyLoss``, torch default init, SGD over 3 lr × 3 momentum × 3 weight-decay values (27 configs), 25 epochs,
batch 1024, shuffled, last partial batch kept (their task-B loader does not set ``drop_last``, §8.3).

Two readings of every config, side by side in one row:

- **Honest** (``{metric}_{split}``): the final weights scored at dataset level on train, val and test; the config is
  chosen on val (``best_config``). Default mode trains with cross-entropy on logits on features standardised with
  train-split statistics.
- **The authors'** (``{metric}_train_best``): per config, the epoch with the highest *training* F1, whose metrics are
  the running ones of that epoch's forward passes (before each update), averaged over batches as torchmetrics
  averages per-batch values. ``paper_summary`` drops lr = 0.01 and reports median ± mean absolute deviation over the
  remaining 18 configs, as their plot did. These are training-set numbers.

``paper_faithful=True`` changes only what the authors did differently in training: the double softmax (CE applied to
softmax outputs) and raw, unstandardised features (they fed the encoder's codes as they came). Everything is still
scored both ways. Why the honest mode standardises: plain SGD's stable step depends on the feature scale. Seen on the
demo plate's 4096-d ConvAE latent (|x| ≤ 2.6, like the authors' HCT15 reference code, |x| ≤ 2.05): raw features train
fine at lr 0.1. The same codes ×12 (|x| ≤ 31) blow up CE-on-logits at lr 0.1 / momentum 0.9 (running loss ~2e7),
while the double softmax, whose loss is bounded, stalls instead at the majority class. Standardised, every config fits.

The metrics (binary, from a 2×2 confusion matrix) follow torchmetrics' definitions the authors used: accuracy;
recall averaged over the 2 classes weighted by support (which always equals accuracy); precision weighted by support;
specificity macro-averaged over the 2 classes; F1 = 2PR/(P+R) from those P and R (§4.3). For two classes the macro
specificity is the mean of the two per-class recalls, i.e. exactly the balanced accuracy (the mean of recall on drugs
and specificity on drugs); both columns are kept because readers look for either name.

Speed: the 27 configs are one compiled program: ``vmap`` over (lr, momentum, weight decay) of a ``lax.scan`` over
epochs of a ``lax.scan`` over full batches plus one step on the partial batch. Every config starts from the same init
and sees the same batch order (a seeded host-side shuffle, the same stream as ``cellssl_jax.lens.probe``), so the
shared features are read once per step for all configs and configs differ only in their hyper-parameters.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from cellssl_jax.plotting import plt, save as save_figure
from cellssl_jax.arrays import check_features as _check_features, check_labels as _check_labels
from cellssl_jax.arrays import mean_abs_deviation, torch_linear_params as _torch_linear_init

SPLITS = ("train", "val", "test")
HIDDEN = 256
LEAKY_SLOPE = 0.01
# (lr, momentum, weight_decay), lr outermost: the authors' 27 SGD configs (§4.3 "Grid").
PAPER_GRID: tuple[tuple[float, float, float], ...] = tuple(
    itertools.product((0.1, 0.05, 0.01), (0.9, 0.8, 0.7), (1e-3, 1e-4, 1e-5)))
# The authors' plot drops this learning rate before summarising (§4.3 "Selection and aggregation").
PAPER_DROPPED_LR = 0.01
# A feature whose train std is below this is constant on train (a dead unit of a ReLU code, say): it is only centred,
# as sklearn's StandardScaler does. Dividing by a tiny std would blow up any val/test row where that unit fires.
STD_FLOOR = 1e-6

METRICS = ("accuracy", "recall", "precision", "specificity", "f1", "balanced_accuracy")
# The running (per-batch, torchmetrics-style) metrics kept per epoch; balanced accuracy equals specificity there too.
HISTORY_METRICS = ("loss", "accuracy", "recall", "precision", "specificity", "f1")
CONTROLS_COLUMNS = (
    ("lr", "momentum", "weight_decay", "seed", "epochs", "batch_size", "paper_faithful", "finite")
    + tuple(f"n_{s}" for s in SPLITS) + tuple(f"pos_frac_{s}" for s in SPLITS)
    + tuple(f"{m}_{s}" for s in SPLITS for m in METRICS)
    + ("best_epoch",) + tuple(f"{m}_train_best" for m in ("acc", "recall", "precision", "specificity", "f1"))
    + ("loss_last_epoch",))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics from a 2×2 confusion matrix, written once for numpy (dataset level) and jax.numpy (running, in the fit).

def _safe_divide(num, den, fill, xp):
    ok = den > 0
    return xp.where(ok, num / xp.where(ok, den, 1), fill)


def _metrics_from_counts(counts, xp, *, torchmetrics_rules: bool) -> dict:
    """``counts[..., t, p]``: rows of true class t predicted p (class 1 = drug). Returns the ``METRICS`` as arrays.

    ``torchmetrics_rules`` (the running per-batch metrics): an undefined ratio counts 0, and a class with
    tp + fp + fn = 0 is left out of the macro mean, as torchmetrics does. Otherwise (dataset level) a specificity or
    balanced accuracy that needs an absent class is NaN: undefined, not 0. Precision of a class never predicted is 0
    in both (sklearn's and torchmetrics' ``zero_division=0``).
    """
    tp = xp.stack([counts[..., 0, 0], counts[..., 1, 1]], axis=-1)
    support = counts.sum(axis=-1)    # per true class
    predicted = counts.sum(axis=-2)  # per predicted class
    n = support.sum(axis=-1)
    nan = jnp.nan if xp is jnp else np.nan
    accuracy = _safe_divide(tp.sum(axis=-1), n, nan, xp)
    # Weighted recall = Σ_c (support_c / n) · tp_c / support_c = accuracy; written out so the definition is visible.
    recall = _safe_divide((support * _safe_divide(tp, support, 0.0, xp)).sum(axis=-1), n, nan, xp)
    precision = _safe_divide((support * _safe_divide(tp, predicted, 0.0, xp)).sum(axis=-1), n, nan, xp)
    # Specificity of class c = tn_c / (tn_c + fp_c) = the recall of the other class (its rows are c's negatives).
    other_support = support[..., ::-1]
    other_tp = tp[..., ::-1]
    if torchmetrics_rules:
        specificity_c = _safe_divide(other_tp, other_support, 0.0, xp)
        meaningful = (tp + (predicted - tp) + (support - tp)) > 0
        specificity = _safe_divide((specificity_c * meaningful).sum(axis=-1), meaningful.sum(axis=-1), 0.0, xp)
        balanced = specificity
    else:
        specificity = _safe_divide(other_tp, other_support, nan, xp).mean(axis=-1)
        balanced = _safe_divide(tp, support, nan, xp).mean(axis=-1)
    f1 = _safe_divide(2 * precision * recall, precision + recall, 0.0, xp)
    f1 = xp.where(xp.isnan(precision + recall), nan, f1)  # an empty split has no F1, not an F1 of 0
    return {"accuracy": accuracy, "recall": recall, "precision": precision, "specificity": specificity, "f1": f1,
            "balanced_accuracy": balanced}


def _confusion(y_true, y_pred, xp):
    """``[..., 2, 2]`` counts from integer labels and predictions (leading axes broadcast, rows on the last)."""
    t = y_true[..., None, None, :] == xp.arange(2)[:, None, None]
    p = y_pred[..., None, None, :] == xp.arange(2)[None, :, None]
    return (t & p).sum(axis=-1).astype(xp.float32)


def binary_metrics(y_true, y_pred) -> dict[str, float]:
    """Dataset-level metrics of hard predictions (0 = control, 1 = drug): ``METRICS`` plus ``n`` and ``pos_frac``
    (share of drug rows). Empty input gives NaN for every rate; see ``_metrics_from_counts`` for undefined cases."""
    y_true = _check_labels(_as_int_labels(y_true), len(np.asarray(y_true)), 2, "y_true")
    y_pred = _check_labels(_as_int_labels(y_pred), len(y_true), 2, "y_pred")
    counts = _confusion(y_true, y_pred, np)
    out = {k: float(v) for k, v in _metrics_from_counts(counts, np, torchmetrics_rules=False).items()}
    return out | {"n": len(y_true), "pos_frac": float(y_true.mean()) if len(y_true) else float("nan")}


def _as_int_labels(y) -> np.ndarray:
    y = np.asarray(y)
    return y.astype(np.int32) if y.dtype == bool else y


# ----------------------------------------------------------------------------------------------------------------------
# The probe in JAX

def init_probe(seed: int, n_features: int) -> dict:
    """The authors' probe at ``torch.nn.Linear`` default init (weight and bias uniform in ±1/sqrt(fan_in)) for both
    layers, from ``jax.random.key(seed)``. Weights are ``[in, out]``, the transpose of torch's."""
    k_hidden, k_out = jax.random.split(jax.random.key(seed))
    return {"hidden": _torch_linear_init(k_hidden, n_features, HIDDEN), "out": _torch_linear_init(k_out, HIDDEN, 2)}


def probe_logits(params: Mapping, x: jax.Array) -> jax.Array:
    """``Linear → LeakyReLU(0.01) → Linear``: the logits ``[N, 2]`` (the authors' Softmax comes after)."""
    h = jax.nn.leaky_relu(x @ params["hidden"]["weight"] + params["hidden"]["bias"], LEAKY_SLOPE)
    return h @ params["out"]["weight"] + params["out"]["bias"]


def probe_loss(params: Mapping, x: jax.Array, y: jax.Array, *, paper_faithful: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over the batch, and the logits. ``paper_faithful``: the CE is applied to the softmax
    probabilities, as the authors' ``Softmax`` head followed by ``CrossEntropyLoss`` does (a double softmax, whose
    loss lives in [log(1+e^-1), log(1+e)] for two classes and whose gradient fades as the probe grows confident)."""
    logits = probe_logits(params, x)
    scores = jax.nn.softmax(logits, axis=-1) if paper_faithful else logits
    return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), logits


def torch_sgd(lr, momentum, weight_decay) -> optax.GradientTransformation:
    """``torch.optim.SGD(lr, momentum, weight_decay)`` (dampening 0, no Nesterov): torch adds ``wd · p`` to the
    gradient *before* the momentum buffer (``buf = m · buf + g + wd · p``; first step ``buf = g + wd · p``), so the
    decay goes first in the chain. optax's ``trace`` starts from zeros, which gives the same first step. Applied to
    every parameter, biases included, as torch does with one parameter group. Arguments may be traced values."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum))


def _shuffled_batches(n: int, batch_size: int, epochs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices per epoch: ``full`` ``[epochs, n // batch_size, batch_size]`` and ``last`` ``[epochs, n %
    batch_size]``, the partial batch a torch loader without ``drop_last`` keeps (one batch of n rows when
    ``batch_size >= n``). One fresh permutation per epoch from ``np.random.default_rng(seed)``: the same stream as
    ``cellssl_jax.lens.probe._epoch_batches``, which only knows drop_last."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError("no rows to train on")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    n_full = n // batch_size
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(epochs)]).astype(np.int32)
    cut = n_full * batch_size
    return perms[:, :cut].reshape(epochs, n_full, batch_size), perms[:, cut:]


def _check_grid(grid) -> np.ndarray:
    hyper = np.asarray(grid, dtype=np.float64)
    if hyper.ndim != 2 or hyper.shape[1] != 3 or len(hyper) == 0:
        raise ValueError(f"grid: expected (lr, momentum, weight_decay) triples, got shape {hyper.shape}")
    bad = ~((hyper[:, 0] > 0) & (hyper[:, 1] >= 0) & (hyper[:, 1] < 1) & (hyper[:, 2] >= 0))
    if bad.any():
        row = np.flatnonzero(bad)[0]
        raise ValueError(f"grid: config {row} {tuple(hyper[row])} needs lr > 0, 0 <= momentum < 1, weight_decay >= 0")
    return hyper.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("paper_faithful",))
def _fit_grid(x, y, hyper, params0, full_batches, last_batch, *, paper_faithful):
    """Train one probe per row of ``hyper`` (``[C, 3]``: lr, momentum, weight decay), vmapped, all from ``params0``
    and the same batches. Returns the final params (leading config axis) and the per-epoch running metrics
    ``[C, epochs, len(HISTORY_METRICS)]``."""
    has_full, has_last = full_batches.shape[1] > 0, last_batch.shape[1] > 0

    def fit_one(h):
        optimizer = torch_sgd(h[0], h[1], h[2])

        def step(carry, rows):
            params, opt_state = carry
            xb, yb = x[rows], y[rows]
            (loss, logits), grads = jax.value_and_grad(probe_loss, has_aux=True)(
                params, xb, yb, paper_faithful=paper_faithful)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            # The metrics of the forward pass made before this update, as the authors' loop logs them.
            counts = _confusion(yb, jnp.argmax(logits, axis=-1), jnp)
            m = _metrics_from_counts(counts, jnp, torchmetrics_rules=True)
            batch = jnp.stack([loss] + [m[k] for k in HISTORY_METRICS[1:-1]])
            return (optax.apply_updates(params, updates), opt_state), batch

        def epoch(carry, batches):
            full, last = batches
            per_batch = []
            if has_full:
                carry, values = jax.lax.scan(step, carry, full)
                per_batch.append(values)
            if has_last:
                carry, values = step(carry, last)
                per_batch.append(values[None])
            # torchmetrics-style: each batch's value, then the mean over batches (a small last batch weighs as much).
            mean = jnp.concatenate(per_batch).mean(axis=0)
            p, r = mean[3], mean[2]
            f1 = jnp.where(p + r > 0, 2 * p * r / jnp.where(p + r > 0, p + r, 1.0), 0.0)
            return carry, jnp.concatenate([mean, f1[None]])

        (params, _), history = jax.lax.scan(epoch, (params0, optimizer.init(params0)), (full_batches, last_batch))
        return params, history

    return jax.vmap(fit_one)(hyper)


@jax.jit
def _predict_grid(params, x):
    """Hard predictions ``[C, N]`` of every config's probe (argmax of logits = argmax of the authors' softmax)."""
    return jax.vmap(lambda p: jnp.argmax(probe_logits(p, x), axis=-1))(params)


def fit_probes(x_train, y_train, grid: Sequence[tuple[float, float, float]] = PAPER_GRID, *, seed: int = 0,
               epochs: int = 25, batch_size: int = 1024, paper_faithful: bool = False) -> tuple[dict, dict]:
    """Train a fresh probe for each (lr, momentum, weight_decay) of ``grid`` on ``x_train`` as given (no scaling).

    All configs share the init ``init_probe(seed, F)`` and the shuffles ``_shuffled_batches(N, batch_size, epochs,
    seed)``; one config alone gives the same weights as inside a grid. Returns the final params (numpy, leading
    config axis) and the running history ``{name: [C, epochs]}`` for ``HISTORY_METRICS``.
    """
    x = _check_features(x_train, "x_train")
    y = _check_labels(_as_int_labels(y_train), x.shape[0], 2, "y_train")
    hyper = _check_grid(grid)
    full, last = _shuffled_batches(len(y), batch_size, epochs, seed)
    params, history = _fit_grid(jnp.asarray(x), jnp.asarray(y), jnp.asarray(hyper), init_probe(seed, x.shape[1]),
                                jnp.asarray(full), jnp.asarray(last), paper_faithful=paper_faithful)
    history = np.asarray(history)
    return jax.device_get(params), {name: history[..., i] for i, name in enumerate(HISTORY_METRICS)}


# ----------------------------------------------------------------------------------------------------------------------
# Task B

def standardise(x, train_mask) -> np.ndarray:
    """``(x - mean) / std`` with mean and std of the ``train_mask`` rows only, so val/test statistics never leak into
    training. Features constant on train (std < ``STD_FLOOR``) are only centred."""
    x = np.asarray(x, dtype=np.float32)
    train = x[np.asarray(train_mask, dtype=bool)].astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    scale = np.where(std < STD_FLOOR, 1.0, std)
    return ((x - mean) / scale).astype(np.float32)


def _check_split(split, n_rows: int) -> np.ndarray:
    split = np.asarray(split).astype(str)
    if split.shape != (n_rows,):
        raise ValueError(f"split: expected shape ({n_rows},), got {split.shape}")
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        row = np.flatnonzero(unknown)[0]
        raise ValueError(f"split: value {str(split[row])!r} at row {row} is not one of {SPLITS}")
    return split


def controls_probe(features, is_drug, split, *, seed: int = 0, epochs: int = 25, batch_size: int = 1024,
                   grid: Sequence[tuple[float, float, float]] = PAPER_GRID, paper_faithful: bool = False
                   ) -> pd.DataFrame:
    """Task B for one encoder: drugs (``is_drug`` 1) vs controls (0), one row per config of ``grid``
    (``CONTROLS_COLUMNS``), trained on the ``split == 'train'`` rows.

    Honest mode: features standardised with train statistics, CE on logits. ``paper_faithful``: raw features and the
    double softmax. In both, ``{metric}_{split}`` are dataset-level metrics of the final weights (NaN for an empty
    split) and ``{metric}_train_best`` the authors' running training metrics at the epoch of best running training
    F1 (``best_epoch``, 1-based, first one on ties as pandas' ``idxmax``). ``finite`` is False when a config
    diverged (non-finite weights); ``loss_last_epoch`` is its mean running loss over the last epoch.
    """
    x = _check_features(features, "features")
    y = _check_labels(_as_int_labels(is_drug), x.shape[0], 2, "is_drug")
    split = _check_split(split, x.shape[0])
    masks = {s: split == s for s in SPLITS}
    train_labels = set(np.unique(y[masks["train"]]).tolist())
    if train_labels != {0, 1}:
        missing = sorted({0, 1} - train_labels)
        names = ", ".join({0: "controls (0)", 1: "drugs (1)"}[c] for c in missing)
        raise ValueError(f"is_drug: the 'train' rows have no {names}; a probe needs both classes to train")
    if not paper_faithful:
        x = standardise(x, masks["train"])
    hyper = _check_grid(grid)
    grid_values = np.asarray(grid, dtype=np.float64)  # reported as given; float32 only inside the compiled fit

    params, history = fit_probes(x[masks["train"]], y[masks["train"]], hyper, seed=seed, epochs=epochs,
                                 batch_size=batch_size, paper_faithful=paper_faithful)
    finite = np.all([np.isfinite(leaf).reshape(len(hyper), -1).all(axis=1) for leaf in jax.tree.leaves(params)],
                    axis=0)
    predictions = np.asarray(_predict_grid(params, jnp.asarray(x)))
    per_split = {}
    for s in SPLITS:
        counts = _confusion(y[masks[s]], predictions[:, masks[s]], np)
        per_split[s] = _metrics_from_counts(counts, np, torchmetrics_rules=False)

    rows = []
    for i, (lr, momentum, weight_decay) in enumerate(grid_values.tolist()):
        at = int(np.argmax(history["f1"][i]))  # first maximum
        row = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": int(seed),
               "epochs": int(epochs), "batch_size": int(batch_size), "paper_faithful": bool(paper_faithful),
               "finite": bool(finite[i])}
        for s in SPLITS:
            n = int(masks[s].sum())
            row[f"n_{s}"] = n
            row[f"pos_frac_{s}"] = float(y[masks[s]].mean()) if n else float("nan")
            row |= {f"{m}_{s}": float(per_split[s][m][i]) for m in METRICS}
        row["best_epoch"] = at + 1
        row |= {f"{short}_train_best": float(history[m][i][at])
                for short, m in (("acc", "accuracy"), ("recall", "recall"), ("precision", "precision"),
                                 ("specificity", "specificity"), ("f1", "f1"))}
        row["loss_last_epoch"] = float(history["loss"][i][-1])
        rows.append(row)
    return pd.DataFrame(rows, columns=list(CONTROLS_COLUMNS))


def best_config(grid_df: pd.DataFrame) -> pd.Series:
    """The honest choice: the config with the highest val F1 (ties → lower lr, then grid order); its test columns are
    the estimate to report. Selection never looks at test. Raises when there is no val split to select on."""
    _require_columns(grid_df, ("lr", "f1_val"))
    candidates = grid_df[np.isfinite(grid_df["f1_val"].to_numpy(float))]
    if candidates.empty:
        raise ValueError("best_config: f1_val is NaN for every config (no 'val' rows?); give the probe val wells")
    top = candidates[candidates["f1_val"] == candidates["f1_val"].max()]
    return top.sort_values("lr", kind="stable").iloc[0]


def paper_summary(grid_df: pd.DataFrame) -> pd.Series:
    """The authors' summary: drop lr = 0.01 and report median and mean absolute deviation (their "median ± mad") of
    the best-training-epoch accuracy, recall, specificity and F1, over the remaining configs (18 on the paper grid).
    Training-set numbers: they say how well a probe fits, not how well it generalises."""
    _require_columns(grid_df, ("lr", "acc_train_best", "f1_train_best"))
    kept = grid_df[~np.isclose(grid_df["lr"].to_numpy(float), PAPER_DROPPED_LR)]
    if kept.empty:
        raise ValueError(f"paper_summary: no config left after dropping lr = {PAPER_DROPPED_LR}")
    out = {"n_configs": len(kept)}
    for short in ("acc", "recall", "specificity", "f1"):
        column = f"{short}_train_best"
        if column in kept.columns:
            values = kept[column].to_numpy(float)
            out[f"{short}_median"] = float(np.median(values))
            out[f"{short}_mad"] = mean_abs_deviation(values)
    return pd.Series(out)


def _require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"grid_df lacks column(s) {missing}; pass the frame controls_probe returned")


# ----------------------------------------------------------------------------------------------------------------------
# Figure

def plot_probe(df_by_model: Mapping[str, pd.DataFrame], path) -> Path:
    """Boxplots over configs of test F1 and test balanced accuracy, one box per model (e.g. ConvAE ours, the authors'
    weights, random init), each config drawn as a dot; chance (0.5) marked on the balanced accuracy. Returns ``path``
    (PNG)."""
    if not df_by_model:
        raise ValueError("df_by_model: give at least one model")
    names = list(df_by_model)
    panels = (("f1_test", "F1 (test, final weights)"), ("balanced_accuracy_test", "balanced accuracy (test)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 + 2.4 * len(names), 4.0), squeeze=False,
                             layout="constrained")
    rng = np.random.default_rng(0)
    for ax, (column, label) in zip(axes[0], panels):
        values = []
        for name in names:
            _require_columns(df_by_model[name], (column,))
            v = df_by_model[name][column].to_numpy(float)
            values.append(v[np.isfinite(v)])
        ax.boxplot(values, showfliers=False)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=12, alpha=0.7, color="tab:blue", zorder=3)
        if column.startswith("balanced"):
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            ax.annotate("chance", (1.0, 0.5), xycoords=("axes fraction", "data"), xytext=(2, 0),
                        textcoords="offset points", va="center", fontsize=8, color="grey")
        ax.set_xticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names], rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    counts = sorted({len(df) for df in df_by_model.values()})
    fig.suptitle(f"Task B, drugs vs controls: probe over {'/'.join(map(str, counts))} configs per model",
                 fontsize=10)
    return save_figure(fig, path)
