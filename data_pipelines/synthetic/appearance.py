"""How a cell looks: from the population's table to one row of drawing parameters per cell, signatures included.

The drawing model (render.py) paints each cell as a distorted ellipse in phase-contrast style: a textured body
(`body` grey offset, `tex_amp` texture), a darker rim just inside the edge, a bright halo just outside it, a nucleus
and optional vacuole/granule spots. Rounded cells (mitotic, dying, or a drug's 'rounding') are compact, bright and
strongly haloed, as in phase contrast.

Signature strength of a cell: s = clip(activity(t) × w_sig, 0, 1), activity as in population.drug_activity, w_sig
the cell's own 0.75-1.25 factor. A cell *carries* the signature (mask 255) where s ≥ SIGNATURE_VISIBLE and the cell is
live, mitotic or dying (not debris). Effects on the drawing at s = 1:
- rounding: 85% of the way to a bright compact ball;
- enlargement: spread area × 2.6 (giant, flat cells; texture a bit fainter);
- elongation: aspect ratio + 2.5 (spindles);
- granularity: bright ringed vacuoles inside the body;
- fragmentation: blebbed outline (5th/6th harmonics at 0.22), dark granules, 15% smaller.
"""

from __future__ import annotations

import math

import numpy as np

from .design import IMAGE_SIZE
from .jit import kernel
from .population import (
    AGE, ANGLE, AREA0, ASPECT, DEAD_R, DEBRIS, DYING, F0, H0, LIFE_H, MITOTIC, NUC_U, NUC_V, PACKED_AREA, PHASE,
    STATE, T_STATE, TEX_X, TEX_Y, TONE, W_SIG, X, Y, Population,
)

SIGNATURE_VISIBLE = 0.25
SIGNATURE_CODES = {"none": 0, "rounding": 1, "enlargement": 2, "elongation": 3, "granularity": 4, "fragmentation": 5}

# Columns of a drawing row (module-level ints: compiled code sees them as constants; render.py reads them too).
D_CX, D_CY = 0, 1  # centre (px)
D_A, D_B = 2, 3  # semi-axes (px)
D_COS, D_SIN = 4, 5  # orientation
D_HARM = 6  # 8 outline harmonics: columns 6..13
D_BODY, D_TEX_AMP, D_TEX_X, D_TEX_Y = 14, 15, 16, 17  # body grey offset, texture amplitude and offset
D_RIM, D_RIM_W = 18, 19  # dark rim depth and width (fraction of the radius)
D_HALO, D_HALO_W = 20, 21  # bright halo height and width (fraction of the radius)
D_NUC_U, D_NUC_V, D_NUC_R, D_NUC_AMP = 22, 23, 24, 25  # nucleus offset (px, cell frame), radius, grey offset
D_VAC_AMP = 26  # vacuole (+) or granule (-) spots
D_MASK, D_COVER = 27, 28  # 1 where the body counts for the signature mask / for confluence
N_PARAMS = 29


