"""The sub-pixel form of "nearest ×2 upsample, then 3×3 conv": the kernels and the phase layout it works in.

A 3×3 convolution of a nearest-upsampled image equals, at each of the four output phases (row parity, column
parity), a 2×2 convolution of the low-resolution image: 2.25× fewer multiplies. Stacking the four phases' 2×2 kernels
on the output axis makes it ONE 2×2 convolution of the padded input, [N, h+1, w+1, 4·O], in which phase (di, dj)
(channels (2·di + dj)·O ...) is valid at spatial offset (di, dj): ``interleave_phases`` turns that into the upsampled
[N, 2h, 2w, O] image, ``deinterleave_phases`` is its adjoint. Used by convae's formulations and by the fused last
block, which reads the phase layout as it is (fused_blocks.relu_conv_to_one_channel(phases=True)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
