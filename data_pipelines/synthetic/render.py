"""Pixels: one compiled pass paints all cells of a frame, then background, uneven illumination and camera noise.

Speed comes from doing no per-frame random field work: cytoplasm texture, vacuole spots and camera noise are tiles
computed once per process (fixed seeds, so identical in every process) and read at per-cell or per-frame offsets on
the torus; the illumination field is computed once per well. The cell painter is a Numba loop over the rotated
ellipse that bounds each cell, in squared radius, with the outline from a small per-cell table (no sqrt, no atan2
per pixel). Cells are added, not layered, so overlapping halos brighten the borders between touching cells as in a
confluent phase-contrast image. Last, the frame gets the original data's preprocessing sharpening (PIL SHARPEN,
original_method.md §1.2), which gives the crisp halos and grain of the real images. No fastmath: identical bytes
run to run.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .appearance import (
    D_A, D_B, D_BODY, D_COS, D_COVER, D_CX, D_CY, D_HALO, D_HALO_W, D_HARM, D_MASK, D_NUC_AMP, D_NUC_R, D_NUC_U,
    D_NUC_V, D_RIM, D_RIM_W, D_SIN, D_TEX_AMP, D_TEX_X, D_TEX_Y, D_VAC_AMP, N_PARAMS,
)
from .design import IMAGE_SIZE
from .jit import helper, kernel

NOISE_TILE = 512  # camera-noise tile, read at a random offset per frame
TILE = 128  # texture tiles: small enough to stay in cache, read at random offsets per cell
_TILE_SEED = 20220309  # fixed: tiles are part of the renderer, not of an experiment's randomness


def _bandpass_noise(size: int, sigma: float, seed: int) -> np.ndarray:
    """Unit-variance Gaussian noise with grain ~sigma px (difference of Gaussians in Fourier space), periodic."""
    white = np.random.default_rng(seed).standard_normal((size, size))
    k = np.fft.fftfreq(size)
    k2 = (k[:, None] ** 2 + k[None, :] ** 2) * (2 * math.pi) ** 2
    band = np.exp(-0.5 * k2 * sigma**2) - np.exp(-0.5 * k2 * (2.0 * sigma) ** 2)
    field = np.fft.ifft2(np.fft.fft2(white) * band).real
    return (field / field.std()).astype(np.float32)


@functools.lru_cache(maxsize=64)
def texture_tile(sigma_px: float) -> np.ndarray:
    """Cytoplasm texture of a given grain size."""
    return _bandpass_noise(TILE, sigma_px, _TILE_SEED + int(round(sigma_px * 100)))


@functools.lru_cache(maxsize=1)
def vacuole_tile() -> np.ndarray:
    """Sparse round spots, bright with a dark ring (peak ~1), about one per 150 px²: vacuoles/granules inside
    cell bodies (and, shifted, nucleoli inside nuclei)."""
    rng = np.random.default_rng(_TILE_SEED + 1)
    impulses = np.zeros((TILE, TILE))
    n = TILE * TILE // 150
    impulses[rng.integers(0, TILE, n), rng.integers(0, TILE, n)] = rng.uniform(0.7, 1.0, n)
    k = np.fft.fftfreq(TILE)
    k2 = (k[:, None] ** 2 + k[None, :] ** 2) * (2 * math.pi) ** 2
    spot = np.exp(-0.5 * k2 * 1.2**2) - 0.35 * np.exp(-0.5 * k2 * 2.4**2)  # centre bright, ring dark
    field = np.fft.ifft2(np.fft.fft2(impulses) * spot).real
    return (field / np.quantile(field, 0.999)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def noise_tile() -> np.ndarray:
    """Camera noise: unit-variance, correlated over ~1 px (the optics' blur)."""
    white = np.random.default_rng(_TILE_SEED + 2).standard_normal((NOISE_TILE, NOISE_TILE))
    k = np.fft.fftfreq(NOISE_TILE)
    k2 = (k[:, None] ** 2 + k[None, :] ** 2) * (2 * math.pi) ** 2
    field = np.fft.ifft2(np.fft.fft2(white) * np.exp(-0.5 * k2 * 0.6**2)).real
    return (field / field.std()).astype(np.float32)


def illumination_field(rng: np.random.Generator) -> np.ndarray:
    """Multiplicative gain of one well: a random tilt and an off-centre vignette, about ±6%."""
    u = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE - 0.5
    gx, gy = rng.normal(0.0, 0.05, 2)
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    vignette = rng.uniform(0.05, 0.15)
    field = 1.0 + gx * u[None, :] + gy * u[:, None] - vignette * ((u[None, :] - cx) ** 2 + (u[:, None] - cy) ** 2)
    return (field / field.mean()).astype(np.float32)


N_ANGLES = 64  # outline table resolution per cell (over the "diamond angle", 0..4 around the circle)


@helper
def _outline_table(h, table):  # pragma: no cover - compiled
    """table[k] = 1 / f(angle_k)^2 for the outline f(θ) = 1 + Σ harmonics, sampled on the diamond angle
    d = k·4/N (a cheap monotone stand-in for θ); returns (min f, max f)."""
    n = table.shape[0] - 1
    f_lo = 1e9
    f_hi = 0.0
    for k in range(n + 1):
        d = 4.0 * k / n
        if d < 1.0:
            x, y = 1.0 - d, d
        elif d < 2.0:
            x, y = 1.0 - d, 2.0 - d
        elif d < 3.0:
            x, y = d - 3.0, 2.0 - d
        else:
            x, y = d - 3.0, d - 4.0
        norm = math.sqrt(x * x + y * y)
        c1 = x / norm
        s1 = y / norm
        c2 = c1 * c1 - s1 * s1
        s2 = 2.0 * c1 * s1
        c3 = c1 * (4.0 * c1 * c1 - 3.0)
        s3 = s1 * (3.0 - 4.0 * s1 * s1)
        c5 = c2 * c3 - s2 * s3
        s5 = s2 * c3 + c2 * s3
        c6 = 2.0 * c3 * c3 - 1.0
        s6 = 2.0 * s3 * c3
        f = 1.0 + h[0] * c2 + h[1] * s2 + h[2] * c3 + h[3] * s3 + h[4] * c5 + h[5] * s5 + h[6] * c6 + h[7] * s6
        f = max(f, 0.35)
        table[k] = 1.0 / (f * f)
        f_lo = min(f_lo, f)
        f_hi = max(f_hi, f)
    return f_lo, f_hi


@kernel
def _paint_cells(params, texture, vacuoles, accum, mask, cover):  # pragma: no cover - compiled
    """Add every cell's grey-level profile into accum; set mask/cover where the cell body lies.

    Works in squared normalised radius s = (r / f(θ))^2, with r the elliptic radius and f the outline, so no
    pixel needs a square root or a trigonometric function: f comes from a per-cell table over the diamond angle.
    Each cell is visited only inside the rotated ellipse that bounds its halo (solved per row)."""
    size = accum.shape[0]
    wrap = size - 1  # size is a power of two: & wraps negative indices too
    twrap = texture.shape[0] - 1
    table = np.empty(N_ANGLES + 1)
    for i in range(params.shape[0]):
        cx = params[i, D_CX]
        cy = params[i, D_CY]
        ca = params[i, D_COS]
        sa = params[i, D_SIN]
        body = params[i, D_BODY]
        tex_amp = params[i, D_TEX_AMP]
        tx = int(params[i, D_TEX_X])
        ty = int(params[i, D_TEX_Y])
        rim = params[i, D_RIM]
        rim_w = params[i, D_RIM_W]
        halo = params[i, D_HALO]
        halo_w = params[i, D_HALO_W]
        nu = params[i, D_NUC_U]
        nv = params[i, D_NUC_V]
        nr = params[i, D_NUC_R]
        inv_nr2 = 1.0 / (nr * nr) if nr > 0.0 else 0.0
        nuc_amp = params[i, D_NUC_AMP]
        vac_amp = params[i, D_VAC_AMP]
        in_mask = params[i, D_MASK] > 0.5
        in_cover = params[i, D_COVER] > 0.5
        inv_a = 1.0 / params[i, D_A]
        inv_b = 1.0 / params[i, D_B]
        f_lo, f_hi = _outline_table(params[i, D_HARM : D_HARM + 8], table)
        rim_s = (1.0 - rim_w) ** 2  # body pixels with s above this are in the dark rim
        halo_s = (1.0 + halo_w) ** 2  # halo pixels have 1 <= s < halo_s
        inv_rim = 1.0 / (1.0 - rim_s)
        inv_halo = 1.0 / (halo_s - 1.0)
        core2 = f_lo * f_lo * rim_s  # elliptic r^2 below this: body, away from the rim, whatever the angle
        r_out = (1.0 + halo_w) * f_hi
        r_out2 = r_out * r_out
        # Bounding ellipse in image coordinates: alpha dx^2 + 2 beta dx dy + gamma dy^2 <= 1.
        ia = inv_a / r_out
        ib = inv_b / r_out
        alpha = ca * ca * ia * ia + sa * sa * ib * ib
        beta = ca * sa * (ia * ia - ib * ib)
        gamma = sa * sa * ia * ia + ca * ca * ib * ib
        dy_max = math.sqrt(alpha / (alpha * gamma - beta * beta))
        y0 = int(math.floor(cy - dy_max - 0.5))
        y1 = int(math.ceil(cy + dy_max - 0.5))
        core_scale = core2 / r_out2  # the core ellipse is the bounding one shrunk by this (squared)
        for py in range(y0, y1 + 1):
            dy = py + 0.5 - cy
            disc = beta * beta * dy * dy - alpha * (gamma * dy * dy - 1.0)
            if disc <= 0.0:
                continue
            root = math.sqrt(disc)
            x0 = int(math.floor(cx + (-beta * dy - root) / alpha - 0.5))
            x1 = int(math.ceil(cx + (-beta * dy + root) / alpha - 0.5))
            # Pixels strictly inside the core (whole pixel centres) skip the outline: a contiguous run per row.
            disc_core = beta * beta * dy * dy - alpha * (gamma * dy * dy - core_scale)
            if disc_core > 0.0:
                root_core = math.sqrt(disc_core)
                xc0 = int(math.ceil(cx + (-beta * dy - root_core) / alpha - 0.5)) + 1
                xc1 = int(math.floor(cx + (-beta * dy + root_core) / alpha - 0.5)) - 1
            else:
                xc0, xc1 = 1, 0
            row = py & wrap
            tex_row = (py + ty) & twrap
            for px in range(x0, x1 + 1):
                dx = px + 0.5 - cx
                u = dx * ca + dy * sa
                v = -dx * sa + dy * ca
                if xc0 <= px <= xc1:
                    s = 0.0
                else:
                    eu = u * inv_a
                    ev = v * inv_b
                    r2 = eu * eu + ev * ev
                    if r2 >= r_out2:
                        continue
                    if r2 < core2:
                        s = 0.0
                    else:
                        au = abs(eu)
                        av = abs(ev)
                        t = av / (au + av + 1e-12)
                        if eu >= 0.0:
                            d = t if ev >= 0.0 else 4.0 - t
                        else:
                            d = 2.0 - t if ev >= 0.0 else 2.0 + t
                        pos = d * (N_ANGLES / 4.0)
                        k = int(pos)
                        if k >= N_ANGLES:
                            k = N_ANGLES - 1
                        w = pos - k
                        s = r2 * (table[k] + w * (table[k + 1] - table[k]))
                        if s >= halo_s:
                            continue
                col = px & wrap
                if s < 1.0:
                    tex_col = (px + tx) & twrap
                    val = body + tex_amp * texture[tex_row, tex_col]
                    if s > rim_s:
                        e = (s - rim_s) * inv_rim
                        val -= rim * e * e
                    if inv_nr2 > 0.0:
                        du = u - nu
                        dv = v - nv
                        q = 1.0 - (du * du + dv * dv) * inv_nr2
                        if q > 0.0:  # darker nucleus with darker nucleoli (the vacuole spots, shifted)
                            val += nuc_amp * q * (1.0 + 2.5 * vacuoles[(tex_row + 97) & twrap, (tex_col + 53) & twrap])
                    if vac_amp != 0.0:
                        val += vac_amp * vacuoles[tex_row, tex_col]
                    if in_mask:
                        mask[row, col] = 255
                    if in_cover:
                        cover[row, col] = 1
                else:
                    q = 1.0 - (s - 1.0) * inv_halo
                    val = halo * q * q
                accum[row, col] += val


@kernel
def _expose(accum, illumination, background, gain, noise, noise_amp, oy, ox, out):  # pragma: no cover - compiled
    """Background + cells, times the illumination, plus camera noise; then the original data's preprocessing
    sharpening (PIL ImageFilter.SHARPEN: 3×3 kernel, centre 32, others -2, /16, i.e. (34·v - 2·box3×3)/16; edges
    replicated) and rounding to uint8."""
    size = accum.shape[0]
    nwrap = noise.shape[0] - 1
    pad = np.empty((size + 2, size + 2), np.float32)
    for y in range(size):
        noise_row = (y + oy) & nwrap
        for x in range(size):
            v = (background + accum[y, x]) * illumination[y, x] * gain
            pad[y + 1, x + 1] = v + noise_amp * noise[noise_row, (x + ox) & nwrap]
    pad[0, :] = pad[1, :]
    pad[size + 1, :] = pad[size, :]
    pad[:, 0] = pad[:, 1]
    pad[:, size + 1] = pad[:, size]
    cols = pad[:-2, :] + pad[1:-1, :] + pad[2:, :]  # vertical 3-sums
    for y in range(size):
        for x in range(size):
            box = cols[y, x] + cols[y, x + 1] + cols[y, x + 2]
            v = math.floor((34.0 * pad[y + 1, x + 1] - 2.0 * box) / 16.0 + 0.5)
            out[y, x] = np.uint8(min(255.0, max(0.0, v)))


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of x (cheap per-frame randomness, no generator state)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class FrameRenderer:
    """Renders frames of one field of view: holds the well's constant parts (illumination, dust, grey levels)."""

    def __init__(self, rng: np.random.Generator, texture_sigma_px: float, dust: np.ndarray):
        self.texture = texture_tile(float(texture_sigma_px))
        self.vacuoles = vacuole_tile()
        self.noise = noise_tile()
        self.illumination = illumination_field(rng)
        self.background = float(rng.uniform(118.0, 132.0))
        self.noise_amp = float(rng.uniform(1.3, 2.0))  # ×~1.6 after sharpening
        self.frame_key = int(rng.integers(0, 2**62))
        self.dust = dust

    def render(self, rows: np.ndarray, time_h: float) -> tuple[np.ndarray, np.ndarray, float]:
        """(image uint8, mask uint8 0/255, confluence = fraction of pixels under a live cell body).

        The frame's camera noise offset and exposure flicker hash (well, time): the same frame whatever the cadence."""
        if rows.shape[1] != N_PARAMS:
            raise ValueError(f"drawing rows must have {N_PARAMS} columns, got {rows.shape[1]}")
        params = np.ascontiguousarray(np.concatenate([rows, self.dust]), dtype=np.float32)
        accum = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        cover = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        _paint_cells(params, self.texture, self.vacuoles, accum, mask, cover)
        bits = _mix64(self.frame_key ^ (int(round(time_h * 10)) + 100_000))
        oy, ox = bits % NOISE_TILE, (bits >> 16) % NOISE_TILE
        gain = 1.0 + 0.02 * (((bits >> 32) & 0xFFFF) / 65535.0 - 0.5)  # ±1% exposure flicker
        image = np.empty((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        _expose(accum, self.illumination, self.background, gain, self.noise, self.noise_amp, oy, ox, image)
        return image, mask, float(np.count_nonzero(cover)) / cover.size


