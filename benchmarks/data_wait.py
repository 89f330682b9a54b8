"""Does the input pipeline make the training step wait? Time spent in ``next(iterator)`` per step, while training.

    .venv/bin/python benchmarks/data_wait.py [--steps 6] [--batch 64] [--crop-steps per_crop|joint]
                                             [--dataset DIR] [--formulation auto] [--workers N] [--read-threads N]
                                             [--dtype float32|bfloat16] [--finish auto|host|device]
                                             [--no-hugepages]

The loop is the training loop's (cellssl_jax/training/loop.py): ``next(iterator)`` → ``global_batch`` → the project's
jitted step (dispatched asynchronously) → read back the PREVIOUS step's metrics, so the next batch is prepared while
the device computes. Two runs of ``--steps`` steps after warm-up (compilation and the pipeline's first batch excluded):
  with data     the default pipeline (``data_pipelines.input_pipeline.default_input_config()``: the paper's 5 crops,
                augmentation, worker_count / read_threads as configured there) feeding each step, in steady state:
                measured only after ``--settle`` data steps (default: as many as the pipeline's buffers hold) and
                with no pause between the measured steps. Before 2026-11-27 the data steps ran in two halves with the
                compute-only steps between them, so they drained batches buffered during compilation and the pause
                (12 workers × 2 hold 24): a pipeline too slow for the step could read as no wait at all;
  compute only  the same loop on one batch fetched once (no ``next``), half before and half after the data run.
Reported: wait = time inside ``next(iterator)`` per step (median, mean, max: the pipeline was not ready), the
host-to-device transfer of the batch, and the slowdown of the whole loop, (wall with data − wall compute only) / steps:
on an accelerator the time it stood idle for data; on a CPU also the pipeline's CPU use slowing the step. The
compute-only steps bracket the data run so that a drift of machine load hits both alike. With no
worker processes or reader threads (the 2-core default) the batch is computed in ``next`` itself, on the same cores
as the step: the wait is then the pipeline's full cost.

Source: ``--dataset`` (a ``python -m data_pipelines.build`` folder, through ``data_pipelines.source.open_source``) or
in-memory PNGs of 256×256 phase-contrast-like frames decoded per access (benchmarks/input_pipeline.py's source: a
``--image-encoding png`` build's cost, dearer to decode than the default raw records).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cellssl_jax import platform  # noqa: E402  (XLA flags before the JAX backend starts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64, help="global batch (input.batch_size)")
    p.add_argument("--crop-steps", choices=["per_crop", "joint"], default="per_crop",
                   help="per_crop (the paper and configs/common.py): 5 updates per batch; joint: one")
    p.add_argument("--formulation", default="auto")
    p.add_argument("--dataset", default="", help="a data_pipelines.build output folder (default: in-memory PNGs)")
    p.add_argument("--images", type=int, default=512, help="distinct in-memory images (without --dataset)")
    p.add_argument("--workers", type=int, default=None, help="override input.worker_count (default: the config's)")
    p.add_argument("--read-threads", type=int, default=None, help="override input.read_threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="ConvAE compute dtype")
    p.add_argument("--finish", choices=["auto", "host", "device"], default="auto",
                   help="input.finish: where x/255 and the photometric augmentations run (auto: as the training loop)")
    p.add_argument("--settle", type=int, default=None,
                   help="data steps run, unmeasured, before the measured ones (default: the batches the pipeline's "
                        "buffers hold, so the figure is its steady rate and not its buffers')")
    p.add_argument("--no-hugepages", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_hugepages and (env := platform.hugepage_malloc_env()) is not None:
        print(f"restarting with {env}", flush=True)
        platform.reexec_with(env)

    import jax
    import optax

    from cellssl_jax.models.convae import ConvAE
    from cellssl_jax.parallel import global_batch, make_data_mesh
    from cellssl_jax.training.step import create_train_state, make_train_step
    from data_pipelines import input_pipeline as ip

    if args.dataset:
        from data_pipelines.source import open_source

        source, what = open_source(args.dataset), args.dataset
    else:
        from input_pipeline import InMemoryPngSource

        source = InMemoryPngSource(args.images, length=max(args.images, 10_000))
        what = f"{args.images} in-memory 256×256 PNGs ({source.texture})"
    cfg = ip.default_input_config()
    cfg.batch_size = args.batch
    if args.workers is not None:
        cfg.worker_count = args.workers
    if args.read_threads is not None:
        cfg.read_threads = args.read_threads
    machine = platform.machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; backend {jax.default_backend()}; source: {what}")
    print(f"pipeline: {sum(cfg.nmb_crops)} crops of {cfg.size_crops[0]} px, batch {cfg.batch_size}, "
          f"worker_count={cfg.worker_count}, read_threads={cfg.read_threads}, "
          f"prefetch_buffer_size={cfg.prefetch_buffer_size}; crop_steps={args.crop_steps}; {args.dtype}", flush=True)

    mesh = make_data_mesh()
    model = ConvAE(formulation=args.formulation, dtype=args.dtype)
    tx = optax.adam(1e-3)
    step = make_train_step(model, tx, loss="bce", crop_steps=args.crop_steps, mesh=mesh)
    state = create_train_state(model, tx, 0, image_size=int(cfg.size_crops[0]), mesh=mesh)
    accelerator = jax.default_backend() != "cpu"
    cfg.finish = args.finish
    finish = ip.resolve_finish(args.finish, accelerator=accelerator)
    workers = ip.resolve_worker_count(cfg.worker_count, accelerator=accelerator)
    settle = buffered_batches(cfg, workers) if args.settle is None else args.settle
    print(f"finish={finish}, worker processes: {workers}; {settle} settle steps before the measured ones", flush=True)
    iterator = iter(ip.create_train_dataset(source, cfg, seed=0, process_index=0, process_count=1,
                                            accelerator=accelerator))

    def to_device(local):
        keys = ("crops_uint8", "photometric") if finish == "device" else ("crops",)
        return global_batch({key: tuple(local[key]) for key in keys}, mesh)

    t = time.perf_counter()
    first = to_device(next(iterator))
    state, metrics = step(state, first)
    jax.block_until_ready(metrics)
    print(f"warm-up (first batch + compilation): {time.perf_counter() - t:.1f} s", flush=True)

    def loop(fetch, steps):
        """Steps fed by fetch() (a host batch, or None: reuse the first); returns wall, next() waits, transfer times."""
        nonlocal state
        waits, puts, pending = [], [], None
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            local = fetch()
            t1 = time.perf_counter()
            batch = first if local is None else to_device(local)
            waits.append(t1 - t)
            puts.append(time.perf_counter() - t1)
            state, metrics = step(state, batch)
            if pending is not None:
                jax.block_until_ready(pending)
            pending = metrics
        jax.block_until_ready(pending)
        return time.perf_counter() - t0, waits, puts

    # Compute only, then the data run (settle steps to drain what the pipeline buffered meanwhile, then the measured
    # steps back to back: a pause would let it refill), then compute only again: load drift hits both alike.
    steps = max(2, args.steps)
    load_before = platform_load()
    wall_compute, _, _ = loop(lambda: None, steps // 2)
    loop(lambda: next(iterator), settle)
    wall_data, waits, puts = loop(lambda: next(iterator), steps)
    w, _, _ = loop(lambda: None, steps - steps // 2)
    wall_compute += w
    load_after = platform_load()
    images = args.batch * steps
    idle = max(0.0, wall_data - wall_compute) / steps
    print(f"\nload average before/after: {load_before} / {load_after}; {steps} steps each way, the data steps "
          f"after {settle} settle steps, back to back")
    print(f"wait in next(iterator) per step (the pipeline not ready): median {1e3 * statistics.median(waits):.1f} ms, "
          f"mean {1e3 * statistics.mean(waits):.1f} ms, max {1e3 * max(waits):.1f} ms")
    print(f"host-to-device transfer (global_batch) per step: median {1e3 * statistics.median(puts):.1f} ms")
    print(f"step wall: with data {1e3 * wall_data / steps:.0f} ms, compute only "
          f"{1e3 * wall_compute / steps:.0f} ms; difference {1e3 * idle:.0f} ms/step "
          f"({100 * idle / (wall_data / steps):.0f}% of the step; on a loaded CPU this includes the pipeline's "
          f"CPU use slowing the step)")
    print(f"throughput: {images / wall_data:.1f} images/s with data, {images / wall_compute:.1f} compute only "
          f"(images = batch × steps; a per_crop step trains on each image {sum(cfg.nmb_crops)} times)")
    return 0


def buffered_batches(cfg, workers: int) -> int:
    """An upper bound on the batches the training pipeline can hold ready (data_pipelines.input_pipeline._to_iter):
    each process's reader threads and their prefetch buffer, and each worker's hand-over buffer."""
    per_process = int(cfg.read_threads) + int(cfg.prefetch_buffer_size)
    if workers > 0:
        return workers * (per_process + int(cfg.worker_buffer_size)) + per_process
    return per_process


def platform_load() -> str:
    import os

    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
