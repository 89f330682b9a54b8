"""Training-step and encoder-inference throughput: this project's JAX step against a PyTorch eager reference.

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--batch-sizes 64 256] [--dtype float32|bfloat16]
        [--repeats 5] [--formulations auto subpixel] [--torch nchw channels_last compile] [--minimal-step]
        [--ynn] [--no-hugepages] [--skip-inference] [--finish auto|host|device]

What is timed, in one process, after warm-up (compilation excluded), as the median of ``--repeats`` calls. The calls of
all variants are interleaved (repeat r of every variant, then repeat r+1), so machine load hits them alike; the load
average is printed before and after.
- JAX: THE PROJECT'S STEP, ``cellssl_jax.training.step.make_train_step(model, optax.adam(1e-3), loss='bce',
  crop_steps='joint', mesh=make_data_mesh())`` on ``{'crops': (x,)}``: one Adam update on B images of 128×128×1 per
  call, state donated. One variant per ``--formulations`` entry (``auto`` = ``subpixel_vjp`` + 1-image slices on CPU).
  An entry ``NAME+KEY=VALUE[+KEY=VALUE…]`` runs formulation NAME with those ``fused_blocks.TUNING`` entries set
  while its functions are traced (e.g. ``auto+last_pre_bias=kernel``), so two settings are timed in the same run.
  With ``--finish device`` (what ``auto`` picks on an accelerator, as training does: ``input.finish``) the step is fed
  uint8 crops and photometric rows (a fifth of the images blurred, as the paper's p=0.2) and finishes them itself, so
  the time includes that work; PyTorch is always fed finished floats.
  ``--minimal-step`` adds a bare jitted Adam+BCE step on the best formulation (what the real step costs on top).
  ``--ynn`` adds the best formulation compiled with YNNPACK on (per-jit compiler option), to re-check platform.py.
- PyTorch: the authors' module (Conv2d / ConvTranspose2d / nn.Upsample / MaxPool2d), ``Adam(lr=1e-3)``, ``BCELoss``,
  in NCHW and channels_last, and ``torch.compile`` of the faster of the two (skipped, with the reason, when it fails or
  exceeds ``--compile-timeout``). ``torch.set_num_threads`` = the cores XLA uses.
- Encoder inference at ``--inference-batch`` (256): ``model.apply(..., method='encode')`` jitted vs ``encoder(x)``
  under ``torch.inference_mode``.
FLOPs: 9.83 GFLOP per image per training step at 128×128 (the paper's layers, plain form; the sub-pixel forms execute
fewer), 0.68 GFLOP per image for encoder inference. "model GFLOP/s" counts those, whatever a variant executes. On a
GPU, MFU = model FLOP/s ÷ a bf16 matmul peak measured in this run (8192³). On CPU the float32 matmul peak of this run
(XLA dot, 2048³) is printed for scale.

Memory: unless ``--no-hugepages``, the script restarts itself once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(cellssl_jax.platform.hugepage_malloc_env), which applies to both frameworks in this process.
Prints a markdown table for BENCHMARKS.md (machine, date, exact command). Writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cellssl_jax import platform  # noqa: E402  (XLA flags before the JAX backend starts)

IMAGE_SIZE = 128


def convae_gflop(image_size: int = IMAGE_SIZE) -> tuple[float, float]:
    """(training step, encoder inference) GFLOP per image of the paper's layers as written (3×3 convs, ×2 nearest
    upsampling before the 2nd and 3rd decoder convs): forward ×3 for a training step, minus the first layer's input
    gradient, which nobody needs. 128×128: 9.83 and 0.68."""
    s = image_size
    enc = [(s * s, 1, 128), ((s // 2) ** 2, 128, 64), ((s // 4) ** 2, 64, 32), ((s // 4) ** 2, 32, 4)]
    dec = [((s // 4) ** 2, 4, 32), ((s // 2) ** 2, 32, 64), (s * s, 64, 128), (s * s, 128, 1)]
    macs = [pixels * 9 * ci * co for pixels, ci, co in enc + dec]
    return 2 * (3 * sum(macs) - macs[0]) / 1e9, 2 * sum(macs[:4]) / 1e9


TRAIN_GFLOP_PER_IMAGE, ENCODE_GFLOP_PER_IMAGE = convae_gflop()
YNN_ON = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                                  "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 16 only, 2 repeats, no torch.compile, small inference")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formulations", nargs="+", default=["auto", "subpixel"],
                   help="ConvAE formulations to time (cellssl_jax.models.convae.FORMULATIONS), each optionally "
                        "+KEY=VALUE settings of cellssl_jax.models.fused_blocks.TUNING")
    p.add_argument("--micro-batch", type=int, default=None, help="ConvAE.micro_batch (default: the model's choice)")
    p.add_argument("--torch", nargs="*", default=["nchw", "channels_last", "compile"],
                   help="PyTorch variants (empty: none)")
    p.add_argument("--compile-timeout", type=float, default=600.0)
    p.add_argument("--minimal-step", action="store_true", help="also time a bare Adam+BCE step (no metrics/guards)")
    p.add_argument("--ynn", action="store_true", help="also time the first formulation with YNNPACK on")
    p.add_argument("--inference-batch", type=int, default=256)
    p.add_argument("--steps-per-call", type=int, default=None,
                   help="steps (or encoder calls) per timed call, synchronised once at the end: keeps host dispatch "
                        "and the sync out of an accelerator's timing (default: 1 on CPU, 10 on an accelerator)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--no-hugepages", action="store_true")
    p.add_argument("--fused-tuning", default="", help="JSON of cellssl_jax.models.fused_blocks.TUNING overrides for "
                                                      "formulation fused_1ch (benchmarks/fused_blocks_tune.py "
                                                      "--write-best)")
    p.add_argument("--finish", choices=["auto", "host", "device"], default="auto",
                   help="feed the project step float crops (host) or uint8 crops it finishes itself (device); auto: "
                        "as the training loop, device on an accelerator")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.repeats = [16], 2
        args.torch = [t for t in args.torch if t != "compile"]
        args.inference_batch = 32
    return args


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------------------------- JAX


def formulation_spec(spec: str) -> tuple[str, dict]:
    """'auto+last_pre_bias=kernel+last_bwd_rows=1024' -> ('auto', {'last_pre_bias': 'kernel', 'last_bwd_rows': 1024})."""
    from cellssl_jax.models import fused_blocks

    name, *settings = spec.split("+")
    overrides = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if not eq or key not in fused_blocks.TUNING:
            raise SystemExit(f"--formulations {spec!r}: {setting!r} is not KEY=VALUE with KEY one of "
                             f"{sorted(fused_blocks.TUNING)}")
        overrides[key] = int(value) if value.isdigit() else value
    return name, overrides


@contextlib.contextmanager
def tuned(overrides: dict):
    """fused_blocks.TUNING with ``overrides`` while a variant's functions are traced (and called: a retrace sees them)."""
    from cellssl_jax.models import fused_blocks

    saved = dict(fused_blocks.TUNING)
    fused_blocks.TUNING.update(overrides)
    try:
        yield
    finally:
        fused_blocks.TUNING.clear()
        fused_blocks.TUNING.update(saved)


