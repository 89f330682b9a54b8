"""The experiment: presets, dose-response and planted effect per condition, plate layout, and seed derivation.

Everything random here is drawn from a NumPy stream keyed by (seed, names...), never from a shared generator, so any
part of the plate can be rebuilt alone, in any order or process, with the same result.

Planted effect of a condition (cell line, drug, concentration): the drug's mechanism where the Hill response
R = c^h / (c^h + EC50^h) reaches `effect_threshold` (0.5 by default, i.e. at or above the EC50), else 'no_effect'.
The EC50 of each (cell line, drug) is put on a log-midpoint between two neighbouring grid concentrations (±0.2
decades, so every grid concentration is at least 0.3 decades from it), and the Hill slope is at least 1.2, so every
response is ≤ 0.304 or ≥ 0.696 (1 / (1 + 10^(-1.2 × 0.3)); 0.302 / 0.698 at the extremes of the paper preset over
seeds 0–4): no condition sits near the threshold and the planted class is unambiguous. Below the threshold the drug does nothing at all (the well runs the
DMSO process), so 'no_effect' is literally true in the pixels.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .catalogue import CELL_LINES, CONTROLS, DEMO_CELL_LINES, DEMO_DRUGS, DRUGS

EFFECTS = ("cytotoxic", "cytostatic", "mixed", "no_effect", "control")
SIM_STEP_H = 1.0  # the simulation's clock; frame times must fall on it
ROWS = "ABCDEFGHIJKLMNOP"  # 384-well plate: 16 rows × 24 columns
N_COLUMNS = 24
IMAGE_SIZE = 256

# Ranges of the per-(cell line, drug) parameters drawn from the seed.
HILL_RANGE = (1.2, 2.5)
EC50_JITTER_DECADES = 0.2
ONSET_RANGE_H = {"cytotoxic": (6.0, 16.0), "mixed": (4.0, 12.0), "cytostatic": (2.0, 8.0)}
# How a cell line's sensitivity shifts the drug's count of active concentrations: -1, 0, +1 with these odds.
SENSITIVITY_SHIFT_P = (0.2, 0.6, 0.2)


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator for one named piece of the plate, e.g. rng_for(seed, 'well', 'ACHN_P1', 'B07', 1).

    Strings enter through CRC-32 (stable across runs and machines, unlike hash()); the result does not depend on
    what else was drawn before, which is what makes wells renderable in any order and in several processes."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    entropy = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


@dataclass(frozen=True)
class PlateConfig:
    """All knobs of a synthetic experiment. Build one with `make_config(preset, **overrides)`."""

    preset: str
    cell_lines: tuple[str, ...]
    drugs: tuple[str, ...]
    plates_per_cell_line: int = 1  # drugs are dealt round-robin to the plates; every plate gets its own controls
    n_concentrations: int = 5
    dilution_factor: float = 10.0
    replicates: int = 4
    n_dmso: int = 6  # per plate
    n_pbs: int = 2  # per plate
    sites: int = 1  # fields of view per well
    t_start_h: float = -4.0  # first frame, hours relative to drug addition
    t_end_h: float = 96.0
    frame_interval_h: float = 4.0
    effect_threshold: float = 0.5
    # How many of the concentrations act (from the top) in a typical cell line, before the line's ±1 sensitivity
    # shift; None = each drug's count in the paper's figure (mostly 1-2 of 5).
    active_concentrations: int | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.cell_lines if c not in CELL_LINES]
        if unknown:
            raise ValueError(f"unknown cell line(s) {unknown}; known: {sorted(CELL_LINES)}")
        unknown = [d for d in self.drugs if d not in DRUGS]
        if unknown:
            raise ValueError(f"unknown drug(s) {unknown}; known: {list(DRUGS)}")
        if len(set(self.drugs)) != len(self.drugs) or len(set(self.cell_lines)) != len(self.cell_lines):
            raise ValueError("cell_lines and drugs must not repeat")
        if min(self.plates_per_cell_line, self.n_concentrations, self.replicates, self.sites) < 1:
            raise ValueError("plates_per_cell_line, n_concentrations, replicates and sites must be >= 1")
        if self.n_dmso < 1:
            raise ValueError("every plate needs at least one DMSO well (the temporal analysis' reference)")
        def on_grid(hours: float) -> bool:
            return abs(hours / SIM_STEP_H - round(hours / SIM_STEP_H)) < 1e-9

        if self.frame_interval_h <= 0 or not on_grid(self.frame_interval_h):
            raise ValueError(f"frame_interval_h must be a positive multiple of {SIM_STEP_H} h: {self.frame_interval_h}")
        if not on_grid(self.t_start_h) or self.t_end_h <= self.t_start_h:
            raise ValueError(f"need t_start_h on the {SIM_STEP_H} h grid and t_end_h > t_start_h")
        if not 0.0 < self.effect_threshold < 1.0:
            raise ValueError("effect_threshold must lie in (0, 1)")
        if self.active_concentrations is not None and not 1 <= self.active_concentrations <= self.n_concentrations:
            raise ValueError("active_concentrations must lie in 1..n_concentrations (or be None)")
        for plate_drugs in self.drugs_by_plate():
            wells = len(plate_drugs) * self.n_concentrations * self.replicates + self.n_dmso + self.n_pbs
            if wells > len(ROWS) * N_COLUMNS:
                raise ValueError(f"{wells} wells do not fit a 384-well plate; use more plates_per_cell_line")

    def frame_times(self) -> np.ndarray:
        """Imaging times (h): t_start_h, t_start_h + interval, ... up to t_end_h."""
        n = int(math.floor((self.t_end_h - self.t_start_h) / self.frame_interval_h + 1e-9)) + 1
        return self.t_start_h + self.frame_interval_h * np.arange(n, dtype=np.float64)

    def drugs_by_plate(self) -> list[tuple[str, ...]]:
        k = self.plates_per_cell_line
        return [tuple(self.drugs[p::k]) for p in range(k)]

    def plate_ids(self, cell_line: str) -> list[str]:
        return [f"{cell_line}_P{p + 1}" for p in range(self.plates_per_cell_line)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_config(preset: str = "demo", **overrides: Any) -> PlateConfig:
    """The named preset with some fields replaced.

    - `demo`: 2 cell lines × 1 plate, 8 drugs (2 per class) × 5 concentrations × 4 replicates, 6 DMSO + 2 PBS wells,
      1 site, a frame every 4 h from -4 h to 96 h: 2 × 168 wells × 26 frames = 8,736 images. The 6 active drugs act
      at their top 2-4 concentrations (active_concentrations=3 ± the line's sensitivity), so each class has ~6
      conditions per line against ~22 without effect. The paper imaged every
      ~2 h; the demo thins that to 4 h to keep the whole demo (rendering and the analyses after it) in minutes.
      Set frame_interval_h=2 for the paper's cadence.
    - `paper`: the 21 cell lines and 31 drugs, two 384-well plates per line (16 + 15 drugs; 48 DMSO + 16 PBS wells on
      each), a frame every 2 h from -24 h to 96 h: 21 × 748 wells × 61 frames = 958,188 images (the paper's "~1M").
      Several hours of CPU and ~40 GB of PNGs: render it with the streaming writer and several workers.
    """
    if preset == "demo":
        base = PlateConfig(preset="demo", cell_lines=DEMO_CELL_LINES, drugs=DEMO_DRUGS, active_concentrations=3)
    elif preset == "paper":
        base = PlateConfig(
            preset="paper",
            cell_lines=tuple(CELL_LINES),
            drugs=tuple(DRUGS),
            plates_per_cell_line=2,
            n_dmso=48,
            n_pbs=16,
            t_start_h=-24.0,
            frame_interval_h=2.0,
        )
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 'demo' or 'paper'")
    fields = {f.name for f in dataclasses.fields(PlateConfig)} - {"preset"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown override(s) {bad}; known: {sorted(fields)}")
    for key in ("cell_lines", "drugs"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class Condition:
    """One (cell line, drug, concentration) with its planted truth; a row of ground_truth.csv."""

    cell_line: str
    drug: str
    concentration_uM: float
    effect: str  # planted class: mechanism, 'no_effect' or 'control'
    mechanism: str  # the drug's class at full response ('control' for DMSO/PBS)
    signature: str  # morphological signature of the drug ('none' for controls and no-effect drugs)
    ec50_uM: float  # inf for drugs without effect, nan for controls
    hill: float
    # hours after drug addition when the effect starts to build: one per cell line and drug, nan for a drug without
    # a mechanism; given also for that drug's concentrations below the threshold, where nothing happens (unused)
    onset_h: float
    response: float  # Hill response at this concentration, 0..1

    @property
    def magnitude(self) -> float:
        """How strongly the drug acts in the simulation: the response where the effect is planted, else 0."""
        return self.response if self.effect in ("cytotoxic", "cytostatic", "mixed") else 0.0

    def as_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hill_response(concentration_uM: float, ec50_uM: float, hill: float) -> float:
    if not math.isfinite(ec50_uM) or concentration_uM <= 0.0:
        return 0.0
    return float(1.0 / (1.0 + (ec50_uM / concentration_uM) ** hill))


def concentrations(drug: str, config: PlateConfig) -> list[float]:
    """The drug's grid, low to high: top, top/10, ... rounded to 6 significant digits so that CSVs round-trip."""
    top = DRUGS[drug].top_uM
    n = config.n_concentrations
    return [float(f"{top / config.dilution_factor ** (n - 1 - i):.6g}") for i in range(n)]


def drug_conditions(cell_line: str, drug: str, config: PlateConfig, seed: int) -> list[Condition]:
    """The drug's conditions in one cell line, low to high concentration."""
    spec = DRUGS[drug]
    grid = concentrations(drug, config)
    rng = rng_for(seed, "dose-response", cell_line, drug)
    hill = float(rng.uniform(*HILL_RANGE))
    jitter = float(rng.uniform(-EC50_JITTER_DECADES, EC50_JITTER_DECADES))
    shift = int(rng.choice([-1, 0, 1], p=SENSITIVITY_SHIFT_P))
    mechanism = spec.mechanism
    if mechanism == "no_effect":
        ec50, onset = math.inf, math.nan
    else:
        onset = float(rng.uniform(*ONSET_RANGE_H[mechanism]))
        n = len(grid)
        # Count of active concentrations (the config's, else the catalogue's scaled to the grid length), shifted by
        # the line's sensitivity; the top concentration always acts, so the class at the top is the mechanism.
        base = config.active_concentrations or round(spec.n_active * n / 5)
        n_active = int(np.clip(base + shift, 1, n))
        lowest_active = grid[n - n_active]
        ec50 = lowest_active / config.dilution_factor ** (0.5 + jitter)
    rows = []
    for c in grid:
        response = hill_response(c, ec50, hill)
        effect = mechanism if response >= config.effect_threshold else "no_effect"
        rows.append(
            Condition(cell_line, drug, c, effect, mechanism, spec.signature, ec50, hill, onset, response)
        )
    return rows


def control_condition(cell_line: str, drug: str) -> Condition:
    return Condition(cell_line, drug, 0.0, "control", "control", "none", math.nan, math.nan, math.nan, 0.0)


def ground_truth(config: PlateConfig, seed: int) -> list[Condition]:
    """Every condition of the experiment: per cell line the controls, then the drugs in catalogue order."""
    rows = []
    for line in config.cell_lines:
        rows += [control_condition(line, c) for c in CONTROLS]
        for drug in config.drugs:
            rows += drug_conditions(line, drug, config, seed)
    return rows


@dataclass(frozen=True)
class WellSpec:
    """One well: where it is and what it holds."""

    plate: str
    well: str  # e.g. 'B07'
    replicate: int  # 1-based among the wells of the same condition on the plate
    condition: Condition


def well_name(index: int) -> str:
    return f"{ROWS[index // N_COLUMNS]}{index % N_COLUMNS + 1:02d}"


def plate_layout(config: PlateConfig, seed: int) -> list[WellSpec]:
    """All wells of the experiment, sorted by plate then well. Conditions are scattered over each plate by a
    seeded shuffle, like the paper's randomized layouts; replicates are numbered in well order."""
    wells: list[WellSpec] = []
    for line in config.cell_lines:
        for plate, plate_drugs in zip(config.plate_ids(line), config.drugs_by_plate()):
            contents: list[Condition] = []
            for drug in plate_drugs:
                for cond in drug_conditions(line, drug, config, seed):
                    contents += [cond] * config.replicates
            contents += [control_condition(line, "DMSO")] * config.n_dmso
            contents += [control_condition(line, "PBS")] * config.n_pbs
            positions = rng_for(seed, "layout", plate).permutation(len(ROWS) * N_COLUMNS)[: len(contents)]
            placed = sorted(zip(positions.tolist(), contents), key=lambda pc: pc[0])
            seen: dict[tuple[str, float], int] = {}
            for pos, cond in placed:
                key = (cond.drug, cond.concentration_uM)
                seen[key] = seen.get(key, 0) + 1
                wells.append(WellSpec(plate, well_name(pos), seen[key], cond))
    return wells
