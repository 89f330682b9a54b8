"""Crops and augmentations of the SwAV-style multi-crop, as pure functions of (image, rng).

What the authors ran (pheno-ml `src/datasets.py:MultiCropDataset`, see ../shared/docs/original_method.md §2), per crop:
``RandomResizedCrop(size, scale=(min, max))`` (ratio (3/4, 4/3), PIL bilinear on the uint8 image) → ``ToTensor`` (x/255)
→ ``RandomHorizontalFlip(0.5)`` → ``RandomApply(GaussianBlur(3, sigma=(0.1, 2.0)), p=0.2)``.

Here every crop is reproduced with the same arithmetic:
- the crop box follows torchvision's ``RandomResizedCrop.get_params`` (10 tries, then the central fallback, so scale 1
  on a square image is the whole image);
- the resize is a Numba port of Pillow's 8-bit antialiased bilinear resampler (same coefficients, same 22-bit fixed
  point, horizontal pass then vertical), bit-identical to ``Image.crop(box).resize(size, BILINEAR)`` of Pillow ≤ 12
  (what the authors ran) and several times faster than Pillow here (see benchmarks/input_pipeline.py): it works on a
  transposed copy of the image, made once and shared by all crops, so both passes run over contiguous memory;
- uint8 → float32 is ``x / 255`` in float32 (as ``ToTensor``), folded into the resize's last store, as is the flip;
- the blur is torchvision's 3×3 Gaussian with reflect padding, done separably (equal to ~1e-7).

Everything acts on ``[H, W, C]`` arrays and treats all channels alike. Randomness comes only from the ``rng`` argument,
drawn in a fixed number of values per call, so switching an optional augmentation on does not shift the draws of the
others.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
from PIL import Image

# Pillow's Resample.c: 8-bit coefficients are fixed point with 32 - 8 - 2 fractional bits.
_PRECISION_BITS = 22
_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes before its central fallback.
_UNIT = np.float32(255.0)


class CropBox(NamedTuple):
    """A crop in pixel coordinates of the source image: rows [top, top+height), columns [left, left+width).

    A NamedTuple (immutable, compared by value) rather than a frozen dataclass: five are made per image, and a frozen
    dataclass costs ~1 us more to build."""

    top: int
    left: int
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """One crop of the multi-crop: output side length and the range of its area as a fraction of the image."""

    size: int
    min_scale: float
    max_scale: float


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Per-crop augmentation settings. The defaults are the paper's (hflip 0.5, blur 0.2 with sigma in [0.1, 2])."""

    hflip_p: float = 0.5
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    vflip_p: float = 0.0
    rot90: bool = False
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b] (clipped at 0), like torchvision ColorJitter
    contrast: float = 0.0  # same, blending with the crop's mean intensity


# --------------------------------------------------------------------------------------------------------------------
# Crop box sampling


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
    """torchvision ``RandomResizedCrop.get_params``: area fraction uniform in ``scale``, log aspect (w/h) uniform in
    ``ratio``, position uniform; after 10 rejected tries, the largest central box whose aspect fits ``ratio``.

    Draws exactly 40 uniforms whatever happens, so the draws of later calls do not depend on how many tries were needed.
    """
    return _crop_box_from_draws(height, width, rng.random(_BOX_DRAWS).tolist(), scale, ratio)


_BOX_DRAWS = 4 * _ATTEMPTS  # uniforms one crop box consumes


def _crop_box_from_draws(height: int, width: int, draws: list[float], scale: tuple[float, float],
                         ratio: tuple[float, float]) -> CropBox:
    """``sample_crop_box`` given its 40 uniforms (python floats: the loop is cheaper in python than in numpy)."""
    if scale[0] >= 1.0 and height == width and ratio[0] <= 1.0 <= ratio[1]:
        # Whole area of a square image: a try can only succeed with h = w = side, as the fallback gives.
        return CropBox(0, 0, height, width)
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = draws[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))  # python round = half to even, as torchvision's int(round(.))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))
            left = int(u_left * (width - w + 1))
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


# --------------------------------------------------------------------------------------------------------------------
# Pillow-exact bilinear resize of uint8 images (Numba)


@numba.njit(cache=True, nogil=True)
def _bilinear_coefficients(in_size: int, out_size: int):
    """Pillow ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter (support 1, antialiased)."""
    scale = in_size / out_size
    filterscale = scale if scale > 1.0 else 1.0
    support = filterscale  # bilinear support 1.0 times the filter scale
    ksize = int(math.ceil(support)) * 2 + 1
    starts = np.empty(out_size, np.int64)
    counts = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    raw = np.empty(ksize, np.float64)
    inv = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        total = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * inv)
            w = 1.0 - t if t < 1.0 else 0.0
            raw[x] = w
            total += w
        for x in range(xmax):
            w = raw[x] / total if total != 0.0 else raw[x]
            if w < 0:
                weights[xx, x] = int(-0.5 + w * (1 << 22))
            else:
                weights[xx, x] = int(0.5 + w * (1 << 22))
        starts[xx] = xmin
        counts[xx] = xmax
    return starts, counts, weights


