"""Finishing crops on the accelerator: uint8 crops + photometric rows → the float32 crops the model trains on.

With ``input.finish = 'device'`` the pipeline hands over what ``augment.multi_crop_uint8`` writes (uint8 crops with
the flips and rotations done, one photometric row per crop) and the jitted training step calls ``finish_crops`` on
them: x/255, brightness, contrast and the 3×3 Gaussian blur run on the accelerator, where they cost next to nothing,
instead of on the host's cores, and the host sends a quarter of the bytes. The arithmetic is ``augment.finish_crops``'s
(same operations in the same order); the results agree to float32 rounding (~1e-7: XLA may fuse a multiply-add or
sum the contrast mean in another order), exactly where a crop has no photometric augmentation.

JAX lives only here in ``data_pipelines``: worker processes never import this module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.augment import PHOTOMETRIC_COLUMNS, to_unit_float

_COLUMN = {name: i for i, name in enumerate(PHOTOMETRIC_COLUMNS)}
_UNIT_FLOAT = to_unit_float(np.arange(256, dtype=np.uint8))


def finish_crops(crops_u8: jax.Array, photometric: jax.Array) -> jax.Array:
    """uint8 [B, S, S, C] crops and their float32 [B, 5] photometric rows → float32 [B, S, S, C] in [0, 1]."""
    if crops_u8.ndim != 4 or photometric.shape != (crops_u8.shape[0], len(PHOTOMETRIC_COLUMNS)):
        raise ValueError(f"expected uint8 [B, S, S, C] crops and [B, {len(PHOTOMETRIC_COLUMNS)}] photometric rows, "
                         f"got {crops_u8.shape} and {photometric.shape}")
    # ToTensor's x/255 as a table of the 256 quotients numpy computes: XLA turns a division by a constant into a
    # multiply by its reciprocal, which differs in the last bit for half of the values.
    x = jnp.asarray(_UNIT_FLOAT)[crops_u8.astype(jnp.int32)]

    def column(name):
        return photometric[:, _COLUMN[name], None, None, None].astype(jnp.float32)

    brightness = column("brightness")
    x = jnp.where(brightness != 1, jnp.clip(x * brightness, 0.0, 1.0), x)
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    contrasted = jnp.clip(mean + column("contrast") * (x - mean), 0.0, 1.0)
    x = jnp.where(column("contrast_on") != 0, contrasted, x)
    edge, middle = column("blur_edge"), column("blur_middle")
    return jnp.where(middle != 0, _blur3(x, edge, middle), x)


def _blur3(x: jax.Array, edge: jax.Array, middle: jax.Array) -> jax.Array:
    """``augment._blur3_rows`` on a batch: separable 3-tap blur, horizontal pass first, reflect padding."""
    p = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="reflect")
    h = middle * x + edge * (p[:, :, :-2] + p[:, :, 2:])
    p = jnp.pad(h, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="reflect")
    return middle * h + edge * (p[:, :-2] + p[:, 2:])
