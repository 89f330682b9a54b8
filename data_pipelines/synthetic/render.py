"""Pixels: one compiled pass paints all cells of a frame, then background, uneven illumination and camera noise.

Speed comes from doing no per-frame random field work: cytoplasm texture, vacuole spots and camera noise are tiles
computed once per process (fixed seeds, so identical in every process) and read at per-cell or per-frame offsets on
the torus; the illumination field is computed once per well. The cell painter is a Numba loop over the rotated
ellipse that bounds each cell, in squared radius, with the outline from a small per-cell table (no sqrt, no atan2
per pixel); per row, a branch-free vectorised pass computes the outline coordinate of every pixel before the
painting pass (see _paint_cells). Scratch buffers live with the renderer, not per frame. Cells are added, not
layered, so overlapping halos brighten the borders between touching cells as in a confluent phase-contrast image.
Last, the frame gets the original data's preprocessing sharpening (PIL SHARPEN, original_method.md §1.2), which
gives the crisp halos and grain of the real images. No fastmath: identical bytes run to run.
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
FRAME_WRAP = IMAGE_SIZE - 1  # power-of-two sizes: `& WRAP` wraps negative indices too; as constants the compiled
TILE_WRAP = TILE - 1  # code knows the result is >= 0 and drops Numba's negative-index fix-up on every read/write
if IMAGE_SIZE & FRAME_WRAP or TILE & TILE_WRAP or NOISE_TILE & (NOISE_TILE - 1):
    raise ValueError("render.py needs power-of-two IMAGE_SIZE, TILE and NOISE_TILE")


@kernel
def _outline_basis(n):  # pragma: no cover - compiled
    """(n + 1, 8) cos/sin of the 2nd, 3rd, 5th and 6th harmonics at the diamond angles d = k·4/n (a cheap monotone
    stand-in for θ). The same for every cell, so computed once instead of per cell (identical arithmetic)."""
    basis = np.empty((n + 1, 8))
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
        basis[k, 0], basis[k, 1], basis[k, 2], basis[k, 3] = c2, s2, c3, s3
        basis[k, 4], basis[k, 5], basis[k, 6], basis[k, 7] = c5, s5, c6, s6
    return basis


@functools.lru_cache(maxsize=1)
def outline_basis() -> np.ndarray:
    return _outline_basis(N_ANGLES)


@helper
def _outline_table(h, basis, table, slope):  # pragma: no cover - compiled
    """table[k] = 1 / f(angle_k)^2 for the outline f = 1 + Σ h·basis[k] (floored at 0.35), slope[k] = table[k+1] -
    table[k] for the interpolation; returns (min f, max f)."""
    f_lo = 1e9
    f_hi = 0.0
    for k in range(N_ANGLES + 1):
        b = basis[k]
        f = (1.0 + h[0] * b[0] + h[1] * b[1] + h[2] * b[2] + h[3] * b[3]  # summed left to right, as before
             + h[4] * b[4] + h[5] * b[5] + h[6] * b[6] + h[7] * b[7])
        f = max(f, 0.35)
        table[k] = 1.0 / (f * f)
        f_lo = min(f_lo, f)
        f_hi = max(f_hi, f)
    for k in range(N_ANGLES):
        slope[k] = table[k + 1] - table[k]
    slope[N_ANGLES] = 0.0
    return f_lo, f_hi


@kernel
def _paint_cells(params, basis, texture, vacuoles, accum, mask, cover):  # pragma: no cover - compiled
    """Add every cell's grey-level profile into accum; set mask/cover where the cell body lies.

    Works in squared normalised radius s = (r / f(θ))^2, with r the elliptic radius and f the outline, so no
    pixel needs a square root or a trigonometric function: f comes from a per-cell table over the diamond angle.
    Each cell is visited only inside the rotated ellipse that bounds its halo, solved per row; each row is three
    runs: the core (pixels surely inside the body, away from the rim: no outline at all) and the outline runs left
    and right of it. An outline run first computes s for all its pixels without a branch (the angle's division
    vectorises; the table lookups follow in a second loop), then paints; so the painting branches wait on a loaded
    s, not on a ~40-cycle chain of division and lookups, which made every mispredicted branch expensive. The
    nucleus test runs only on the columns of the row that its disc can reach."""
    table = np.empty(N_ANGLES + 1)
    slope = np.empty(N_ANGLES + 1)
    run_r2 = np.empty(2 * IMAGE_SIZE)  # per-run scratch: elliptic r^2, table position, s
    run_pos = np.empty(2 * IMAGE_SIZE)
    run_s = np.empty(2 * IMAGE_SIZE)
    ramp = np.arange(2 * IMAGE_SIZE).astype(np.float64)  # 0, 1, 2, ... as floats: dx without int->float per pixel
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
        has_vac = vac_amp != 0.0
        in_mask = params[i, D_MASK] > 0.5
        in_cover = params[i, D_COVER] > 0.5
        inv_a = 1.0 / params[i, D_A]
        inv_b = 1.0 / params[i, D_B]
        f_lo, f_hi = _outline_table(params[i, D_HARM : D_HARM + 8], basis, table, slope)
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
        # The nucleus is a disc of radius nr (the cell frame is a rotation of the image's): its centre in image
        # offsets, and a reach one pixel wider than nr, beyond which q <= 0 whatever the rounding.
        ndx = nu * ca - nv * sa
        ndy = nu * sa + nv * ca
        reach = nr + 1.0
        for py in range(y0, y1 + 1):
            dy = py + 0.5 - cy
            disc = beta * beta * dy * dy - alpha * (gamma * dy * dy - 1.0)
            if disc <= 0.0:
                continue
            root = math.sqrt(disc)
            x0 = int(math.floor(cx + (-beta * dy - root) / alpha - 0.5))
            x1 = int(math.ceil(cx + (-beta * dy + root) / alpha - 0.5))
            if x1 - x0 + 1 > ramp.shape[0]:  # wider than any cell we draw; grow the scratch rather than overrun it
                ramp = np.arange(2 * (x1 - x0 + 1)).astype(np.float64)
                run_r2 = np.empty(ramp.shape[0])
                run_pos = np.empty(ramp.shape[0])
                run_s = np.empty(ramp.shape[0])
            # Pixels strictly inside the core (whole pixel centres) skip the outline: a contiguous run per row.
            disc_core = beta * beta * dy * dy - alpha * (gamma * dy * dy - core_scale)
            if disc_core > 0.0:
                root_core = math.sqrt(disc_core)
                xc0 = max(x0, int(math.ceil(cx + (-beta * dy - root_core) / alpha - 0.5)) + 1)
                xc1 = min(x1, int(math.floor(cx + (-beta * dy + root_core) / alpha - 0.5)) - 1)
            else:
                xc0, xc1 = 1, 0
            if xc0 > xc1:  # no core in this row: one outline run
                xc0, xc1 = x1 + 1, x1
            nx0, nx1 = 1, 0  # columns the nucleus can reach in this row
            ey = dy - ndy
            if inv_nr2 > 0.0 and abs(ey) < reach:
                half = math.sqrt(reach * reach - ey * ey)
                nx0 = int(math.floor(cx + ndx - half - 0.5))
                nx1 = int(math.ceil(cx + ndx + half - 0.5))
            dy_sa = dy * sa  # u = dx·cos + dy·sin, v = -dx·sin + dy·cos
            dy_ca = dy * ca
            acc_row = accum[py & FRAME_WRAP]
            mask_row = mask[py & FRAME_WRAP]
            cover_row = cover[py & FRAME_WRAP]
            tex_row = (py + ty) & TILE_WRAP
            tex = texture[tex_row]
            vac = vacuoles[tex_row]
            nucleoli = vacuoles[(tex_row + 97) & TILE_WRAP]
            for run in range(3):
                if run == 0:
                    a0, a1, core = xc0, xc1, True
                elif run == 1:
                    a0, a1, core = x0, xc0 - 1, False
                else:
                    a0, a1, core = xc1 + 1, x1, False
                n_run = a1 - a0 + 1
                if n_run <= 0:
                    continue
                if not core:
                    dx0 = a0 + 0.5 - cx
                    for j in range(n_run):  # elliptic radius and diamond angle: no branch, no gather
                        dx = dx0 + ramp[j]
                        eu = (dx * ca + dy_sa) * inv_a
                        ev = (dy_ca - dx * sa) * inv_b
                        au = abs(eu)
                        av = abs(ev)
                        t = av / (au + av + 1e-12)
                        d = (t if ev >= 0.0 else 4.0 - t) if eu >= 0.0 else (2.0 - t if ev >= 0.0 else 2.0 + t)
                        run_r2[j] = eu * eu + ev * ev
                        run_pos[j] = d * (N_ANGLES / 4.0)
                    for j in range(n_run):  # s from the outline table; inf past the bounding ellipse
                        r2 = run_r2[j]
                        pos = run_pos[j]
                        k = min(int(pos), N_ANGLES - 1)
                        s = r2 * (table[k] + (pos - k) * slope[k])
                        run_s[j] = math.inf if r2 >= r_out2 else (0.0 if r2 < core2 else s)
                for j in range(n_run):
                    px = a0 + j
                    s = 0.0 if core else run_s[j]
                    if s >= halo_s:
                        continue
                    col = px & FRAME_WRAP
                    if s < 1.0:
                        tex_col = (px + tx) & TILE_WRAP
                        val = body + tex_amp * tex[tex_col]
                        if s > rim_s:
                            e = (s - rim_s) * inv_rim
                            val -= rim * e * e
                        if nx0 <= px <= nx1:
                            dx = px + 0.5 - cx
                            du = (dx * ca + dy_sa) - nu
                            dv = (dy_ca - dx * sa) - nv
                            q = 1.0 - (du * du + dv * dv) * inv_nr2
                            if q > 0.0:  # darker nucleus with darker nucleoli (the vacuole spots, shifted)
                                val += nuc_amp * q * (1.0 + 2.5 * nucleoli[(tex_col + 53) & TILE_WRAP])
                        if has_vac:
                            val += vac_amp * vac[tex_col]
                        if in_mask:
                            mask_row[col] = 255
                        if in_cover:
                            cover_row[col] = 1
                    else:
                        q = 1.0 - (s - 1.0) * inv_halo
                        val = halo * q * q
                    acc_row[col] += val


@kernel
def _expose(accum, illumination, background, gain, noise, noise_amp, oy, ox, pad, out):  # pragma: no cover
    """Background + cells, times the illumination, plus camera noise; then the original data's preprocessing
    sharpening (PIL ImageFilter.SHARPEN: 3×3 kernel, centre 32, others -2, /16, i.e. (34·v - 2·box3×3)/16; edges
    replicated) and rounding to uint8. pad: (size + 2)² float32 scratch.

    Rows are read in contiguous runs (the noise row split where its tile wraps) and the rounding stays in floats,
    so the loops vectorise; the 3×3 box is summed as float32 column triples then row triples, in that order, as the
    reference formulation does."""
    size = accum.shape[0]
    nsize = noise.shape[0]
    split = min(size, nsize - ox)  # columns before the noise row wraps
    for y in range(size):
        noise_row = noise[(y + oy) & (nsize - 1)]
        acc_row = accum[y]
        ill_row = illumination[y]
        pad_row = pad[y + 1]
        head = noise_row[ox:]  # slices, so that every loop indexes from 0: no negative-index fix-up, it vectorises
        for x in range(split):
            pad_row[x + 1] = (background + acc_row[x]) * ill_row[x] * gain + noise_amp * head[x]
        acc_tail = acc_row[split:]
        ill_tail = ill_row[split:]
        pad_tail = pad_row[split + 1 :]
        for x in range(size - split):
            pad_tail[x] = (background + acc_tail[x]) * ill_tail[x] * gain + noise_amp * noise_row[x]
        pad_row[0] = pad_row[1]
        pad_row[size + 1] = pad_row[size]
    pad[0, :] = pad[1, :]
    pad[size + 1, :] = pad[size, :]
    cols = np.empty(size + 2, np.float32)
    for y in range(size):
        above = pad[y]
        centre = pad[y + 1]
        below = pad[y + 2]
        for x in range(size + 2):
            cols[x] = above[x] + centre[x] + below[x]
        out_row = out[y]
        for x in range(size):
            box = cols[x] + cols[x + 1] + cols[x + 2]
            v = np.floor((34.0 * centre[x + 1] - 2.0 * box) / 16.0 + 0.5)  # np: stays a float (math.floor: int)
            out_row[x] = np.uint8(min(255.0, max(0.0, v)))


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit hash of x (cheap per-frame randomness, no generator state)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class FrameRenderer:
    """Renders frames of one field of view: holds the well's constant parts (illumination, dust, grey levels) and
    the float scratch buffers, reused frame to frame (a fresh 256 KiB array per frame costs page faults)."""

    def __init__(self, rng: np.random.Generator, texture_sigma_px: float, dust: np.ndarray):
        self.texture = texture_tile(float(texture_sigma_px))
        self.vacuoles = vacuole_tile()
        self.noise = noise_tile()
        self.basis = outline_basis()
        self.illumination = illumination_field(rng)
        self.background = float(rng.uniform(118.0, 132.0))
        self.noise_amp = float(rng.uniform(1.3, 2.0))  # ×~1.6 after sharpening
        self.frame_key = int(rng.integers(0, 2**62))
        self.dust = dust
        self._accum = np.empty((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        self._cover = np.empty((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        self._pad = np.empty((IMAGE_SIZE + 2, IMAGE_SIZE + 2), np.float32)

    def render(self, rows: np.ndarray, time_h: float) -> tuple[np.ndarray, np.ndarray, float]:
        """(image uint8, mask uint8 0/255, confluence = fraction of pixels under a live cell body).

        The frame's camera noise offset and exposure flicker hash (well, time): the same frame whatever the cadence."""
        if rows.shape[1] != N_PARAMS:
            raise ValueError(f"drawing rows must have {N_PARAMS} columns, got {rows.shape[1]}")
        params = np.ascontiguousarray(np.concatenate([rows, self.dust]), dtype=np.float32)
        accum, cover = self._accum, self._cover
        accum.fill(0.0)
        cover.fill(0)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        _paint_cells(params, self.basis, self.texture, self.vacuoles, accum, mask, cover)
        bits = _mix64(self.frame_key ^ (int(round(time_h * 10)) + 100_000))
        oy, ox = bits % NOISE_TILE, (bits >> 16) % NOISE_TILE
        gain = 1.0 + 0.02 * (((bits >> 32) & 0xFFFF) / 65535.0 - 0.5)  # ±1% exposure flicker
        image = np.empty((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        _expose(accum, self.illumination, self.background, gain, self.noise, self.noise_amp, oy, ox, self._pad, image)
        return image, mask, float(np.count_nonzero(cover)) / cover.size