_LITTLE_ENDIAN = sys.byteorder == "little"  # the 8x8 tile transpose reads byte b of a word as column b


@numba.njit(cache=True, nogil=True)
def _transpose_bytes_8x8(rows64, out64):
    """Transpose of a uint8 [H, W] plane (H, W multiples of 8) seen as uint64 words: ``rows64`` is its [H, W/8] view,
    ``out64`` the [W, H/8] view of the [W, H] result. Each 8x8 byte tile is 8 words, transposed in registers by three
    rounds of masked swaps (4-, 2-, then 1-byte blocks; little-endian: byte b of a word is column b). 8 times fewer
    loads and stores than a byte-by-byte transpose: 3.5x faster here (21 vs 75 us for 256x256)."""
    n_row_blocks = rows64.shape[0] // 8
    n_col_words = rows64.shape[1]
    m32 = np.uint64(0x00000000FFFFFFFF); m16 = np.uint64(0x0000FFFF0000FFFF); m8 = np.uint64(0x00FF00FF00FF00FF)
    s32 = np.uint64(32); s16 = np.uint64(16); s8 = np.uint64(8)
    for yb in range(n_row_blocks):
        for xb in range(n_col_words):
            r0 = rows64[8*yb, xb]; r1 = rows64[8*yb+1, xb]; r2 = rows64[8*yb+2, xb]; r3 = rows64[8*yb+3, xb]
            r4 = rows64[8*yb+4, xb]; r5 = rows64[8*yb+5, xb]; r6 = rows64[8*yb+6, xb]; r7 = rows64[8*yb+7, xb]
            t = ((r0 >> s32) ^ r4) & m32; r0 ^= t << s32; r4 ^= t
            t = ((r1 >> s32) ^ r5) & m32; r1 ^= t << s32; r5 ^= t
            t = ((r2 >> s32) ^ r6) & m32; r2 ^= t << s32; r6 ^= t
            t = ((r3 >> s32) ^ r7) & m32; r3 ^= t << s32; r7 ^= t
            t = ((r0 >> s16) ^ r2) & m16; r0 ^= t << s16; r2 ^= t
            t = ((r1 >> s16) ^ r3) & m16; r1 ^= t << s16; r3 ^= t
            t = ((r4 >> s16) ^ r6) & m16; r4 ^= t << s16; r6 ^= t
            t = ((r5 >> s16) ^ r7) & m16; r5 ^= t << s16; r7 ^= t
            t = ((r0 >> s8) ^ r1) & m8; r0 ^= t << s8; r1 ^= t
            t = ((r2 >> s8) ^ r3) & m8; r2 ^= t << s8; r3 ^= t
            t = ((r4 >> s8) ^ r5) & m8; r4 ^= t << s8; r5 ^= t
            t = ((r6 >> s8) ^ r7) & m8; r6 ^= t << s8; r7 ^= t
            out64[8*xb, yb] = r0; out64[8*xb+1, yb] = r1; out64[8*xb+2, yb] = r2; out64[8*xb+3, yb] = r3
            out64[8*xb+4, yb] = r4; out64[8*xb+5, yb] = r5; out64[8*xb+6, yb] = r6; out64[8*xb+7, yb] = r7


def _planes_transposed(image: np.ndarray) -> np.ndarray:
    """``transposed_planes`` without the checks: the 8x8-tile transpose where it applies (one channel, sides multiples
    of 8, contiguous, little-endian), the plain loop otherwise."""
    height, width, channels = image.shape
    if channels == 1 and height % 8 == 0 and width % 8 == 0 and image.flags.c_contiguous and _LITTLE_ENDIAN:
        planes_t = np.empty((1, width, height), np.uint8)
        _transpose_bytes_8x8(image.reshape(height, width).view(np.uint64),
                             planes_t.reshape(width, height).view(np.uint64))
        return planes_t
    return _transpose_planes(image)


@numba.njit(cache=True, nogil=True)
def _transpose_planes(image):
    """uint8 [H, W, C] (read-only is fine) → contiguous [C, W, H]: the resize kernel's input layout."""
    height, width, channels = image.shape
    planes_t = np.empty((channels, width, height), np.uint8)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                planes_t[c, x, y] = image[y, x, c]
    return planes_t


