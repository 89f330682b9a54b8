"""The sub-pixel form of "nearest ×2 upsample, then 3×3 conv": the kernels and the phase layout it works in.

A 3×3 convolution of a nearest-upsampled image equals, at each of the four output phases (row parity, column
parity), a 2×2 convolution of the low-resolution image: 2.25× fewer multiplies. Stacking the four phases' 2×2 kernels
on the output axis makes it ONE 2×2 convolution of the padded input, [N, h+1, w+1, 4·O], in which phase (di, dj)
(channels (2·di + dj)·O ...) is valid at spatial offset (di, dj): ``interleave_phases`` turns that into the upsampled
[N, 2h, 2w, O] image, ``deinterleave_phases`` is its adjoint. Used by convae's formulations and by the fused last
block, which reads the phase layout as it is (fused_blocks.relu_conv_to_one_channel(phases=True)).

``all_phase_conv`` computes that one 2×2 convolution two ways: ``"xla"``, XLA's convolution (cuDNN on a GPU), and
``"gemm"``, one matrix product of the 2×2 windows (``window_patches``: the four shifted copies of the padded input
side by side, [N, h+1, w+1, 4·I]) with the kernel as a [4·I, 4·O] matrix, whose backward pass is two more products
in the input's dtype: the input gradient (the window gradient, in the input's dtype, summed back at its four offsets
in float32: a second rounding that XLA's convolution does not make) and the weight gradient (patchesᵀ @ output
gradient, a float32 result). Why: on an H100 in bf16 the sub-pixel form of the 64→128
layer timed no faster than the plain one through XLA's convolutions (4.78 against 4.97 ms of training work at batch
256) although it has 2.2× fewer FLOPs; as products with a million rows it is the shape matrix units run best. Not
yet timed on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

PHASE_CONVS = ("xla", "gemm")

# Rows of the 2-tap kernels that a 3-tap kernel collapses to after a nearest ×2 upsample, per output phase.
# Output row 2i+0 reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i  → taps (K0, K1+K2) over rows (i-1, i).
# Output row 2i+1 reads upsampled rows 2i, 2i+1, 2i+2 = input rows i, i, i+1 → taps (K0+K1, K2) over rows (i, i+1).
_PHASE_TAPS = (
    jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], jnp.float32),
    jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], jnp.float32),
)


def subpixel_kernels(kernel: jax.Array) -> jax.Array:
    """3×3 HWIO kernel → (2, 2, 2, 2, I, O): the 2×2 kernel for each output phase (row phase, column phase)."""
    rows = []
    for di in range(2):
        cols = []
        for dj in range(2):
            k = jnp.einsum("ra,abio,cb->rcio", _PHASE_TAPS[di], kernel.astype(jnp.float32), _PHASE_TAPS[dj])
            cols.append(k.astype(kernel.dtype))
        rows.append(jnp.stack(cols))
    return jnp.stack(rows)


def all_phase_kernel(kernel: jax.Array) -> jax.Array:
    """3×3 HWIO kernel → one 2×2 kernel with the four sub-pixel phases stacked on the output axis: (2, 2, I, 4·O)."""
    ci, co = kernel.shape[2], kernel.shape[3]
    return subpixel_kernels(kernel).transpose(2, 3, 4, 0, 1, 5).reshape(2, 2, ci, 4 * co)


def interleave_phases(y_all: jax.Array, h: int, w: int) -> jax.Array:
    """[N, h+1, w+1, 4·O] (phase (di, dj) valid at offset (di, dj)) → the upsampled [N, 2h, 2w, O]."""
    n, co = y_all.shape[0], y_all.shape[-1] // 4
    y6 = y_all.reshape(n, h + 1, w + 1, 2, 2, co)
    rows = [jnp.stack([y6[:, di:di + h, dj:dj + w, di, dj, :] for dj in range(2)], axis=3) for di in range(2)]
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, co)


def deinterleave_phases(dout: jax.Array) -> jax.Array:
    """Adjoint of ``interleave_phases``: each phase of [N, 2h, 2w, O] placed at its offset in [N, h+1, w+1, 4·O]
    (zero where a phase is not valid)."""
    n, hh, ww, co = dout.shape
    d6 = dout.reshape(n, hh // 2, 2, ww // 2, 2, co)
    parts = [jnp.pad(d6[:, :, di, :, dj, :], ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))
             for di in range(2) for dj in range(2)]
    return jnp.concatenate(parts, axis=-1)


def all_phase_conv(x: jax.Array, k_all: jax.Array, how: str = "xla") -> jax.Array:
    """[N, h, w, I] and the (2, 2, I, 4·O) kernel of ``all_phase_kernel`` → [N, h+1, w+1, 4·O]: the 2×2 convolution
    of the input padded by one pixel, by XLA's convolution (``"xla"``) or as one matrix product (``"gemm"``)."""
    if how == "xla":
        return lax.conv_general_dilated(x, k_all, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if how == "gemm":
        return _phase_gemm(x, k_all)
    raise ValueError(f"all_phase_conv: how must be one of {PHASE_CONVS}, got {how!r}")


def window_patches(x: jax.Array) -> jax.Array:
    """[N, h, w, I] → [N, h+1, w+1, 4·I]: at each position of the padded grid its 2×2 window, (row, column) offset
    (a, b) in channels (2a + b)·I ..., as the HWIO kernel's (a, b) taps read it."""
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, a:a + h + 1, b:b + w + 1] for a in range(2) for b in range(2)], axis=-1)


def _channel_products(a: jax.Array, matrix: jax.Array) -> jax.Array:
    """a [..., K] @ matrix [K, J], the result in the inputs' dtype. Not asked for in float32: that would write the
    [N·65·65, 512] result at twice the bytes and convert it in a pass of its own; XLA's bf16 matrix products on a GPU
    sum in float32 anyway (cuBLAS compute type F32), as its bf16 convolutions do."""
    return lax.dot_general(a, matrix, (((a.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _phase_gemm(x, k_all):
    return _channel_products(window_patches(x), k_all.reshape(-1, k_all.shape[-1]).astype(x.dtype))


def _phase_gemm_fwd(x, k_all):
    # only x is kept: the patches (4× its bytes) are rebuilt for the weight gradient
    return _phase_gemm(x, k_all), (x, k_all)


def _phase_gemm_bwd(res, dy):
    x, k_all = res
    _, h, w, ci = x.shape
    d_windows = _channel_products(dy, k_all.reshape(-1, k_all.shape[-1]).T.astype(x.dtype))  # [N, h+1, w+1, 4·I]
    # the adjoint of window_patches: window (a, b) back at its offset in the padded grid, summed, the pad cut off
    windows = [d_windows[..., i * ci:(i + 1) * ci].astype(jnp.float32) for i in range(4)]
    dxp = sum(jnp.pad(dw, ((0, 0), (i // 2, 1 - i // 2), (i % 2, 1 - i % 2), (0, 0))) for i, dw in enumerate(windows))
    dx = dxp[:, 1:h + 1, 1:w + 1].astype(x.dtype)
    spatial = ((0, 1, 2), (0, 1, 2))  # patchesᵀ @ dy over every position: [4·I, 4·O]
    dk = lax.dot_general(window_patches(x), dy, (spatial, ((), ())), preferred_element_type=jnp.float32)
    return dx, dk.reshape(k_all.shape).astype(k_all.dtype)


_phase_gemm.defvjp(_phase_gemm_fwd, _phase_gemm_bwd)
