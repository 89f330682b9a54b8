"""All-pairs DTW: our Numba kernel against dtaidistance's parallel C and tslearn, in one process.

    .venv/bin/python benchmarks/dtw.py            # N = 31, 500, 2000 (about a quarter of an hour on 2 cores)
    .venv/bin/python benchmarks/dtw.py --quick    # N = 31, 300

Data: random walks of random lengths 50–100, univariate (d = 1) and d = 16, unconstrained and with a Sakoe–Chiba
radius of 10 (dtaidistance window=11, tslearn sakoe_chiba_radius=10). Cells/s counts the DP cells inside the band
(sum over pairs), the same work for every implementation; ours also computes padding cells, which are not counted.
Ours runs with 2 threads (``numba.set_num_threads(2)``) and with 1 (per-core rate); dtaidistance runs
``distance_matrix_fast`` (OpenMP over all cores); tslearn runs ``cdist_dtw`` (default n_jobs; platform notes found
n_jobs=-1 slower). Everything is compiled / warmed up before timing; times are medians of the repeats (wall clock).
tslearn is run only where the estimate from its measured rate at a smaller N is under --tslearn-budget seconds;
otherwise the table says "skipped (too slow)" and no number is extrapolated.
Prints a markdown table for BENCHMARKS.md with the machine, the load average (the machine is shared) and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellssl_jax.temporal import dtw  # noqa: E402

RADIUS = 10
LENGTHS = (50, 100)


def make_series(n_series: int, d: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, n_series)
    return [np.cumsum(rng.standard_normal((n, d)) if d > 1 else rng.standard_normal(n), axis=0) for n in lengths]


def band_cells(n: int, m: int, radius: int | None) -> int:
    if radius is None:
        return n * m
    lo, hi = -radius - max(0, n - m), radius + max(0, m - n)
    i = np.arange(n)
    return int(np.clip(np.minimum(m - 1, i + hi) - np.maximum(0, i + lo) + 1, 0, None).sum())


def total_cells(series: list[np.ndarray], radius: int | None) -> int:
    """DP cells over all pairs i < j, counted per distinct (length, length) combination."""
    lengths, counts = np.unique([len(s) for s in series], return_counts=True)
    total = 0
    for a, (n, cn) in enumerate(zip(lengths, counts)):
        total += cn * (cn - 1) // 2 * band_cells(n, n, radius)
        for m, cm in zip(lengths[a + 1:], counts[a + 1:]):
            total += cn * cm * band_cells(n, m, radius)
    return int(total)


class Timing(NamedTuple):
    wall: float  # median wall-clock seconds
    cpu: float  # median CPU seconds of this process (all threads): work done, whatever else the machine runs
    runs: int
    result: np.ndarray


def timed(fn, repeats: int, budget_s: float) -> Timing:
    """Medians over up to ``repeats`` runs, stopping early once ``budget_s`` seconds are spent."""
    walls, cpus, result = [], [], None
    while len(walls) < repeats and (not walls or sum(walls) < budget_s):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus), len(walls), result)


def ours(series, radius, threads):
    def run():
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            return dtw.distance_matrix(series, window=radius)
        finally:
            numba.set_num_threads(previous)
    return run


def dtaidistance_fast(series, radius, d):
    from dtaidistance import dtw as dtai
    from dtaidistance import dtw_ndim

    window = None if radius is None else radius + 1
    module = dtai if d == 1 else dtw_ndim
    return lambda: module.distance_matrix_fast(series, window=window, parallel=True)


def tslearn_cdist(series, radius):
    from tslearn.metrics import cdist_dtw

    band = {} if radius is None else dict(global_constraint="sakoe_chiba", sakoe_chiba_radius=radius)
    return lambda: cdist_dtw(series, **band)


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dtaidistance
    import tslearn

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, {platform.machine()}; load average {load}; "
            f"numba {numba.__version__}, dtaidistance {dtaidistance.__version__}, tslearn {tslearn.__version__}; "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")


def fma_peak_per_core() -> float:
    """Fused multiply-adds per second of one core, from a float64 matrix product (numpy's BLAS on one thread).

    A d-dimensional DTW cell needs d multiply-adds for its local cost alone, so peak / d bounds the cells/s that any
    exact float64 kernel can reach on this core at that d, before the DP itself."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1500, 1500)), rng.standard_normal((1500, 1500))
    best = np.inf
    with threadpool_limits(1):
        for _ in range(4):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 1500 ** 3 / best


def rate(cells: int, seconds: float) -> str:
    return f"{cells / seconds / 1e9:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 31 and 300 only")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the numbers of series")
    parser.add_argument("--dims", type=int, nargs="*", default=[1, 16], help="dimensions per time step")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--repeat-budget", type=float, default=60.0,
                        help="stop repeating a measurement once this many seconds are spent on it")
    parser.add_argument("--tslearn-budget", type=float, default=30.0,
                        help="run tslearn only where its estimated time is below this (seconds)")
    args = parser.parse_args()
    sizes = args.sizes or ([31, 300] if args.quick else [31, 500, 2000])
    threads = min(2, numba.config.NUMBA_NUM_THREADS)

    # Warm-up: compile our kernels and tslearn's (its numba functions are not cached) before any timing.
    warm = make_series(12, 1, 0), make_series(12, 16, 0)
    for series in warm:
        for radius in (None, RADIUS):
            dtw.distance_matrix(series, window=radius)
            dtaidistance_fast(series, radius, 1 if series[0].ndim == 1 else series[0].shape[1])()
            tslearn_cdist(series, radius)()

    rows = []
    tslearn_rate: dict[tuple[int, int | None], float] = {}  # cells/s measured at the last size it ran
    for n_series in sizes:
        for d in args.dims:
            for radius in (None, RADIUS):
                series = make_series(n_series, d, seed=n_series * 100 + d)
                cells = total_cells(series, radius)
                par = timed(ours(series, radius, threads), args.repeats, args.repeat_budget)
                one = timed(ours(series, radius, 1), args.repeats, args.repeat_budget)
                dtai = timed(dtaidistance_fast(series, radius, d), args.repeats, args.repeat_budget)
                upper = np.triu_indices(n_series, 1)
                diff = float(np.max(np.abs(par.result[upper] - dtai.result[upper])))
                key = (d, radius)
                estimate = cells / tslearn_rate[key] if key in tslearn_rate else 0.0
                if estimate <= args.tslearn_budget:
                    tsl = timed(tslearn_cdist(series, radius), args.repeats, args.repeat_budget)
                    tslearn_rate[key] = cells / tsl.wall
                    diff = max(diff, float(np.max(np.abs(par.result - tsl.result))))
                    ts_cells = f"{tsl.wall:.3f} | {tsl.wall / par.wall:.1f}×"
                else:
                    ts_cells = "skipped (too slow) | –"
                band = "none" if radius is None else f"r={radius}"
                row = (f"| {n_series} | {d} | {band} | {cells / 1e9:.3f} "
                       f"| {par.wall:.3f} | {rate(cells, par.wall)} "
                       f"| {one.wall:.3f} | {rate(cells, one.wall)} | {rate(cells, one.cpu)} "
                       f"| {dtai.wall:.3f} | {rate(cells, dtai.wall)} | {dtai.wall / par.wall:.1f}× "
                       f"| {dtai.cpu / par.cpu:.1f}× | {ts_cells} | {diff:.1e} |")
                rows.append(row)
                print(row, f"  (runs: ours {par.runs}/{one.runs}, dtaidistance {dtai.runs})", file=sys.stderr,
                      flush=True)

    print("\n### DTW all-pairs distance matrix\n")
    print(f"Machine: {machine_line()}  ")
    print(f"Command: `.venv/bin/python {' '.join(sys.argv)}`. Random-walk series of "
          f"random lengths {LENGTHS[0]}–{LENGTHS[1]}; medians of up to {args.repeats} runs. "
          f"*ours*: `dtw.distance_matrix` with {threads} threads (blocks under "
          f"{dtw._SERIAL_BELOW_CELLS:,} cells run on one), *1 thread*: the same with `numba.set_num_threads(1)`; "
          "*dtaidistance*: `distance_matrix_fast` (OpenMP); *tslearn*: `cdist_dtw`. "
          "G cells/s = DP cells inside the band / second. Ratios = their time / ours; the CPU ratio divides "
          "process CPU seconds, which a busy shared machine disturbs less than wall time.\n")
    peak = fma_peak_per_core()
    print(f"Roofline: one core's float64 matrix product runs {peak / 1e9:.1f} G multiply-adds/s; a d-dimensional cell "
          "needs d of them for its local cost, so no exact float64 kernel exceeds "
          + ", ".join(f"{peak / d / 1e9:.2f} G cells/s per core at d = {d}" for d in args.dims)
          + " (before the DP's own min/add).\n")
    print("| N | d | band | G cells | ours s | ours G cells/s | 1 thread s | per core G cells/s (wall) "
          "| per core G cells/s (CPU) | dtaidistance s | dtaidistance G cells/s | × dtaidistance (wall) "
          "| × dtaidistance (CPU) | tslearn s | × tslearn | max abs diff |")
    print("|" + "---|" * 16)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
