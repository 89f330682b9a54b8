"""Throughput of the training input pipeline: decode + the paper's 5-crop multi-crop + augmentation, through Grain.

    .venv/bin/python benchmarks/input_pipeline.py [--dataset DIR] [--images 128] [--batch 64] [--batches 6]
                                                  [--repeats 5] [--workers 1 2]

Source: a dataset built by ``python -m data_pipelines.build`` when ``--dataset`` is given (its default stores raw
uint8 bytes: the decode stage then measures what training reads); otherwise 256×256 grayscale images PNG-encoded in
memory and decoded per access, what a build with ``--image-encoding png`` stores: PNG decoding costs ~4x a raw
record's (~315 against ~74 µs, commit 9627762), so that source's decode figures bound the default's from above.
The images are shifted/flipped copies of ../shared/reference/HCT15_example.jpg (a real phase-contrast frame) when it
exists, so PNG decoding costs what it costs on real data; smooth random texture otherwise.

Stages, each timed ``--repeats`` times in turn (interleaved, so machine load hits them alike) and reported as the median
images/s of one process (= one core) and images per CPU-second of that process:
  decode              source[i] only, over --images random rows, each image dropped before the next (as in the pipeline)
  crops (PIL recipe)  the authors' per-crop recipe with PIL crop+resize, x/255, flip view, numpy 3×3 blur: the reference
  crops (ours)        data_pipelines.augment.multi_crop on decoded images, written into preallocated rows (as in batches)
  decode + crops      what one pipeline element costs
  grain, 0 workers    create_train_dataset(...) in-process, batches of --batch (includes Grain's index plumbing)
  ... finish=device   the same with input.finish='device': uint8 crops + photometric rows, x/255 and blur left to the
                      accelerator (what the training loop picks there); the host's share of the work
  eval: ...           one image of feature extraction (create_eval_dataset's element): decode, x/255, the authors'
                      float antialiased resize to 128 px
Then the pipeline with T reader threads in the process (the kernels release the GIL) and with N worker processes,
for each --finish place,
start-up (first batch) excluded, reported as images/s (wall) and images per CPU-second of this process AND its
workers (read from /proc): on a shared machine the wall rate follows the load, the CPU rate is what the cores deliver.
Writes nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines import augment as A  # noqa: E402
from data_pipelines import input_pipeline as ip  # noqa: E402

REFERENCE_IMAGE = REPO / ".." / "shared" / "reference" / "HCT15_example.jpg"
try:  # encode like the dataset build does
    from data_pipelines.build import BuildOptions

    PNG_LEVEL = BuildOptions().png_compress_level
except ImportError:
    PNG_LEVEL = 0


class InMemoryPngSource:
    """Random-access source of PNG bytes decoded per access, the shape of data_pipelines.source.open_source.

    ``length`` rows cycle over ``n`` distinct encoded images: the pipeline's shuffle then works over a realistic
    index range (Grain's index_shuffle costs ~60 µs per element over 256 indices but ~5 µs over 10^4 or more).
    """

    def __init__(self, n: int, size: int = 256, seed: int = 0, length: int | None = None):
        self.length = n if length is None else length
        rng = np.random.default_rng(seed)
        if REFERENCE_IMAGE.exists():
            base = np.asarray(Image.open(REFERENCE_IMAGE).convert("L").resize((size, size), Image.BILINEAR))
        else:
            noise = rng.random((size // 8, size // 8))
            base = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        self.encoded = []
        for _ in range(n):
            image = np.roll(base, tuple(rng.integers(0, size, 2)), axis=(0, 1))
            if rng.random() < 0.5:
                image = image[:, ::-1]
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=PNG_LEVEL)
            self.encoded.append(buffer.getvalue())
        self.texture = "HCT15_example.jpg" if REFERENCE_IMAGE.exists() else "synthetic texture"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        image = np.asarray(Image.open(io.BytesIO(self.encoded[index % len(self.encoded)])))
        return {"image": image[:, :, None], "row_id": np.int64(index)}


def pil_recipe_multi_crop(image: np.ndarray, rng: np.random.Generator, specs, params: A.AugmentParams):
    """Reference: the per-crop recipe done the straightforward way (PIL crop + resize per crop, numpy blur)."""
    plane = Image.fromarray(image[:, :, 0])
    crops = []
    for spec in specs:
        box = A.sample_crop_box(image.shape[0], image.shape[1], rng, (spec.min_scale, spec.max_scale))
        resized = plane.crop((box.left, box.top, box.left + box.width, box.top + box.height)).resize(
            (spec.size, spec.size), Image.BILINEAR)
        crop = np.divide(np.asarray(resized), np.float32(255), dtype=np.float32)
        u = rng.random(7)
        if u[0] < params.hflip_p:
            crop = crop[:, ::-1]
        if u[1] <= params.blur_p:
            k = A.gaussian_kernel3(params.blur_sigma[0] + (params.blur_sigma[1] - params.blur_sigma[0]) * u[2])
            padded = np.pad(crop, 1, mode="reflect")
            crop = sum(k[i] * k[j] * padded[i:i + spec.size, j:j + spec.size] for i in range(3) for j in range(3))
        crops.append(crop)
    return crops


# CPU clocks (process_time, /proc/<pid>/stat) advance in 10 ms ticks: a timing of fewer than 5 ticks is no
# measurement, and is printed as nan rather than as a rate of billions of images per CPU second.
MIN_CPU_S = 0.05


def per_cpu_second(count: int, cpu: float) -> float:
    return count / cpu if cpu >= MIN_CPU_S else float("nan")


def timed(fn, count: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) for fn() processing `count` images."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, per_cpu_second(count, cpu)


def bench_in_process(source, pipeline_source, args) -> dict[str, list[tuple[float, float]]]:
    """``source``: the --images rows timed stage by stage; ``pipeline_source``: the full-length source Grain reads."""
    cfg = ip.default_input_config()
    specs, params = ip.crop_specs(cfg), ip.augment_params(cfg)
    n = len(source)
    decoded = [source[i]["image"] for i in range(n)]
    rng = np.random.default_rng(0)
    grain_cfg = ip.default_input_config()
    grain_cfg.batch_size = args.batch
    batches = max(1, n // args.batch)
    rows_out = [np.empty((s.size, s.size, decoded[0].shape[2]), np.float32) for s in specs]  # as the batch rows

    grain_cfg.read_threads = 0  # this thread computes the batches: the process's CPU time is the pipeline's
    # One iterator for all runs: the steady state of training (start-up and first batches are not what limits it).
    grain_cfg.finish = "host"
    grain_iterator = iter(ip.create_train_dataset(pipeline_source, grain_cfg, seed=0, process_index=0, process_count=1))
    grain_cfg.finish = "device"
    device_iterator = iter(ip.create_train_dataset(pipeline_source, grain_cfg, seed=0, process_index=0,
                                                   process_count=1))

    def grain_run(iterator=grain_iterator):
        for _ in range(batches):
            next(iterator)

    stages = {
        # Each image is dropped before the next is read, as the pipeline does (a list of them all would add page
        # faults that the pipeline does not pay).
        "decode": lambda: [source[i] and None for i in range(n)],
        "crops (PIL recipe)": lambda: [pil_recipe_multi_crop(x, rng, specs, params) for x in decoded],
        "crops (ours)": lambda: [A.multi_crop(x, rng, specs, params, out=rows_out) and None for x in decoded],
        "decode + crops": lambda: [A.multi_crop(source[i]["image"], rng, specs, params, out=rows_out) and None
                                   for i in range(n)],
        f"grain, 0 workers, batch {args.batch}": grain_run,
        "  ... finish=device": lambda: grain_run(device_iterator),
        "eval: decode + x/255 + float resize": lambda: [A.eval_preprocess(source[i]["image"], 128).shape and None
                                                        for i in range(n)],
    }
    counts = {name: n for name in stages}
    counts[f"grain, 0 workers, batch {args.batch}"] = counts["  ... finish=device"] = batches * args.batch
    for fn in stages.values():  # warm-up: Numba loads its cache, PIL and Grain initialise
        fn()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in stages}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            results[name].append(timed(fn, counts[name]))
    return results


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (any process: Grain's workers are children of this one)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_parallel(source, args, *, workers: int = 0, threads: int = 0,
                   finish: str = "host") -> list[tuple[float, float, float, int]]:
    """(images/s wall, images per CPU-second of this process AND its worker processes, CPU seconds of this process
    alone, images) per run, of the pipeline with `workers` processes or `threads` reader threads, after the first batch
    (process start-up excluded). The CPU figure is what a core delivers whatever else loads the machine; the wall
    figure depends on that load. With workers, this process's share is the serial part: the training process has
    one main thread, which also drives the accelerator."""
    import multiprocessing

    cfg = ip.default_input_config()
    cfg.batch_size = args.batch
    cfg.worker_count = workers
    cfg.read_threads = threads
    cfg.prefetch_buffer_size = max(2, threads)
    cfg.finish = finish
    it = iter(ip.create_train_dataset(source, cfg, seed=0, process_index=0, process_count=1))
    next(it)
    pids = [os.getpid()] + [child.pid for child in multiprocessing.active_children()]
    rates = []
    for _ in range(args.repeats):
        cpu, own = sum(_process_cpu_seconds(pid) for pid in pids), _process_cpu_seconds(pids[0])
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        wall = time.perf_counter() - start
        cpu, own = sum(_process_cpu_seconds(pid) for pid in pids) - cpu, _process_cpu_seconds(pids[0]) - own
        count = args.batches * args.batch
        rates.append((count / wall, per_cpu_second(count, cpu), own, count))
    it.close()
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="a dataset built by data_pipelines.build (default: in-memory PNGs)")
    parser.add_argument("--images", type=int, default=128, help="images per in-process timing run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="batches per timing run with workers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="*", default=[2], help="in-process reader threads to try")
    parser.add_argument("--finish", nargs="+", choices=["host", "device"], default=["host", "device"],
                        help="where x/255 and the photometric augmentations run, for the parallel runs")
    args = parser.parse_args()

    if args.dataset:
        from data_pipelines.source import open_source

        full = open_source(args.dataset)
        source, label = full, f"built dataset {args.dataset} ({len(full)} images, {full.image_shape})"

        rows = np.random.default_rng(0).choice(len(full), min(args.images, len(full)), replace=False).tolist()

        class Head:  # --images random rows, for the in-process stages (random reads, as the shuffled pipeline does)
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                return full[rows[i]]

        head = Head()
    else:
        head = InMemoryPngSource(args.images)
        source = InMemoryPngSource(args.images, length=100_000)
        label = (f"{args.images} distinct in-memory PNGs (a 100,000-row source cycles over them), 256x256x1, "
                 f"zlib level {PNG_LEVEL}, from {source.texture}")

    print(f"source: {label}; multi-crop 5 x 128 px (1 x scale 1, 1 x 0.5-0.75, 3 x 0.5), hflip 0.5, blur 0.2")
    print(f"medians of {args.repeats} interleaved runs; one process = one core\n")
    results = bench_in_process(head, source, args)
    header = f"{'stage':44s} {'img/s (wall)':>13s} {'img/CPU-s':>10s} {'us/img (CPU)':>13s}"
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:44s} {wall:13,.0f} {cpu:10,.0f} {1e6 / cpu:13,.0f}")
    ours = statistics.median(r[1] for r in results["crops (ours)"])
    ref = statistics.median(r[1] for r in results["crops (PIL recipe)"])
    print(f"\ncrops+augment, ours vs PIL recipe (CPU time, same process): {ours / ref:.2f}x")
    if any(r[1] != r[1] for runs in results.values() for r in runs):
        print(f"(nan: a timing used under {MIN_CPU_S * 1e3:.0f} ms of CPU, the clock's resolution; raise --images)")

    print()
    print("parallel runs (CPU: this process and its workers, all threads; wall: depends on the machine's load)")
    for label, kwargs in [(f"{name}, finish={finish}", {**kwargs, "finish": finish})
                          for name, kwargs in ([(f"grain, {t} read threads", {"threads": t}) for t in args.threads]
                                               + [(f"grain, {w} worker(s)", {"workers": w}) for w in args.workers])
                          for finish in args.finish]:
        runs = bench_parallel(source, args, **kwargs)
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        # This process's share is a few clock ticks per run: summed over the runs, not a median of 10 ms steps.
        own_s, own_images = sum(r[2] for r in runs), sum(r[3] for r in runs)
        own = 1e6 / per_cpu_second(own_images, own_s)
        print(f"{label + f', batch {args.batch}':44s} {wall:13,.0f} {cpu:10,.0f} {1e6 / cpu:13,.0f}   "
              f"(this process {own:,.0f} us/img over all runs, {own_s * os.sysconf('SC_CLK_TCK'):.0f} clock ticks; "
              f"wall runs: {', '.join(f'{r[0]:,.0f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
