"""Dynamic time warping: Numba kernels and the thin dispatch over them.

Convention (the one of dtaidistance and tslearn): the DTW distance is the square root of the smallest sum of squared
differences along a monotone warping path from (0, 0) to (n-1, m-1), in float64. Multivariate series (n, d) use
*dependent* DTW: the cost of cell (i, j) is the squared euclidean distance between the d-vectors a[i] and b[j].

Band (``window``): a Sakoe–Chiba radius r, or ``None`` for unconstrained DTW. For equal lengths the allowed cells are
|i - j| <= r. For unequal lengths n (rows) and m (columns) the band is widened by the length difference so that it
always contains the end cell, exactly as dtaidistance and tslearn do::

    -r - max(0, n - m)  <=  j - i  <=  r + max(0, m - n)        (0-based i, j)

so ``window=r`` here equals dtaidistance ``window=r + 1`` and tslearn ``sakoe_chiba_radius=r``.

Collections (``series`` arguments) are a list of 1-D (univariate) or 2-D (n_i, d) arrays of any lengths, a 2-D
array (N, n) of univariate series, or a 3-D array (N, n, d). A single series is a 1-D array (n,) or a 2-D array (n, d).
Values must be finite: NaN padding (tslearn's variable-length format) is refused; pass a list of arrays instead.

How the all-pairs kernel is fast: it runs 8 pairs at once, one per SIMD lane. The DP state of the 8 pairs lives in
8-tuples of floats; LLVM's SLP vectoriser turns each tuple operation into two AVX2 instructions, and the row carried
along j (the "left" and "diagonal" cells) stays in registers. Pairs are ordered by series length so that the 8 pairs
of one chunk have nearly the same shape; lanes with shorter series are padded with whatever the lane held before
(cells past a lane's end never feed back into its result) and each lane reads its result at its own end cell. The
kernel enumerates its pairs itself and writes each distance straight into the result, so a 20,000-series matrix needs
no scratch beyond a few small per-thread buffers; ``condensed=True`` never allocates N x N.
For d > 1 the kernel sweeps two rows at a time and computes the costs of 2 x 2 cells together, so that each vector
it loads serves two cells and eight independent fused multiply-add chains keep the FMA units busy. The threads each
run one plain (non-parallel) worker function over their share of chunks: with the lane kernel inlined straight into
numba's parallel-loop body, LLVM generated code 20-40% slower (measured).
All kernels do the same float operations in the same order (cost summed over dimensions from 0 up, each term added
with one fused multiply-add, then ``min(min(diag, up), left) + cost``, sqrt at the end), so every entry point
returns bit-identical distances.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "NearestNeighbour",
    "cross_distance",
    "distance_matrix",
    "dtw_distance",
    "lb_keogh",
    "nearest_neighbour",
    "nearest_neighbour_search",
    "warping_path",
]

DEFAULT_BLOCK_PAIRS = 1 << 18  # pairs per kernel call (progress granularity): about a second of work or less
# Below this many DP cells a block runs on one thread: waking a second one costs more than it saves, and on a busy
# machine the wait for it to be scheduled can exceed the whole job (measured on the shared 2-core machine, N = 31
# series of length 50-100: 28 ms with 2 threads, 2 ms with 1).
_SERIAL_BELOW_CELLS = 4_000_000
# Lower bounds are summed in another order than the DTW path cost; a relative slack keeps rounding from pruning a
# candidate whose true distance ties the best one.
_LB_SLACK = 1e-9


# ----------------------------------------------------------------------------------------------------------------
# Input normalisation (Python side)
# ----------------------------------------------------------------------------------------------------------------

def _radius(window: int | None) -> int:
    """Sakoe–Chiba radius for the kernels; -1 means unconstrained."""
    if window is None:
        return -1
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"dtw: window must be None or an integer radius >= 0, got {window!r}")
    return int(window)


def _as_series(x, what: str) -> np.ndarray:
    """One series as a C-contiguous float64 (n, d) array."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"dtw: {what} must be 1-D (n,) or 2-D (n, d), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"dtw: {what} is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        bad = int(np.argwhere(~np.isfinite(a))[0, 0])
        raise ValueError(f"dtw: {what} has a non-finite value at time step {bad} (NaN padding is not supported; "
                         "pass series of different lengths as a list)")
    return np.ascontiguousarray(a)


