"""Plain-numpy DTW written straight from the definition, for tests of the Numba kernels in ``dtw.py``.

Slow (a Python loop over cells) and deliberately naive: a full cost matrix, a full accumulated matrix, an explicit
band mask. Same conventions as ``dtw.py`` (see its docstring): squared euclidean cell cost, sqrt at the end, band
``-r - max(0, n - m) <= j - i <= r + max(0, m - n)``.
"""

from __future__ import annotations

import numpy as np


def _as_2d(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def band_mask(n: int, m: int, window: int | None) -> np.ndarray:
    """Boolean (n, m) mask of the cells a path may use."""
    i = np.arange(n)[:, None]
    j = np.arange(m)[None, :]
    if window is None:
        return np.ones((n, m), dtype=bool)
    return (j - i >= -window - max(0, n - m)) & (j - i <= window + max(0, m - n))


def accumulated_cost(a, b, window: int | None = None) -> np.ndarray:
    """(n, m) matrix of the cheapest squared cost of a path from (0, 0) to each cell; inf outside the band."""
    x, y = _as_2d(a), _as_2d(b)
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(axis=2)
    allowed = band_mask(len(x), len(y), window)
    acc = np.full(cost.shape, np.inf)
    for i in range(len(x)):
        for j in range(len(y)):
            if not allowed[i, j]:
                continue
            if i == 0 and j == 0:
                acc[i, j] = cost[i, j]
                continue
            best = min(acc[i - 1, j - 1] if i and j else np.inf,
                       acc[i - 1, j] if i else np.inf,
                       acc[i, j - 1] if j else np.inf)
            acc[i, j] = cost[i, j] + best
    return acc


def dtw(a, b, window: int | None = None) -> float:
    return float(np.sqrt(accumulated_cost(a, b, window)[-1, -1]))


def path_cost(a, b, path) -> float:
    """sqrt of the summed squared differences along a given path."""
    x, y = _as_2d(a), _as_2d(b)
    path = np.asarray(path)
    return float(np.sqrt(((x[path[:, 0]] - y[path[:, 1]]) ** 2).sum()))


def lb_keogh(query, candidate, window: int | None) -> float:
    """Envelope of the query values each candidate step may be matched to under the band; sqrt of the summed
    squared excursions of the candidate outside it."""
    q, c = _as_2d(query), _as_2d(candidate)
    allowed = band_mask(len(q), len(c), window)
    total = 0.0
    for j in range(len(c)):
        rows = q[allowed[:, j]]
        upper, lower = rows.max(axis=0), rows.min(axis=0)
        total += (np.clip(c[j] - upper, 0, None) ** 2).sum() + (np.clip(lower - c[j], 0, None) ** 2).sum()
    return float(np.sqrt(total))
