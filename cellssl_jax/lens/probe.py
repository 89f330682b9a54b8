"""Linear probes for the lens evaluation: do lens features ``E(L(x))`` classify drugs better than ``E(x)``?

Pure functions on feature arrays (float32 ``[N, F]``), integer labels in ``[0, K)`` and a per-row split
(``'train' / 'val' / 'test'``, split by well by the caller so neighbouring frames do not leak). Nothing here reads
files or knows about images.

Two protocols (see ``../shared/docs/original_method.md`` §6.4, §8.1, §8.3):

- **Honest (default).** A ``Linear(F, K)`` probe trained with cross-entropy on its logits, a fixed number of epochs;
  top-1/top-3 measured at dataset level on train, val and test with the final weights; hyper-parameters chosen on
  val (``best_config``), never on test; methods compared on the test metric (``compare``).
- **``paper_faithful=True``.** The authors' ``DrugClassifier`` (``Linear → Softmax``) trained with
  ``CrossEntropyLoss`` on those probabilities (a double softmax); metrics are torchmetrics-style averages over
  shuffled ``drop_last`` batches; the training metrics are the running ones of the forward passes made during the
  epoch (before each step's update), as the authors' loop logs them; per config the epoch with the best *training*
  micro top-3 F1 is kept and its *training* top-3 accuracy is what the authors compared (``compare(...,
  metric='top3_train')``). That is a training-set number: it says how well a probe fits, not how well it generalises.

A note on the authors' F1: with torchmetrics' micro average and ``top_k=3`` every row predicts exactly 3 classes, so
precision = tp / 3N = acc / 3 and recall = tp / N = acc, hence F1 = 2·acc/(k+1) = acc/2. "Best training F1" is
therefore exactly "best training top-3 accuracy"; ``micro_topk_f1`` computes it from the counts, not from that
identity, and the tests check the identity.

Speed: the whole fit (all epochs, all batches) is one jitted ``lax.scan`` over epochs of a ``lax.scan`` over batches,
and ``probe_grid`` trains all learning rates of one batch size at once with ``vmap`` (same init and batch order, so
the features are read once per step for every learning rate). It compiles once per (rows, F, K, batch geometry,
number of learning rates, loss); the shuffles are drawn on the host so they stay out of the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from scipy.stats import mannwhitneyu
from tqdm.auto import tqdm

from cellssl_jax.arrays import check_features as _check_features, check_labels as _check_labels
from cellssl_jax.arrays import torch_linear_params as _torch_linear_init
from cellssl_jax.plotting import plt, save as save_figure

SPLITS = ("train", "val", "test")
GRID_COLUMNS = ("features", "lr", "batch_size", "seed", "top1_train", "top3_train", "top1_val", "top3_val",
                "top1_test", "top3_test", "f1_train")
# The authors' learning-rate cut before their Mann-Whitney test (§6.4 item 6).
PAPER_MAX_LR = 0.01


@dataclass(frozen=True)
class ProbeConfig:
    lr: float
    batch_size: int
    epochs: int = 30
    seed: int = 0


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields with numpy, not ==
class ProbeParams:
    """A trained ``Linear(F, K)``: ``logits = x @ weight + bias`` (weight is ``[F, K]``, the transpose of torch's).

    ``history`` holds one value per epoch of the running training metrics, averaged over that epoch's batches and
    computed from the forward pass made before each update (as the authors log them): ``loss``, ``top1``, ``top3``.
    ``paper_faithful`` records which loss trained it; it does not change how ``predict_proba`` reads it.
    """

    weight: np.ndarray
    bias: np.ndarray
    paper_faithful: bool = False
    history: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: bad rows are named, so a broken feature file is found quickly.

def _check_probs(probs, y, k: int) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs: expected [N, K], got shape {probs.shape}")
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k={k} must be in [1, K={probs.shape[1]}]")
    return probs, _check_labels(y, probs.shape[0], probs.shape[1])


# ----------------------------------------------------------------------------------------------------------------------
# The probe in JAX

def _topk_hits(scores: jax.Array, y: jax.Array, k: int) -> jax.Array:
    """1.0 where the true class is among the ``k`` highest scores. Ties are broken towards the lower class index (a
    deterministic stand-in for ``torch.topk``, whose tie order is unspecified), so equal scores never count as a hit
    for every tied class at once: uniform scores give exactly chance level, not 100%. A row with a NaN score (a
    diverged probe) is a miss: NaN compares False with everything, so it would otherwise rank first."""
    true_score = jnp.take_along_axis(scores, y[:, None], axis=1)
    classes = jnp.arange(scores.shape[1])[None, :]
    ahead = (scores > true_score) | ((scores == true_score) & (classes < y[:, None]))
    return ((ahead.sum(axis=1) < k) & ~jnp.isnan(scores).any(axis=1)).astype(jnp.float32)


def probe_loss(params: Mapping[str, jax.Array], x: jax.Array, y: jax.Array, *, paper_faithful: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    """Mean loss over the batch and the scores the metrics rank.

    Default: cross-entropy on the logits. ``paper_faithful``: the authors' ``Softmax`` output fed to
    ``CrossEntropyLoss``, which applies log-softmax again (double softmax, §8.1); the returned scores are then the
    softmax probabilities, which is what the authors' torchmetrics ranked.
    """
    logits = x @ params["weight"] + params["bias"]
    scores = jax.nn.softmax(logits, axis=-1) if paper_faithful else logits
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, y).mean()
    return loss, scores


def _batching(n: int, batch_size: int) -> tuple[int, int]:
    """(rows per batch, batches per epoch) with drop_last; batch_size >= n gives one full batch, not zero."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError("no rows to train on")
    if batch_size >= n:
        return n, 1
    return batch_size, n // batch_size


@functools.partial(jax.jit, static_argnums=(1, 2))
def _torch_linear_init_jit(key, n_features, n_classes):
    return _torch_linear_init(key, n_features, n_classes)


def _epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """Row indices ``[epochs, batches, rows]``: a fresh seeded shuffle per epoch, cut into drop_last batches. Drawn
    on the host (numpy) rather than inside the jitted fit: the same stream for every batch size and feature set of a
    seed, and a smaller program to compile."""
    rows, n_batches = _batching(n, batch_size)
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n)[: rows * n_batches].reshape(n_batches, rows) for _ in range(epochs)]
                    ).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("paper_faithful",))
