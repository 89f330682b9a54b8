"""Feature extraction from an image file exactly as the authors' ``convae/feature_extractor.py`` did it.

Their chain (original_method.md §2): ``torchvision.io.read_image`` → uint8 (1, H, W) → ``x / 255.`` (float32) →
``transforms.Resize(128)`` on the tensor (bilinear, antialiased) → ``encoder`` → ``reshape(-1)``: 4096 features in
channel-major (C, H, W) order.

The resize is reimplemented in numpy following PyTorch's CPU antialiased kernel (separable: along the width first, then
the height; per output pixel a normalised triangle filter widened by the scale; float32 accumulation with fused
multiply-add), so no torch or torchvision is needed and the result matches the authors' preprocessed HCT-15 image
bit for bit. PIL's mode-'F' BILINEAR resize is the same filter but accumulates differently (max 1.2e-7 off on that image).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

AUTHORS_INPUT_SIZE = 128
PREPROCESSING_DESCRIPTION = (
    "grayscale uint8 image -> x/255 (float32) -> bilinear antialiased resize of the shorter side to 128 "
    "(torchvision.transforms.Resize(128) on a tensor) -> encoder; features = latent flattened channel-major (C, H, W)"
)


def read_grayscale_uint8(path: str | Path) -> np.ndarray:
    """(H, W) uint8 pixels of a single-channel image file, as ``torchvision.io.read_image`` returns them.

    The authors' 1-channel encoder cannot take a colour image; rather than guess a conversion, refuse it.
    """
    with Image.open(path) as im:
        if im.mode != "L":
            raise ValueError(f"{path}: image mode {im.mode!r}; the authors' ConvAE reads single-channel 8-bit ('L') "
                             "images. Convert it explicitly, e.g. PIL.Image.open(p).convert('L')")
        return np.asarray(im, dtype=np.uint8).copy()


def _aa_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and float32 weights (out_size, taps) of PyTorch's antialiased bilinear filter along one axis."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: interp_size / 2 = 1, widened by the scale when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    rows = []
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * invscale))
        rows.append((lo, w / w.sum()))
    taps = max(len(w) for _, w in rows)
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.float32)  # zero-weight padding taps leave the sum unchanged
    for i, (lo, w) in enumerate(rows):
        index[i, : len(w)] = np.arange(lo, lo + len(w))
        weight[i, : len(w)] = w
    return index, weight


def _resize_last_axis(x: np.ndarray, out_size: int) -> np.ndarray:
    index, weight = _aa_bilinear_taps(x.shape[-1], out_size)
    acc = x[..., index[:, 0]] * weight[:, 0]
    for t in range(1, index.shape[1]):
        # fma(x, w, acc) in float32: the float64 product of two float32 values is exact; the float64 sum then float32
        # cast rounds twice, which can differ from a true fma on rare ties (none on the reference image).
        acc = (acc.astype(np.float64) + x[..., index[:, t]].astype(np.float64) * weight[:, t]).astype(np.float32)
    return acc


def resize_bilinear_antialias(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``torchvision.transforms.Resize(size)`` (bilinear, antialias) on a float32 (..., H, W) array.

    An int ``size`` sets the shorter side, keeping the aspect ratio as torchvision does; a pair is (H, W).
    """
    image = np.asarray(image, np.float32)
    h, w = image.shape[-2:]
    if isinstance(size, int):
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long / short)
        out_h, out_w = (new_short, new_long) if h <= w else (new_long, new_short)
    else:
        out_h, out_w = size
    x = _resize_last_axis(image, out_w)  # width first, as PyTorch's separable kernel does
    x = np.swapaxes(_resize_last_axis(np.swapaxes(x, -1, -2), out_h), -1, -2)
    return np.ascontiguousarray(x)


def preprocess_like_authors(pixels: np.ndarray, size: int = AUTHORS_INPUT_SIZE) -> np.ndarray:
    """uint8 (H, W) → float32 (size, size) in [0, 1]: ``Resize(size)(x / 255.)``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image, got {pixels.dtype} {pixels.shape}")
    return resize_bilinear_antialias(pixels.astype(np.float32) / np.float32(255.0), size)


def extract_features_from_image(path: str | Path, params, model) -> np.ndarray:
    """One image file → the authors' 4096-d ConvAE feature vector (channel-major flattened latent), float32.

    ``model`` is a ``cellssl_jax.models.convae.ConvAE`` with one input channel; ``params`` its Flax params (e.g.
    imported from the authors' checkpoint with ``convert.torch_to_flax``).
    """
    import jax.numpy as jnp

    from cellssl_jax.features import feature_function

    if model.in_channels != 1:
        raise ValueError(
            f"the authors' preprocessing reads one grayscale channel; this model takes {model.in_channels}")
    x = preprocess_like_authors(read_grayscale_uint8(path))
    features = feature_function(model, "latent")(params, jnp.asarray(x)[None, :, :, None])
    return np.asarray(features[0], np.float32)
