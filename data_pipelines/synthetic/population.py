"""The biology of one field of view: an agent simulation of cells that grow, divide, move, die and fall apart.

The field is a 256×256 torus (a window on a large well: cells leaving one side enter on the other), stepped every
SIM_STEP_H hours whatever the imaging cadence, so a frame at time t is the same for any frame interval.

Per step:
- contact inhibition: the cell cycle slows as the summed spread cell area passes AREA_SOFT of the field and stops at
  AREA_STOP; a packed crowd is drawn compressed to PACKED_AREA (appearance.py);
- a drug's activity a(t) = magnitude × onset ramp (relaxing after a hold for cytostatic and mixed drugs) slows the
  cycle by `arrest × a(t)` and adds a death hazard `kill_per_h × k(t) × susceptibility`, where k(t) is a(t) except
  that it always relaxes to 0 (the kill phase ends with the hold) while a(t) relaxes to the mechanism's `residual`;
- cells that finish the cycle round up for MITOSIS_H and split in two; dead cells round up, shrink and after
  DEATH_TO_DEBRIS_H (±) fall apart into 1-3 debris specks, which slowly get washed away;
- live cells crawl (a persistent random walk, slower when crowded) and push each other apart.

Mechanism kinetics (MECHANISM_KINETICS) give the temporal shapes of the paper's prototypes (§5.4) as distance to DMSO.
The DMSO wells of the demo lines grow until ~90 h (attached area 0.24 → 1.28 of the field at 92 h in ACHN, 0.15 →
1.34 in HT29), so a drug well that merely stops changing still sees its gap widen. Measured on the gap to DMSO in
attached area (population only, full response, mean of 3 fields, frames every 4 h after the drug; "late change" =
what the gap gains over the last third as a fraction of its peak, "end/peak" = the gap at 96 h / its peak; the setup
of tests/test_synthetic_plate.py::test_planted_gap_to_dmso_levels_off...), ACHN / HT29:
- cytotoxic = kill + arrest, sustained: the well empties (area 0.09 / 0.06 at 92 h) and the gap widens to the end
  (late change +0.13 / +0.12, end/peak 1.00 / 1.00);
- cytostatic = near-complete arrest that lifts after `hold_h`: the cells catch up while DMSO saturates, the gap rises,
  then narrows (late change −0.47 / −0.61, end/peak 0.52 / 0.41);
- mixed = partial kill + arrest for `hold_h`, then the kill stops and half the arrest stays (`residual`): the area
  falls to 0.29 / 0.20 by ~50 h, then the survivors regrow (0.47 / 0.41 at 92 h) at about the pace at which DMSO
  still grows, so the gap rises, then levels off (late change −0.02 / −0.06, end/peak 0.95 / 0.93; at magnitude
  0.85, about the lowest planted on the demo plates: −0.05 / −0.16, 0.89 / 0.84). With the kinetics before issue #6
  (kill 0.010, arrest 0.85, both sustained) the mixed well kept losing cells and its gap widened like a cytotoxic
  one (late change +0.16 / +0.12). On rendered demo plates (seeds 0-2, pooled features of the demo checkpoint,
  distance to DMSO per planted series, 37 mixed) the mixed late change is now −0.15 median (IQR −0.21 to −0.11),
  end/peak 0.89, between cytotoxic (+0.18, 0.96) and cytostatic (−0.40, 0.44); it was +0.10 (0.07 to 0.12).
  Limit: in slow lines whose DMSO wells are still far from confluence at 96 h (doubling ≥ ~40 h; MDAMB231, HS578T,
  EKVX measured) every gap still widens late: mixed +0.10 to +0.17 vs cytotoxic +0.21 to +0.25, and the cytostatic
  gap narrows only partly (end/peak 0.76 to 0.88).
No effect = no activity: the DMSO process itself.

The step is one compiled function over a table of cells (one float64 row per cell or debris speck, columns below)
with its own SplitMix64 random stream, seeded from the well's generator: nothing global, so wells interleave freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .catalogue import CellLine
from .design import IMAGE_SIZE, SIM_STEP_H, Condition
from .jit import helper, kernel

MITOSIS_H = 1.0
DEATH_TO_DEBRIS_H = (10.0, 24.0)  # uniform range of how long a dead cell stays a rounded body
BASAL_DEATH_PER_H = 0.0015  # every culture loses a few cells
DEBRIS_LOSS_PER_H = 0.012
AREA_SOFT = 0.7  # summed spread cell area / field area where contact inhibition starts ...
AREA_STOP = 1.4  # ... and where the cycle stops
PACKED_AREA = 1.2  # a crowd whose spread area exceeds this fraction of the field is compressed to it
PACKING = 0.85  # two cells overlap at most until their centres are this × (r1 + r2) apart
ONSET_RAMP_H = 8.0  # time for a drug's activity to build up after its onset
PERSISTENCE_H = 3.0  # velocity memory of crawling cells


@dataclass(frozen=True)
class Kinetics:
    kill_per_h: float  # death hazard at full activity and mean susceptibility
    arrest: float  # fraction of cycle progression removed at full activity
    hold_h: float  # how long after the onset the activity holds before it relaxes (inf: sustained)
    relax_h: float = 16.0  # time for the activity to fade after hold_h
    # Fraction of the activity (arrest and signature) kept once it has relaxed; the killing always stops. 0: the
    # drug wears off completely (cytostatic); between 0 and 1: the survivors of the kill phase stay partly arrested
    # (mixed), so they regrow more slowly than released cytostatic cells and the gap to DMSO levels off.
    residual: float = 0.0


MECHANISM_KINETICS = {
    "cytotoxic": Kinetics(kill_per_h=0.035, arrest=0.7, hold_h=math.inf),
    "mixed": Kinetics(kill_per_h=0.015, arrest=0.85, hold_h=36.0, residual=0.5),
    "cytostatic": Kinetics(kill_per_h=0.0, arrest=0.97, hold_h=36.0),
}


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


def _onset_and_relaxation(condition: Condition, t_h: float) -> tuple[float, float]:
    """(magnitude × onset ramp, how far the activity has relaxed after the hold: 0..1) at time t."""
    kin = MECHANISM_KINETICS[condition.mechanism]
    since_onset = t_h - condition.onset_h
    onset = condition.magnitude * _smoothstep(since_onset / ONSET_RAMP_H)
    relaxed = _smoothstep((since_onset - kin.hold_h) / kin.relax_h) if math.isfinite(kin.hold_h) else 0.0
    return onset, relaxed


def drug_activity(condition: Condition, t_h: float) -> float:
    """How strongly the drug acts at time t (0..1): the magnitude times the onset ramp, relaxing after the hold to
    the mechanism's residual (0 for cytostatic drugs). Drives the arrest and the signature. 0 for controls,
    no-effect drugs and concentrations below the threshold."""
    if condition.magnitude == 0.0:
        return 0.0
    onset, relaxed = _onset_and_relaxation(condition, t_h)
    return onset * (1.0 - relaxed * (1.0 - MECHANISM_KINETICS[condition.mechanism].residual))


def kill_activity(condition: Condition, t_h: float) -> float:
    """How strongly the drug kills at time t (0..1): as drug_activity, but it relaxes to 0 whatever the residual
    (the kill phase ends with the hold)."""
    if condition.magnitude == 0.0:
        return 0.0
    onset, relaxed = _onset_and_relaxation(condition, t_h)
    return onset * (1.0 - relaxed)


# Cell states.
LIVE, MITOTIC, DYING, DEBRIS = 0, 1, 2, 3

# Columns of the cell table (module-level ints so that compiled code sees them as constants).
X, Y, VX, VY = 0, 1, 2, 3
AREA0 = 4  # spread area at birth (px²); the cell grows to twice that before dividing
PHASE = 5  # cell-cycle progress 0..1
CYCLE_H = 6
ASPECT = 7
ANGLE = 8
H0 = 9  # 8 outline harmonics (2nd, 3rd, 5th, 6th order; cos and sin): columns 9..16
F0 = 17  # 4 directions for the blebs of the fragmentation signature: columns 17..20
TEX_X, TEX_Y = 21, 22  # offset into the texture tiles
NUC_U, NUC_V = 23, 24  # nucleus offset, as a fraction of the semi-axes
W_KILL = 25  # susceptibility to the drug's killing (inherited)
W_SIG = 26  # expressivity of the drug's signature (inherited)
STATE = 27
T_STATE = 28  # hours in the current state
LIFE_H = 29  # dying cells: hours until they fall apart
DEAD_R = 30  # dead cells and debris: radius
TONE = 31  # debris: grey offset
AGE = 32  # hours since birth
N_COLUMNS = 33
FIELD = float(IMAGE_SIZE)


# -- compiled kernels -------------------------------------------------------------------------------------------
@helper
def _next(state):  # pragma: no cover - compiled
    """SplitMix64: the next 64 random bits of the stream held in state[0]."""
    z = state[0] + np.uint64(0x9E3779B97F4A7C15)
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@helper
def _u01(state):  # pragma: no cover - compiled
    """Uniform in [0, 1) from the top 53 bits."""
    return (_next(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@helper
def _uniform(state, lo, hi):  # pragma: no cover - compiled
    """Uniform in [lo, hi); call with floats only (every argument type is one more compilation)."""
    return lo + (hi - lo) * _u01(state)


@helper
def _normal(state):  # pragma: no cover - compiled
    u1 = 1.0 - _u01(state)  # (0, 1]
    u2 = _u01(state)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@helper
def _spread_area(c, i):  # pragma: no cover - compiled
    return c[i, AREA0] * (1.0 + min(c[i, PHASE], 1.0))


@helper
def _new_cell(c, i, state, line, x, y):  # pragma: no cover - compiled
    """Row i becomes a fresh spread cell at (x, y) with the line's individual variability.
    line = (base area, doubling h, aspect, irregularity, motility)."""
    z = np.empty(19)  # the draws go through loops: one inlined copy of the generator instead of 27
    for k in range(19):
        z[k] = _normal(state)
    u = np.empty(9)
    for k in range(9):
        u[k] = _u01(state)
    c[i, :] = 0.0
    c[i, X] = x % FIELD
    c[i, Y] = y % FIELD
    c[i, AREA0] = line[0] * math.exp(0.12 * z[0])
    c[i, CYCLE_H] = (line[1] - MITOSIS_H) * math.exp(0.1 * z[1])
    c[i, ASPECT] = 1.0 + (line[2] - 1.0) * math.exp(0.3 * z[2])
    for k in range(8):  # outline: low harmonics carry the shape, high ones a little ruffle
        c[i, H0 + k] = (0.5 if k < 4 else 1.0 / 6.0) * line[3] * z[3 + k]
    norm = math.sqrt(z[11] ** 2 + z[12] ** 2 + z[13] ** 2 + z[14] ** 2) + 1e-12
    for k in range(4):
        c[i, F0 + k] = z[11 + k] / norm
    c[i, ANGLE] = math.pi * u[0]
    c[i, TEX_X] = math.floor(FIELD * u[1])
    c[i, TEX_Y] = math.floor(FIELD * u[2])
    c[i, NUC_U] = 0.5 * u[3] - 0.25
    c[i, NUC_V] = 0.5 * u[4] - 0.25
    c[i, W_KILL] = 0.5 + u[5]
    c[i, W_SIG] = 0.75 + 0.5 * u[6]
    c[i, STATE] = LIVE
    c[i, AGE] = 10.0


@helper
def _new_debris(c, i, state, x, y):  # pragma: no cover - compiled
    u = np.empty(5)
    for k in range(5):
        u[k] = _u01(state)
    c[i, :] = 0.0
    c[i, X] = x % FIELD
    c[i, Y] = y % FIELD
    c[i, STATE] = DEBRIS
    c[i, DEAD_R] = 1.2 + 2.0 * u[0]
    c[i, ASPECT] = 1.0 + 0.8 * u[1]
    c[i, ANGLE] = math.pi * u[2]
    c[i, TONE] = (-1.0 if u[3] < 0.6 else 1.0) * (20.0 + 25.0 * u[4])  # mostly dark specks


@helper
def _kill(c, i, state, t_state):  # pragma: no cover - compiled
    """A dead cell rounds up into a compact ball of about 60% of its spread radius."""
    c[i, DEAD_R] = 0.6 * math.sqrt(_spread_area(c, i) / math.pi)
    c[i, STATE] = DYING
    c[i, T_STATE] = t_state
    c[i, LIFE_H] = _uniform(state, DEATH_TO_DEBRIS_H[0], DEATH_TO_DEBRIS_H[1])


@helper
def _attached_area(c, n):  # pragma: no cover - compiled
    total = 0.0
    for i in range(n):
        if c[i, STATE] <= MITOTIC:
            total += _spread_area(c, i)
    return total / (IMAGE_SIZE * IMAGE_SIZE)


@helper
def _push_apart(c, n, iters):  # pragma: no cover - compiled
    """Soft exclusion on the torus between attached cells, with a bin grid so each cell meets only its neighbours.
    The crowd is drawn compressed (PACKED_AREA), so exclusion works on the compressed radii."""
    size = float(IMAGE_SIZE)
    half = size / 2.0
    squeeze = math.sqrt(min(1.0, PACKED_AREA / max(_attached_area(c, n), 1e-9)))
    idx = np.empty(n, np.int64)
    r = np.empty(n)
    m = 0
    r_max = 0.0
    for i in range(n):
        if c[i, STATE] <= MITOTIC:
            idx[m] = i
            r[m] = squeeze * math.sqrt(_spread_area(c, i) / math.pi)
            r_max = max(r_max, r[m])
            m += 1
    if m < 2:
        return
    nb = int(size // (2.0 * PACKING * r_max + 1e-9))
    if nb < 3:
        nb = 1  # too few bins to tell neighbours apart: compare all pairs
    bin_size = size / nb
    reach_lo, reach_hi = (-1, 2) if nb > 1 else (0, 1)
    for _ in range(iters):
        # Counting sort of the attached cells into bins.
        count = np.zeros(nb * nb + 1, np.int64)
        cell_bin = np.empty(m, np.int64)
        for k in range(m):
            i = idx[k]
            b = int(c[i, Y] // bin_size) % nb * nb + int(c[i, X] // bin_size) % nb
            cell_bin[k] = b
            count[b + 1] += 1
        for b in range(nb * nb):
            count[b + 1] += count[b]
        order = np.empty(m, np.int64)
        fill = count[:-1].copy()
        for k in range(m):
            order[fill[cell_bin[k]]] = k
            fill[cell_bin[k]] += 1
        for k in range(m):
            i = idx[k]
            bx = cell_bin[k] % nb
            by = cell_bin[k] // nb
            for oy in range(reach_lo, reach_hi):
                for ox in range(reach_lo, reach_hi):
                    b = (by + oy) % nb * nb + (bx + ox) % nb
                    for slot in range(count[b], count[b + 1]):
                        q = order[slot]
                        if q <= k:
                            continue  # each pair once
                        j = idx[q]
                        dx = c[j, X] - c[i, X]
                        dy = c[j, Y] - c[i, Y]
                        if dx > half:
                            dx -= size
                        elif dx < -half:
                            dx += size
                        if dy > half:
                            dy -= size
                        elif dy < -half:
                            dy += size
                        dmin = PACKING * (r[k] + r[q])
                        d2 = dx * dx + dy * dy
                        if d2 >= dmin * dmin:
                            continue
                        d = math.sqrt(d2) + 1e-6
                        shift = 0.25 * (dmin - d) / d
                        c[i, X] -= shift * dx
                        c[i, Y] -= shift * dy
                        c[j, X] += shift * dx
                        c[j, Y] += shift * dy
        for k in range(m):
            i = idx[k]
            c[i, X] %= size
            c[i, Y] %= size


@kernel
def _seed_field(c, state, line, confluence):  # pragma: no cover - compiled
    """Fill a fresh table: asynchronous cells at the seeding confluence, a dead cell or so and some debris."""
    n_cells = max(3, int(round(confluence * IMAGE_SIZE * IMAGE_SIZE / (1.5 * line[0]))))
    n = 0
    for _ in range(n_cells):
        _new_cell(c, n, state, line, _uniform(state, 0.0, FIELD), _uniform(state, 0.0, FIELD))
        c[n, PHASE] = _uniform(state, 0.0, 1.0)
        n += 1
    for _ in range(int(_uniform(state, 0.0, 2.5))):
        _new_cell(c, n, state, line, _uniform(state, 0.0, FIELD), _uniform(state, 0.0, FIELD))
        _kill(c, n, state, _uniform(state, 0.0, 8.0))
        n += 1
    for _ in range(int(_uniform(state, 2.0, 7.0))):
        _new_debris(c, n, state, _uniform(state, 0.0, FIELD), _uniform(state, 0.0, FIELD))
        n += 1
    _push_apart(c, n, 12)
    return n


@kernel
def _step(c, n, out, state, line, arrest, kill):  # pragma: no cover - compiled
    """Advance the table c[:n] by one step into out; returns the new row count. out needs room for 4n rows."""
    dt = SIM_STEP_H
    crowd = _attached_area(c, n)
    cycling = min(1.0, max(0.0, (AREA_STOP - crowd) / (AREA_STOP - AREA_SOFT)))
    speed = line[4] * min(1.0, max(0.15, 1.0 - crowd / AREA_STOP))
    decay = math.exp(-dt / PERSISTENCE_H)
    kick = math.sqrt(1.0 - decay * decay) * speed
    offset = 0.45 * math.sqrt(line[0] / math.pi)
    m = 0
    for i in range(n):
        st = c[i, STATE]
        if st == LIVE:
            c[i, PHASE] += dt / c[i, CYCLE_H] * cycling * (1.0 - arrest)
            if c[i, PHASE] >= 1.0:
                st = MITOTIC
                c[i, STATE] = MITOTIC
                c[i, T_STATE] = 0.0
        if st <= MITOTIC:
            hazard = BASAL_DEATH_PER_H + kill * c[i, W_KILL]
            if _uniform(state, 0.0, 1.0) < 1.0 - math.exp(-hazard * dt):
                _kill(c, i, state, 0.0)
                st = DYING
        c[i, T_STATE] += dt
        c[i, AGE] += dt
        if st == MITOTIC and c[i, T_STATE] >= MITOSIS_H:
            # Two daughters side by side across the division axis; they keep the lineage's drug response.
            axis = _uniform(state, 0.0, math.pi)
            for sign in (-1.0, 1.0):
                x = c[i, X] + sign * offset * math.cos(axis)
                y = c[i, Y] + sign * offset * math.sin(axis)
                _new_cell(out, m, state, line, x, y)
                out[m, W_KILL] = c[i, W_KILL]
                out[m, W_SIG] = c[i, W_SIG]
                out[m, ANGLE] = axis + math.pi / 2.0 + 0.3 * _normal(state)
                out[m, AGE] = 0.0
                out[m, PHASE] = _uniform(state, 0.0, 0.05)
                m += 1
        elif st == DYING and c[i, T_STATE] >= c[i, LIFE_H]:
            for _ in range(1 + int(_uniform(state, 0.0, 3.0))):  # 1-3 specks where the cell lay
                spread = 0.6 * c[i, DEAD_R]
                _new_debris(out, m, state, c[i, X] + spread * _normal(state), c[i, Y] + spread * _normal(state))
                m += 1
        elif st == DEBRIS and _uniform(state, 0.0, 1.0) < DEBRIS_LOSS_PER_H * dt:
            pass  # washed away
        else:
            out[m, :] = c[i, :]
            m += 1
    g = np.empty(3)
    for i in range(m):
        for k in range(3):
            g[k] = _normal(state)
        if out[i, STATE] <= MITOTIC:  # crawling: a persistent random walk
            out[i, VX] = out[i, VX] * decay + kick * g[0]
            out[i, VY] = out[i, VY] * decay + kick * g[1]
            out[i, ANGLE] += 0.08 * g[2]
        else:  # dead cells and debris only jiggle
            out[i, VX] = 0.3 * g[0]
            out[i, VY] = 0.3 * g[1]
        out[i, X] = (out[i, X] + out[i, VX] * dt) % IMAGE_SIZE
        out[i, Y] = (out[i, Y] + out[i, VY] * dt) % IMAGE_SIZE
    _push_apart(out, m, 2)
    return m


# -- Python face ------------------------------------------------------------------------------------------------
class Population:
    """The cells of one field of view under one condition. `advance_to(t)` steps the clock; `cells` is the table."""

    def __init__(self, line: CellLine, condition: Condition, rng: np.random.Generator, t0_h: float):
        self.line = line
        self.condition = condition
        self.kinetics = MECHANISM_KINETICS.get(condition.mechanism)
        self.t_h = t0_h
        self._line = np.array(
            [math.pi * line.radius_px**2, line.doubling_h, line.aspect, line.irregularity, line.motility_px_h]
        )
        self._state = np.array([rng.integers(0, 2**63, dtype=np.uint64)], dtype=np.uint64)
        expected = line.seeding_confluence() * IMAGE_SIZE**2 / (1.5 * self._line[0])
        self._table = np.zeros((int(expected) + 32, N_COLUMNS))
        self._spare = np.zeros_like(self._table)
        self._n = _seed_field(self._table, self._state, self._line, line.seeding_confluence())

    @property
    def cells(self) -> np.ndarray:
        """The current table (a view: valid until the next step)."""
        return self._table[: self._n]

    def activity(self) -> float:
        return drug_activity(self.condition, self.t_h)

    def advance_to(self, t_h: float) -> None:
        while self.t_h < t_h - 1e-9:
            arrest = self.kinetics.arrest * self.activity() if self.kinetics else 0.0
            kill = self.kinetics.kill_per_h * kill_activity(self.condition, self.t_h) if self.kinetics else 0.0
            if len(self._spare) < 4 * self._n + 8:  # room for every cell to divide or crumble
                self._spare = np.zeros((2 * (4 * self._n + 8), N_COLUMNS))
            self._n = _step(self._table, self._n, self._spare, self._state, self._line, arrest, kill)
            self._table, self._spare = self._spare, self._table
            self.t_h += SIM_STEP_H