def _coefficients(in_size: int, out_size: int):
    """``_bilinear_coefficients``, computed once per (in, out) size pair: the 10 box sizes x few output sizes of a
    training run recur all the time, and computing them cost ~10% of a crop."""
    key = (in_size, out_size)
    found = _COEFFICIENTS.get(key)
    if found is None:
        found = _COEFFICIENTS[key] = _bilinear_coefficients(in_size, out_size)
    return found


_COEFFICIENTS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


@numba.njit(cache=True, nogil=True)
def _horizontal_pass(plane_t, top, left, x_coefficients, y_coefficients):
    """Pillow's horizontal pass over the box rows the vertical pass will read: uint8 [n_rows (+ pad), out_w].

    ``plane_t`` is one channel TRANSPOSED ([W, H], contiguous), so each output column is a weighted sum of a few
    contiguous runs of the plane, vectorised over rows; the result is then transposed back in a small buffer."""
    x_starts, x_counts, x_weights = x_coefficients
    y_starts, y_counts, _ = y_coefficients
    out_w = x_starts.shape[0]
    out_h = y_starts.shape[0]
    half = np.int32(1 << (_PRECISION_BITS - 1))
    y_first = y_starts[0]
    n_rows = y_starts[out_h - 1] + y_counts[out_h - 1] - y_first  # Pillow's ybox_first/ybox_last
    row0 = top + y_first
    # Rows padded to a multiple of 8 (the pad is never read back) so that, when the output width is one too, the
    # transpose back runs on 8x8 byte tiles: ~8 -> ~2 us of a ~25 us pass for a 128-pixel crop.
    tiled = _LITTLE_ENDIAN and out_w % 8 == 0
    n_cols = (n_rows + 7) // 8 * 8 if tiled else n_rows
    tmp_t = np.empty((out_w, n_cols), np.uint8)
    acc = np.empty(n_rows, np.int32)
    for xx in range(out_w):
        acc[:] = half
        for k in range(x_counts[xx]):
            weight = x_weights[xx, k]
            src = plane_t[left + x_starts[xx] + k, row0 : row0 + n_rows]
            for i in range(n_rows):
                acc[i] += np.int32(src[i]) * weight
        for i in range(n_rows):
            tmp_t[xx, i] = np.uint8(min(max(acc[i] >> _PRECISION_BITS, 0), 255))
    tmp = np.empty((n_cols, out_w), np.uint8)
    if tiled:
        _transpose_bytes_8x8(tmp_t.view(np.uint64), tmp.view(np.uint64))
    else:
        for i in range(n_rows):
            for xx in range(out_w):
                tmp[i, xx] = tmp_t[xx, i]
    return tmp


@numba.njit(cache=True, nogil=True)
def _vertical_row(tmp, yy, y_coefficients, acc_row):
    """Pillow's vertical pass for output row ``yy`` into ``acc_row`` (int32, before the shift and clip)."""
    y_starts, y_counts, y_weights = y_coefficients
    acc_row[:] = np.int32(1 << (_PRECISION_BITS - 1))
    y0 = y_starts[yy] - y_starts[0]
    for k in range(y_counts[yy]):
        weight = y_weights[yy, k]
        src = tmp[y0 + k]
        for i in range(acc_row.shape[0]):
            acc_row[i] += np.int32(src[i]) * weight


@numba.njit(cache=True, nogil=True)
def _resize_lut(planes_t, top, left, out, lut, hflip, x_coefficients, y_coefficients):
    """Resize the box at (top, left) of ``planes_t`` ([C, W, H], see ``_horizontal_pass``) into any ``out`` [S_h, S_w,
    C] (a view is fine) as ``lut[pixel]``, mirrored left to right if ``hflip``. Same coefficients, rounding and order
    as Pillow ≤ 12's 8-bit resampler: horizontal pass into uint8, then vertical pass."""
    out_h, out_w, channels = out.shape
    acc_row = np.empty(out_w, np.int32)
    for c in range(channels):
        tmp = _horizontal_pass(planes_t[c], top, left, x_coefficients, y_coefficients)
        for yy in range(out_h):
            _vertical_row(tmp, yy, y_coefficients, acc_row)
            for i in range(out_w):
                value = lut[min(max(acc_row[i] >> _PRECISION_BITS, 0), 255)]
                out[yy, out_w - 1 - i if hflip else i, c] = value