def _as_collection(series, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A collection as (packed (N, max_len, d) float64, lengths (N,) int64); padding is zeros and never read."""
    if isinstance(series, np.ndarray) and series.dtype != object:
        arr = np.asarray(series, dtype=np.float64)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise ValueError(f"dtw: {what} as an array must be 2-D (N, n) or 3-D (N, n, d), got shape {arr.shape}")
        if arr.shape[1] == 0 or arr.shape[2] == 0:
            raise ValueError(f"dtw: {what} holds empty series (shape {arr.shape})")
        finite = np.isfinite(arr).reshape(len(arr), -1).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise ValueError(f"dtw: {what}[{bad}] has a non-finite value (NaN padding is not supported; pass "
                             "series of different lengths as a list)")
        return np.ascontiguousarray(arr), np.full(len(arr), arr.shape[1], dtype=np.int64)
    items = [_as_series(s, f"{what}[{k}]") for k, s in enumerate(series)]
    if not items:
        return np.zeros((0, 1, 1)), np.zeros(0, dtype=np.int64)
    dims = {s.shape[1] for s in items}
    if len(dims) > 1:
        first = items[0].shape[1]
        bad = next(k for k, s in enumerate(items) if s.shape[1] != first)
        raise ValueError(f"dtw: {what}[{bad}] has {items[bad].shape[1]} dimensions, {what}[0] has {first}")
    lengths = np.array([len(s) for s in items], dtype=np.int64)
    packed = np.zeros((len(items), int(lengths.max()), items[0].shape[1]))
    for k, s in enumerate(items):
        packed[k, : len(s)] = s
    return packed, lengths


def _check_same_dim(d1: int, d2: int, what1: str, what2: str) -> None:
    if d1 != d2:
        raise ValueError(f"dtw: {what1} has {d1} dimensions per time step but {what2} has {d2}")


# ----------------------------------------------------------------------------------------------------------------
# Shared scalar pieces
# ----------------------------------------------------------------------------------------------------------------

@njit
def _min(x, y):
    # Inputs are finite (checked at the door), so NaN never reaches here; this form maps to vminpd.
    return x if x < y else y


@njit
def _band_offsets(n, m, radius, unconstrained_reach):
    """Allowed j - i range [lo, hi] (1-based or 0-based alike) for an n x m problem; radius < 0 = unconstrained."""
    if radius < 0:
        return -unconstrained_reach, unconstrained_reach
    return -radius - max(0, n - m), radius + max(0, m - n)


# The cost of a cell, summed over dimensions 0, 1, ..., d-1: (a0 - b0)^2, then c + (ak - bk)^2 as one fused multiply-add
# (fastmath "contract" lets LLVM fuse exactly this multiply and add, nothing else). Every kernel accumulates this
# way, so all entry points agree bit for bit; the fused form halves the floating-point operations of the
# multivariate kernels and rounds once instead of twice.
@njit(fastmath={"contract"})
def _acc(c, x, y):
    t = x - y
    return c + t * t


@njit
def _cell_cost(a, i, b, j, d):
    c = a[i, 0] - b[j, 0]
    c = c * c
    for k in range(1, d):
        c = _acc(c, a[i, k], b[j, k])
    return c


# ----------------------------------------------------------------------------------------------------------------
# Single-pair kernels
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def _dtw_sq_pair(a, b, radius, abandon_above):
    """Squared DTW of a (n, d) and b (m, d); returns inf as soon as a whole row exceeds ``abandon_above``."""
    n, d = a.shape
    m = b.shape[0]
    lo, hi = _band_offsets(n, m, radius, n + m)
    inf = np.inf
    row = np.full(m + 1, inf)
    row[0] = 0.0
    for i in range(1, n + 1):
        js = max(1, i + lo)
        je = min(m, i + hi)
        diag = row[js - 1]
        if js == 1:
            row[0] = inf
        left = inf
        row_min = inf
        for j in range(js, je + 1):
            up = row[j]
            v = _min(_min(diag, up), left) + _cell_cost(a, i - 1, b, j - 1, d)
            diag = up
            left = v
            row[j] = v
            row_min = _min(row_min, v)
        if row_min > abandon_above:
            return inf
    return row[m]


@njit(cache=True)
def _cumulative_cost(a, b, radius):
    """Full (n+1, m+1) accumulated-cost matrix, inf outside the band (for the warping path)."""
    n, d = a.shape
    m = b.shape[0]
    lo, hi = _band_offsets(n, m, radius, n + m)
    D = np.full((n + 1, m + 1), np.inf)
    D[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(max(1, i + lo), min(m, i + hi) + 1):
            D[i, j] = _min(_min(D[i - 1, j - 1], D[i - 1, j]), D[i, j - 1]) + _cell_cost(a, i - 1, b, j - 1, d)
    return D


@njit(cache=True)
def _backtrack(D):
    """Optimal path from (0, 0) to (n-1, m-1); ties prefer diagonal, then up, then left (tslearn's argmin order)."""
    n = D.shape[0] - 1
    m = D.shape[1] - 1
    path = np.empty((n + m, 2), dtype=np.int64)
    i, j, k = n, m, 0
    while True:
        path[k, 0] = i - 1
        path[k, 1] = j - 1
        k += 1
        if i == 1 and j == 1:
            break
        diag = D[i - 1, j - 1]
        up = D[i - 1, j]
        left = D[i, j - 1]
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    return path[:k][::-1].copy()


# ----------------------------------------------------------------------------------------------------------------
# Lower bound and nearest-neighbour search
# ----------------------------------------------------------------------------------------------------------------

@njit(cache=True)
def _lb_keogh_sq(q, c, radius):
    """Squared LB_Keogh of DTW(q, c) (q rows, c columns): each c[j] is compared with the envelope of the q values it
    may be matched to under the band. Every column holds at least one cell of any path, so the sum of the squared
    distances to the envelope is a lower bound of the squared DTW, for any lengths and any band."""
    n, d = q.shape
    m = c.shape[0]
    lo, hi = _band_offsets(n, m, radius, n + m)
    qmax = np.empty(n, dtype=np.int64)  # monotone deques of q indices, one for the max and one for the min
    qmin = np.empty(n, dtype=np.int64)
    total = 0.0
    for k in range(d):
        hmax = tmax = hmin = tmin = 0
        nxt = 0
        for j in range(m):
            first = max(0, j - hi)
            last = min(n - 1, j - lo)
            while nxt <= last:
                v = q[nxt, k]
                while tmax > hmax and q[qmax[tmax - 1], k] <= v:
                    tmax -= 1
                qmax[tmax] = nxt
                tmax += 1
                while tmin > hmin and q[qmin[tmin - 1], k] >= v:
                    tmin -= 1
                qmin[tmin] = nxt
                tmin += 1
                nxt += 1
            while qmax[hmax] < first:
                hmax += 1
            while qmin[hmin] < first:
                hmin += 1
            x = c[j, k]
            upper = q[qmax[hmax], k]
            lower = q[qmin[hmin], k]
            if x > upper:
                total += (x - upper) * (x - upper)
            elif x < lower:
                total += (lower - x) * (lower - x)
    return total


@njit(cache=True)
def _nearest_neighbour(q, database, lengths, radius, slack):
    """Index and squared distance of the database series closest to q, visiting candidates by increasing LB_Keogh,
    stopping once the bound exceeds the best distance, and abandoning a DTW once a whole row exceeds it.
    Ties go to the lowest index, as numpy's argmin. Returns (index, distance^2, DTW runs, DTW runs abandoned)."""
    count = database.shape[0]
    bounds = np.empty(count)
    for s in range(count):
        bounds[s] = _lb_keogh_sq(q, database[s, : lengths[s]], radius)
    order = np.argsort(bounds, kind="mergesort")
    best = np.inf
    best_index = -1
    runs = 0
    abandoned = 0
    for r in range(count):
        s = order[r]
        if bounds[s] * (1.0 - slack) > best:
            break
        runs += 1
        dist = _dtw_sq_pair(q, database[s, : lengths[s]], radius, best)
        if dist == np.inf:
            abandoned += 1
        elif dist < best or (dist == best and s < best_index):
            best = dist
            best_index = s
    return best_index, best, runs, abandoned


# ----------------------------------------------------------------------------------------------------------------
# The 8-lane all-pairs kernel. Each helper spells out the 8 lanes so that LLVM sees 8 isomorphic scalar operations,
# which its SLP vectoriser packs into 2 x 4 float64 AVX2 operations.
# ----------------------------------------------------------------------------------------------------------------

@njit
def _load8(a, j):
    return (a[j, 0], a[j, 1], a[j, 2], a[j, 3], a[j, 4], a[j, 5], a[j, 6], a[j, 7])


@njit
def _store8(a, j, v):
    a[j, 0] = v[0]
    a[j, 1] = v[1]
    a[j, 2] = v[2]
    a[j, 3] = v[3]
    a[j, 4] = v[4]
    a[j, 5] = v[5]
    a[j, 6] = v[6]
    a[j, 7] = v[7]


@njit
def _min8(x, y):
    return (_min(x[0], y[0]), _min(x[1], y[1]), _min(x[2], y[2]), _min(x[3], y[3]),
            _min(x[4], y[4]), _min(x[5], y[5]), _min(x[6], y[6]), _min(x[7], y[7]))


@njit
def _add8(x, y):
    return (x[0] + y[0], x[1] + y[1], x[2] + y[2], x[3] + y[3],
            x[4] + y[4], x[5] + y[5], x[6] + y[6], x[7] + y[7])


@njit
def _sq(x):
    return x * x


@njit
def _sqdiff8(x, y):
    return (_sq(x[0] - y[0]), _sq(x[1] - y[1]), _sq(x[2] - y[2]), _sq(x[3] - y[3]),
            _sq(x[4] - y[4]), _sq(x[5] - y[5]), _sq(x[6] - y[6]), _sq(x[7] - y[7]))


@njit
def _in_band(v, k, lo, hi):
    return v if (lo <= k) & (k <= hi) else np.inf


@njit
def _mask8(v, k, lo, hi):
    """Lane l keeps v[l] where its own band holds column offset k = j - i, else inf."""
    return (_in_band(v[0], k, lo[0], hi[0]), _in_band(v[1], k, lo[1], hi[1]),
            _in_band(v[2], k, lo[2], hi[2]), _in_band(v[3], k, lo[3], hi[3]),
            _in_band(v[4], k, lo[4], hi[4]), _in_band(v[5], k, lo[5], hi[5]),
            _in_band(v[6], k, lo[6], hi[6]), _in_band(v[7], k, lo[7], hi[7]))


@njit(fastmath={"contract"})
def _acc8(c, x, y):
    return (_acc(c[0], x[0], y[0]), _acc(c[1], x[1], y[1]), _acc(c[2], x[2], y[2]), _acc(c[3], x[3], y[3]),
            _acc(c[4], x[4], y[4]), _acc(c[5], x[5], y[5]), _acc(c[6], x[6], y[6]), _acc(c[7], x[7], y[7]))


@njit
def _cost8(Ai, Bj, d):
    c = _sqdiff8(_load8(Ai, 0), _load8(Bj, 0))
    for k in range(1, d):
        c = _acc8(c, _load8(Ai, k), _load8(Bj, k))
    return c


# One row of the DP over columns [j_start, j_stop) for 8 lanes; columns outside [fs, fe] are masked per lane.
# diag and left (the cells up-left and left of the current one) are carried in registers. Loop indices are uint64
# so that numba's negative-index wrap-around test leaves the inner loop (with signed indices it cost a test and a
# cmov per access and more than halved the rate).

@njit
def _segment_univariate(row, j_start, j_stop, i, diag, left, a, B, fs, fe, lo, hi):
    one = np.uint64(1)
    ufs = np.uint64(fs)
    ufe = np.uint64(fe)
    for j in range(np.uint64(j_start), np.uint64(j_stop)):
        up = _load8(row, j)
        v = _add8(_min8(_min8(diag, up), left), _sqdiff8(a, _load8(B[j - one], 0)))
        if j < ufs or j > ufe:
            v = _mask8(v, np.int64(j) - i, lo, hi)
        diag = up
        left = v
        _store8(row, j, v)
    return diag, left


@njit
def _cost8_tile(Ai0, Ai1, Bj0, Bj1, d):
    """Costs of the 2 x 2 cells (rows i, i+1) x (columns j, j+1): each loaded vector serves two cells, and the
    eight independent accumulations keep the FMA units busy. Per cell: d0^2, then fma(dk, dk, c) for k = 1.."""
    a0 = _load8(Ai0, 0)
    a1 = _load8(Ai1, 0)
    b0 = _load8(Bj0, 0)
    b1 = _load8(Bj1, 0)
    c00 = _sqdiff8(a0, b0)
    c01 = _sqdiff8(a0, b1)
    c10 = _sqdiff8(a1, b0)
    c11 = _sqdiff8(a1, b1)
    for k in range(1, d):
        a0 = _load8(Ai0, k)
        a1 = _load8(Ai1, k)
        b0 = _load8(Bj0, k)
        b1 = _load8(Bj1, k)
        c00 = _acc8(c00, a0, b0)
        c01 = _acc8(c01, a0, b1)
        c10 = _acc8(c10, a1, b0)
        c11 = _acc8(c11, a1, b1)
    return c00, c01, c10, c11


@njit
def _cost8_col(Ai0, Ai1, Bj, d):
    b = _load8(Bj, 0)
    c0 = _sqdiff8(_load8(Ai0, 0), b)
    c1 = _sqdiff8(_load8(Ai1, 0), b)
    for k in range(1, d):
        b = _load8(Bj, k)
        c0 = _acc8(c0, _load8(Ai0, k), b)
        c1 = _acc8(c1, _load8(Ai1, k), b)
    return c0, c1


@njit
def _cell8(diag, up, left, cost, j, i, fs, fe, lo, hi):
    """One DP cell for 8 lanes: min(min(diag, up), left) + cost, masked per lane outside [fs, fe]."""
    v = _add8(_min8(_min8(diag, up), left), cost)
    if j < fs or j > fe:
        v = _mask8(v, np.int64(j) - i, lo, hi)
    return v


@njit
def _two_rows_multivariate(row, j_start, j_stop, i, diag0, Ai0, Ai1, B, d, fs0, fe0, fs1, fe1, lo, hi):
    """Rows i and i + 1 in one sweep over columns [j_start, j_stop): row i lives in registers only (up of row
    i + 1), row i + 1 is stored. Halves the row-buffer traffic and shares each loaded vector between two cells."""
    one = np.uint64(1)
    inf = np.inf
    inf8 = (inf, inf, inf, inf, inf, inf, inf, inf)
    ufs0 = np.uint64(fs0)
    ufe0 = np.uint64(fe0)
    ufs1 = np.uint64(fs1)
    ufe1 = np.uint64(fe1)
    i1 = i + 1
    left0 = inf8
    diag1 = inf8
    left1 = inf8
    j = np.uint64(j_start)
    stop = np.uint64(j_stop)
    while j + one < stop:
        c00, c01, c10, c11 = _cost8_tile(Ai0, Ai1, B[j - one], B[j], d)
        up0 = _load8(row, j)
        v0 = _cell8(diag0, up0, left0, c00, j, i, ufs0, ufe0, lo, hi)
        v1 = _cell8(diag1, v0, left1, c10, j, i1, ufs1, ufe1, lo, hi)
        _store8(row, j, v1)
        up0b = _load8(row, j + one)
        w0 = _cell8(up0, up0b, v0, c01, j + one, i, ufs0, ufe0, lo, hi)
        w1 = _cell8(v0, w0, v1, c11, j + one, i1, ufs1, ufe1, lo, hi)
        _store8(row, j + one, w1)
        diag0 = up0b
        left0 = w0
        diag1 = w0
        left1 = w1
        j += np.uint64(2)
    if j < stop:
        c0, c1 = _cost8_col(Ai0, Ai1, B[j - one], d)
        up0 = _load8(row, j)
        v0 = _cell8(diag0, up0, left0, c0, j, i, ufs0, ufe0, lo, hi)
        v1 = _cell8(diag1, v0, left1, c1, j, i1, ufs1, ufe1, lo, hi)
        _store8(row, j, v1)


@njit
def _cost8_pair(Ai, Bj0, Bj1, d):
    """_cost8 for two neighbouring columns at once: two independent chains of additions instead of one, so the
    multivariate inner loop is not bound by the latency of its d dependent additions. Same sums, same order."""
    a = _load8(Ai, 0)
    c0 = _sqdiff8(a, _load8(Bj0, 0))
    c1 = _sqdiff8(a, _load8(Bj1, 0))
    for k in range(1, d):
        a = _load8(Ai, k)
        c0 = _acc8(c0, a, _load8(Bj0, k))
        c1 = _acc8(c1, a, _load8(Bj1, k))
    return c0, c1


@njit
def _step8(row, j, i, diag, left, cost, fs, fe, lo, hi):
    up = _load8(row, j)
    v = _cell8(diag, up, left, cost, j, i, fs, fe, lo, hi)
    _store8(row, j, v)
    return up, v


@njit
def _segment_multivariate(row, j_start, j_stop, i, diag, left, Ai, B, d, fs, fe, lo, hi):
    one = np.uint64(1)
    ufs = np.uint64(fs)
    ufe = np.uint64(fe)
    j = np.uint64(j_start)
    stop = np.uint64(j_stop)
    while j + one < stop:
        c0, c1 = _cost8_pair(Ai, B[j - one], B[j], d)
        diag, left = _step8(row, j, i, diag, left, c0, ufs, ufe, lo, hi)
        diag, left = _step8(row, j + one, i, diag, left, c1, ufs, ufe, lo, hi)
        j += np.uint64(2)
    if j < stop:
        diag, left = _step8(row, j, i, diag, left, _cost8(Ai, B[j - one], d), ufs, ufe, lo, hi)
    return diag, left


@njit
def _row_bounds(i, lo_min, lo_max, hi_min, hi_max, m_max):
    """Columns of row i: the union of the 8 bands [js, je] and their intersection [fs, fe] (empty: fs = je + 1)."""
    js = max(1, i + lo_min)  # union of the bands on this row: [js, je]
    je = min(m_max, i + hi_max)
    fs = max(js, i + lo_max)  # intersection: [fs, fe], no masking needed there
    fe = min(je, i + hi_min)
    if fs > fe:
        fs = je + 1
        fe = je
    return js, je, fs, fe


@njit
def _dtw_sq_lanes(A, B, n8, m8, lo8, hi8, row, out):
    """Squared DTW of 8 pairs at once. A (>= max n, d, 8) and B (>= max m, d, 8) hold lane l's series in [:, :, l];
    n8, m8 their lengths; lo8, hi8 their bands (allowed j - i); row (>= max m + 1, 8) is scratch; out[l] gets pair l.

    Rows run over the union of the 8 bands; the columns where the bands differ are masked per lane, the rest
    (nearly all of them once pairs are sorted by length) run unmasked. Rows and columns past a lane's own lengths
    compute values that never reach that lane's end cell, which is read when row i reaches n8[l]. Multivariate
    rows go two at a time (_two_rows_multivariate) until the first row where some lane ends, then one at a time."""
    d = A.shape[1]
    inf = np.inf
    inf8 = (inf, inf, inf, inf, inf, inf, inf, inf)
    n_min = n8.min()
    n_max = n8.max()
    m_max = m8.max()
    lo_min = lo8.min()
    lo_max = lo8.max()
    hi_min = hi8.min()
    hi_max = hi8.max()
    lo = (lo8[0], lo8[1], lo8[2], lo8[3], lo8[4], lo8[5], lo8[6], lo8[7])
    hi = (hi8[0], hi8[1], hi8[2], hi8[3], hi8[4], hi8[5], hi8[6], hi8[7])
    for j in range(m_max + 1):
        _store8(row, j, inf8)
    _store8(row, 0, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    i = 1
    while i <= n_max:
        js, je, fs, fe = _row_bounds(i, lo_min, lo_max, hi_min, hi_max, m_max)
        diag = _load8(row, js - 1)
        if js == 1:
            _store8(row, 0, inf8)
        if d > 1 and i + 1 < n_min:
            js1, je1, fs1, fe1 = _row_bounds(i + 1, lo_min, lo_max, hi_min, hi_max, m_max)
            # columns past row i's own end (je, je1] are masked for row i: outside every lane's band
            if fs > fe:
                fs = je1 + 1
                fe = je1
            _two_rows_multivariate(row, js, je1 + 1, i, diag, A[i - 1], A[i], B, d, fs, fe, fs1, fe1, lo, hi)
            i += 2
            continue
        left = inf8
        if d == 1:
            diag, left = _segment_univariate(row, js, je + 1, i, diag, left, _load8(A[i - 1], 0), B, fs, fe, lo, hi)
        else:
            diag, left = _segment_multivariate(row, js, je + 1, i, diag, left, A[i - 1], B, d, fs, fe, lo, hi)
        if i >= n_min:
            for lane in range(8):
                if n8[lane] == i:
                    out[lane] = row[m8[lane], lane]
        i += 1


# Pair layouts of the all-pairs kernel; pairs are enumerated over positions sorted by length (x_order, y_order),
# row-major with odd rows backwards, so a chunk that straddles two rows still holds similar lengths.
_TRIANGLE_CONDENSED = 0  # p < q of X against itself; out is scipy's condensed vector
_TRIANGLE_SQUARE = 1  # p < q of X against itself; out is the flat (N, N) matrix, both halves written
_RECTANGLE = 2  # every p of X against every q of Y; out is the flat (|X|, |Y|) matrix


@njit
def _pair_at(t, layout, nx, ny):
    """Sorted positions (p, q) of pair number t in the enumeration above."""
    if layout == _RECTANGLE:
        p = t // ny
        q = t % ny
        if p % 2 == 1:
            q = ny - 1 - q
        return p, q
    # Row p of the triangle starts at p * n - p * (p + 1) / 2; invert that, then fix float rounding.
    b = 2.0 * nx - 1.0
    p = int((b - np.sqrt(max(b * b - 8.0 * t, 0.0))) / 2.0)
    while p > 0 and p * nx - p * (p + 1) // 2 > t:
        p -= 1
    while (p + 1) * nx - (p + 1) * (p + 2) // 2 <= t:
        p += 1
    offset = t - (p * nx - p * (p + 1) // 2)
    if p % 2 == 1:
        offset = nx - 2 - p - offset
    return p, p + 1 + offset


@njit
def _load_lanes(X, x_len, Y, y_len, P8, Q8, radius, reach, A, B, n8, m8, lo8, hi8, loaded_p, loaded_q):
    """Copy the 8 pairs (X[P8[l]], Y[Q8[l]]) into the lane buffers; a lane whose series is already there (loaded_p,
    loaded_q: what each lane holds, -1 for nothing) is not copied again. Consecutive pairs of a triangle row share
    their first series, so most chunks copy only the second ones."""
    d = X.shape[2]
    for lane in range(8):
        p = P8[lane]
        q = Q8[lane]
        n = x_len[p]
        m = y_len[q]
        n8[lane] = n
        m8[lane] = m
        lo8[lane], hi8[lane] = _band_offsets(n, m, radius, reach)
        if loaded_p[lane] != p:
            loaded_p[lane] = p
            for r in range(n):
                for c in range(d):
                    A[r, c, lane] = X[p, r, c]
        if loaded_q[lane] != q:
            loaded_q[lane] = q
            for r in range(m):
                for c in range(d):
                    B[r, c, lane] = Y[q, r, c]


@njit
def _pairs_worker(X, x_len, Y, y_len, x_order, y_order, layout, start, stop, radius, t, n_threads, out):
    """Chunks t, t + n_threads, ... of pairs [start, stop): one thread's share, with its own scratch."""
    n_pairs = stop - start
    n_chunks = (n_pairs + 7) // 8
    nx = x_order.shape[0]
    ny = y_order.shape[0]
    d = X.shape[2]
    reach = X.shape[1] + Y.shape[1] + 2
    A = np.zeros((X.shape[1], d, 8))
    B = np.zeros((Y.shape[1], d, 8))
    row = np.empty((Y.shape[1] + 1, 8))
    P8 = np.empty(8, dtype=np.int64)
    Q8 = np.empty(8, dtype=np.int64)
    n8 = np.empty(8, dtype=np.int64)
    m8 = np.empty(8, dtype=np.int64)
    lo8 = np.empty(8, dtype=np.int64)
    hi8 = np.empty(8, dtype=np.int64)
    res = np.empty(8)
    loaded_p = np.full(8, -1, dtype=np.int64)
    loaded_q = np.full(8, -1, dtype=np.int64)
    for chunk in range(t, n_chunks, n_threads):
        first = start + chunk * 8
        count = min(8, stop - first)
        for lane in range(8):
            p, q = _pair_at(first + min(lane, count - 1), layout, nx, ny)
            P8[lane] = x_order[p]
            Q8[lane] = y_order[q]
        _load_lanes(X, x_len, Y, y_len, P8, Q8, radius, reach, A, B, n8, m8, lo8, hi8, loaded_p, loaded_q)
        _dtw_sq_lanes(A, B, n8, m8, lo8, hi8, row, res)
        for lane in range(count):
            i = P8[lane]
            j = Q8[lane]
            v = np.sqrt(res[lane])
            if layout == _TRIANGLE_CONDENSED:
                lo_ij = min(i, j)
                hi_ij = max(i, j)
                out[lo_ij * nx - lo_ij * (lo_ij + 1) // 2 + hi_ij - lo_ij - 1] = v
            elif layout == _TRIANGLE_SQUARE:
                out[i * nx + j] = v
                out[j * nx + i] = v
            else:
                out[i * ny + j] = v


@njit(parallel=True, cache=True)
def _pairs_distance(X, x_len, Y, y_len, x_order, y_order, layout, start, stop, radius, n_threads, out):
    n_chunks = (stop - start + 7) // 8
    n_threads = max(1, min(n_threads, n_chunks))
    for t in prange(n_threads):
        _pairs_worker(X, x_len, Y, y_len, x_order, y_order, layout, start, stop, radius, t, n_threads, out)


# ----------------------------------------------------------------------------------------------------------------
# Compilation of the all-pairs kernel with LLVM's SLP vectoriser
# ----------------------------------------------------------------------------------------------------------------

_PAIRS_SIGNATURE = ("(float64[:, :, ::1], int64[::1], float64[:, :, ::1], int64[::1], int64[::1], int64[::1], "
                    "int64, int64, int64, int64, int64, float64[::1])")
_compile_lock = threading.Lock()
_pairs_ready = False


@contextmanager
def _slp_vectoriser_enabled():
    """Numba switched LLVM's SLP vectoriser off by default in 0.58 (numba PR #8852, after miscompilations reported in
    other code). The lane kernel needs it (without it the 8-tuples stay scalar: measured 2-3x slower), so it is switched on
    only while this module compiles that kernel, holding numba's compiler lock so no other compilation sees the
    flag. The parity tests against dtaidistance and tslearn guard the compiled result. If a numba release drops
    the flag, the kernel compiles without SLP: still exact, slower."""
    from numba.core import config
    from numba.core.compiler_lock import global_compiler_lock

    if not hasattr(config, "SLP_VECTORIZE"):
        yield
        return
    with global_compiler_lock:
        previous = config.SLP_VECTORIZE
        config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            config.SLP_VECTORIZE = previous


def _pairs_kernel():
    """The all-pairs kernel compiled (or loaded from numba's cache) for the one signature the dispatch uses."""
    global _pairs_ready
    if not _pairs_ready:
        with _compile_lock:
            if not _pairs_ready:
                with _slp_vectoriser_enabled():
                    _pairs_distance.compile(_PAIRS_SIGNATURE)
                _pairs_distance.disable_compile()  # any other argument types are a dispatch bug: fail loudly
                _pairs_ready = True
    return _pairs_distance


@contextmanager
def _threads(parallel: bool):
    if parallel:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="pair", unit_scale=True)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def dtw_distance(a, b, *, window: int | None = None) -> float:
    """DTW distance between two series (n,) / (n, d) and (m,) / (m, d); see the module docstring for the band."""
    x = _as_series(a, "a")
    y = _as_series(b, "b")
    _check_same_dim(x.shape[1], y.shape[1], "a", "b")
    return float(np.sqrt(_dtw_sq_pair(x, y, _radius(window), np.inf)))


def warping_path(a, b, *, window: int | None = None) -> tuple[np.ndarray, float]:
    """Optimal warping path as an int64 array of (i, j) rows from (0, 0) to (n-1, m-1), and the DTW distance.

    Among equal-cost predecessors the path prefers the diagonal, then (i-1, j), then (i, j-1), like tslearn."""
    x = _as_series(a, "a")
    y = _as_series(b, "b")
    _check_same_dim(x.shape[1], y.shape[1], "a", "b")
    D = _cumulative_cost(x, y, _radius(window))
    return _backtrack(D), float(np.sqrt(D[-1, -1]))


def lb_keogh(query, candidate, *, window: int | None) -> float:
    """LB_Keogh lower bound of ``dtw_distance(query, candidate, window=window)`` (envelope around the query)."""
    q = _as_series(query, "query")
    c = _as_series(candidate, "candidate")
    _check_same_dim(q.shape[1], c.shape[1], "query", "candidate")
    return float(np.sqrt(_lb_keogh_sq(q, c, _radius(window))))


class NearestNeighbour(NamedTuple):
    index: int
    distance: float
    dtw_evaluations: int  # DTW runs started (the others were pruned by LB_Keogh)
    dtw_abandoned: int  # of those, runs stopped early because a whole row exceeded the best distance
    candidates: int


def nearest_neighbour_search(query, database, *, window: int | None = None) -> NearestNeighbour:
    """1-NN under DTW with LB_Keogh pruning and early abandoning, with counts of the work it did."""
    q = _as_series(query, "query")
    packed, lengths = _as_collection(database, "database")
    if len(lengths) == 0:
        raise ValueError("dtw: nearest_neighbour needs a non-empty database")
    _check_same_dim(q.shape[1], packed.shape[2], "query", "database")
    index, dist_sq, runs, abandoned = _nearest_neighbour(q, packed, lengths, _radius(window), _LB_SLACK)
    return NearestNeighbour(int(index), float(np.sqrt(dist_sq)), int(runs), int(abandoned), len(lengths))


def nearest_neighbour(query, database, *, window: int | None = None) -> tuple[int, float]:
    """(index, distance) of the database series nearest to ``query`` under DTW; ties go to the lowest index."""
    found = nearest_neighbour_search(query, database, window=window)
    return found.index, found.distance


def _run_pairs(X, x_len, Y, y_len, layout, out_flat, total, block_size, radius, parallel, bar) -> None:
    """Fill ``out_flat`` with the ``total`` pairs of ``layout``, ``block_size`` pairs per kernel call."""
    block = int(block_size) if block_size is not None else DEFAULT_BLOCK_PAIRS
    if block < 1:
        raise ValueError(f"dtw: block_size must be >= 1, got {block_size!r}")
    if total == 0:
        return
    kernel = _pairs_kernel()
    x_order = np.argsort(x_len, kind="stable")  # similar lengths side by side: the 8 lanes of a chunk match
    y_order = x_order if Y is X else np.argsort(y_len, kind="stable")
    cells_per_pair = float(x_len.mean()) * float(y_len.mean())
    for start in range(0, total, block):
        stop = min(total, start + block)
        threaded = parallel and (stop - start) * cells_per_pair >= _SERIAL_BELOW_CELLS
        with _threads(threaded):
            kernel(X, x_len, Y, y_len, x_order, y_order, layout, start, stop, radius,
                   numba.get_num_threads(), out_flat)
        if bar is not None:
            bar.update(stop - start)


def distance_matrix(series, *, window: int | None = None, condensed: bool = False, block_size: int | None = None,
                    parallel: bool = True, progress: bool = False) -> np.ndarray:
    """All-pairs DTW distances: symmetric (N, N) with a zero diagonal, or with ``condensed=True`` the N(N-1)/2
    upper-triangle entries in scipy ``squareform`` order (never allocating N x N).

    The kernel writes straight into the result; beyond it and a packed copy of the input, memory is O(threads x
    longest series x d). ``block_size`` is the number of pairs per kernel call (default ``DEFAULT_BLOCK_PAIRS``;
    it sets the progress-bar granularity). ``parallel=False`` runs on one thread."""
    X, lengths = _as_collection(series, "series")
    radius = _radius(window)
    n = len(lengths)
    total = n * (n - 1) // 2
    result = np.zeros(total) if condensed else np.zeros((n, n))
    layout = _TRIANGLE_CONDENSED if condensed else _TRIANGLE_SQUARE
    bar = _progress(total, progress, "DTW distance matrix")
    try:
        _run_pairs(X, lengths, X, lengths, layout, result.reshape(-1), total, block_size, radius, parallel, bar)
    finally:
        if bar is not None:
            bar.close()
    return result


def cross_distance(X, Y, *, window: int | None = None, parallel: bool = True,
                   block_size: int | None = None) -> np.ndarray:
    """DTW distances between every series of X and every series of Y, as an (|X|, |Y|) array."""
    Xp, x_len = _as_collection(X, "X")
    Yp, y_len = _as_collection(Y, "Y")
    radius = _radius(window)
    nx, ny = len(x_len), len(y_len)
    result = np.zeros((nx, ny))
    if nx == 0 or ny == 0:
        return result
    _check_same_dim(Xp.shape[2], Yp.shape[2], "X", "Y")
    _run_pairs(Xp, x_len, Yp, y_len, _RECTANGLE, result.reshape(-1), nx * ny, block_size, radius, parallel, None)
    return result
