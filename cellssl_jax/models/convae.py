"""The paper's convolutional autoencoder (Dmitrenko et al. 2022, §3.1 of original_method.md), in Flax Linen.

Encoder: Conv 1→128, ReLU, MaxPool 2 → Conv 128→64, ReLU, MaxPool 2 → Conv 64→32, ReLU → Conv 32→4 (linear).
Decoder: ConvT 4→32, ReLU, Upsample ×2 → ConvT 32→64, ReLU, Upsample ×2 → ConvT 64→128, ReLU → ConvT 128→1, Sigmoid.
All kernels 3×3, stride 1, padding 1; 189,381 parameters for a 1×128×128 input → 4×32×32 latent.

Layout and naming
-----------------
Activations are NHWC. Every layer is stored as the kernel of a *plain cross-correlation* in HWIO plus a bias, under
``encoder/conv{0..3}`` and ``decoder/conv{0..3}``. A PyTorch ``ConvTranspose2d`` with stride 1 and padding 1 is exactly
such a convolution whose kernel is the transposed-conv weight flipped spatially with in/out channels swapped; the interop
module does that conversion, so the model itself only knows convolutions.

Formulations of the same function (``formulation``), all with the same parameters:
- ``"plain"``: the layers as written above; the reference the fast forms are tested against.
- ``"subpixel"``: a nearest ×2 upsample followed by a 3×3 conv equals four 2×2 convs on the low-resolution input whose
  outputs are interleaved (pixel shuffle). 2.25× fewer FLOPs in the two upsampling layers, which hold ~75% of the
  model's FLOPs at 128×128. Explicit ``jnp.pad`` + VALID convolutions: with padding inside the conv, XLA:CPU emitted a
  weight-gradient convolution that fell into a naive loop (platform notes). Gradients by autodiff: the portable form
  (GPU/TPU, where XLA's own backward convolutions are good).
- ``"subpixel_vjp"``: the sub-pixel math with hand-written backward passes (``jax.custom_vjp``) shaped for XLA:CPU; see
  "Backward passes for XLA:CPU" below for what each one avoids.
- ``"plain_1ch"``: ``"plain"`` with the one-channel first and last layers as matrix products over shifted copies (their
  custom VJPs below). On an H100 in bf16 at batch 256: 16,100 images/s against plain's 15,000 (BENCHMARKS.md).
- ``"fused_1ch"``: ``"plain"`` with the two one-channel blocks fused (``fused_blocks.py``: Pallas/Triton kernels on one
  GPU, the same patch products in jnp elsewhere): the first block's conv 1→C + bias + ReLU + 2×2 max pool, whose
  forward pass never writes the full-resolution activation; and the last layer's input ReLU + conv C→1, whose
  forward pass replaces a cuDNN convolution with one output channel (4.1 ms at batch 256 on an H100) and whose
  backward pass reads the 128-channel activation once and writes its masked gradient once. On an H100 in bf16 at
  batch 256 (first block's backward from the pooling mask its forward kernel saved, ``fused_blocks.TUNING``):
  28,350-28,370 images/s, 3.85× PyTorch eager (channels_last), 36.5-37.2% MFU (BENCHMARKS.md, 2026-11-27); 21,550
  images/s (2.93×) with autodiff's backward for that block, the default before. In float32 it ran 6,000 images/s
  against plain's 6,900 on the same card, so ``auto`` runs plain there (measured while the kernels' products ran at
  full float32 precision against XLA's TF32; they follow jax's precision setting since, not yet timed).
- ``"fused_subpixel"``: ``"fused_1ch"`` with the last upsampling conv (up + 64→128 at 128², 73% of the FLOPs; 4.89
  ms of the ~9.0 ms step on the H100, 2026-11-27) in its sub-pixel form: one 2×2 convolution of dec2's un-upsampled
  output with the four phases on the output axis (``subpixel.all_phase_kernel``; 2.2× fewer FLOPs), whose output
  [N, h+1, w+1, 4·C] the fused last block reads in that phase layout (``relu_conv_to_one_channel(phases=True)``), so
  neither the 128-channel activation nor its gradient is ever interleaved. Written for the GPU and slower there:
  17,200 images/s against fused_1ch's 21,600 on an H100 in bf16 at batch 256 (2026-11-27, both with the first
  block's earlier backward pass; that layer's sub-pixel form had already timed no faster than the plain one alone,
  4.78 against 4.97 ms, despite the FLOPs); the CPU's own sub-pixel form gained nothing from reading the phase layout
  either (BENCHMARKS.md). Kept as a tested alternative; ``fused_blocks.TUNING["phase_conv"] = "gemm"`` runs its 2×2
  convolution as one matrix product of the windows (``subpixel.all_phase_conv``; not yet timed on a GPU).
- ``"auto"``: decided when the function is traced: ``"subpixel_vjp"`` on CPU, on a GPU ``"fused_1ch"`` with a 16-bit
  compute dtype and ``"plain"`` in float32 (each the fastest measured there), ``"plain"`` elsewhere (TPU: not
  measured). With several GPUs the training step runs the kernels on each device's share of the
  batch (``fused_blocks.batch_sharded``; tested on forced CPU devices through Pallas's interpreter, not timed on
  several GPUs); a multi-device jit outside it runs the blocks' jnp form.

``micro_batch``: ``encode`` and ``decode_logits`` run over the batch in slices of this many images (``lax.map``), so
every intermediate of one slice stays in the CPU caches (one 128×128×128 float32 activation is 8 MB per image; the
L3 of the measured machine is 32 MB). The result and gradient are the same as the whole batch at once (sums in a
different order). ``None`` (default) picks 1 on CPU with ``subpixel_vjp`` and the whole batch otherwise; 0 = the whole
batch. Only ``subpixel_vjp`` is safe inside a loop on XLA:CPU: autodiff's weight-gradient convolutions are left
non-canonical inside a while body and run a naive loop there (a ``lax.scan``/``map`` step was >10× slower).

Mixed precision: ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32 and the output sigmoid is
computed in float32 so the loss sees full-precision probabilities.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cellssl_jax.models.fused_blocks import TUNING, conv_relu_pool_one_channel, is_16_bit, relu_conv_to_one_channel
from cellssl_jax.models.subpixel import (all_phase_conv, all_phase_kernel, deinterleave_phases, interleave_phases,
                                         subpixel_kernels)

_DIMS = ("NHWC", "HWIO", "NHWC")
FORMULATIONS = ("plain", "subpixel", "subpixel_vjp", "plain_1ch", "fused_1ch", "fused_subpixel", "auto")
# Those whose middle layers are XLA's own convolutions (autodiff): plain and the ones that change the one-channel
# layers (the fused ones fall back to plain_1ch's products where a fused block does not apply).
_XLA_CONVS = ("plain", "plain_1ch", "fused_1ch", "fused_subpixel")
# Every formulation slower than auto's choice on the 2-core CPU, with what was measured (BENCHMARKS.md, "Training step
# vs PyTorch"): the training loop warns with it when one of them is configured there.
_SLOW_ON_CPU = {
    "subpixel": "1.1x PyTorch at batch 64 and 256",
    "plain_1ch": "6.8 images/s against auto's 10.1 at batch 64",
    "fused_1ch": "6.7 images/s against auto's 10.1 at batch 64 (no Triton on a CPU: the kernels' jnp form runs)",
    "fused_subpixel": "its batch-64 warm-up step had not finished after 6 minutes (XLA:CPU runs the weight gradient "
                      "of its padded convolution as a naive loop)",
    "plain": "6.1 images/s against auto's 10.4 at batch 64 (XLA:CPU's own convolution gradients)",
}
# The same on one GPU: training step at batch 256 on an H100 (BENCHMARKS.md, "GPU: NVIDIA H100"). In bf16 auto's
# fused_1ch ran 28,400 images/s (2026-11-27, first block's backward from the saved pooling mask; the others were
# timed against its earlier 21,600). subpixel_vjp (the CPU's hand-written backward passes) was timed on an H200 only.
_SLOW_ON_GPU = {
    "plain": "15,100 images/s against auto's 28,400 (H100, bf16, batch 256)",
    "plain_1ch": "16,100 images/s against auto's 28,400 (H100, bf16, batch 256)",
    "subpixel": "14,300 images/s against auto's 28,400 (H100, bf16, batch 256)",
    "fused_subpixel": "17,200 images/s against auto's 21,600 then (H100, bf16, batch 256, 2026-11-27, both with the "
                      "first block's earlier backward pass)",
    "subpixel_vjp": "~13,500 images/s against plain's 17,100 (H200, bf16, batch 256; written for XLA:CPU)",
}
# In float32 auto runs plain (6,900 images/s); only fused_1ch was timed against it there.
_SLOW_ON_GPU_FLOAT32 = {
    "fused_1ch": "6,000 images/s against auto's 6,900 (H100, float32, batch 256, 2026-11-27, its kernels' products "
                 "then at full float32 precision)",
}


def _slow_on(backend: str, dtype) -> tuple[str, str, dict[str, str]]:
    """(where, what auto runs there, its formulations measured slower) for this backend and compute dtype; nothing
    measured elsewhere, so no claim."""
    if backend == "cpu":
        return "the CPU", "subpixel_vjp here, 1.8x PyTorch eager at batch 64-256", _SLOW_ON_CPU
    if backend == "gpu" and is_16_bit(dtype):
        return "a GPU", "fused_1ch there, 3.85x PyTorch eager on an H100 in bf16", _SLOW_ON_GPU
    if backend == "gpu":
        return "a GPU", "plain there in float32, 1.4x PyTorch eager on an H100", _SLOW_ON_GPU_FLOAT32
    return "", "", {}


_ONE_CHANNEL_PRODUCTS = ("plain_1ch", "fused_1ch", "fused_subpixel")
_FUSED = ("fused_1ch", "fused_subpixel")


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3×3 stride-1 'same' convolution as explicit pad + VALID conv."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMS)
    return y + bias


def _conv_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The same convolution written the obvious way (SAME padding); used by the plain formulation."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


def upsample_conv_subpixel(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """conv3x3(upsample_nearest_2x(x)) computed as four 2×2 convs on x, interleaved."""
    n, h, w, _ = x.shape
    k2 = subpixel_kernels(kernel)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = []
    for di in range(2):
        row = []
        for dj in range(2):
            window = xp[:, di : di + h + 1, dj : dj + w + 1, :]
            row.append(lax.conv_general_dilated(window, k2[di, dj], (1, 1), "VALID", dimension_numbers=_DIMS))
        phases.append(jnp.stack(row, axis=3))  # (n, h, w, 2[dj], o)
    y = jnp.stack(phases, axis=2)  # (n, h, 2[di], w, 2[dj], o)
    return y.reshape(n, 2 * h, 2 * w, -1) + bias

# ----------------------------------------------------------------------------------------------------------------------
# Backward passes for XLA:CPU (formulation "subpixel_vjp")
#
# What autodiff of the sub-pixel form cost on XLA:CPU, per op in profiles of the training step (BENCHMARKS.md):
# - each weight-gradient convolution is preceded by copies of its input and output gradient to [C, H, W, N] / [H, W, N,
#   C] (batch innermost), which XLA:CPU emits at 0.1–2 GB/s. Within one-image slices (``micro_batch``) those copies are
#   2-D transposes of cache-resident data; the convolution is written out with canonical NHWC/HWIO dimensions, which
#   keeps it canonical inside the slice loop, where XLA does not canonicalise;
# - the first layer (1 input channel) and the last (1 output channel) are convolutions with one channel on one side,
#   which Eigen runs as matrix-vector work over the widest activation. Written as products with 9 (+1) columns or rows
#   of shifted copies of the one-channel side: im2col [pixels, 9] @ [9, C] for the first layer's output and the last
#   layer's input gradient, [9 (+1), pixels] @ [pixels, C] for both weight gradients (4–13× faster than the
#   convolutions measured alone);
# - bias gradients: XLA lowers a sum over (N, H, W) to a reduce-window that ran at ~2.6 GB/s; ones @ rows is a plain
#   matrix product (4× faster) and, for the first layer, rides along in the weight-gradient product as a row of ones;
# - the two sub-pixel upsampling layers: one 2×2 convolution with all four phases as 4·Co output channels (one large
#   product instead of four), its input gradient one convolution of the de-interleaved output gradient, its weight
#   gradient one convolution instead of four (each with its own copies).
# Tried and dropped (same process, interleaved): Winograd F(2×2,3×3) / F(3×3,2×2) for the two big layers (half the
# multiplies, but XLA's batched products and transforms made them no faster), im2col products for the middle layers
# (no faster than Eigen's convolution), YNNPACK (slower).
# All products accumulate in float32 (``preferred_element_type``) whatever the compute dtype.
# ----------------------------------------------------------------------------------------------------------------------


def _pad1(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _valid_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMS,
                                    preferred_element_type=jnp.float32).astype(x.dtype)


def _flip_io(kernel: jax.Array) -> jax.Array:
    """The kernel whose VALID conv of the (padded) output gradient is the input gradient."""
    return jnp.flip(kernel, (0, 1)).swapaxes(2, 3)


def _rows(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])


def _matmul32(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _bias_grad(dy: jax.Array) -> jax.Array:
    """Sum over N, H, W as ones @ rows: XLA:CPU's reduction over the major axes is ~4× slower than the product."""
    r = _rows(dy)
    return _matmul32(jnp.ones((1, r.shape[0]), r.dtype), r)[0]