def _fit_lrs(x, y, lrs, params0, batches, *, paper_faithful):
    """Train one probe per learning rate in ``lrs`` (vmapped), all from ``params0`` and the same ``batches``
    (``[epochs, n_batches, batch_size]`` row indices): a ``lax.scan`` over epochs of a ``lax.scan`` over batches.

    Returns the final params, the params at the epoch of best running training top-3 F1 (first such epoch, as
    ``idxmax``), and the per-epoch running metrics, each with a leading learning-rate axis.
    """
    k3 = min(3, params0["bias"].shape[0])

    def fit_one(lr):
        optimizer = optax.adam(lr)  # torch Adam defaults: betas (0.9, 0.999), eps 1e-8

        def step(carry, batch_idx):
            params, opt_state = carry
            xb, yb = x[batch_idx], y[batch_idx]
            (loss, scores), grads = jax.value_and_grad(probe_loss, has_aux=True)(
                params, xb, yb, paper_faithful=paper_faithful)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = (loss, _topk_hits(scores, yb, 1).mean(), _topk_hits(scores, yb, k3).mean())
            return (params, opt_state), metrics

        def epoch(carry, epoch_batches):
            params, opt_state, best_params, best_f1 = carry
            (params, opt_state), (loss, top1, top3) = jax.lax.scan(step, (params, opt_state), epoch_batches)
            loss, top1, top3 = loss.mean(), top1.mean(), top3.mean()
            f1 = 2.0 * top3 / (k3 + 1)  # the authors' micro top-k F1 of batch-averaged P = acc/k, R = acc
            better = f1 > best_f1
            best_params = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best_params)
            best_f1 = jnp.where(better, f1, best_f1)
            return (params, opt_state, best_params, best_f1), (loss, top1, top3, f1)

        carry0 = (params0, optimizer.init(params0), params0, jnp.float32(-1.0))
        (params, _, best_params, _), history = jax.lax.scan(epoch, carry0, batches)
        return params, best_params, history

    return jax.vmap(fit_one)(lrs)


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int, lrs: Sequence[float], batch_size: int, epochs: int,
         seed: int, paper_faithful: bool):
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    params0 = _torch_linear_init_jit(jax.random.key(seed), x.shape[1], n_classes)
    batches = _epoch_batches(len(y), batch_size, epochs, seed)
    final, best, (loss, top1, top3, f1) = _fit_lrs(
        jnp.asarray(x), jnp.asarray(y), jnp.asarray(lrs, jnp.float32), params0, jnp.asarray(batches),
        paper_faithful=paper_faithful)
    history = {"loss": np.asarray(loss), "top1": np.asarray(top1), "top3": np.asarray(top3), "f1": np.asarray(f1)}
    return jax.device_get(final), jax.device_get(best), history