@numba.njit(cache=True, nogil=True)
def _resize_rows(planes_t, top, left, out, as_float, hflip, x_coefficients, y_coefficients):
    """``_resize_lut`` specialised for a C-contiguous ``out`` (batch rows): float32 x/255 (``as_float``; multi_crop)
    or uint8 (the uint8 hand-over). The conversion and the stores vectorise where the table lookup and 3-D strided
    stores did not (~2x faster vertical pass). ``np.float32(v) / 255`` is the table's own arithmetic, so the result
    is the same bit for bit."""
    out_h, out_w, channels = out.shape
    rows = out.reshape(out_h, out_w * channels)
    acc_row = np.empty(out_w, np.int32)
    values = np.empty(out_w, out.dtype)
    unit = np.float32(255.0)
    for c in range(channels):
        tmp = _horizontal_pass(planes_t[c], top, left, x_coefficients, y_coefficients)
        for yy in range(out_h):
            _vertical_row(tmp, yy, y_coefficients, acc_row)
            if as_float:
                for i in range(out_w):
                    values[i] = np.float32(min(max(acc_row[i] >> _PRECISION_BITS, 0), 255)) / unit
            else:
                for i in range(out_w):
                    values[i] = min(max(acc_row[i] >> _PRECISION_BITS, 0), 255)
            _store_row(rows[yy], values, channels, c, hflip)


@numba.njit(cache=True, nogil=True, inline="always")
def _store_row(row, values, channels, c, hflip):
    """One output row's values of channel ``c`` into ``row`` ([W*C], channels interleaved), mirrored if ``hflip``."""
    out_w = values.shape[0]
    if channels == 1:  # the common case: contiguous stores
        if hflip:
            for i in range(out_w):
                row[out_w - 1 - i] = values[i]
        else:
            for i in range(out_w):
                row[i] = values[i]
    else:
        for i in range(out_w):
            row[(out_w - 1 - i if hflip else i) * channels + c] = values[i]


_IDENTITY_LUT = np.arange(256, dtype=np.uint8)
# x/255 in float32 for every uint8 value: equal to ``np.divide(x, float32(255))`` element for element (ToTensor's).
_UNIT_LUT = np.divide(np.arange(256, dtype=np.uint8), np.float32(255.0), dtype=np.float32)


def transposed_planes(image: np.ndarray) -> np.ndarray:
    """The image transposed per channel, contiguous uint8 [C, W, H]: the input layout of the resize kernel."""
    _check_hwc_uint8(image)
    return _planes_transposed(image)


