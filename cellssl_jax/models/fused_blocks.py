"""The ConvAE's two one-channel blocks at full resolution, each fused into Pallas kernels.

- ``conv_relu_pool_one_channel``: the first block, conv 3×3 (one input channel → C) + bias + ReLU + 2×2 max pool;
- ``relu_conv_to_one_channel``: the last, the previous conv's bias + ReLU + conv 3×3 (C → one channel) + bias.

First block
-----------
Why: on an H200 in bf16 at batch 256 the first layer alone took 2.9 ms of a ~15 ms training step at under 1% of the
matmul peak (BENCHMARKS.md, layer profile). Written as separate ops it writes and re-reads a [N, 128, 128, C]
activation (1 GB at batch 256 in bf16) four times: conv out, pool in, pool gradient out, weight gradient in. The
fused forward kernel reads a 16-column patch matrix (33 MB) and writes only the pooled block (256 MB): 0.36 ms on an
H100 against 1.48 ms for cuDNN's convolution alone. The backward pass (``TUNING["first_backward"]``) comes in four
forms. ``"pallas"`` recomputes the four pre-activations of each pooled pixel in a kernel: forward + backward ran at
3.9-43 ms on an H100 (six tilings) against 1.4 ms for formulation plain_1ch's products (pool aside). ``"xla"`` is
autodiff of the same patch products, which takes the products' float32 results literally: lowered for CUDA, its
weight gradient is a float32 product of [M, 4, C] converted to float32 (2 GB at batch 256) with the patches.
``"products"`` writes that backward pass out with the products in the input's dtype and float32 sums (as cuDNN runs
a bf16 weight gradient), the bias gradient a row of the same product. Both recompute the [M, 4, C] pre-activations
(1 GB at batch 256 in bf16) and write and read their gradient. ``"saved"`` recomputes no pre-activation: the forward
kernel also writes each output's pooling mask (one byte: which sub-positions hold the max, none where the ReLU is
off; 128 MB at batch 256), and a backward kernel reads the mask, the output gradient and the patches once,
accumulating the weight and bias gradients; the input gradient, when one is asked for (the lens trains through the
encoder), is a kernel of its own. Measured on an H100 at batch 256 (BENCHMARKS.md, 2026-11-27 05:46-05:58 UTC): in
bf16 the block's forward + backward took 0.95 ms with "saved" against 3.40 ("xla") and 3.16 ("products"), and the
whole training step ran 28,400 images/s against 21,550 and 22,000; in float32 "saved" made the step slower (3,700
against 6,000 images/s with "xla"), timed while the kernels' products ran at full float32 precision (they follow jax's
matmul precision since, TF32 by default on a GPU: not yet re-timed). So the default ``"auto"`` is "saved" for 16-bit
inputs (float16 taken to behave as bf16, not timed) and "xla" for float32.

The math (no approximation). Pooled pixel (i, j) sees the 4×4 input patch at rows 2i−1..2i+2, cols 2j−1..2j+2 (zero
outside the image): its 16 values are one row of ``patches`` [M, 16] (M = N·H/2·W/2). The conv output at sub-position
s = (si, sj) of the 2×2 pooling window is that row times W_s [16, C], the 3×3 kernel placed at offset (si, sj) of a 4×4
grid. So ``block = max_s relu(patches @ W_s + b) = relu(max_s(patches @ W_s) + b)``. The gradient follows JAX's rules
for the unfused ops exactly: a max shares the cotangent equally among tied sub-positions, and ReLU passes nothing at
or below zero.

Last block
----------
Its input is the 128-channel activation at full resolution (1 GB at batch 256 in bf16). Unfused, the backward pass
writes the input gradient, reads it back with the activation to apply the ReLU's mask, writes the masked gradient,
and reads the activation once more for the weight gradient. Fused, one pass reads the pre-activation and writes the
masked gradient, with the weight gradient accumulated on the way. The previous conv's bias (``pre_bias``) can be
added in the kernels too (``TUNING["last_pre_bias"] = "kernel"``): the backward kernel then also sums the masked
gradient into that bias's gradient as it writes it, which XLA otherwise does in a pass of its own over the 1 GB
gradient (a reduction cannot fuse into a custom call), and the forward reads the bias-free conv output.
The math: with ``taps`` [M, 16] the 9 shifted copies of the one-channel output gradient (``dy[p+1−i, q+1−j]`` in
column 3i+j, zero-padded to 16) and ``a = pre + pre_bias``, the input gradient is ``relu'(a) · (taps @ K)`` (its
column sums: pre_bias's gradient) and the weight gradient ``tapsᵀ @ relu(a)``. The forward pass writes the nine
per-tap partial sums ``relu(a) @ Kᵀ`` [M, 16], which jnp shifts and adds (16 float32 values a pixel: a
quarter of the bytes of 128 bf16 channels). The products are per pixel, so the kernels do not care in which order
the M rows come: with ``phases=True`` the input is a sub-pixel upsampling conv's output in its phase layout
(``subpixel.py``), and only the 16-column partial sums and taps are interleaved / de-interleaved (formulation
``fused_subpixel``).

Both blocks
-----------
Two implementations of the same function: ``pallas`` (GPU, Triton; ``interpret=True`` runs it anywhere, which is how
the tests check the kernel on CPU) and ``xla`` (the same patch products written with jnp ops and differentiated by
autodiff: the reference the kernel is tested against, and what runs on CPU/TPU, or under a multi-device jit outside
``batch_sharded``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from cellssl_jax.models.subpixel import deinterleave_phases, interleave_phases

IMPLS = ("auto", "pallas", "xla", "pallas_interpret")

# Tile sizes and warps of the Triton kernels (rows = pooled pixels for the first block, pixels for the last). A
# backward program handles ``*_bwd_rows`` rows in steps of ``*_bwd_chunk`` and writes one partial weight gradient:
# more rows per program, fewer partials to sum; the chunk bounds the float32 tiles live at once. Read when a function
# is traced; benchmarks/fused_blocks_tune.py times alternatives on a GPU.
TUNING = {
    "first_fwd_rows": 64, "first_fwd_warps": 4, "first_bwd_rows": 64, "first_bwd_chunk": 64, "first_bwd_warps": 4,
    "first_stages": 2,
    "last_fwd_rows": 64, "last_fwd_warps": 4, "last_bwd_rows": 2048, "last_bwd_chunk": 32, "last_bwd_warps": 4,
    "last_stages": 2,
    # The first block's backward pass (module docstring): "auto" = "saved" for 16-bit inputs, "xla" for float32, on
    # an H100 at batch 256 (2026-11-27) the fastest of the four timed in bf16 and of the two timed in float32 (the
    # kernels' products then at full float32 precision; float16 not timed). The
    # last block's tiling above was within 0.1% of the best of eleven timed alone on an H100 (1.03 ms of training
    # work at batch 256, bf16; 2026-11-27).
    "first_backward": "auto",
    "first_mask_rows": 2048, "first_mask_chunk": 32, "first_mask_warps": 4,
    # The previous conv's bias in the last block: "xla" (added by XLA to the conv output, its gradient a reduction
    # of its own over the 1 GB masked gradient) or "kernel" (added in the kernels, its gradient summed by the backward
    # kernel on the way). Same function (tests/test_fused_blocks.py), up to bf16 rounding: on a GPU XLA may add the
    # bias inside cuDNN's convolution and round once. Timed on an H100 (bf16, batch 256, 2026-11-27): no faster
    # (21,554 against 21,554 images/s; 28,323 against 28,368 with "saved"), so "xla" stays.
    "last_pre_bias": "xla",
    # Formulation fused_subpixel: the 2×2 all-phase convolution that feeds the last block its phase layout, by XLA's
    # convolution ("xla") or as one matrix product of the 2×2 windows ("gemm", subpixel.all_phase_conv). Not yet
    # timed on a GPU; fused_subpixel itself ran slower than fused_1ch there with "xla" (BENCHMARKS.md).
    "phase_conv": "xla",
}
FIRST_BACKWARDS = ("auto", "xla", "products", "pallas", "saved")
LAST_PRE_BIASES = ("xla", "kernel")
_UNROLL = 8  # at most this many chunks per program are unrolled; more run in a loop


def _over_chunks(n: int, body, init):
    """body(i, carry) for i < n: unrolled when short (static slices), else a loop."""
    if n <= _UNROLL:
        carry = init
        for i in range(n):
            carry = body(i, carry)
        return carry
    return lax.fori_loop(0, n, body, init)


def _chunk_rows(i, chunk: int):
    return pl.ds(i * chunk if isinstance(i, int) else pl.multiple_of(i * chunk, chunk), chunk)


def patches_4x4(x: jax.Array) -> jax.Array:
    """[N, H, W, 1] → [N·H/2·W/2, 16]: the 4×4 input patch of every pooled pixel, row-major (4a + b)."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1)))
    cols = [xp[:, a:a + h:2, b:b + w:2] for a in range(4) for b in range(4)]
    return jnp.stack(cols, axis=-1).reshape(n * (h // 2) * (w // 2), 16)


def phase_weights(kernel: jax.Array) -> jax.Array:
    """HWIO [3, 3, 1, C] → [4, 16, C]: for each pooling sub-position (2·si + sj) the 3×3 kernel placed at (si, sj)."""
    k = kernel[:, :, 0, :]
    phases = [jnp.pad(k, ((si, 1 - si), (sj, 1 - sj), (0, 0))).reshape(16, -1) for si in range(2) for sj in range(2)]
    return jnp.stack(phases)


def _xla(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    n, h, w, _ = x.shape
    z = jnp.einsum("mk,skc->msc", patches_4x4(x), phase_weights(kernel),
                   preferred_element_type=jnp.float32).astype(x.dtype) + bias
    return jnp.max(jax.nn.relu(z), axis=1).reshape(n, h // 2, w // 2, -1)


def conv_relu_pool_one_channel(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto") -> jax.Array:
    """max_pool_2x2(relu(conv3x3_same(x, kernel) + bias)) for a one-channel NHWC ``x`` with even H and W."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    n, h, w, ci = x.shape
    if ci != 1 or h % 2 or w % 2:
        raise ValueError(f"the fused first block needs a one-channel input with even sides, got shape {x.shape}")
    if impl == "auto":
        impl = "pallas" if pallas_supported(x, kernel) else "xla"
    if impl == "xla":
        return _xla(x, kernel, bias)
    interpret = impl == "pallas_interpret"
    return _on_each_device(lambda *a: _fused(*a, interpret), x, kernel, bias)


_BATCH_MESH = contextvars.ContextVar("fused_blocks_batch_mesh", default=None)


@contextlib.contextmanager
def batch_sharded(mesh, axis: str):
    """Functions traced inside this block run the Pallas kernels on each device's share of the batch.

    A pallas_call has no sharding rule: under a jit whose batch is split over several devices XLA would gather the
    whole batch onto every device to run it. Inside this block the kernels run under ``jax.shard_map`` over ``axis``
    of ``mesh`` (batch split, parameters replicated; the parameters' gradients are summed over devices by
    shard_map's transpose). The caller names the batch axis (``parallel.DATA_AXIS``: models name no device axis);
    the training step traces its model inside this block (``training/step.py``).
    """
    token = _BATCH_MESH.set(None if mesh is None else (mesh, axis))
    try:
        yield
    finally:
        _BATCH_MESH.reset(token)


def _batch_split():
    """(mesh, axis) when traced inside ``batch_sharded`` over more than one device, else None."""
    ctx = _BATCH_MESH.get()
    return ctx if ctx is not None and ctx[0].shape[ctx[1]] > 1 else None


def _on_each_device(fn, x, *params):
    """``fn(x, *params)`` with x split over the batch mesh, when there is one (the parameters replicated)."""
    split = _batch_split()
    if split is None:
        return fn(x, *params)
    mesh, axis = split
    # check_vma off: pallas_call carries no varying-axes rule; the specs below say what varies
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis),) + (P(),) * len(params), out_specs=P(axis),
                         check_vma=False)(x, *params)


def is_16_bit(dtype) -> bool:
    """bf16 or float16 compute: the dtypes whose measured choices (here and in ``ConvAE``'s ``auto``) differ from
    float32's."""
    return jnp.dtype(dtype).itemsize == 2


def pallas_supported(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether ``auto`` runs the Triton kernels: on a GPU, where one device holds the batch or the batch is split by
    ``batch_sharded``, for a power-of-two width (Triton tiles are powers of two)."""
    c = kernel.shape[-1]
    one_batch = jax.device_count() == 1 or _BATCH_MESH.get() is not None
    return (jax.default_backend() == "gpu" and one_batch and c >= 16 and c & (c - 1) == 0
            and x.dtype in (jnp.bfloat16, jnp.float32))


# ----------------------------------------------------------------------------------------------------------------------
# The Pallas kernels
# ----------------------------------------------------------------------------------------------------------------------


def _dot(a, b):
    # jax's matmul precision setting, as XLA's own convolutions and products get it: in float32 TF32 by default on
    # a GPU, full float32 under jax.default_matmul_precision("highest"). (Until 2026-11-27 the kernels forced
    # HIGHEST in float32, and ran slower there than the XLA ops they replace, BENCHMARKS.md "GPU: NVIDIA H100"; the
    # precision is the likely cause, not yet measured.)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _forward_kernel(q_ref, w_ref, b_ref, out_ref, *mask_ref):
    """With ``mask_ref``, also each output's pooling mask: bit s set where sub-position s holds the max (ties set
    several), 0 where the ReLU passes nothing. The mask compares the float32 pre-activations with the bias added, as
    the unfused ops do in float32 (adding the bias can make more of them tie); the output is the same either way,
    since rounding keeps the order."""
    q = q_ref[...]
    b = b_ref[...].astype(jnp.float32)
    best = hits = None
    for s in range(4):
        z = _dot(q, w_ref[s, :, :])
        z = z + b if mask_ref else z
        if best is None:
            best, hits = z, (jnp.ones(z.shape, jnp.int32) if mask_ref else None)
            continue
        if mask_ref:
            hits = jnp.where(z > best, 1 << s, jnp.where(z == best, hits | (1 << s), hits))
        best = jnp.maximum(best, z)
    pre = best if mask_ref else best + b
    out_ref[...] = jnp.maximum(pre, 0.0).astype(out_ref.dtype)
    if mask_ref:
        mask_ref[0][...] = jnp.where(pre > 0, hits, 0).astype(mask_ref[0].dtype)


def _weight_grads_over_chunks(n: int, chunk, c: int, dw_ref, db_ref):
    """A backward program's chunks, ``chunk(i, (dws, db))`` from zero, then its partial weight [4, 16, C] and bias
    [C] gradients written."""
    zeros = tuple(jnp.zeros((16, c), jnp.float32) for _ in range(4))
    dws, db = _over_chunks(n, chunk, (zeros, jnp.zeros((1, c), jnp.float32)))
    for s in range(4):
        dw_ref[0, s, :, :] = dws[s]
    db_ref[...] = db


def _mask_share(mask, g):
    """(mask as int32, the cotangent each of its sub-positions gets: g shared equally among the tied ones)."""
    m = mask.astype(jnp.int32)
    ties = (m & 1) + ((m >> 1) & 1) + ((m >> 2) & 1) + ((m >> 3) & 1)
    return m, g.astype(jnp.float32) / jnp.maximum(ties, 1).astype(jnp.float32)


def _mask_weight_kernel(qt_ref, mask_ref, g_ref, dw_ref, db_ref, *, chunk_size, dtype):
    """One program: a tile of pooled pixels in chunks; its partial weight and bias gradients from the saved mask."""
    c = g_ref.shape[-1]

    def chunk(i, acc):
        dws, db = acc
        rows = _chunk_rows(i, chunk_size)
        g = g_ref[rows, :]  # read once: the shares and the bias gradient
        m, share = _mask_share(mask_ref[rows, :], g)
        qt = qt_ref[:, rows]
        new_dws = []
        for s in range(4):
            dz = jnp.where(((m >> s) & 1) != 0, share, 0.0).astype(dtype)
            new_dws.append(dws[s] + _dot(qt, dz))
        # Σ_s dz_s: the whole cotangent where any sub-position passes it (one reduction instead of four)
        db = db + jnp.sum(jnp.where(m != 0, g.astype(jnp.float32), 0.0), axis=0, keepdims=True)
        return tuple(new_dws), db

    _weight_grads_over_chunks(mask_ref.shape[0] // chunk_size, chunk, c, dw_ref, db_ref)


def _mask_input_kernel(mask_ref, g_ref, wt_ref, dq_ref):
    """The patch gradient of a tile of pooled pixels from the saved mask: Σ_s dz_s @ W_sᵀ."""
    dtype = wt_ref.dtype
    m, share = _mask_share(mask_ref[...], g_ref[...])
    dq = None
    for s in range(4):
        dz = jnp.where(((m >> s) & 1) != 0, share, 0.0).astype(dtype)
        t = _dot(dz, wt_ref[s, :, :])
        dq = t if dq is None else dq + t
    dq_ref[...] = dq


def _backward_kernel(q_ref, qt_ref, w_ref, wt_ref, b_ref, g_ref, dq_ref, dw_ref, db_ref, *, chunk_size):
    """One program: a tile of pooled pixels in chunks; accumulates its partial weight and bias gradients."""
    dtype = q_ref.dtype
    c = w_ref.shape[-1]
    b = b_ref[...].astype(jnp.float32)

    def chunk(i, acc):
        dws, db = acc
        rows = _chunk_rows(i, chunk_size)
        q = q_ref[rows, :]
        # pass 1: the pooled pre-activation and how many sub-positions reach it (ties share the gradient)
        best = _dot(q, w_ref[0, :, :])
        ties = jnp.ones_like(best)
        for s in range(1, 4):
            z = _dot(q, w_ref[s, :, :])
            ties = jnp.where(z > best, 1.0, jnp.where(z == best, ties + 1.0, ties))
            best = jnp.maximum(best, z)
        g = g_ref[rows, :].astype(jnp.float32)
        share = jnp.where(best + b > 0, g / ties, 0.0)  # ReLU passes nothing at or below zero
        # pass 2: each sub-position's gradient, into the weight, bias and patch gradients
        qt = qt_ref[:, rows]
        dq = jnp.zeros((chunk_size, 16), jnp.float32)
        new_dws = []
        for s in range(4):
            z = _dot(q, w_ref[s, :, :])
            dz = jnp.where(z == best, share, 0.0)
            db = db + jnp.sum(dz, axis=0, keepdims=True)
            dz = dz.astype(dtype)
            new_dws.append(dws[s] + _dot(qt, dz))
            dq = dq + _dot(dz, wt_ref[s, :, :])
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        return tuple(new_dws), db

    _weight_grads_over_chunks(q_ref.shape[0] // chunk_size, chunk, c, dw_ref, db_ref)



def _compiler_params(block: str, direction: str):
    try:
        from jax.experimental.pallas import triton as plgpu

        return plgpu.CompilerParams(num_warps=TUNING[f"{block}_{direction}_warps"], num_stages=TUNING[f"{block}_stages"])
    except (ImportError, AttributeError, TypeError):  # the Triton params moved between JAX versions: use defaults
        return None


def _backward_tiles(m: int, chunk: int, rows: int) -> tuple[int, int]:
    """(chunk, rows per program): powers of two, no more rows per program than there are rows."""
    rows = min(rows, max(chunk, 1 << (m - 1).bit_length()))
    return min(chunk, rows), rows


def _padded_rows(a: jax.Array, multiple: int) -> jax.Array:
    extra = -a.shape[0] % multiple
    return a if extra == 0 else jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1))


def _forward_call(q, w, b, interpret, with_mask=False):
    """The pooled block [M, C], and with_mask its pooling mask [M, C] (int8)."""
    m, c = q.shape[0], w.shape[-1]
    tile = TUNING["first_fwd_rows"]
    q = _padded_rows(q, tile)
    block, rows = jax.ShapeDtypeStruct((q.shape[0], c), q.dtype), pl.BlockSpec((tile, c), lambda i: (i, 0))
    out = pl.pallas_call(
        _forward_kernel,
        out_shape=(block, jax.ShapeDtypeStruct(block.shape, jnp.int8)) if with_mask else block,
        grid=(q.shape[0] // tile,),
        in_specs=[pl.BlockSpec((tile, 16), lambda i: (i, 0)),
                  pl.BlockSpec((4, 16, c), lambda i: (0, 0, 0)),
                  pl.BlockSpec((1, c), lambda i: (0, 0))],
        out_specs=(rows, rows) if with_mask else rows,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("first", "fwd"),
        name="first_block_forward",
    )(q, w, b.reshape(1, c))
    return (out[0][:m], out[1][:m]) if with_mask else out[:m]


def _mask_weight_call(q, mask, g, dtype, interpret):
    """(∂/∂ phase weights [4, 16, C], ∂/∂ bias [C]), float32, from the saved mask."""
    m, c = mask.shape
    chunk_size, rows = _backward_tiles(m, TUNING["first_mask_chunk"], TUNING["first_mask_rows"])
    q, mask, g = (_padded_rows(a, rows) for a in (q, mask, g))  # padded rows: mask 0, no gradient
    programs = mask.shape[0] // rows
    dw, db = pl.pallas_call(
        functools.partial(_mask_weight_kernel, chunk_size=chunk_size, dtype=dtype),
        out_shape=(jax.ShapeDtypeStruct((programs, 4, 16, c), jnp.float32),
                   jax.ShapeDtypeStruct((programs, c), jnp.float32)),
        grid=(programs,),
        in_specs=[pl.BlockSpec((16, rows), lambda i: (0, i)),
                  pl.BlockSpec((rows, c), lambda i: (i, 0)),
                  pl.BlockSpec((rows, c), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((1, 4, 16, c), lambda i: (i, 0, 0, 0)),
                   pl.BlockSpec((1, c), lambda i: (i, 0))),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("first", "mask"),
        name="first_block_weight_grad",
    )(q.T, mask, g)
    return dw.sum(axis=0), db.sum(axis=0)


def _mask_input_call(mask, g, wt, interpret):
    """∂/∂ patches [M, 16], float32, from the saved mask (a kernel of its own, so that XLA can drop it unused)."""
    m, c = mask.shape
    tile = TUNING["first_fwd_rows"]
    mask, g = _padded_rows(mask, tile), _padded_rows(g, tile)
    dq = pl.pallas_call(
        _mask_input_kernel,
        out_shape=jax.ShapeDtypeStruct((mask.shape[0], 16), jnp.float32),
        grid=(mask.shape[0] // tile,),
        in_specs=[pl.BlockSpec((tile, c), lambda i: (i, 0)),
                  pl.BlockSpec((tile, c), lambda i: (i, 0)),
                  pl.BlockSpec((4, c, 16), lambda i: (0, 0, 0))],
        out_specs=pl.BlockSpec((tile, 16), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("first", "fwd"),
        name="first_block_input_grad",
    )(mask, g, wt)
    return dq[:m]


def _backward_call(q, w, b, g, interpret):
    m, c = q.shape[0], w.shape[-1]
    chunk_size, rows = _backward_tiles(m, TUNING["first_bwd_chunk"], TUNING["first_bwd_rows"])
    q, g = _padded_rows(q, rows), _padded_rows(g, rows)  # padded rows carry a zero gradient
    programs = q.shape[0] // rows
    dq, dw, db = pl.pallas_call(
        functools.partial(_backward_kernel, chunk_size=chunk_size),
        out_shape=(jax.ShapeDtypeStruct((q.shape[0], 16), jnp.float32),
                   jax.ShapeDtypeStruct((programs, 4, 16, c), jnp.float32),
                   jax.ShapeDtypeStruct((programs, c), jnp.float32)),
        grid=(programs,),
        in_specs=[pl.BlockSpec((rows, 16), lambda i: (i, 0)),
                  pl.BlockSpec((16, rows), lambda i: (0, i)),
                  pl.BlockSpec((4, 16, c), lambda i: (0, 0, 0)),
                  pl.BlockSpec((4, c, 16), lambda i: (0, 0, 0)),
                  pl.BlockSpec((1, c), lambda i: (0, 0)),
                  pl.BlockSpec((rows, c), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((rows, 16), lambda i: (i, 0)),
                   pl.BlockSpec((1, 4, 16, c), lambda i: (i, 0, 0, 0)),
                   pl.BlockSpec((1, c), lambda i: (i, 0))),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("first", "bwd"),
        name="first_block_backward",
    )(q, q.T, w, w.transpose(0, 2, 1), b.reshape(1, c), g)
    return dq[:m], dw.sum(axis=0), db.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, kernel, bias, interpret):
    n, h, w, _ = x.shape
    return _forward_call(patches_4x4(x), phase_weights(kernel), bias, interpret).reshape(n, h // 2, w // 2, -1)


def _first_backward(dtype) -> str:
    """TUNING["first_backward"], with "auto" resolved for inputs of this dtype."""
    choice = TUNING["first_backward"]
    if choice not in FIRST_BACKWARDS:
        raise ValueError(f"fused_blocks.TUNING['first_backward'] must be one of {FIRST_BACKWARDS}, got {choice!r}")
    if choice == "auto":  # measured on an H100: saved 28,400 vs xla 21,550 images/s in bf16; 3,700 vs 6,000 in float32
        return "saved" if is_16_bit(dtype) else "xla"
    return choice


def _fused_fwd(x, kernel, bias, interpret):
    n, h, w, _ = x.shape
    q, wp = patches_4x4(x), phase_weights(kernel)
    if _first_backward(x.dtype) == "saved":
        out, mask = _forward_call(q, wp, bias, interpret, with_mask=True)
        return out.reshape(n, h // 2, w // 2, -1), (x, kernel, bias, mask)
    return _forward_call(q, wp, bias, interpret).reshape(n, h // 2, w // 2, -1), (x, kernel, bias, None)


def _fused_bwd(interpret, res, g):
    x, kernel, bias, mask = res
    backward = _first_backward(x.dtype)
    if (mask is not None) != (backward == "saved"):
        raise RuntimeError("fused_blocks.TUNING['first_backward'] changed between the forward and the backward pass")
    if mask is not None:
        return _saved_bwd(x, kernel, bias, mask, g, interpret)
    if backward == "xla":
        _, vjp = jax.vjp(_xla, x, kernel, bias)
        return vjp(g)
    if backward == "products":
        return _products_bwd(x, kernel, bias, g)
    q, from_patches = jax.vjp(patches_4x4, x)
    wp, to_kernel = jax.vjp(phase_weights, kernel.astype(jnp.float32))
    dq, dw, db = _backward_call(q, wp.astype(x.dtype), bias, g.reshape(-1, g.shape[-1]), interpret)
    (dx,) = from_patches(dq.astype(x.dtype))
    (dk,) = to_kernel(dw)
    return dx, dk.astype(kernel.dtype), db.astype(bias.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _saved_bwd(x, kernel, bias, mask, g, interpret):
    """The backward pass from the pooling mask the forward kernel saved: no pre-activation is recomputed."""
    dtype = x.dtype
    q, from_patches = jax.vjp(patches_4x4, x)
    wp, to_kernel = jax.vjp(phase_weights, kernel.astype(jnp.float32))
    g = g.reshape(-1, g.shape[-1])
    dw, db = _mask_weight_call(q, mask, g, dtype, interpret)
    dq = _mask_input_call(mask, g, wp.astype(dtype).transpose(0, 2, 1), interpret)  # dropped when x needs none
    (dx,) = from_patches(dq.astype(dtype))
    (dk,) = to_kernel(dw)
    return dx, dk.astype(kernel.dtype), db.astype(bias.dtype)


def _products_bwd(x, kernel, bias, g):
    """The VJP of ``_xla`` written out, every [M, 4, C] array in x's dtype, every sum in float32.

    JAX's rules for the unfused ops, as autodiff applies them: the max shares the cotangent equally among tied
    sub-positions, the ReLU passes nothing at or below zero (so a pooled pixel whose best pre-activation is ≤ 0 gets
    nothing). The pre-activations are recomputed, rounded as ``_xla`` rounds them."""
    dtype = x.dtype
    q, from_patches = jax.vjp(patches_4x4, x)
    wp, to_kernel = jax.vjp(phase_weights, kernel.astype(jnp.float32))  # places the taps: exact in any dtype
    wp = wp.astype(dtype)
    z = jnp.einsum("mk,skc->msc", q, wp) + bias  # x's dtype out: float32 sums, rounded once, as _xla's
    best = jnp.max(z, axis=1, keepdims=True)
    hits = z == best
    ties = jnp.sum(hits, axis=1, keepdims=True, dtype=jnp.int32).astype(dtype)
    share = jnp.where(best > 0, g.reshape(best.shape) / ties, jnp.zeros((), dtype))
    dz = jnp.where(hits, share, jnp.zeros((), dtype))  # [M, 4, C]
    q1 = jnp.concatenate([q, jnp.ones((q.shape[0], 1), dtype)], axis=1)  # a row of ones: the bias gradient
    dw1 = jnp.einsum("mk,msc->skc", q1, dz, preferred_element_type=jnp.float32)  # [4, 17, C]
    dq = jnp.einsum("msc,skc->mk", dz, wp, preferred_element_type=jnp.float32).astype(dtype)  # XLA drops it unused
    (dx,) = from_patches(dq)
    (dk,) = to_kernel(dw1[:, :16])
    return dx, dk.astype(kernel.dtype), dw1[:, 16].sum(axis=0).astype(bias.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The last block: relu(pre) → conv 3×3 to one channel
# ----------------------------------------------------------------------------------------------------------------------


def _adjoint_taps(img: jax.Array) -> jax.Array:
    """[N, H, W] → [N, H, W, 16]: channel 3i+j holds img[p+1−i, q+1−j] (the output positions pixel (p, q) reaches
    through tap (i, j), as convae's ``_shift_cols(adjoint=True)``), channels 9..15 zero."""
    _, h, w = img.shape
    p = jnp.pad(img, ((0, 0), (1, 1), (1, 1)))
    cols = [p[:, 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)] + [jnp.zeros_like(img)] * 7
    return jnp.stack(cols, axis=-1)


def _tap_kernel(kernel: jax.Array) -> jax.Array:
    """HWIO [3, 3, C, 1] → [16, C]: row 3i+j is tap (i, j); rows 9..15 zero (Triton tiles are powers of two)."""
    k9 = kernel[..., 0].reshape(9, -1)
    return jnp.concatenate([k9, jnp.zeros((7, k9.shape[1]), k9.dtype)])


def _rows_to_image(rows16: jax.Array, pre: jax.Array, phases: bool) -> jax.Array:
    """[rows, 16] per input row of ``pre`` → [N, H, W, 16] at the pixels of the image ``pre`` stands for.

    The products of the last block are per pixel, so the row order of the 128-channel input is free; only these
    16-column float32 arrays are rearranged (with phases: interleaved), a quarter of the bytes of 128 bf16 channels."""
    n, hp, wp, _ = pre.shape
    if not phases:
        return rows16.reshape(n, hp, wp, 16)
    return interleave_phases(rows16.reshape(n, hp, wp, 4 * 16), hp - 1, wp - 1)


def _image_to_rows(img16: jax.Array, phases: bool) -> jax.Array:
    """Adjoint of ``_rows_to_image``: [N, H, W, 16] → [rows, 16] in the input's row order (zero rows where a phase
    is not valid)."""
    return (deinterleave_phases(img16) if phases else img16).reshape(-1, 16)


def _conv_output(partials: jax.Array, dtype, bias: jax.Array) -> jax.Array:
    """[N, H, W, 16] per-tap partial sums at each input pixel → the conv output [N, H, W, 1] + bias:
    Σ_t partial_t[p+i−1, q+j−1]."""
    _, h, w, _ = partials.shape
    t = jnp.pad(partials, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(t[:, i:i + h, j:j + w, 3 * i + j] for i in range(3) for j in range(3))
    return y[..., None].astype(dtype) + bias


def _last_xla(pre: jax.Array, pre_bias: jax.Array | None, kernel: jax.Array, bias: jax.Array,
              phases: bool) -> jax.Array:
    rows = pre.reshape(-1, kernel.shape[2])
    rows = rows if pre_bias is None else rows + pre_bias
    partials = jnp.matmul(jax.nn.relu(rows), _tap_kernel(kernel).T, preferred_element_type=jnp.float32)
    return _conv_output(_rows_to_image(partials, pre, phases), pre.dtype, bias)


def relu_conv_to_one_channel(pre: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str = "auto",
                             phases: bool = False, pre_bias: jax.Array | None = None) -> jax.Array:
    """conv3x3_same(relu(pre + pre_bias), kernel) + bias for an HWIO kernel [3, 3, C, 1]; NHWC, output [N, H, W, 1].

    ``pre_bias`` [C] (optional): the previous conv's bias, so that ``pre`` can be that conv's output without it; where
    it is added is ``TUNING["last_pre_bias"]``'s choice (module docstring).
    ``phases=True``: ``pre`` is the output of a sub-pixel upsampling conv in its phase layout, [N, h+1, w+1, 4·C]
    (``subpixel.interleave_phases`` of it is the [N, 2h, 2w, C] image it stands for); the output is [N, 2h, 2w, 1],
    the same as for that image, which is never formed, nor is its gradient. ``pre_bias`` is then the C channels' bias,
    the same for every phase.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    c = pre.shape[-1] // 4 if phases else pre.shape[-1]
    if kernel.shape[-1] != 1 or kernel.shape[2] != c or (phases and pre.shape[-1] != 4 * c):
        layout = f"a phase-layout input of 4·{c} channels" if phases else f"an input of {c} channels"
        raise ValueError(f"the fused last block needs a kernel [3, 3, {c}, 1] for {layout}, got {kernel.shape}")
    if pre_bias is not None and pre_bias.shape != (c,):
        raise ValueError(f"the fused last block's pre_bias must have shape ({c},), got {pre_bias.shape}")
    if TUNING["last_pre_bias"] not in LAST_PRE_BIASES:
        raise ValueError(f"fused_blocks.TUNING['last_pre_bias'] must be one of {LAST_PRE_BIASES}, "
                         f"got {TUNING['last_pre_bias']!r}")
    pre_bias = None if pre_bias is None else pre_bias.astype(pre.dtype)  # the sum in pre's dtype, either way
    if impl == "auto":
        impl = "pallas" if pallas_supported(pre, kernel.swapaxes(2, 3)) else "xla"
    if impl == "xla":
        return _last_xla(pre, pre_bias, kernel, bias, phases)
    if pre_bias is not None and TUNING["last_pre_bias"] == "xla":
        pre = pre + (jnp.tile(pre_bias, 4) if phases else pre_bias)
        pre_bias = None
    interpret = impl == "pallas_interpret"
    if pre_bias is None:
        return _on_each_device(lambda p, k, b: _last_fused(p, None, k, b, interpret, phases), pre, kernel, bias)
    return _on_each_device(lambda *a: _last_fused(*a, interpret, phases), pre, pre_bias, kernel, bias)


def _biased(pre, pre_bias):
    """pre + pre_bias rounded to pre's dtype, as XLA's add of the unfused ops rounds it (the ReLU's mask depends on
    it); pre itself without a bias (the kernels then read no bias at all: the form timed before the bias moved in)."""
    if pre_bias is None:
        return pre
    return (pre.astype(jnp.float32) + pre_bias.astype(jnp.float32)).astype(pre.dtype)


def _last_forward_kernel(*refs, biased):
    pre_ref, pb_ref, kt_ref, out_ref = refs if biased else (refs[0], None, *refs[1:])
    a = jnp.maximum(_biased(pre_ref[...], pb_ref[...] if biased else None), 0)
    out_ref[...] = _dot(a, kt_ref[...])


def _last_backward_kernel(*refs, chunk_size, biased):
    """One program: a tile of pixels in chunks; writes their masked input gradient and accumulates its partial weight
    gradient and, when biased, the previous bias's (the column sums of the masked gradient, as written)."""
    if biased:
        taps_ref, taps_t_ref, pre_ref, pb_ref, k_ref, dpre_ref, dk_ref, dpb_ref = refs
        pb = pb_ref[...]
    else:
        (taps_ref, taps_t_ref, pre_ref, k_ref, dpre_ref, dk_ref), pb = refs, None
    c = pre_ref.shape[-1]

    def chunk(i, acc):
        dk, dpb = acc
        rows = _chunk_rows(i, chunk_size)
        a = _biased(pre_ref[rows, :], pb)
        da = _dot(taps_ref[rows, :], k_ref[...])
        dpre = jnp.where(a > 0, da, 0.0).astype(dpre_ref.dtype)
        dpre_ref[rows, :] = dpre
        if biased:
            dpb = dpb + jnp.sum(dpre.astype(jnp.float32), axis=0, keepdims=True)
        return dk + _dot(taps_t_ref[:, rows], jnp.maximum(a, 0)), dpb

    zeros = (jnp.zeros((16, c), jnp.float32), jnp.zeros((1, c), jnp.float32) if biased else None)
    dk, dpb = _over_chunks(pre_ref.shape[0] // chunk_size, chunk, zeros)
    dk_ref[0, :, :] = dk
    if biased:
        dpb_ref[...] = dpb


def _last_forward_call(pre2d, pre_bias, kt, interpret):
    m, c = pre2d.shape
    tile = TUNING["last_fwd_rows"]
    pre2d = _padded_rows(pre2d, tile)
    biased = pre_bias is not None
    bias_in = [pre_bias.reshape(1, c)] if biased else []
    out = pl.pallas_call(
        functools.partial(_last_forward_kernel, biased=biased),
        out_shape=jax.ShapeDtypeStruct((pre2d.shape[0], 16), jnp.float32),
        grid=(pre2d.shape[0] // tile,),
        in_specs=[pl.BlockSpec((tile, c), lambda i: (i, 0)),
                  *[pl.BlockSpec((1, c), lambda i: (0, 0))] * biased,
                  pl.BlockSpec((c, 16), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((tile, 16), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("last", "fwd"),
        name="last_block_forward",
    )(pre2d, *bias_in, kt)
    return out[:m]


def _last_backward_call(taps, pre2d, pre_bias, k16, interpret):
    """(masked input gradient, weight gradient [16, C], the previous bias's gradient [C] or None when unbiased)."""
    m, c = pre2d.shape
    chunk_size, rows = _backward_tiles(m, TUNING["last_bwd_chunk"], TUNING["last_bwd_rows"])
    taps, pre2d = _padded_rows(taps, rows), _padded_rows(pre2d, rows)  # padded rows: zero taps, zero gradient
    programs = pre2d.shape[0] // rows
    biased = pre_bias is not None
    bias_in = [pre_bias.reshape(1, c)] if biased else []
    out = pl.pallas_call(
        functools.partial(_last_backward_kernel, chunk_size=chunk_size, biased=biased),
        out_shape=(jax.ShapeDtypeStruct(pre2d.shape, pre2d.dtype),
                   jax.ShapeDtypeStruct((programs, 16, c), jnp.float32),
                   *[jax.ShapeDtypeStruct((programs, c), jnp.float32)] * biased),
        grid=(programs,),
        in_specs=[pl.BlockSpec((rows, 16), lambda i: (i, 0)),
                  pl.BlockSpec((16, rows), lambda i: (0, i)),
                  pl.BlockSpec((rows, c), lambda i: (i, 0)),
                  *[pl.BlockSpec((1, c), lambda i: (0, 0))] * biased,
                  pl.BlockSpec((16, c), lambda i: (0, 0))],
        out_specs=(pl.BlockSpec((rows, c), lambda i: (i, 0)),
                   pl.BlockSpec((1, 16, c), lambda i: (i, 0, 0)),
                   *[pl.BlockSpec((1, c), lambda i: (i, 0))] * biased),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params("last", "bwd"),
        name="last_block_backward",
    )(taps, taps.T, pre2d, *bias_in, k16)
    dpre, dk = out[0], out[1]
    return dpre[:m], dk.sum(axis=0), out[2].sum(axis=0) if biased else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _last_fused(pre, pre_bias, kernel, bias, interpret, phases):
    return _last_fused_fwd(pre, pre_bias, kernel, bias, interpret, phases)[0]


def _last_fused_fwd(pre, pre_bias, kernel, bias, interpret, phases):
    partials = _last_forward_call(pre.reshape(-1, kernel.shape[2]), pre_bias, _tap_kernel(kernel).T, interpret)
    return _conv_output(_rows_to_image(partials, pre, phases), pre.dtype, bias), (pre, pre_bias, kernel)


def _last_fused_bwd(interpret, phases, res, dy):
    pre, pre_bias, kernel = res
    taps = _image_to_rows(_adjoint_taps(dy[..., 0]), phases)
    k16, to_kernel = jax.vjp(_tap_kernel, kernel.astype(jnp.float32))
    dpre, dk16, dpb = _last_backward_call(taps, pre.reshape(-1, kernel.shape[2]), pre_bias, k16.astype(pre.dtype),
                                          interpret)
    (dk,) = to_kernel(dk16)
    db = jnp.sum(dy, dtype=jnp.float32)[None]
    dpb = None if pre_bias is None else dpb.astype(pre_bias.dtype)
    return dpre.reshape(pre.shape), dpb, dk.astype(kernel.dtype), db.astype(kernel.dtype)


_last_fused.defvjp(_last_fused_fwd, _last_fused_bwd)
