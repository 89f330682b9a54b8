"""Small pieces every analysis needs on feature arrays: input checks that name the bad row (a broken feature file is
found quickly), torch's ``nn.Linear`` initialisation as a parameter dict (probes start where the authors' did), and
the authors' spread statistic."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def check_features(x, name: str = "features") -> np.ndarray:
    """A finite float32 ``[N, F]`` array, or a ValueError naming the first bad row."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array [N, F], got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name}: non-finite values in {rows.size} row(s), first at row {rows[0]}")
    return x


def check_labels(y, n_rows: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Integer labels in ``[0, n_classes)`` of shape ``(n_rows,)`` as int32, or a ValueError naming the row."""
    y = np.asarray(y)
    if y.shape != (n_rows,):
        raise ValueError(f"{name}: expected shape ({n_rows},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{name}: labels must be integers; row {np.flatnonzero(np.mod(y, 1) != 0)[0]} is not")
    y = y.astype(np.int32)
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        row = np.flatnonzero(bad)[0]
        raise ValueError(f"{name}: label {y[row]} at row {row} is outside [0, {n_classes})")
    return y


def torch_linear_params(key: jax.Array, n_features: int, n_out: int) -> dict[str, jax.Array]:
    """``torch.nn.Linear``'s default: weight and bias uniform in ±1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5)).
    ``weight`` is ``[n_features, n_out]``, the transpose of torch's."""
    bound = 1.0 / math.sqrt(n_features)
    k_w, k_b = jax.random.split(key)
    return {"weight": jax.random.uniform(k_w, (n_features, n_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (n_out,), jnp.float32, -bound, bound)}


def mean_abs_deviation(values) -> float:
    """pandas' removed ``Series.mad()`` (the authors' "± mad"): mean |x − mean(x)| over the non-NaN values (NaN if
    there are none)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan")
    with np.errstate(invalid="ignore"):  # inf - inf: an infinite value has no finite deviation
        return float(np.mean(np.abs(x - x.mean())))


def json_default(value):
    """``json.dumps(default=...)`` for what analyses put in their summaries: numpy scalars and arrays, paths."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