def _to_params(tree, i: int, paper_faithful: bool, history: dict[str, np.ndarray] | None = None) -> ProbeParams:
    return ProbeParams(weight=np.asarray(tree["weight"][i]), bias=np.asarray(tree["bias"][i]),
                       paper_faithful=paper_faithful,
                       history={} if history is None else {k: v[i] for k, v in history.items()})


def train_probe(x_train, y_train, n_classes: int, cfg: ProbeConfig, *, paper_faithful: bool = False) -> ProbeParams:
    """Train the authors' ``DrugClassifier`` (``Linear(F, K)``) with Adam(``cfg.lr``) for ``cfg.epochs`` epochs.

    Each epoch shuffles the rows (one numpy stream seeded by ``cfg.seed``) and runs ``N // batch_size`` batches,
    dropping the remainder as the authors' ``drop_last=True`` loader does. When ``batch_size > N`` torch would run zero
    batches (and divide by zero when averaging); we run one full batch per epoch instead. Init as ``torch.nn.Linear``
    (uniform ±1/sqrt(F)), from ``cfg.seed``: same seed, same inputs → identical weights.

    ``paper_faithful=False``: cross-entropy on the logits. ``True``: cross-entropy on softmax probabilities (double
    softmax, §8.1), which weakens the gradient as the probe grows confident. Returns the weights after the last epoch.
    """
    x = _check_features(x_train, "x_train")
    y = _check_labels(y_train, x.shape[0], n_classes, "y_train")
    final, _, history = _fit(x, y, n_classes, [cfg.lr], cfg.batch_size, cfg.epochs, cfg.seed, paper_faithful)
    return _to_params(final, 0, paper_faithful, history)


@jax.jit
def _softmax_linear(x, weight, bias):
    return jax.nn.softmax(x @ weight + bias, axis=-1)


@jax.jit
def _log_softmax_linear(x, weight, bias):
    return jax.nn.log_softmax(x @ weight + bias, axis=-1)


def predict_proba(params: ProbeParams, x) -> np.ndarray:
    """Class probabilities ``[N, K]``: softmax of the linear layer. In ``paper_faithful`` mode the classifier's own
    output already is this softmax (the second softmax lives only inside the loss), so both modes read the same."""
    x = _check_features(x, "x")
    if x.shape[1] != params.weight.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features, the probe expects {params.weight.shape[0]}")
    return np.asarray(_softmax_linear(x, params.weight, params.bias))


