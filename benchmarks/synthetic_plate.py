"""Speed of the synthetic plate generator on one core (issue #2 §2 asks for >= 500 rendered images/s per core).

    .venv/bin/python benchmarks/synthetic_plate.py [--wells 48] [--preset demo] [--repeats 3]

Renders a sample of the preset's wells (every k-th well of the layout, so all conditions and both early sparse and
late confluent frames are in it) in this process and reports, per core:
- render only: simulation + drawing, images/s;
- render + write: the same plus the image and mask PNGs written to a temporary folder;
- the reference, in the same process on the same frames: Pillow's PNG encoder at compress_level=1, the obvious
  way to write them, so the numbers can be compared across machines and loads as ratios.
Times are process CPU time (robust on a shared machine) and wall time; the best of --repeats runs is kept.

Measured 2026-11-26 on the shared 2-core dev box (load average 3.5-5.5 from other jobs, so absolute figures run
low; the ratio to the Pillow reference is the steadier number), render only, images/s per core (CPU):
    paper: 330 (0.86× a Pillow encode) before the row-pass painter, 466 (0.55×) after;
    demo:  385 (0.81×) before, 506 (0.60×) after.
In one process, old and new code alternating on the same 48 wells (best of 3, two sessions): paper 371-390 ->
531-591, demo 412-449 -> 599-680.
Render + PNG write: paper 184 -> 212, demo 179 -> 194; zlib's Huffman coder (~1.2 ms per 256² frame) is now the
larger half of that.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipelines.synthetic.design import make_config, plate_layout  # noqa: E402
from data_pipelines.synthetic.plate import iter_well_frames, iter_well_rows, write_stream  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--wells", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = make_config(args.preset)
    layout = plate_layout(config, 0)
    step = max(1, len(layout) // args.wells)
    sample = layout[::step][: args.wells]
    n_images = len(sample) * len(config.frame_times())
    # Warm up: compile (or load) the kernels and build the texture tiles outside the timings.
    next(iter_well_frames(sample[0], config, 0))

    frames: list[np.ndarray] = []

    def render_only() -> None:
        frames.clear()
        for spec in sample:
            for frame in iter_well_frames(spec, config, 0):
                frames.append(frame.image)

    def render_and_write() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in sample:
                for _ in write_stream(iter_well_rows(spec, config, 0), Path(tmp)):
                    pass

    def pillow_reference() -> None:
        for image in frames:
            Image.fromarray(image).save(io.BytesIO(), format="PNG", compress_level=1)

    results = {}
    for name, fn in (("render only", render_only), ("render + PNG write", render_and_write),
                     ("reference: Pillow PNG encode, level 1", pillow_reference)):
        runs = [_timed(fn) for _ in range(args.repeats)]
        results[name] = (min(r[0] for r in runs), min(r[1] for r in runs))

    print(f"preset {args.preset}: {len(sample)} wells × {len(config.frame_times())} frames = {n_images} images, "
          f"best of {args.repeats}")
    print(f"{'':40s} {'img/s (CPU)':>12s} {'img/s (wall)':>13s} {'ms/img (CPU)':>13s}")
    for name, (cpu, wall) in results.items():
        print(f"{name:40s} {n_images / cpu:12.0f} {n_images / wall:13.0f} {1e3 * cpu / n_images:13.2f}")
    ref = results["reference: Pillow PNG encode, level 1"][0]
    render, write = results["render only"][0], results["render + PNG write"][0]
    print(f"ratios (CPU): render only = {render / ref:.2f}× a Pillow PNG encode of the frame; "
          f"our image+mask writing = {(write - render) / ref:.2f}× it")


if __name__ == "__main__":
    main()
