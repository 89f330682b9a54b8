"""Tile sizes and warps for the fused one-channel blocks' Triton kernels (cellssl_jax/models/fused_blocks.py), on a GPU.

    python3 benchmarks/fused_blocks_tune.py [--batch 256] [--dtype bfloat16] [--repeats 3] [--blocks first last]
        [--configs NAME ...] [--unfused plain matmul] [--write-best best.json]

Times, at the shapes of a 128×128 training step, each block's forward and its training work (forward + the
gradients a training step asks for) for every configuration in CONFIGS (keys of ``fused_blocks.TUNING``), next to the
unfused forms the model would run otherwise (``plain``: XLA's convolutions; ``matmul``: formulation plain_1ch's
products). The first block's rows include the 2×2 max pool and the last block's the ReLU of its input, which the
unfused rows leave out (they cost extra there). Prints milliseconds per call, median of the repeats; with
--write-best, the fastest configuration per block as JSON for ``train_throughput.py --fused-tuning``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cellssl_jax import platform  # noqa: E402,F401  (XLA flags before the JAX backend starts)

# (name, overrides of fused_blocks.TUNING without the block's prefix); each block is timed with each. The first
# block's rows time its Pallas backward kernel unless they name another backward pass ("backward xla", ...).
CONFIGS = (
    ("loop 2048/32 w4", {"bwd_rows": 2048, "bwd_chunk": 32}),
    ("backward xla", {"backward": "xla"}),
    ("backward products", {"backward": "products"}),
    ("backward saved", {"backward": "saved"}),
    ("saved 1024/64", {"backward": "saved", "mask_rows": 1024, "mask_chunk": 64}),
    ("saved 4096/32 w8", {"backward": "saved", "mask_rows": 4096, "mask_chunk": 32, "mask_warps": 8}),
    # after "saved" became the bf16 default (2026-11-27: 0.95 ms of training work against 1.18 / 1.04 for the two
    # tilings above): the mask kernel's chunk and warps, and the forward kernel's tiles with the mask it now writes
    ("saved 2048/16", {"backward": "saved", "mask_chunk": 16}),
    ("saved 2048/64 w8", {"backward": "saved", "mask_chunk": 64, "mask_warps": 8}),
    ("saved 512/32", {"backward": "saved", "mask_rows": 512}),
    ("saved fwd 128 w8", {"backward": "saved", "fwd_rows": 128, "fwd_warps": 8}),
    ("saved fwd 32 w4", {"backward": "saved", "fwd_rows": 32, "fwd_warps": 4}),
    ("tile 64 w4", {"bwd_rows": 64, "bwd_chunk": 64}),
    ("tile 128 w4", {"bwd_rows": 128, "bwd_chunk": 128}),
    ("unroll 256/64 w4", {"bwd_rows": 256, "bwd_chunk": 64}),
    ("unroll 512/64 w8", {"bwd_rows": 512, "bwd_chunk": 64, "bwd_warps": 8}),
    ("loop 1024/64 w4 s1", {"bwd_rows": 1024, "bwd_chunk": 64, "stages": 1}),
    ("fwd 128 w8", {"fwd_rows": 128, "fwd_warps": 8}),
    ("fwd 256 w8", {"fwd_rows": 256, "fwd_warps": 8}),
    ("fwd 32 w4", {"fwd_rows": 32, "fwd_warps": 4}),
    ("loop 4096/32 w4", {"bwd_rows": 4096, "bwd_chunk": 32}),
    ("loop 2048/64 w8", {"bwd_rows": 2048, "bwd_chunk": 64, "bwd_warps": 8}),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=20, help="calls per timing, one sync at the end")
    p.add_argument("--blocks", nargs="+", choices=["first", "last"], default=["first", "last"])
    p.add_argument("--configs", nargs="+", default=None, help="only these CONFIGS (names)")
    p.add_argument("--unfused", nargs="*", default=["plain", "matmul"], choices=["plain", "matmul"])
    p.add_argument("--write-best", default="", help="write the fastest configuration per block (training work) as "
                                                    "JSON for train_throughput.py --fused-tuning")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cellssl_jax.models import fused_blocks
    from layer_profile import layer_fn
    from train_throughput import repeated, timed_once, tuned

    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    n = args.batch

    def arr(shape, scale=1.0):
        return jnp.asarray(rng.normal(0, scale, shape).astype(np.float32), dtype)

    blocks = {  # name: (x, kernel, bias, cotangent of the fused form, cotangent of the unfused conv, input grad?)
        "first 1→128 @128²": (jnp.asarray(rng.random((n, 128, 128, 1), np.float32), dtype), arr((3, 3, 1, 128), 0.3),
                              arr((128,), 0.1), arr((n, 64, 64, 128)), arr((n, 128, 128, 128)), False),
        "last 128→1 @128²": (arr((n, 128, 128, 128)), arr((3, 3, 128, 1), 0.05), arr((1,), 0.1), arr((n, 128, 128, 1)),
                             arr((n, 128, 128, 1)), True),
    }
    fused = {"first 1→128 @128²": fused_blocks.conv_relu_pool_one_channel,
             "last 128→1 @128²": fused_blocks.relu_conv_to_one_channel}

    def time_pair(f, x, kernel, bias, cot, input_grad):
        def train(x, kernel, bias, cot):
            y, vjp = jax.vjp(f, x, kernel, bias)
            dx, dk, db = vjp(cot.astype(y.dtype))
            return (dx if input_grad else jnp.zeros((), x.dtype)), dk, db
        jf, jt = jax.jit(f), jax.jit(train)
        calls = repeated({"forward": (lambda: jf(x, kernel, bias), None),
                          "train": (lambda: jt(x, kernel, bias, cot), None)}, args.calls)
        calls = {what: call for what, (call, _) in calls.items()}
        for call in calls.values():
            jax.block_until_ready(call())
        times = {what: [] for what in calls}
        for _ in range(args.repeats):
            for what, call in calls.items():
                times[what].append(timed_once(call, jax.block_until_ready) / args.calls)
        return 1e3 * statistics.median(times["forward"]), 1e3 * statistics.median(times["train"])

    print(f"backend {jax.default_backend()} {[d.device_kind for d in jax.devices()]}; jax {jax.__version__}; batch {n};"
          f" {args.dtype}; {args.calls} calls per timing, median of {args.repeats}", flush=True)
    print("| block | variant | forward ms | train ms |\n|---|---|---|---|", flush=True)
    best_overrides = {}
    for block, (x, kernel, bias, cot_fused, cot_conv, input_grad) in blocks.items():
        first = block.startswith("first")
        if block.split()[0] not in args.blocks:
            continue
        for form in args.unfused:
            f, _ = layer_fn(form, False, first)
            try:
                fwd, train = time_pair(f, x, kernel, bias, cot_conv, input_grad)
                print(f"| {block} | unfused {form} (no {'pool' if first else 'input ReLU'}) | {fwd:.3f} | {train:.3f} |",
                      flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"| {block} | unfused {form} | FAILED {type(err).__name__}: {str(err)[:200]} | |", flush=True)
        prefix = "first_" if first else "last_"
        for name, overrides in CONFIGS:
            if (args.configs and name not in args.configs) or ("backward" in overrides and not first):
                continue
            # the first block's rows time its Pallas backward kernel unless they name another backward pass
            setting = {prefix + k: v for k, v in {**({"backward": "pallas"} if first else {}), **overrides}.items()}
            try:
                with tuned(setting):
                    fwd, train = time_pair(lambda *a: fused[block](*a, impl="pallas"), x, kernel, bias, cot_fused,
                                           input_grad)
                print(f"| {block} | fused {name} | {fwd:.3f} | {train:.3f} |", flush=True)
                chosen = {prefix + k: setting[prefix + k] for k in overrides}
                if first:
                    chosen["first_backward"] = setting["first_backward"]
                best_overrides.setdefault(prefix, []).append((train, chosen))
            except Exception as err:  # noqa: BLE001 - a configuration Triton rejects: report, go on
                print(f"| {block} | fused {name} | FAILED {type(err).__name__}: {str(err)[:300]} | |", flush=True)
    if args.write_best:
        import json

        best = {}
        for timed in best_overrides.values():
            best.update(min(timed, key=lambda t: t[0])[1])
        Path(args.write_best).write_text(json.dumps(best))
        print(f"fastest per block: {best} -> {args.write_best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