def resized_crop(
    image: np.ndarray,
    box: CropBox,
    size: int,
    *,
    planes_t: np.ndarray | None = None,
    as_float: bool = False,
    hflip: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``image[box]`` resized to ``size × size`` with Pillow's antialiased bilinear filter, uint8 [H, W, C] in.

    Bit-identical to ``Image.fromarray(channel).crop(box).resize((size, size), Image.BILINEAR)`` per channel under
    Pillow ≤ 12 (what the authors' torchvision ``RandomResizedCrop`` ran). Pillow 13 runs the vertical pass first when
    the height shrinks and the width does not much; its result then differs by 1 grey level in some pixels.
    ``as_float=True`` returns float32 x/255 (``ToTensor``) instead of uint8. Pass ``planes_t`` (from
    ``transposed_planes``) to share one transpose among several crops of the same image. ``hflip=True`` returns the
    crop mirrored left to right (``[:, ::-1]``), contiguous. ``out``: an array (or view) of shape [size, size, C] and
    dtype float32 (``as_float``) or uint8 to write into, e.g. one row of a batch; it is returned.
    """
    _check_hwc_uint8(image)
    if not (0 <= box.top and box.top + box.height <= image.shape[0] and 0 <= box.left
            and box.left + box.width <= image.shape[1] and box.height > 0 and box.width > 0):
        raise ValueError(f"crop box {box} lies outside the {image.shape[0]}x{image.shape[1]} image")
    planes_t = transposed_planes(image) if planes_t is None else planes_t
    channels = image.shape[2]
    dtype = np.float32 if as_float else np.uint8
    if out is None:
        out = np.empty((size, size, channels), dtype)
    elif out.shape != (size, size, channels) or out.dtype != dtype:  # the kernel does not bounds-check
        raise ValueError(f"out must be {dtype.__name__} {(size, size, channels)}, got {out.dtype} {out.shape}")
    if planes_t.shape != (channels, image.shape[1], image.shape[0]) or planes_t.dtype != np.uint8:
        raise ValueError("planes_t must be transposed_planes(image)")
    _resize_lut(planes_t, box.top, box.left, out, _UNIT_LUT if as_float else _IDENTITY_LUT, hflip,
                _coefficients(box.width, size), _coefficients(box.height, size))
    return out


def _check_hwc_uint8(image: np.ndarray) -> None:
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, C] image, got {image.dtype} with shape {image.shape}")


# --------------------------------------------------------------------------------------------------------------------
# Float conversion, blur and the augmentation chain


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [0, 1] as ``ToTensor``/``x/255.`` do: a float32 division (not a multiply by 1/255)."""
    return np.divide(image, _UNIT, dtype=np.float32)


def gaussian_kernel3(sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian for kernel size 3: exp(-x²/2σ²) at x = -1, 0, 1, normalised; float32 (computed in
    float64 with python math, which is ~20× cheaper than numpy on 3 values; within 1 ulp of torchvision's float32)."""
    side = math.exp(-0.5 / (sigma * sigma))
    total = 1.0 + 2.0 * side
    return np.array([side / total, 1.0 / total, side / total], np.float32)


def gaussian_blur3(image: np.ndarray, sigma: float, out: np.ndarray | None = None) -> np.ndarray:
    """3×3 Gaussian blur of a float32 [H, W, C] image with reflect padding (torchvision ``GaussianBlur(3)``), done as
    two 1-D passes: separable, so equal to torchvision's 2-D convolution up to float32 rounding (~1e-7). ``out``: a
    C-contiguous float32 array of the same shape, not overlapping ``image``, to write into; it is returned."""
    if image.ndim != 3 or image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"gaussian_blur3 needs an [H>=2, W>=2, C] image, got shape {image.shape}")
    edge, middle = gaussian_kernel3(sigma)[:2]
    height, width, channels = image.shape
    flat = np.ascontiguousarray(image, dtype=np.float32).reshape(height, width * channels)
    if out is None:
        out = np.empty(image.shape, np.float32)
    elif out.shape != image.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {image.shape}, got {out.dtype} {out.shape}")
    _blur3_rows(flat, out.reshape(height, width * channels), np.float32(edge), np.float32(middle), channels)
    return out


@numba.njit(cache=True, nogil=True)
def _blur3_rows(src, out, edge, middle, channels):
    """Separable 3-tap blur of [H, W*C] rows; horizontal neighbours are ``channels`` apart. Reflect padding: the
    neighbour of column 0 is column 1, of the last column the one before it (same for rows)."""
    height, row_len = src.shape
    tmp = np.empty_like(src)
    last = row_len - channels
    for y in range(height):
        row = src[y]
        h = tmp[y]
        for i in range(channels, last):
            h[i] = middle * row[i] + edge * (row[i - channels] + row[i + channels])
        for c in range(channels):
            h[c] = middle * row[c] + edge * (row[c + channels] + row[c + channels])
            h[last + c] = middle * row[last + c] + edge * (row[last + c - channels] + row[last + c - channels])
    for y in range(height):
        above = tmp[y - 1] if y > 0 else tmp[1]
        below = tmp[y + 1] if y < height - 1 else tmp[height - 2]
        centre = tmp[y]
        o = out[y]
        for i in range(row_len):
            o[i] = middle * centre[i] + edge * (above[i] + below[i])


_AUGMENT_DRAWS = 7  # hflip, blur?, sigma, vflip, rot90 k, brightness, contrast


class AugmentDraw(NamedTuple):
    """The random decisions of one ``augment`` call (None / False / 0: not applied). A NamedTuple like ``CropBox``."""

    hflip: bool
    vflip: bool
    rot90_k: int
    brightness: float | None  # multiplicative factor
    contrast: float | None  # blend factor around the crop's mean
    blur_sigma: float | None


def draw_augment(rng: np.random.Generator, params: AugmentParams) -> AugmentDraw:
    """Draws the 7 uniforms of one crop's augmentation and turns them into decisions."""
    return _augment_draw_from(rng.random(_AUGMENT_DRAWS).tolist(), params)


def _augment_draw_from(draws: list[float], params: AugmentParams) -> AugmentDraw:
    """``draw_augment`` given its 7 uniforms."""
    u_hflip, u_blur, u_sigma, u_vflip, u_rot, u_bright, u_contrast = draws
    lo, hi = params.blur_sigma
    return AugmentDraw(
        hflip=u_hflip < params.hflip_p,  # torchvision RandomHorizontalFlip: flip if rand < p
        vflip=u_vflip < params.vflip_p,
        rot90_k=int(u_rot * 4) if params.rot90 else 0,
        brightness=max(0.0, 1.0 + params.brightness * (2.0 * u_bright - 1.0)) if params.brightness > 0 else None,
        contrast=max(0.0, 1.0 + params.contrast * (2.0 * u_contrast - 1.0)) if params.contrast > 0 else None,
        blur_sigma=lo + (hi - lo) * u_sigma if u_blur <= params.blur_p else None,  # RandomApply: unless p < rand
    )


def apply_augment(crop: np.ndarray, draw: AugmentDraw, *, hflip_done: bool = False) -> np.ndarray:
    """Applies drawn decisions in the chain's order: flips, rot90, brightness, contrast, blur. Values stay in [0, 1]
    (flips and blur are convex, jitter clips). May return a view of ``crop``."""
    out = _geometric(crop[:, ::-1] if draw.hflip and not hflip_done else crop, draw)
    if draw.brightness is not None or draw.contrast is not None:
        # Contiguous before the crop's mean is taken: numpy sums a flipped or rotated view in another order, and the
        # uint8 hand-over (flips done in uint8, finish_crops) must give the same bits.
        out = np.ascontiguousarray(out)
    if draw.brightness is not None:
        out = np.clip(out * np.float32(draw.brightness), 0.0, 1.0)
    if draw.contrast is not None:
        mean = np.float32(out.mean())
        out = np.clip(mean + np.float32(draw.contrast) * (out - mean), 0.0, 1.0)
    if draw.blur_sigma is not None:
        out = gaussian_blur3(out, draw.blur_sigma)
    return out


def augment(crop: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Random flips/rotations, optional brightness/contrast jitter, then the random blur, on a float32 [S, S, C] crop.

    The paper's chain is hflip(0.5) then blur(0.2); the optional ones are off by default. Each call draws 7 uniforms.
    The result may be a (flipped) view of ``crop``.
    """
    return apply_augment(crop, draw_augment(rng, params))


def expand_crop_specs(
    size_crops: Sequence[int],
    nmb_crops: Sequence[int],
    min_scale_crops: Sequence[float],
    max_scale_crops: Sequence[float],
) -> tuple[CropSpec, ...]:
    """SwAV's per-group lists → one ``CropSpec`` per output crop, in the spec's order (group 0 first)."""
    lengths = {len(size_crops), len(nmb_crops), len(min_scale_crops), len(max_scale_crops)}
    if len(lengths) != 1:
        raise ValueError(
            "size_crops, nmb_crops, min_scale_crops and max_scale_crops must have the same length, got "
            f"{list(size_crops)}, {list(nmb_crops)}, {list(min_scale_crops)}, {list(max_scale_crops)}"
        )
    specs = []
    for size, count, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
        if not (int(size) > 0 and int(count) >= 0 and 0 < lo <= hi <= 1):
            raise ValueError(
                f"bad crop group: size={size}, count={count}, scale=({lo}, {hi}); need 0 < min <= max <= 1"
            )
        specs += [CropSpec(int(size), float(lo), float(hi))] * int(count)
    if not specs:
        raise ValueError("the multi-crop has no crops (nmb_crops sums to 0)")
    return tuple(specs)


def multi_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    specs: Sequence[CropSpec],
    params: AugmentParams | None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    boxes: list[CropBox] | None = None,
    out: Sequence[np.ndarray] | None = None,
) -> tuple[np.ndarray, ...]:
    """All crops of one uint8 [H, W, C] image as float32 [S_k, S_k, C] in [0, 1], in ``specs`` order.

    Same draws and results as ``augment(resized_crop(image, sample_crop_box(...), ...), rng, params)`` crop after crop;
    the flip and the float conversion are folded into the resize. ``params=None`` turns augmentation off. ``out``: one
    C-contiguous float32 [S_k, S_k, C] array per crop (e.g. row j of each batch array) to write into, which spares the
    batching copy. If ``boxes`` is a list, the sampled crop boxes are appended to it (a debug hook).
    """
    _check_hwc_uint8(image)
    height, width, channels = image.shape
    if out is not None:
        if len(out) != len(specs):
            raise ValueError(f"out has {len(out)} arrays for {len(specs)} crops")
        for spec, target in zip(specs, out):  # checked once here: the kernel does not bounds-check
            if (target.shape != (spec.size, spec.size, channels) or target.dtype != np.float32
                    or not target.flags.c_contiguous):
                raise ValueError(f"out arrays must be C-contiguous float32 {(spec.size, spec.size, channels)}, "
                                 f"got {target.dtype} {target.shape}")
    planes_t = _planes_transposed(image)  # one transpose shared by all crops of this image
    crops = []
    for k, (spec, (box, draw)) in enumerate(zip(specs, _planned_crops(height, width, rng, specs, params, ratio))):
        if boxes is not None:
            boxes.append(box)
        hflip = draw is not None and draw.hflip
        x_coefficients, y_coefficients = _coefficients(box.width, spec.size), _coefficients(box.height, spec.size)
        target = out[k] if out is not None else None
        if draw is None or _only_flip_and_blur(draw) and draw.blur_sigma is None:
            if target is None:
                target = np.empty((spec.size, spec.size, channels), np.float32)
            _resize_rows(planes_t, box.top, box.left, target, True, hflip, x_coefficients, y_coefficients)
            crops.append(target)
            continue
        resized = np.empty((spec.size, spec.size, channels), np.float32)
        _resize_rows(planes_t, box.top, box.left, resized, True, hflip, x_coefficients, y_coefficients)
        if _only_flip_and_blur(draw):  # the paper's chain: blur last, straight into the output row
            crops.append(gaussian_blur3(resized, draw.blur_sigma, out=target))
            continue
        result = apply_augment(resized, draw, hflip_done=True)
        if target is not None:
            target[...] = result
            result = target
        crops.append(result)
    return tuple(crops)


def _planned_crops(height: int, width: int, rng: np.random.Generator, specs: Sequence[CropSpec],
                   params: AugmentParams | None, ratio: tuple[float, float]) -> list[tuple[CropBox, AugmentDraw | None]]:
    """Each crop's box and augmentation draw, in the order ``sample_crop_box`` then ``draw_augment`` would draw them.

    All uniforms are drawn at once: one call instead of two per crop, and the same stream (a Generator's random(n)
    is n successive random() values)."""
    per_crop = _BOX_DRAWS + (0 if params is None else _AUGMENT_DRAWS)
    draws = rng.random(per_crop * len(specs)).tolist()
    plans = []
    for k, spec in enumerate(specs):
        crop_draws = draws[k * per_crop : (k + 1) * per_crop]
        box = _crop_box_from_draws(height, width, crop_draws[:_BOX_DRAWS], (spec.min_scale, spec.max_scale), ratio)
        plans.append((box, None if params is None else _augment_draw_from(crop_draws[_BOX_DRAWS:], params)))
    return plans


def _only_flip_and_blur(draw: AugmentDraw) -> bool:
    return not (draw.vflip or draw.rot90_k or draw.brightness is not None or draw.contrast is not None)


# The uint8 hand-over: crops leave the host as uint8 with every geometric augmentation done (flips and rot90 are exact
# permutations of pixels, so they commute with x/255), plus one row of photometric parameters per crop; the float
# conversion and the photometric augmentations ("finishing") run later, on the host (``finish_crops``) or on the
# accelerator (``data_pipelines.device_finish``). Columns of a photometric row, and the row that changes nothing:
PHOTOMETRIC_COLUMNS = ("brightness", "contrast_on", "contrast", "blur_edge", "blur_middle")
PHOTOMETRIC_IDENTITY = (1.0, 0.0, 1.0, 0.0, 0.0)  # brightness ×1 is exact; blur weights (0, 0) mean "no blur"


def photometric_row(draw: AugmentDraw | None) -> tuple[float, float, float, float, float]:
    """A crop's photometric parameters (``PHOTOMETRIC_COLUMNS``) from its draw; ``None`` (no augmentation): identity."""
    if draw is None:
        return PHOTOMETRIC_IDENTITY
    edge, middle = gaussian_kernel3(draw.blur_sigma)[:2] if draw.blur_sigma is not None else (0.0, 0.0)
    return (1.0 if draw.brightness is None else draw.brightness, float(draw.contrast is not None),
            1.0 if draw.contrast is None else draw.contrast, float(edge), float(middle))


def multi_crop_uint8(
    image: np.ndarray,
    rng: np.random.Generator,
    specs: Sequence[CropSpec],
    params: AugmentParams | None,
    ratio: tuple[float, float],
    out: Sequence[np.ndarray],
) -> np.ndarray:
    """``multi_crop`` stopped before the float conversion (a quarter of the bytes to hand over): writes each crop's
    uint8 resize, flipped and rotated as drawn, into ``out[k]`` ([S_k, S_k, C] uint8) and returns float32
    [n_crops, len(PHOTOMETRIC_COLUMNS)], each crop's photometric row. ``finish_crops`` then gives ``multi_crop``'s
    floats bit for bit. Same draws as ``multi_crop``, for every augmentation setting."""
    _check_hwc_uint8(image)
    height, width, channels = image.shape
    planes_t = _planes_transposed(image)
    rows = np.empty((len(specs), len(PHOTOMETRIC_COLUMNS)), np.float32)
    for k, (spec, (box, draw)) in enumerate(zip(specs, _planned_crops(height, width, rng, specs, params, ratio))):
        target = out[k]
        if target.shape != (spec.size, spec.size, channels) or target.dtype != np.uint8:
            raise ValueError(f"out[{k}] must be uint8 {(spec.size, spec.size, channels)}, got {target.dtype} "
                             f"{target.shape}")
        hflip = draw is not None and draw.hflip
        x_coefficients, y_coefficients = _coefficients(box.width, spec.size), _coefficients(box.height, spec.size)
        if draw is not None and (draw.vflip or draw.rot90_k):
            resized = np.empty_like(target)
            _resize_rows(planes_t, box.top, box.left, resized, False, hflip, x_coefficients, y_coefficients)
            target[...] = _geometric(resized, draw)
        else:
            _resize_rows(planes_t, box.top, box.left, target, False, hflip, x_coefficients, y_coefficients)
        rows[k] = photometric_row(draw)
    return rows


def _geometric(crop: np.ndarray, draw: AugmentDraw) -> np.ndarray:
    """The vertical flip and rot90 of a draw, as a view (the horizontal flip is the resize's or the caller's)."""
    if draw.vflip:
        crop = crop[::-1]
    if draw.rot90_k:
        crop = np.rot90(crop, k=draw.rot90_k, axes=(0, 1))
    return crop


def finish_crops(crops_u8: np.ndarray, photometric: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 crops [B, S, S, C] from ``multi_crop_uint8`` and their photometric rows [B, 5] → float32 x/255, then
    brightness, contrast and blur where the rows say so: what ``multi_crop`` returns for them, bit for bit. ``out``:
    a C-contiguous float32 array of the same shape to write into; it is returned."""
    if out is None:
        out = np.empty(crops_u8.shape, np.float32)
    elif out.shape != crops_u8.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {crops_u8.shape}, got {out.dtype} {out.shape}")
    photometric = np.asarray(photometric, np.float32)
    if photometric.shape != (crops_u8.shape[0], len(PHOTOMETRIC_COLUMNS)):
        raise ValueError(f"photometric rows must have shape {(crops_u8.shape[0], len(PHOTOMETRIC_COLUMNS))} "
                         f"(columns {PHOTOMETRIC_COLUMNS}), got {photometric.shape}")
    batch, height, width, channels = crops_u8.shape
    if height < 2 or width < 2:
        raise ValueError(f"crops of {height}x{width} are too small to blur")
    jitter = (photometric[:, 0] != 1) | (photometric[:, 1] != 0)
    if not jitter.any():  # the paper's chain: conversion and blur in one kernel
        _finish_rows(np.ascontiguousarray(crops_u8).reshape(batch, height, width * channels),
                     photometric[:, 3:5], out.reshape(batch, height, width * channels), channels)
        return out
    for b in range(batch):  # brightness / contrast: apply_augment's own numpy arithmetic, then its blur
        brightness, contrast_on, contrast, edge, middle = photometric[b].tolist()
        draw = AugmentDraw(hflip=False, vflip=False, rot90_k=0,
                           brightness=None if brightness == 1 else brightness,
                           contrast=contrast if contrast_on else None, blur_sigma=None)
        crop = apply_augment(to_unit_float(crops_u8[b]), draw)
        if middle != 0:
            _blur3_rows(np.ascontiguousarray(crop).reshape(height, width * channels),
                        out[b].reshape(height, width * channels), np.float32(edge), np.float32(middle), channels)
        else:
            out[b] = crop
    return out


@numba.njit(cache=True, nogil=True)
def _finish_rows(crops_u8, blur, out, channels):
    unit = np.float32(255.0)
    scratch = np.empty(crops_u8.shape[1:], np.float32)
    for b in range(crops_u8.shape[0]):
        target = scratch if blur[b, 1] != 0 else out[b]
        src = crops_u8[b]
        for y in range(src.shape[0]):
            for i in range(src.shape[1]):
                target[y, i] = np.float32(src[y, i]) / unit
        if blur[b, 1] != 0:
            _blur3_rows(scratch, out[b], blur[b, 0], blur[b, 1], channels)


# --------------------------------------------------------------------------------------------------------------------
# Inference preprocessing


def resize_float(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a float32 [H, W, C] image to ``size × size``, per channel in Pillow mode 'F'.

    This matches the authors' inference preprocessing (``Resize(128)(x / 255.)`` on a tensor) to ~1e-7.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an [H, W, C] image, got shape {image.shape}")
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
            (size, size), Image.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=-1)


def eval_preprocess(image: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 [H, W, C] → float32 x/255, then (if ``size`` is set and differs) the float antialiased bilinear resize."""
    _check_hwc_uint8(image)
    out = to_unit_float(image)
    if size is not None and (image.shape[0], image.shape[1]) != (size, size):
        out = resize_float(out, size)
    return out