def _weight_grad(x_padded: jax.Array, dy: jax.Array) -> jax.Array:
    """∂/∂kernel of ``_valid_conv(x_padded, kernel)``: the convolution XLA would emit, written with canonical layouts.

    It contracts over (N, H, W): batch as the input-feature axis, the output gradient as a kernel as large as the image.
    """
    lhs = x_padded.transpose(3, 1, 2, 0)  # [Ci, H', W', N]
    rhs = dy.transpose(1, 2, 0, 3)  # [H, W, N, Co]
    out = lax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", dimension_numbers=_DIMS,
                                   preferred_element_type=jnp.float32)  # [Ci, kh, kw, Co]
    return out.transpose(1, 2, 0, 3)


@jax.custom_vjp
def conv3x3_vjp(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3×3 'same' convolution (= ``_conv``) with the backward pass written out."""
    return _valid_conv(_pad1(x), kernel) + bias


def _conv3x3_fwd(x, kernel, bias):
    return conv3x3_vjp(x, kernel, bias), (x, kernel)


def _conv3x3_bwd(res, dy):
    x, kernel = res
    dx = _valid_conv(_pad1(dy), _flip_io(kernel))
    dk = _weight_grad(_pad1(x), dy).astype(kernel.dtype)
    return dx, dk, _bias_grad(dy).astype(kernel.dtype)


conv3x3_vjp.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _shifts(img: jax.Array, adjoint: bool) -> list[jax.Array]:
    """The 9 shifted copies [N, H, W] of a one-channel image [N, H, W, 1], in tap order 3i+j.

    Forward: copy 3i+j holds the pixel each output position (r, s) sees through tap (i, j), img[r+i-1, s+j-1].
    Adjoint: copy 3i+j holds the output position each input pixel (p, q) reaches through tap (i, j),
    img[p+1-i, q+1-j]. Zero outside the image in both.
    """
    _, h, w, _ = img.shape
    p = _pad1(img)[..., 0]
    if adjoint:
        return [p[:, 2 - i:2 - i + h, 2 - j:2 - j + w] for i in range(3) for j in range(3)]
    return [p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def _shift_rows(img: jax.Array, adjoint: bool) -> jax.Array:
    """[9, N·H·W]: the shifted copies as rows (the left operand of a weight-gradient product)."""
    return jnp.stack([s.reshape(-1) for s in _shifts(img, adjoint)])


def _shift_cols(img: jax.Array, adjoint: bool) -> jax.Array:
    """[N·H·W, 9]: the shifted copies as columns (im2col of a one-channel image)."""
    return jnp.stack(_shifts(img, adjoint), axis=-1).reshape(-1, 9)


@jax.custom_vjp
def conv_from_one_channel_vjp(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3×3 'same' convolution of a one-channel input (the first layer), as im2col [pixels, 9] @ [9, Co].

    Eigen runs a convolution with one input channel at ~2 GFLOP/s (it is bound by writing the wide output); the
    product with 9 columns is several times faster.
    """
    n, h, w, _ = x.shape
    co = kernel.shape[-1]
    y = _matmul32(_shift_cols(x, adjoint=False), kernel.reshape(9, co)).astype(x.dtype)
    return y.reshape(n, h, w, co) + bias


def _from1_fwd(x, kernel, bias):
    return conv_from_one_channel_vjp(x, kernel, bias), (x, kernel)


def _from1_bwd(res, dy):
    x, kernel = res
    taps = _shift_rows(x, adjoint=False)
    taps_and_ones = jnp.concatenate([taps, jnp.ones((1, taps.shape[1]), taps.dtype)])  # [10, N·H·W]
    g = _matmul32(taps_and_ones, _rows(dy))  # [10, Co]: weight rows, then the bias
    dx = _valid_conv(_pad1(dy), _flip_io(kernel))  # removed by XLA when nobody asks for the input gradient
    return dx, g[:9].reshape(kernel.shape).astype(kernel.dtype), g[9].astype(kernel.dtype)


conv_from_one_channel_vjp.defvjp(_from1_fwd, _from1_bwd)


@jax.custom_vjp
def conv_to_one_channel_vjp(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3×3 'same' convolution to a one-channel output (the last layer)."""
    return _valid_conv(_pad1(x), kernel) + bias


def _to1_fwd(x, kernel, bias):
    return conv_to_one_channel_vjp(x, kernel, bias), (x, kernel)


def _to1_bwd(res, dy):
    x, kernel = res
    n, h, w, c = x.shape
    k9 = kernel.reshape(9, c)  # HWIO with O = 1: row 3i+j is tap (i, j)
    dx = _matmul32(_shift_cols(dy, adjoint=True), k9).astype(x.dtype).reshape(x.shape)  # [pixels, 9] @ [9, Ci]
    dk = _matmul32(_shift_rows(dy, adjoint=True), _rows(x))  # [9, Ci]
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype), jnp.sum(dy, dtype=jnp.float32)[None].astype(kernel.dtype)


conv_to_one_channel_vjp.defvjp(_to1_fwd, _to1_bwd)


@jax.custom_vjp
def upsample_conv_vjp(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """conv3x3(upsample_nearest_2x(x)) as one 2×2 convolution with all four phases, interleaved."""
    _, h, w, _ = x.shape
    return interleave_phases(_valid_conv(_pad1(x), all_phase_kernel(kernel)), h, w) + bias


def _up_fwd(x, kernel, bias):
    return upsample_conv_vjp(x, kernel, bias), (x, kernel)


def _up_bwd(res, dout):
    x, kernel = res
    k_all = all_phase_kernel(kernel)
    d_all = deinterleave_phases(dout)  # [N, h+1, w+1, 4·O]
    dx = _valid_conv(d_all, _flip_io(k_all))  # exactly the unpadded input: [N, h, w, I]
    dk_all = _weight_grad(_pad1(x), d_all)
    _, to_kernel = jax.vjp(all_phase_kernel, kernel.astype(jnp.float32))
    (dk,) = to_kernel(dk_all)
    return dx, dk.astype(kernel.dtype), _bias_grad(dout).astype(kernel.dtype)


upsample_conv_vjp.defvjp(_up_fwd, _up_bwd)


def _in_slices(fn: Callable[[jax.Array], Any], x: jax.Array, size: int) -> Any:
    """``fn`` over the batch in slices of ``size`` images (``lax.map``); the whole batch when size is 0 or too big.

    ``fn`` may return a pytree of per-image arrays; each comes back with the whole batch on its leading axis.
    """
    n = x.shape[0]
    if size <= 0 or size >= n:
        return fn(x)
    if n % size:
        raise ValueError(f"micro_batch={size} must divide the batch size {n}")
    out = lax.map(fn, x.reshape(n // size, size, *x.shape[1:]))
    return jax.tree_util.tree_map(lambda y: y.reshape(n, *y.shape[2:]), out)


class ConvAE(nn.Module):
    """The paper's ConvAE; widths and channels configurable (a 5-channel Cell Painting model is a config change)."""

    in_channels: int = 1
    encoder_widths: Sequence[int] = (128, 64, 32)
    latent_channels: int = 4
    decoder_widths: Sequence[int] = (32, 64, 128)
    formulation: str = "auto"  # one of FORMULATIONS: same function, different speed
    dtype: Any = jnp.float32  # compute dtype; parameters are always float32
    micro_batch: int | None = None  # images per slice in encode/decode_logits; None: 1 on CPU with subpixel_vjp

    def setup(self):
        if self.formulation not in FORMULATIONS:
            raise ValueError(f"formulation must be one of {FORMULATIONS}, got {self.formulation!r}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 or None, got {self.micro_batch}")
        if len(self.encoder_widths) != 3 or len(self.decoder_widths) != 3:
            raise ValueError("the paper's ConvAE has exactly three hidden widths in encoder and decoder")
        self.encoder = _Stack(self._encoder_channels(), name="encoder")
        self.decoder = _Stack(self._decoder_channels(), name="decoder")

    def _encoder_channels(self):
        e = self.encoder_widths
        return ((self.in_channels, e[0]), (e[0], e[1]), (e[1], e[2]), (e[2], self.latent_channels))

    def _decoder_channels(self):
        d = self.decoder_widths
        return ((self.latent_channels, d[0]), (d[0], d[1]), (d[1], d[2]), (d[2], self.in_channels))

    def resolved_formulation(self) -> str:
        """The formulation actually run (``auto`` resolved for this backend; see the module docstring)."""
        if self.formulation != "auto":
            return self.formulation
        backend = jax.default_backend()
        if backend == "gpu":  # the kernels pay in 16 bits; in float32 plain ran faster (_SLOW_ON_GPU_FLOAT32)
            return "fused_1ch" if is_16_bit(self.dtype) else "plain"
        return "subpixel_vjp" if backend == "cpu" else "plain"

    def speed_warning(self) -> str | None:
        """Why this formulation is a slow choice on this backend, as measured (BENCHMARKS.md); None when it is not."""
        where, auto, slow = _slow_on(jax.default_backend(), self.dtype)
        if (why := slow.get(self.formulation)) is None:
            return None
        return (f"formulation {self.formulation!r} on {where} is slower than 'auto' ({auto}): {why}; it computes the "
                f"same function")

    def resolved_micro_batch(self) -> int:
        """Images per slice actually used (0: the whole batch)."""
        if self.micro_batch is not None:
            return self.micro_batch
        return 1 if self.resolved_formulation() == "subpixel_vjp" and jax.default_backend() == "cpu" else 0

    def encode(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) in [0, 1] → latent (N, H/4, W/4, latent_channels), linear output."""
        return self.encode_layers(x)["latent"]

    def encode_flat(self, x: jax.Array) -> jax.Array:
        """The latent flattened channel-major (C, H, W) as float32 [N, C·H/4·W/4], like the authors'
        ``encoder(x).reshape(N, -1)`` on NCHW: the paper's 4,096 features, column for column."""
        return flatten_channel_major(self.encode(x))

    def encode_layers(self, x: jax.Array, summarize: Callable[[dict], Any] | None = None) -> Any:
        """Every encoder stage's output: 'block1' (after conv0+ReLU+pool), 'block2', 'block3' (conv2+ReLU), 'latent'.

        Feature extraction pools the intermediate stages into translation-invariant statistics; XLA drops the
        stages a caller does not use. ``summarize(stages)``, when given, must work image by image (e.g. statistics
        over each image's positions); it runs inside each ``micro_batch`` slice, so only its result is gathered over
        the batch, and several features come from one loop over the slices (CPU, batch 256, latent + pooled: 107–120
        images/s, against 47 with one loop per feature mode computed outside the slices; BENCHMARKS.md).
        """
        summarize = summarize or (lambda stages: stages)
        formulation = self.resolved_formulation()
        layers = self.encoder.layers(self.dtype)
        x = x.astype(self.dtype)
        if formulation == "subpixel_vjp":
            return _in_slices(lambda xs: summarize(_encode_layers_vjp(xs, layers)), x, self.resolved_micro_batch())
        conv = _conv_reference if formulation in _XLA_CONVS else _conv
        one_channel = x.shape[-1] == 1
        if formulation in _FUSED and one_channel and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            b1 = conv_relu_pool_one_channel(x, *layers[0])
        else:
            first = conv_from_one_channel_vjp if formulation in _ONE_CHANNEL_PRODUCTS and one_channel else conv
            b1 = max_pool_2x2(nn.relu(first(x, *layers[0])))
        b2 = max_pool_2x2(nn.relu(conv(b1, *layers[1])))
        b3 = nn.relu(conv(b2, *layers[2]))
        return summarize({"block1": b1, "block2": b2, "block3": b3, "latent": conv(b3, *layers[3])})

    def decode_logits(self, z: jax.Array) -> jax.Array:
        formulation = self.resolved_formulation()
        layers = self.decoder.layers(self.dtype)
        z = z.astype(self.dtype)
        if formulation == "subpixel_vjp":
            return _in_slices(lambda zs: _decode_logits_vjp(zs, layers), z, self.resolved_micro_batch())
        if formulation in _XLA_CONVS:
            one_channel = layers[3][0].shape[-1] == 1
            x = upsample_nearest_2x(nn.relu(_conv_reference(z, *layers[0])))
            x = nn.relu(_conv_reference(x, *layers[1]))
            kernel, bias = layers[2]
            if formulation == "fused_subpixel" and one_channel:
                # the last upsampling conv in its phase layout [N, h+1, w+1, 4·C], read by the last block as it is
                y = all_phase_conv(x, all_phase_kernel(kernel), TUNING["phase_conv"])
                return relu_conv_to_one_channel(y, *layers[3], phases=True, pre_bias=bias).astype(jnp.float32)
            if formulation in _FUSED and one_channel:  # the conv's bias goes to the last block (fused_blocks.TUNING)
                y = lax.conv_general_dilated(upsample_nearest_2x(x), kernel, (1, 1), "SAME", dimension_numbers=_DIMS)
                return relu_conv_to_one_channel(y, *layers[3], pre_bias=bias).astype(jnp.float32)
            pre = _conv_reference(upsample_nearest_2x(x), kernel, bias)
            last = conv_to_one_channel_vjp if formulation == "plain_1ch" and one_channel else _conv_reference
            return last(nn.relu(pre), *layers[3]).astype(jnp.float32)
        x = nn.relu(_conv(z, *layers[0]))
        x = nn.relu(upsample_conv_subpixel(x, *layers[1]))
        x = nn.relu(upsample_conv_subpixel(x, *layers[2]))
        return _conv(x, *layers[3]).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent → reconstruction in [0, 1], float32."""
        return nn.sigmoid(self.decode_logits(z))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def flatten_channel_major(z: jax.Array) -> jax.Array:
    """[N, H, W, C] → float32 [N, C·H·W] in (C, H, W) order, as PyTorch's ``reshape(N, -1)`` of NCHW."""
    z = z.astype(jnp.float32)
    return jnp.transpose(z, (0, 3, 1, 2)).reshape(z.shape[0], -1)


def _encode_layers_vjp(x, layers):
    first = conv_from_one_channel_vjp if x.shape[-1] == 1 else conv3x3_vjp
    b1 = max_pool_2x2(nn.relu(first(x, *layers[0])))
    b2 = max_pool_2x2(nn.relu(conv3x3_vjp(b1, *layers[1])))
    b3 = nn.relu(conv3x3_vjp(b2, *layers[2]))
    return {"block1": b1, "block2": b2, "block3": b3, "latent": conv3x3_vjp(b3, *layers[3])}


def _decode_logits_vjp(z, layers):
    x = nn.relu(conv3x3_vjp(z, *layers[0]))
    x = nn.relu(upsample_conv_vjp(x, *layers[1]))
    x = nn.relu(upsample_conv_vjp(x, *layers[2]))
    last = conv_to_one_channel_vjp if layers[3][0].shape[-1] == 1 else conv3x3_vjp
    return last(x, *layers[3]).astype(jnp.float32)


class _Stack(nn.Module):
    """Four 3×3 conv layers' parameters, named conv0..conv3 with HWIO kernels."""

    channels: Sequence[tuple[int, int]]

    def setup(self):
        self.convs = [_ConvParams(cin, cout, name=f"conv{i}") for i, (cin, cout) in enumerate(self.channels)]

    def layers(self, dtype):
        return [c(dtype) for c in self.convs]


class _ConvParams(nn.Module):
    cin: int
    cout: int

    @nn.compact
    def __call__(self, dtype):
        kernel = self.param("kernel", _torch_default_kernel_init(self.cin), (3, 3, self.cin, self.cout), jnp.float32)
        bias = self.param("bias", _torch_default_bias_init(self.cin), (self.cout,), jnp.float32)
        return kernel.astype(dtype), bias.astype(dtype)


def _torch_default_kernel_init(fan_in_channels: int):
    """PyTorch's Conv2d default (kaiming_uniform a=√5 → U(±1/√fan_in)), so training starts where the authors' did."""
    bound = 1.0 / (fan_in_channels * 9) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _torch_default_bias_init(fan_in_channels: int):
    return _torch_default_kernel_init(fan_in_channels)


def model_from_config(cfg) -> ConvAE:
    """Build the model from a config's ``model`` section (ml_collections.ConfigDict or dict)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[get("dtype", "float32")]
    return ConvAE(
        in_channels=get("in_channels", 1),
        encoder_widths=tuple(get("encoder_widths", (128, 64, 32))),
        latent_channels=get("latent_channels", 4),
        decoder_widths=tuple(get("decoder_widths", (32, 64, 128))),
        formulation=get("formulation", "auto"),
        dtype=dtype,
        micro_batch=get("micro_batch", None),
    )


def init_params(model: ConvAE, rng: jax.Array, image_size: int = 128) -> dict:
    x = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
    return model.init(rng, x)["params"]


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