def predict_log_proba(params: ProbeParams, x) -> np.ndarray:
    """Log class probabilities ``[N, K]`` (log-softmax of the linear layer). Rank on these, not on ``predict_proba``:
    in float32 a class more than ~100 logits below the top gets probability exactly 0, so the lower classes tie and
    top-k would be decided by class index instead of by the probe."""
    x = _check_features(x, "x")
    if x.shape[1] != params.weight.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features, the probe expects {params.weight.shape[0]}")
    return np.asarray(_log_softmax_linear(x, params.weight, params.bias))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def _hits(probs: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(_topk_hits(jnp.asarray(probs), jnp.asarray(y), k))


def topk_accuracy(probs, y, k: int) -> float:
    """Fraction of rows whose true class is among the ``k`` highest probabilities, over the whole set (ties go to
    the lower class index)."""
    probs, y = _check_probs(probs, y, k)
    if len(y) == 0:
        return float("nan")
    return float(_hits(probs, y, k).mean())


def batch_averaged_topk(probs, y, k: int, batch_size: int, *, seed: int | None = None) -> float:
    """The authors' number: torchmetrics top-k accuracy per batch, averaged over batches of a ``drop_last`` loader
    (§6.4, §8.3), so up to ``batch_size - 1`` rows are never scored and small batches weigh as much as full ones
    would. ``seed`` shuffles the rows first, as the authors' shuffled test loader did; ``None`` keeps row order.
    ``batch_size > N`` scores one full batch (torch would score none and divide by zero)."""
    probs, y = _check_probs(probs, y, k)
    if len(y) == 0:
        return float("nan")
    rows, n_batches = _batching(len(y), batch_size)
    order = np.arange(len(y)) if seed is None else np.random.default_rng(seed).permutation(len(y))
    hits = _hits(probs, y, k)[order[: rows * n_batches]].reshape(n_batches, rows)
    return float(hits.mean(axis=1).mean())


def micro_topk_f1(probs, y, k: int = 3) -> float:
    """torchmetrics' micro F1 with ``top_k=k`` at dataset level: each row predicts its k top classes, so
    tp = hits, fp = kN - tp, fn = N - tp; F1 = 2PR / (P + R) (0 when both are 0)."""
    probs, y = _check_probs(probs, y, k)
    if len(y) == 0:
        return float("nan")
    tp = float(_hits(probs, y, k).sum())
    fp, fn = k * len(y) - tp, len(y) - tp
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def per_group_accuracy(probs, y, groups, ks: Sequence[int] = (1, 3)) -> pd.DataFrame:
    """Dataset-level top-k accuracy within each group (cell line): columns ``group, n, top1, top3`` (one ``top{k}``
    per k), one row per group, sorted by group. The ``n`` add up to ``len(y)``."""
    probs, y = _check_probs(probs, y, max(ks))
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups: expected shape {y.shape}, got {groups.shape}")
    hits = {k: _hits(probs, y, k) for k in ks}
    rows = []
    for group in sorted(pd.unique(groups)):
        mask = groups == group
        rows.append({"group": group, "n": int(mask.sum()), **{f"top{k}": float(hits[k][mask].mean()) for k in ks}})
    return pd.DataFrame(rows, columns=["group", "n", *[f"top{k}" for k in ks]])


# ----------------------------------------------------------------------------------------------------------------------
# The grid and its comparison

def probe_grid(features: Mapping[str, np.ndarray], y, split, *, lrs: Sequence[float] = (5e-4, 1e-3, 5e-3, 1e-2),
               batch_sizes: Sequence[int] = (256, 512, 1024, 2048), epochs: int = 30, seeds: Sequence[int] = (0,),
               paper_faithful: bool = False, n_classes: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Train a fresh probe per feature set × lr × batch size × seed on the ``split == 'train'`` rows and score it.

    Every feature set sees the same seeds, hence the same init and batch order for the same config (a paired
    design, so ``compare`` can count per-config wins). ``n_classes`` defaults to ``max(y) + 1``.

    Honest mode: top-1/top-3 at dataset level with the final weights on train, val and test; ``f1_train`` is the
    authors' micro top-3 F1 on train at dataset level. ``paper_faithful``: double-softmax training; per config the
    epoch with the best running training F1 is kept (§6.4 item 5); ``top*_train``/``f1_train`` are that epoch's
    running batch-averaged training metrics, and ``top*_val``/``top*_test`` are batch-averaged over a shuffled
    ``drop_last`` loader with that epoch's weights. A split with no rows gives NaN.
    """
    if not features:
        raise ValueError("features: give at least one feature set")
    y = np.asarray(y)
    split = np.asarray(split).astype(str)
    if split.shape != y.shape:
        raise ValueError(f"split: expected shape {y.shape}, got {split.shape}")
    unknown = ~np.isin(split, SPLITS)
    if unknown.any():
        row = np.flatnonzero(unknown)[0]
        raise ValueError(f"split: value {split[row]!r} at row {row} is not one of {SPLITS}")
    n_classes = int(np.max(y)) + 1 if n_classes is None else n_classes
    y = _check_labels(y, len(y), n_classes, "y")
    masks = {s: split == s for s in SPLITS}
    if not masks["train"].any():
        raise ValueError("split: no 'train' rows")
    lrs = [float(lr) for lr in lrs]
    k3 = min(3, n_classes)

    checked = {}
    for name, x in features.items():
        checked[name] = _check_features(x, f"features[{name!r}]")
        if checked[name].shape[0] != len(y):
            raise ValueError(f"features[{name!r}] has {checked[name].shape[0]} rows, y has {len(y)}")

    rows = []
    jobs = [(name, bs, seed) for name in features for bs in batch_sizes for seed in seeds]
    for name, bs, seed in tqdm(jobs, desc="probe grid", disable=not progress):
        x = checked[name]
        final, best, history = _fit(x[masks["train"]], y[masks["train"]], n_classes, lrs, bs, epochs, seed,
                                    paper_faithful)
        for i, lr in enumerate(lrs):
            row = {"features": name, "lr": lr, "batch_size": int(bs), "seed": int(seed)}
            if paper_faithful:
                params = _to_params(best, i, True)
                at = int(np.argmax(history["f1"][i]))  # first max, like the authors' idxmax on the history CSV
                row |= {"top1_train": float(history["top1"][i][at]), "top3_train": float(history["top3"][i][at]),
                        "f1_train": float(history["f1"][i][at])}
                for s in ("val", "test"):
                    probs = predict_proba(params, x[masks[s]])
                    row |= {f"top1_{s}": batch_averaged_topk(probs, y[masks[s]], 1, bs, seed=seed),
                            f"top3_{s}": batch_averaged_topk(probs, y[masks[s]], k3, bs, seed=seed)}
            else:
                params = _to_params(final, i, False)
                for s in SPLITS:
                    probs = predict_log_proba(params, x[masks[s]])  # ranks as the probabilities, without underflow
                    row |= {f"top1_{s}": topk_accuracy(probs, y[masks[s]], 1),
                            f"top3_{s}": topk_accuracy(probs, y[masks[s]], k3)}
                    if s == "train":
                        row["f1_train"] = micro_topk_f1(probs, y[masks[s]], k3)
            rows.append(row)
    return pd.DataFrame(rows, columns=list(GRID_COLUMNS))


def compare(grid: pd.DataFrame, baseline: str = "no_lens", metric: str = "top3_test", *,
            max_lr: float | None = PAPER_MAX_LR) -> dict[str, dict]:
    """Compare every other feature set of ``grid`` with ``baseline`` on ``metric`` across configs.

    Per method: mean and median of the metric for baseline and method and their differences (method − baseline);
    the one-sided Mann–Whitney U test (``alternative='less'``: baseline < method) p-value and ``p_times_2`` as the
    authors printed it; and, pairing configs by (lr, batch_size, seed), how often the method wins / ties.
    ``max_lr`` keeps configs with lr ≤ 0.01 as the authors did (a no-op on the default grid; ``None`` keeps all).

    The authors' protocol is ``compare(probe_grid(..., paper_faithful=True), metric='top3_train')``: their
    "+8%" compares *training-set* top-3 accuracies (§6.4 items 5–6); report it as such, and prefer ``top3_test``.
    """
    if metric not in grid.columns:
        raise ValueError(f"metric {metric!r} is not a grid column ({', '.join(grid.columns)})")
    if max_lr is not None:
        grid = grid[grid["lr"] <= max_lr * (1 + 1e-9)]
    names = list(pd.unique(grid["features"]))
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} not in the grid's feature sets {names}")
    keys = ["lr", "batch_size", "seed"]
    base = grid[grid["features"] == baseline]
    out = {}
    for name in names:
        if name == baseline:
            continue
        method = grid[grid["features"] == name]
        a, b = base[metric].to_numpy(float), method[metric].to_numpy(float)
        test = mannwhitneyu(a, b, alternative="less")
        paired = base[keys + [metric]].merge(method[keys + [metric]], on=keys, suffixes=("_base", "_method"))
        diff = paired[f"{metric}_method"] - paired[f"{metric}_base"]
        out[name] = {
            "metric": metric, "split": metric.rsplit("_", 1)[-1], "baseline": baseline,
            "n_baseline": len(a), "n_method": len(b),
            "mean_baseline": float(a.mean()), "mean_method": float(b.mean()), "mean_diff": float(b.mean() - a.mean()),
            "median_baseline": float(np.median(a)), "median_method": float(np.median(b)),
            "median_diff": float(np.median(b) - np.median(a)),
            "u_statistic": float(test.statistic), "p_less": float(test.pvalue), "p_times_2": float(2 * test.pvalue),
            "paired_n": len(paired), "paired_wins": int((diff > 0).sum()), "paired_ties": int((diff == 0).sum()),
        }
    return out


def best_config(grid: pd.DataFrame, features_name: str, metric: str = "top3_val") -> pd.Series:
    """The (lr, batch_size) with the best mean ``metric`` over seeds for one feature set: model selection on the
    validation split. Test metrics are refused, so the test numbers of the chosen row stay an unbiased estimate.
    Returns the seed-averaged row (all grid metrics) with ``n_seeds``; ties go to the first config in grid order."""
    if metric.endswith("_test"):
        raise ValueError(f"best_config selects on {metric!r}, a test metric; select on a '_val' metric")
    if metric not in grid.columns:
        raise ValueError(f"metric {metric!r} is not a grid column")
    rows = grid[grid["features"] == features_name]
    if rows.empty:
        raise ValueError(f"no grid rows for feature set {features_name!r}")
    metrics = [c for c in GRID_COLUMNS if c.startswith(("top", "f1"))]
    means = rows.groupby(["lr", "batch_size"], sort=False)[metrics].mean()
    means["n_seeds"] = rows.groupby(["lr", "batch_size"], sort=False)["seed"].nunique()
    lr, bs = means[metric].idxmax()
    return pd.concat([pd.Series({"features": features_name, "lr": lr, "batch_size": int(bs)}), means.loc[(lr, bs)]])


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def _metric_label(metric: str) -> str:
    kind, split = metric.rsplit("_", 1)
    label = f"{kind.replace('top', 'top-')} accuracy ({split})"
    return label + " — training set" if split == "train" else label


def plot_probe_comparison(grid: pd.DataFrame, path, metric: str = "top3_test", baseline: str = "no_lens") -> Path:
    """The paper's boxplot, over configs, of ``metric`` per feature set, each config drawn as a dot, annotated with
    the one-sided Mann–Whitney p (baseline < method) from ``compare``. Returns ``path`` (PNG)."""
    names = list(pd.unique(grid["features"]))
    values = [grid.loc[grid["features"] == n, metric].to_numpy(float) for n in names]
    stats = compare(grid, baseline=baseline, metric=metric, max_lr=None) if baseline in names else {}
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4.2))
    ax.boxplot(values, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), [n.replace("_", " ") for n in names])
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.7, color="tab:blue", zorder=3)
    top = max((np.nanmax(v) for v in values if len(v)), default=1.0)
    for i, name in enumerate(names, start=1):
        if name in stats:
            s = stats[name]
            ax.text(i, top, f"p={s['p_less']:.2g}\nΔmedian={s['median_diff']:+.3f}", ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(_metric_label(metric))
    ax.set_title(f"Linear probe over {len(values[0]) if values else 0} configs per feature set\n"
                 f"(one-sided Mann–Whitney U vs {baseline.replace('_', ' ')})", fontsize=10)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_per_group(df_by_method: Mapping[str, pd.DataFrame], path) -> Path:
    """Grouped bars per cell line, one panel for top-1 and one for top-3, one bar colour per method (e.g. no lens vs
    lens), from ``per_group_accuracy`` tables. Returns ``path`` (PNG)."""
    if not df_by_method:
        raise ValueError("df_by_method: give at least one method")
    methods = list(df_by_method)
    groups = sorted(set().union(*(set(df["group"]) for df in df_by_method.values())), key=str)
    metrics = [m for m in ("top1", "top3") if all(m in df.columns for df in df_by_method.values())]
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    size = (max(6.0, 0.55 * len(groups) * len(methods) + 2), 3.2 * len(metrics))
    fig, axes = plt.subplots(len(metrics), 1, figsize=size, squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics):
        for j, method in enumerate(methods):
            table = df_by_method[method].set_index("group")
            heights = [float(table[metric].get(g, np.nan)) for g in groups]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, heights, width, label=method.replace("_", " "))
        ax.set_ylabel(metric.replace("top", "top-") + " accuracy")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncols=len(methods))
    first = df_by_method[methods[0]].set_index("group")
    ticks = [f"{g}\n(n={int(first['n'][g])})" if "n" in first.columns and g in first.index else str(g) for g in groups]
    axes[-1, 0].set_xticks(x, ticks, rotation=45, ha="right")
    axes[-1, 0].set_xlabel("cell line")
    return save_figure(fig, path)