@kernel
def _drawing_rows(cells, activity, signature, body_level, texture_amp, halo, out):  # pragma: no cover - compiled
    """Fill out[i] with the drawing parameters of cells[i] (see the module docstring for the model)."""
    n = cells.shape[0]
    enlarge_gain = 1.6 if signature == 2 else 0.0
    packed = 0.0
    for i in range(n):
        if cells[i, STATE] <= MITOTIC:
            w = min(1.0, max(0.0, activity * cells[i, W_SIG]))
            packed += cells[i, AREA0] * (1.0 + min(cells[i, PHASE], 1.0)) * (1.0 + enlarge_gain * w)
    squeeze = min(1.0, PACKED_AREA / max(packed / (IMAGE_SIZE * IMAGE_SIZE), 1e-9))
    for i in range(n):
        st = cells[i, STATE]
        dying = st == DYING
        debris = st == DEBRIS
        strength = min(1.0, max(0.0, activity * cells[i, W_SIG]))
        rounding = strength if signature == 1 else 0.0
        enlargement = strength if signature == 2 else 0.0
        elongation = strength if signature == 3 else 0.0
        granularity = strength if signature == 4 else 0.0
        fragmentation = strength if signature == 5 else 0.0

        # Size: spread area (grows through the cycle), enlarged by the signature, compressed when packed.
        area = cells[i, AREA0] * (1.0 + min(cells[i, PHASE], 1.0)) * (1.0 + 1.6 * enlargement) * squeeze
        radius = math.sqrt(area / math.pi)
        # Roundness: newborn daughters spread out over ~2 h; mitotic and dying cells are balls.
        rnd = max(0.7 * min(1.0, max(0.0, 1.0 - cells[i, AGE] / 2.0)), 0.85 * rounding)
        if st == MITOTIC:
            rnd = 1.0
        radius *= (1.0 - 0.45 * rnd) * (1.0 - 0.15 * fragmentation)
        aspect = 1.0 + (cells[i, ASPECT] - 1.0 + 2.5 * elongation) * (1.0 - rnd)
        life = 0.0
        if dying:
            life = min(1.0, max(0.0, cells[i, T_STATE] / max(cells[i, LIFE_H], 1e-6)))
            radius = cells[i, DEAD_R] * (1.0 - 0.35 * life)
            aspect = 1.08
            rnd = 1.0
        elif debris:
            radius = cells[i, DEAD_R]
            aspect = cells[i, ASPECT]
            rnd = 1.0
        a = radius * math.sqrt(aspect)
        b = radius / math.sqrt(aspect)
        out[i, D_CX] = cells[i, X]
        out[i, D_CY] = cells[i, Y]
        out[i, D_A] = a
        out[i, D_B] = b
        out[i, D_COS] = math.cos(cells[i, ANGLE])
        out[i, D_SIN] = math.sin(cells[i, ANGLE])
        for k in range(8):
            h = cells[i, H0 + k] * (1.0 - rnd)
            if k >= 4:
                h += 0.22 * fragmentation * cells[i, F0 + k - 4]
            out[i, D_HARM + k] = 0.03 * cells[i, H0 + k] if dying else h

        # Grey levels: spread cells are near background with texture; balls are darker inside with a strong halo.
        fade = 1.0 - 0.55 * life
        halo_px = 1.2 if debris else 2.4 + 1.6 * rnd
        out[i, D_BODY] = cells[i, TONE] if debris else (body_level - 12.0 * rnd) * fade
        out[i, D_TEX_AMP] = 0.0 if debris else 0.8 * texture_amp * (1.0 + 0.8 * rnd) * (1.0 - 0.3 * enlargement)
        out[i, D_TEX_X] = cells[i, TEX_X]
        out[i, D_TEX_Y] = cells[i, TEX_Y]
        out[i, D_RIM] = 25.0 if debris else 0.8 * halo + 35.0 * rnd
        out[i, D_RIM_W] = min(0.45, max(0.08, 2.0 / max(radius, 1.0)))
        out[i, D_HALO] = 20.0 if debris else halo * (1.0 + 1.1 * rnd) * fade
        out[i, D_HALO_W] = halo_px / max(radius, 0.5)
        out[i, D_NUC_U] = cells[i, NUC_U] * a
        out[i, D_NUC_V] = cells[i, NUC_V] * b
        out[i, D_NUC_R] = 0.0 if (dying or debris) else 0.45 * min(a, b) * (1.0 - 0.5 * rnd)
        out[i, D_NUC_AMP] = -16.0
        out[i, D_VAC_AMP] = 80.0 * granularity - 40.0 * fragmentation
        out[i, D_MASK] = 1.0 if (strength >= SIGNATURE_VISIBLE and not debris) else 0.0
        out[i, D_COVER] = 1.0 if st <= MITOTIC else 0.0


def drawing_rows(population: Population, signature: str) -> np.ndarray:
    """(n_cells, N_PARAMS) float32 drawing parameters for the population at its current time."""
    cells, line = population.cells, population.line
    out = np.zeros((len(cells), N_PARAMS), dtype=np.float32)
    _drawing_rows(cells, population.activity(), SIGNATURE_CODES[signature], line.body_level, line.texture_amp,
                  line.halo, out)
    return out


def dust_rows(rng: np.random.Generator) -> np.ndarray:
    """Static specks on the optics: drawn in every frame of a well at the same place."""
    n = int(rng.integers(2, 7))
    out = np.zeros((n, N_PARAMS), dtype=np.float64)
    out[:, D_CX], out[:, D_CY] = rng.uniform(0, IMAGE_SIZE, n), rng.uniform(0, IMAGE_SIZE, n)
    r = rng.uniform(1.5, 5.0, n)
    out[:, D_A], out[:, D_B] = r, r * rng.uniform(0.6, 1.0, n)
    angle = rng.uniform(0, math.pi, n)
    out[:, D_COS], out[:, D_SIN] = np.cos(angle), np.sin(angle)
    out[:, D_BODY] = -rng.uniform(8.0, 25.0, n)
    out[:, D_RIM_W] = 0.3
    out[:, D_HALO_W] = 1.0 / r
    return out.astype(np.float32)


