"""Where the ConvAE's training step spends its time: each layer's forward and forward+backward, timed alone.

    .venv/bin/python benchmarks/layer_profile.py [--batch 256] [--dtype bfloat16|float32] [--forms plain subpixel]
        [--steps-per-call N] [--repeats 5] [--layers enc1 dec3 ...]

Each of the paper's eight 3×3 convolutions (with its bias and ReLU; the two that follow a ×2 nearest upsampling with
it, in the plain form and in the sub-pixel form of cellssl_jax.models.convae) is jitted alone at the shapes of a
128×128 training step, and timed: forward, and the training work (forward + weight/bias gradients + input gradient,
which the first layer does not need); the two one-channel layers also as the matrix products of formulation
``plain_1ch`` ("matmul") and as formulation ``fused_1ch``'s fused blocks ("fused": the first with its pool; "fused_in":
the last with the ReLU of its input). Reported per layer: milliseconds per call, the layer's model FLOPs (as
benchmarks/train_throughput.py counts them: the plain form's) and the TFLOP/s they amount to, the layer's share of the
sum, and on an accelerator the fraction of a bf16 matmul peak measured in the same run. The sum of the training work
against the whole step of train_throughput.py shows what the rest (pooling, loss, Adam, copies) costs.
Writes nothing; prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from cellssl_jax import platform  # noqa: E402,F401  (XLA flags before the JAX backend starts)

# name, input side (pixels), in channels, out channels, upsampled x2 before the conv, ReLU after
LAYERS = (
    ("enc1 1→128 @128²", 128, 1, 128, False, True),
    ("enc2 128→64 @64²", 64, 128, 64, False, True),
    ("enc3 64→32 @32²", 32, 64, 32, False, True),
    ("enc4 32→4 @32²", 32, 32, 4, False, False),
    ("dec1 4→32 @32²", 32, 4, 32, False, True),
    ("dec2 up+32→64 @64²", 32, 32, 64, True, True),
    ("dec3 up+64→128 @128²", 64, 64, 128, True, True),
    ("dec4 128→1 @128²", 128, 128, 1, False, False),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--forms", nargs="+", default=["plain", "subpixel"],
                   choices=["plain", "subpixel", "phase_xla", "phase_gemm"],
                   help="how the two upsampling layers are written (the others are the same in all): phase_* write "
                        "the sub-pixel phase layout [N, h+1, w+1, 4·O] that formulation fused_subpixel's last block "
                        "reads, by XLA's convolution or as one matrix product (subpixel.all_phase_conv)")
    p.add_argument("--steps-per-call", type=int, default=None, help="default: 1 on CPU, 20 on an accelerator")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", nargs="+", default=None, help="only these layers (name prefixes: enc1 dec3 ...)")
    return p.parse_args(argv)


def layer_fn(form: str, up: bool, relu: bool):
    import jax
    import jax.numpy as jnp

    from cellssl_jax.models.convae import _conv_reference as _conv
    from cellssl_jax.models.convae import (conv_from_one_channel_vjp, conv_to_one_channel_vjp, upsample_conv_subpixel,
                                           upsample_nearest_2x)
    from cellssl_jax.models.fused_blocks import conv_relu_pool_one_channel, relu_conv_to_one_channel
    from cellssl_jax.models.subpixel import all_phase_conv, all_phase_kernel

    def f(x, kernel, bias):
        if form == "fused":  # formulation fused_1ch: conv + bias + ReLU + the 2x2 max pool after it, one kernel
            return conv_relu_pool_one_channel(x, kernel, bias)
        if form == "fused_in":  # formulation fused_1ch's last layer: the ReLU of its input, then the conv
            return relu_conv_to_one_channel(x, kernel, bias)
        if form == "matmul":  # the one-channel layers of formulation plain_1ch / subpixel_vjp
            y = (conv_from_one_channel_vjp if x.shape[-1] == 1 else conv_to_one_channel_vjp)(x, kernel, bias)
        elif up and form == "subpixel":
            y = upsample_conv_subpixel(x, kernel, bias)
        elif up and form.startswith("phase_"):  # no interleaving: the phase layout, each phase with the bias
            y = all_phase_conv(x, all_phase_kernel(kernel), form.removeprefix("phase_")) + jnp.tile(bias, 4)
        else:
            y = _conv(upsample_nearest_2x(x) if up else x, kernel, bias)
        return jax.nn.relu(y) if relu else y

    def train(x, kernel, bias, cotangent, need_input_grad: bool):
        y, vjp = jax.vjp(lambda x, k, b: f(x, k, b), x, kernel, bias)
        dx, dk, db = vjp(cotangent.astype(y.dtype))
        return (dx if need_input_grad else jnp.zeros((), x.dtype)), dk, db

    return f, train


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train_throughput import matmul_peak_gflops, repeated, timed_once

    backend = jax.default_backend()
    k = args.steps_per_call or (1 if backend == "cpu" else 20)
    dtype = jnp.dtype(args.dtype)
    peak, peak_what = matmul_peak_gflops(args.dtype)
    print(f"backend {backend} {[d.device_kind for d in jax.devices()]}; jax {jax.__version__}; batch {args.batch}; "
          f"{args.dtype}; {k} call(s) per timing, median of {args.repeats}; matmul peak {peak / 1e3:.3g} TFLOP/s "
          f"({peak_what}); {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}", flush=True)

    rng = np.random.default_rng(0)
    timed = {}  # layer name -> {form: (label, forward s, train s, forward FLOP, train FLOP)}
    for name, side, ci, co, up, relu in LAYERS:
        if args.layers and not any(name.startswith(prefix) for prefix in args.layers):
            continue
        out_side = side * 2 if up else side
        fwd_flop = 2 * 9 * ci * co * out_side**2 * args.batch
        first = name.startswith("enc1")
        train_flop = fwd_flop * (2 if first else 3)
        x = jnp.asarray(rng.random((args.batch, side, side, ci), np.float32), dtype)
        kernel = jnp.asarray(rng.normal(0, 0.05, (3, 3, ci, co)).astype(np.float32), dtype)
        bias = jnp.zeros((co,), dtype)
        one_channel = ci == 1 or co == 1
        for form in (args.forms if up else [args.forms[0]] + (["matmul"] if one_channel else [])
                     + (["fused"] if ci == 1 else []) + (["fused_in"] if co == 1 else [])):
            f, train = layer_fn(form, up, relu)
            cot_side = out_side // 2 if form == "fused" else out_side  # the fused block ends with its pool
            cot_shape = (args.batch, cot_side, cot_side, co)
            if up and form.startswith("phase_"):
                cot_shape = (args.batch, side + 1, side + 1, 4 * co)
            cot = jnp.asarray(rng.normal(size=cot_shape).astype(np.float32), dtype)
            jf = jax.jit(f)
            jt = jax.jit(train, static_argnums=4)

            calls = repeated({"forward": (lambda: jf(x, kernel, bias), None),
                              "train": (lambda: jt(x, kernel, bias, cot, not first), None)}, k)
            calls = {what: call for what, (call, _) in calls.items()}
            try:
                for call in calls.values():
                    jax.block_until_ready(call())
            except Exception as err:  # noqa: BLE001 - one form that fails to compile must not sink the profile
                print(f"  {name} ({form}): FAILED ({type(err).__name__}: {str(err)[:300]})", flush=True)
                continue
            times = {what: [] for what in calls}
            for _ in range(args.repeats):
                for what, call in calls.items():
                    times[what].append(timed_once(call, jax.block_until_ready) / k)
            label = name + (f" ({form})" if up or form in ("matmul", "fused", "fused_in") else "")
            label += {"fused": " incl. pool", "fused_in": " incl. its input's ReLU"}.get(form, "")
            fwd_s, train_s = statistics.median(times["forward"]), statistics.median(times["train"])
            timed.setdefault(name, {})[form] = (label, fwd_s, train_s, fwd_flop, train_flop)
            print(f"  {label}: forward {1e3 * fwd_s:.3f} ms, train {1e3 * train_s:.3f} ms", flush=True)

    for form in args.forms:
        # per layer: this form where the layer has one (the upsampling layers), else the layer's only row; the first
        # form's table takes the matrix-product rows of the one-channel layers (formulation plain_1ch)
        preferred = (form, "matmul") if form == args.forms[0] else (form,)
        chosen = [next((by_form[f] for f in reversed(preferred) if f in by_form), next(iter(by_form.values())))
                  for by_form in timed.values()]
        total = sum(r[2] for r in chosen)
        title = f"{form} form" + (" with the one-channel layers as matrix products (formulation plain_1ch)"
                                  if any(r[0].endswith("(matmul)") for r in chosen) else "")
        print(f"\n== {title}: training work of the 8 layers alone, batch {args.batch}, {args.dtype}")
        print("| layer | forward ms | train ms | share of train | model TFLOP/s (train) | of matmul peak |")
        print("|---|---|---|---|---|---|")
        for label, fwd_s, train_s, _, train_flop in chosen:
            tflops = train_flop / train_s / 1e12
            print(f"| {label} | {1e3 * fwd_s:.3f} | {1e3 * train_s:.3f} | {100 * train_s / total:.0f}% | "
                  f"{tflops:.2f} | {100 * tflops * 1e3 / peak:.0f}% |")
        flop = sum(r[4] for r in chosen)
        print(f"| sum | {1e3 * sum(r[1] for r in chosen):.3f} | {1e3 * total:.3f} | 100% | {flop / total / 1e12:.2f} | "
              f"{100 * flop / total / 1e9 / peak:.0f}% |")
        print(f"images/s if the step were only these layers: {args.batch / total:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
