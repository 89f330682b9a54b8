"""The project's built-in data set: a synthetic live-cell imaging plate with planted drug effects (issue #2 §2).

    python -m data_pipelines.synthetic_plate --preset demo --out runs/demo/plate [--seed 0] [--workers 2]

`demo` (2 cell lines, 8 drugs, 8,736 images; frames every 4 h, thinned from the paper's 2 h to keep the demo in
minutes) or `paper` (21 lines × 31 drugs, ~0.96M images, rendered as a stream). See data_pipelines/synthetic/ for
the model: design.py (presets, planted effects), population.py (biology), appearance.py (signatures), render.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from data_pipelines.synthetic import *  # noqa: F403 - this module is the package's public face
from data_pipelines.synthetic import __all__  # noqa: F401
from data_pipelines.synthetic import make_config, render_plate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.synthetic_plate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="demo", choices=["demo", "paper"])
    parser.add_argument("--out", required=True, help="output folder (images/, masks/, manifest.csv, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes rendering wells in parallel")
    parser.add_argument("--frame-interval-h", type=float, default=None, help="override the preset's cadence")
    args = parser.parse_args(argv)
    overrides = {} if args.frame_interval_h is None else {"frame_interval_h": args.frame_interval_h}
    make_config(args.preset, **overrides)  # fail on bad arguments before creating anything
    start = time.perf_counter()
    manifest = render_plate(args.out, preset=args.preset, seed=args.seed, workers=args.workers, **overrides)
    print(f"wrote {manifest} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