def jax_variants(args, batch: int):
    """name -> (call, sync) for the project's step per formulation (+ optional extras)."""
    import jax
    import numpy as np
    import optax

    from cellssl_jax.models.convae import ConvAE
    from cellssl_jax.parallel import batch_sharding, make_data_mesh
    from cellssl_jax.training.step import create_train_state, make_train_step
    from data_pipelines.augment import PHOTOMETRIC_IDENTITY, gaussian_kernel3
    from data_pipelines.input_pipeline import resolve_finish

    mesh = make_data_mesh()
    rng = np.random.default_rng(0)
    x = rng.random((batch, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
    on_device = lambda a: jax.device_put(a, batch_sharding(mesh))  # noqa: E731
    finish_on_device = resolve_finish(args.finish, accelerator=jax.default_backend() != "cpu") == "device"
    if finish_on_device:
        photometric = np.float32([PHOTOMETRIC_IDENTITY] * batch)
        photometric[::5, 3:] = gaussian_kernel3(1.0)[:2]
        crops_u8 = rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8)
        batch_arrays = {"crops_uint8": (on_device(crops_u8),), "photometric": (on_device(photometric),)}
    else:
        batch_arrays = {"crops": (on_device(x),)}
    variants = {}
    for spec in args.formulations:
        formulation, overrides = formulation_spec(spec)
        model = ConvAE(formulation=formulation, dtype=args.dtype, micro_batch=args.micro_batch)
        tx = optax.adam(1e-3)
        step = make_train_step(model, tx, loss="bce", crop_steps="joint", mesh=mesh)
        holder = [create_train_state(model, tx, 0, image_size=IMAGE_SIZE, mesh=mesh)]

        def call(step=step, holder=holder, overrides=overrides):
            with tuned(overrides):
                holder[0], metrics = step(holder[0], batch_arrays)
            return metrics

        fed = ", finishing uint8 crops" if finish_on_device else ""
        variants[f"jax {spec} (project step{fed})"] = (call, jax.block_until_ready)
    best = args.formulations[0]
    if args.minimal_step:
        variants[f"jax {best} (minimal step)"] = (minimal_step(args, best, on_device(x)), jax.block_until_ready)
    if args.ynn:
        variants[f"jax {best} + YNNPACK (minimal step)"] = (
            minimal_step(args, best, on_device(x), compiler_options=YNN_ON), jax.block_until_ready)
    return variants


def minimal_step(args, formulation, x, compiler_options=None):
    """A bare jitted step: Adam(1e-3) on the BCE-with-logits loss; no metrics, no finite guard, no sharding."""
    import jax
    import jax.numpy as jnp
    import optax

    from cellssl_jax.models.convae import ConvAE, init_params

    formulation, overrides = formulation_spec(formulation)
    model = ConvAE(formulation=formulation, dtype=args.dtype, micro_batch=args.micro_batch)
    tx = optax.adam(1e-3)
    params = init_params(model, jax.random.key(0), IMAGE_SIZE)

    def loss_fn(p, x):
        logits = model.apply({"params": p}, x, method=lambda m, v: m.decode_logits(m.encode(v)))
        return jnp.mean(jax.nn.softplus(logits) - x * logits)

    def step(state, x):
        p, o = state
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    jitted = jax.jit(step, donate_argnums=0, compiler_options=compiler_options)
    holder = [(params, tx.init(params))]

    def call():
        with tuned(overrides):
            holder[0], loss = jitted(holder[0], x)
        return loss

    return call


def jax_encoder_variants(args, batch: int):
    import jax
    import numpy as np

    from cellssl_jax.models.convae import ConvAE, init_params

    x = jax.device_put(np.random.default_rng(1).random((batch, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32))
    out = {}
    for spec in args.formulations:
        formulation, overrides = formulation_spec(spec)
        model = ConvAE(formulation=formulation, dtype=args.dtype, micro_batch=args.micro_batch)
        params = init_params(model, jax.random.key(0), IMAGE_SIZE)
        encode = jax.jit(lambda p, v, model=model: model.apply({"params": p}, v, method="encode"))

        def call(encode=encode, params=params, overrides=overrides):
            with tuned(overrides):
                return encode(params, x)

        out[f"jax {spec} encode"] = (call, jax.block_until_ready)
    return out


def matmul_peak_gflops(dtype: str) -> tuple[float, str]:
    """Square matmuls (XLA dot) on random data in this run: 8192³ bf16 on an accelerator (10 back to back per timing,
    one sync, so dispatch and clock ramp-up stay out), 2048³ f32 on CPU; the best of 5 timings."""
    import jax
    import jax.numpy as jnp

    on_cpu = jax.default_backend() == "cpu"
    n, dt_, k = (2048, jnp.float32, 1) if on_cpu else (8192, jnp.bfloat16, 10)
    # random, not constant, operands: on a GPU a product of zeros or ones runs measurably faster (less switching power)
    a = jax.random.normal(jax.random.key(0), (n, n), dt_)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()

    def many():
        out = None
        for _ in range(k):
            out = mm(a)
        return out

    for _ in range(2):  # warm-up: clocks up
        many().block_until_ready()
    best = min(timed_once(many, jax.block_until_ready) for _ in range(5))
    return 2 * n**3 * k / best / 1e9, f"{n}³ {jnp.dtype(dt_).name} XLA dot, random data"


# ------------------------------------------------------------------------------------------------------------ PyTorch


def torch_module():
    import torch.nn as nn

    encoder = nn.Sequential(nn.Conv2d(1, 128, 3, 1, 1), nn.ReLU(True), nn.MaxPool2d(2), nn.Conv2d(128, 64, 3, 1, 1),
                            nn.ReLU(True), nn.MaxPool2d(2), nn.Conv2d(64, 32, 3, 1, 1), nn.ReLU(True),
                            nn.Conv2d(32, 4, 3, 1, 1))
    decoder = nn.Sequential(nn.ConvTranspose2d(4, 32, 3, 1, 1), nn.ReLU(True), nn.Upsample(scale_factor=2),
                            nn.ConvTranspose2d(32, 64, 3, 1, 1), nn.ReLU(True), nn.Upsample(scale_factor=2),
                            nn.ConvTranspose2d(64, 128, 3, 1, 1), nn.ReLU(True), nn.ConvTranspose2d(128, 1, 3, 1, 1),
                            nn.Sigmoid())
    return nn.Sequential(encoder, decoder)


def torch_setup(args, layout: str, batch: int, device: str):
    import torch

    torch.manual_seed(0)
    model = torch_module().to(device)
    x = torch.rand(batch, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def torch_train_call(args, layout: str, batch: int, device: str, compiled: bool = False):
    import torch

    model, x = torch_setup(args, layout, batch, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCELoss()
    forward = torch.compile(model) if compiled else model
    autocast = args.dtype == "bfloat16"

    def call():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        loss = loss_fn(y.float(), x)
        loss.backward()
        opt.step()
        return loss

    return call


def torch_encode_call(args, layout: str, batch: int, device: str):
    import torch

    model, x = torch_setup(args, layout, batch, device)
    encoder = model[0].eval()
    autocast = args.dtype == "bfloat16"

    def call():
        with torch.inference_mode(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                                    enabled=autocast):
            return encoder(x)

    return call


def torch_sync(device: str):
    import torch

    if device.startswith("cuda"):
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


class _Timeout(Exception):
    pass


def with_timeout(fn, seconds: float):
    """Run fn() with SIGALRM as a time limit (main thread, Unix); raises _Timeout."""
    def on_alarm(signum, frame):
        raise _Timeout(f"exceeded {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------------ timing


def timed_once(call, sync) -> float:
    t = time.perf_counter()
    sync(call())
    return time.perf_counter() - t


def repeated(variants: dict, k: int) -> dict:
    """Each call runs k steps back to back (one sync at the end, by the caller)."""
    if k == 1:
        return variants

    def many(call):
        def run():
            out = None
            for _ in range(k):
                out = call()
            return out
        return run

    return {name: (many(call), sync) for name, (call, sync) in variants.items()}


def warm_up(variants: dict) -> dict:
    """First call of each (compilation); drops variants whose first call fails, with the reason."""
    kept = {}
    for name, (call, sync) in variants.items():
        t = time.perf_counter()
        try:
            sync(call())
            sync(call())
        except Exception as err:  # noqa: BLE001 - report and go on: one failed variant must not sink the run
            print(f"  {name}: FAILED ({type(err).__name__}: {str(err)[:200]})", flush=True)
            continue
        print(f"  {name}: warm-up {time.perf_counter() - t:.1f} s", flush=True)
        kept[name] = (call, sync)
    return kept


def interleaved_medians(variants: dict, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in variants}
    for r in range(repeats):
        for name, (call, sync) in variants.items():
            times[name].append(timed_once(call, sync))
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n.split(' (')[0]} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    return times


# -------------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.no_hugepages:
        env = platform.hugepage_malloc_env()
        if env is not None:
            print(f"restarting with {env} (transparent huge pages for malloc; --no-hugepages to skip)", flush=True)
            platform.reexec_with(env)

    import jax

    if args.fused_tuning:
        import json

        from cellssl_jax.models import fused_blocks

        fused_blocks.TUNING.update(json.loads(Path(args.fused_tuning).read_text()))
        print(f"fused_blocks.TUNING: {fused_blocks.TUNING}", flush=True)
    backend = jax.default_backend()
    machine = platform.machine_description()
    torch_device = "cpu"
    torch_ok = bool(args.torch)
    if torch_ok:
        try:
            import torch

            threads = machine["cores"]
            torch.set_num_threads(threads)
            if backend == "gpu":
                torch_device = "cuda" if torch.cuda.is_available() else None
                if torch_device is None:
                    print("PyTorch has no CUDA here: PyTorch reference skipped on this GPU machine")
                    torch_ok = False
        except ImportError as err:
            print(f"PyTorch not importable ({err}): reference skipped")
            torch_ok = False
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/train_throughput.py",
                                                *(sys.argv[1:] if argv is None else argv)])
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; backend {backend} "
          f"{[d.device_kind for d in jax.devices()]}; jaxlib {machine['jaxlib']}; XLA_FLAGS={machine['xla_flags']!r}; "
          f"GLIBC_TUNABLES={machine['glibc_tunables']!r}")
    if torch_ok:
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {torch_device}")
    print(f"date: {date}\ncommand: {command}\nload average (1/5/15 min) at start: {load_average()}", flush=True)

    if args.steps_per_call is None:
        args.steps_per_call = 1 if backend == "cpu" else 10
    if backend != "cpu":
        try:
            import torch

            torch.backends.cudnn.benchmark = True  # the reference at its best: cuDNN picks its fastest algorithms
        except ImportError:
            pass
    peak, peak_what = matmul_peak_gflops(args.dtype)
    print(f"matmul peak in this run: {peak:.0f} GFLOP/s ({peak_what})", flush=True)

    rows = []  # (section, batch, name, median s, images/s)
    for batch in args.batch_sizes:
        print(f"\n== training step, batch {batch}, {args.dtype}", flush=True)
        variants = jax_variants(args, batch)
        eager = {}
        if torch_ok:
            for layout in [t for t in args.torch if t in ("nchw", "channels_last")]:
                eager[f"torch {layout} eager"] = (torch_train_call(args, layout, batch, torch_device),
                                                  torch_sync(torch_device))
        variants.update(eager)
        variants = warm_up(repeated(variants, args.steps_per_call))
        if torch_ok and "compile" in args.torch:
            eager_alive = [n for n in eager if n in variants]
            if eager_alive:
                # the faster eager layout, judged on one more call each
                best_layout = min(eager_alive, key=lambda n: timed_once(*variants[n])).split()[1]
                name = f"torch {best_layout} torch.compile"
                try:
                    call = torch_train_call(args, best_layout, batch, torch_device, compiled=True)
                    sync = torch_sync(torch_device)
                    t = time.perf_counter()
                    with_timeout(lambda: (sync(call()), sync(call())), args.compile_timeout)
                    print(f"  {name}: compiled and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
                    variants.update(repeated({name: (call, sync)}, args.steps_per_call))
                except Exception as err:  # noqa: BLE001 - inductor needs a compiler etc.; report and go on
                    print(f"  {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
        print(f"  load average before timing: {load_average()}", flush=True)
        times = interleaved_medians(variants, args.repeats)
        print(f"  load average after timing: {load_average()}", flush=True)
        for name, ts in times.items():
            rows.append(("train", batch, name, statistics.median(ts) / args.steps_per_call, ts))
        del variants

    if not args.skip_inference:
        batch = args.inference_batch
        print(f"\n== encoder inference, batch {batch}, {args.dtype}", flush=True)
        variants = jax_encoder_variants(args, batch)
        if torch_ok:
            for layout in [t for t in args.torch if t in ("nchw", "channels_last")]:
                variants[f"torch {layout} eager encode"] = (torch_encode_call(args, layout, batch, torch_device),
                                                            torch_sync(torch_device))
        variants = warm_up(repeated(variants, args.steps_per_call))
        print(f"  load average before timing: {load_average()}", flush=True)
        times = interleaved_medians(variants, args.repeats)
        print(f"  load average after timing: {load_average()}", flush=True)
        for name, ts in times.items():
            rows.append(("encode", batch, name, statistics.median(ts) / args.steps_per_call, ts))

    report(rows, args, machine, backend, date, command, peak, peak_what)
    return 0


def report(rows, args, machine, backend, date, command, peak, peak_what):
    print("\n== results (medians)")
    best_torch: dict[tuple[str, int], tuple[float, str]] = {}
    for section, batch, name, med, _ in rows:
        if name.startswith("torch"):
            best_torch[(section, batch)] = max(best_torch.get((section, batch), (0.0, "")), (batch / med, name))
    header = ("| task | batch | variant | images/s | × best PyTorch | model GFLOP/s |"
              + (" MFU |" if backend != "cpu" else ""))
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for section, batch, name, med, ts in rows:
        ips = batch / med
        gflop = (TRAIN_GFLOP_PER_IMAGE if section == "train" else ENCODE_GFLOP_PER_IMAGE) * ips
        ref = best_torch.get((section, batch), (0, ""))[0]
        ratio = f"{ips / ref:.2f}" if ref else "n/a"
        task = "train step" if section == "train" else "encoder inference"
        mfu = f" {100 * gflop / peak:.1f}% |" if backend != "cpu" else ""
        lines.append(f"| {task} | {batch} | {name} | {ips:.1f} | {ratio} | {gflop:.0f} |{mfu}")
    print("\n".join(lines))
    for (section, batch), (ips, name) in best_torch.items():
        print(f"best PyTorch for {section} at batch {batch}: {name} ({ips:.1f} images/s)")
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB RAM; backend {backend}; "
          f"jaxlib {machine['jaxlib']}; XLA_FLAGS `{machine['xla_flags']}`; GLIBC_TUNABLES "
          f"`{machine['glibc_tunables'] or '(unset)'}`; {args.dtype}; median of {args.repeats}, interleaved; "
          f"{args.steps_per_call} step(s) per timed call")
    print(f"matmul peak in the same run: {peak:.0f} GFLOP/s ({peak_what})")
    print(f"date: {date}; load average at the end: {load_average()}")
    print(f"command: `{command}`")
    if backend == "cpu":
        print("GPU: not measured in this run (MFU and the bf16 path print on a GPU backend).")


if __name__ == "__main__":
    sys.exit(main())
