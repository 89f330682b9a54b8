"""From cluster centroids to biological effects, and the score against a planted ground truth.

The original authors looked at the k = 8 centroids and mapped them to four effects by hand
(toxicity-classifier ``biological_inference_of_clusters``). Here a cluster is mapped by rules on its centroid's
shape, each threshold a named constant with its reason; a mapping file overrides the rules by hand, as they did.

Shape features of a centroid c (length L, in the units of the scaled series), read after a Savitzky–Golay smoothing
(window 7, order 2: the smoothing the authors applied to their centres before plotting them), which removes the
single-point spikes DBA leaves at the ends of a barycentre (its first and last points average only the points
warped onto them):
- ``start``: mean of the first ``EDGE_POINTS`` points; ``final``: mean of the last ``EDGE_POINTS`` points;
- ``peak``: max(c); ``peak_position``: argmax / (L - 1), in [0, 1];
- ``end_peak_ratio``: final / peak (1 = ends at its peak; small = fell back);
- ``late_change``: the least-squares slope over the last third, times the span of that third, divided by the peak:
  how much of its peak the curve still gained (+) or lost (−) over the last third.

Rules, applied in order (names are the four classes of the paper's figure):
1. ``no_effect``: the peak stays low: below ``NOISE_MULTIPLE`` × the DMSO-vs-DMSO noise level when that is known
   ("flat/low": within the spread of untreated wells), else below ``NO_EFFECT_PEAK`` × the level unit.
2. ``cytotoxic``: rises to the end: ``late_change >= RISING_LATE_CHANGE`` and it has not fallen back
   (``end_peak_ratio > FALLEN_BACK``). An earlier transient peak does not matter: a drug whose dying cells first
   round up (a quick jump of the distance that settles) and then keeps killing still widens the gap at the end.
3. ``cytostatic``: rises, then falls back: ``end_peak_ratio <= FALLEN_BACK`` (the paper's prototype: peak ~0.7
   near image 20, end ~0.25).
4. ``mixed``: in between: rises, then levels off (a plateau), falls back only partly, or slows down.

A plateau is called mixed, not cytostatic: it sits between "still rising" and "rising then falling", and it is the
shape the synthetic plate plants for its 'mixed' mechanism (partial kill for a while, then partly arrested survivors
that regrow about as fast as DMSO still grows: the gap rises, then levels off; data_pipelines/synthetic/population.py),
while its 'cytostatic' arrest lifts completely and the gap narrows.

Measured (issue #6, plates seeds 0–2 of the demo preset, pooled features of the demo ConvAE, k = 8, radius 3, mean
of clustering seeds 0–2): per planted series ``late_change`` has median −0.15 (IQR −0.21 to −0.11) for mixed, +0.18
for cytotoxic, −0.40 for cytostatic (end/peak 0.89, 0.96, 0.44); ARI 0.985 / 0.928 / 0.935, mixed recall 1.00 / 0.95
/ 0.85. Before the plate's mixed kinetics were fixed (its gap widened to the end like a cytotoxic one: late change
+0.10 median) the same rules gave mixed recall 0.59 / 0.28 / 0.30 and no shape rule separated the two.
Limit: in slow lines whose DMSO wells are far from confluence at 96 h (MDAMB231, HS578T, EKVX; paper preset only)
every gap still widens late, so mixed reads as cytotoxic there. The adjusted Rand index cannot see a swap of two
labels between clusters: read the per-class recall next to it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.signal import savgol_filter
from sklearn.metrics import adjusted_rand_score, confusion_matrix

# The paper's order (effect 0..3 in cluster_of_distances.py), used for colours and the confusion matrix.
EFFECTS = ("no_effect", "mixed", "cytostatic", "cytotoxic")
EFFECT_CODES = {"no_effect": ".", "mixed": "M", "cytostatic": "S", "cytotoxic": "T"}  # as in method doc §5.5

# Savitzky–Golay smoothing of the centroid before its features are read (the original's plotting smoothing).
SMOOTH_WINDOW = 7
SMOOTH_ORDER = 2
# Points averaged for the start and final levels: one point is noisy, a few points still describe the edge of a
# 30-point series.
EDGE_POINTS = 3
# Without a noise level (e.g. --distances input without DMSO rows, or the paper's 'cell_drug' scale): a peak under
# a quarter of the level unit is no effect. The unit is the 95th percentile of all drug-series values, about the
# height of the strong effects; noise-only curves next to effective drugs sit far below a quarter of that.
NO_EFFECT_PEAK = 0.25
# A centroid peaking under 2 × the DMSO-vs-DMSO noise level is noise. The noise curve compares two halves of the
# DMSO wells of one plate; conditions without any planted effect sit above it, by the spread between wells that
# no half-vs-half split of the DMSO wells sees (position, seeding): on the rendered demo plates (DMSO-standardised
# pooled features of the demo ConvAE) the curves of drugs with a planted response of exactly 0 reach 1.9 × the
# noise level (seed 1; 1.3 on seed 0), while every planted effect peaks above 3.5 ×. Measured, k=8, radius 3,
# 5 clustering seeds, mean ARI (seed 0 / seed 1 plate): 1.5 → 0.93 / 0.59 (ten no-effect conditions called
# effects on seed 1), 2.0 → 0.93 / 0.91, 2.5 → 0.93 / 0.91, 3.0 → 0.93 / 0.91. An earlier benchmark on
# synthetic feature tables with pure per-image noise (no well-level spread) favoured 1.5 (mean ARI 0.79 vs 0.54
# for 2.0): there a no-effect condition sits at the noise level, and weak effects just above it.
NOISE_MULTIPLE = 2.0
# Still gaining at least a tenth of its peak over the last third: the curve "rises to the end". Planted series on
# the demo-preset plates: cytotoxic +0.18 median, mixed −0.15, cytostatic −0.40 (see the module docstring).
RISING_LATE_CHANGE = 0.10
# Fell back to at most 60 % of its peak: the paper's cytostatic prototype peaks at ~0.7 and ends at ~0.25 (0.36).
FALLEN_BACK = 0.60


@dataclass(frozen=True)
class ShapeFeatures:
    start: float
    final: float
    peak: float
    peak_position: float
    end_peak_ratio: float
    late_change: float


def smooth_centroid(curve: np.ndarray) -> np.ndarray:
    """Savitzky–Golay (SMOOTH_WINDOW, SMOOTH_ORDER) smoothing; curves shorter than the window are returned as is."""
    curve = np.asarray(curve, dtype=float)
    if len(curve) < SMOOTH_WINDOW:
        return curve
    return savgol_filter(curve, SMOOTH_WINDOW, SMOOTH_ORDER)


def shape_features(curve: np.ndarray, *, smooth: bool = True) -> ShapeFeatures:
    curve = np.asarray(curve, dtype=float)
    length = len(curve)
    if length < 3:
        raise ValueError(f"a centroid of {length} points is too short to describe its shape")
    if smooth:
        curve = smooth_centroid(curve)
    edge = min(EDGE_POINTS, length)
    peak = float(curve.max())
    final = float(curve[-edge:].mean())
    third = curve[-max(2, length // 3):]
    slope = np.polyfit(np.arange(len(third)), third, 1)[0]
    scale = peak if peak > 0 else 1.0
    return ShapeFeatures(
        start=float(curve[:edge].mean()),
        final=final,
        peak=peak,
        peak_position=float(np.argmax(curve) / (length - 1)),
        end_peak_ratio=final / scale,
        late_change=float(slope * (len(third) - 1) / scale),
    )


def classify_shape(features: ShapeFeatures, *, level_unit: float = 1.0, noise_level: float | None = None) -> str:
    """The effect of a centroid, by the rules of the module docstring."""
    if noise_level is not None and np.isfinite(noise_level):
        low = NOISE_MULTIPLE * noise_level
    else:
        low = NO_EFFECT_PEAK * level_unit
    if features.peak < low:
        return "no_effect"
    if features.late_change >= RISING_LATE_CHANGE and features.end_peak_ratio > FALLEN_BACK:
        return "cytotoxic"
    if features.end_peak_ratio <= FALLEN_BACK:
        return "cytostatic"
    return "mixed"


def map_clusters(centroids: np.ndarray, *, level_unit: float = 1.0, noise_level: float | None = None,
                 mapping: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per cluster: its shape features, the rule's effect, and the final ``effect`` (the mapping's when
    given, the rule's otherwise) with its ``effect_source``."""
    rows = []
    for c, curve in enumerate(np.asarray(centroids)):
        feats = shape_features(curve)
        rule = classify_shape(feats, level_unit=level_unit, noise_level=noise_level)
        effect, source = (mapping[c], "mapping") if mapping is not None else (rule, "rules")
        rows.append(dict(cluster=c, **asdict(feats), rule_effect=rule, effect=effect, effect_source=source))
    return pd.DataFrame(rows)


def _check_effect(effect, source: str) -> str:
    effect = str(effect).strip()
    if effect not in EFFECTS:
        raise ValueError(f"{source}: effect {effect!r} is not one of {EFFECTS}")
    return effect


def load_mapping(path: str | Path, n_clusters: int) -> dict[int, str]:
    """Read a hand-made cluster → effect mapping: JSON ``{"0": "no_effect", …}`` (or a list of
    ``{"cluster": 0, "effect": …}`` objects) or CSV with columns ``cluster, effect``. Every cluster 0..k-1 must be
    mapped."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        pairs = list(data.items()) if isinstance(data, dict) else [(d["cluster"], d["effect"]) for d in data]
    else:
        table = pd.read_csv(path)
        if not {"cluster", "effect"} <= set(table.columns):
            raise ValueError(f"{path}: a mapping CSV needs columns 'cluster, effect'; found {list(table.columns)}")
        pairs = list(zip(table["cluster"], table["effect"]))
    mapping = {}
    for i, (cluster, effect) in enumerate(pairs):
        try:
            cid = int(cluster)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {i}: cluster {cluster!r} is not an integer") from None
        mapping[cid] = _check_effect(effect, f"{path}: entry {i}")
    missing = sorted(set(range(n_clusters)) - set(mapping))
    extra = sorted(set(mapping) - set(range(n_clusters)))
    if missing or extra:
        raise ValueError(f"{path}: mapping must cover clusters 0..{n_clusters - 1} exactly; "
                         f"missing {missing}, unknown {extra}")
    return mapping


# ----------------------------------------------------------------------------------------------------------------------
# Scoring against ground truth


def concentration_key(values) -> np.ndarray:
    """Concentrations as matching keys: 6 significant digits, so 1.1 from CSV and 1.1000000000000001 from
    Parquet meet."""
    return np.array([float(f"{float(v):.6g}") for v in np.asarray(values, dtype=float)])


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """Planted effects per (cell_line, drug, concentration_uM); rows of controls (effect 'control') are dropped."""
    path = Path(path)
    table = pd.read_csv(path)
    need = ["cell_line", "drug", "concentration_uM", "effect"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(table.columns)}")
    for i, effect in enumerate(table["effect"]):
        if effect != "control":
            _check_effect(effect, f"{path}: line {i + 2}")
    return table[table["effect"] != "control"].reset_index(drop=True)


def score_effects(predicted: pd.DataFrame, truth: pd.DataFrame, *, controls=("DMSO", "PBS")) -> dict:
    """Adjusted Rand index, per-class recall and confusion matrix of predicted vs planted effects.

    Both tables have ``cell_line, drug, concentration_uM, effect``; one predicted row per (cell line, drug,
    concentration). Controls are excluded. Predicted rows without a truth row are counted, not scored.
    """
    def keyed(table):
        table = table[~table["drug"].astype(str).isin(controls)].copy()
        table["_conc"] = concentration_key(table["concentration_uM"])
        table["cell_line"] = table["cell_line"].astype(str)
        table["drug"] = table["drug"].astype(str)
        return table

    pred, true = keyed(predicted), keyed(truth)
    keys = ["cell_line", "drug", "_conc"]
    if true.duplicated(keys).any():
        raise ValueError("ground truth has more than one row for some (cell_line, drug, concentration_uM)")
    if pred.duplicated(keys).any():
        raise ValueError("predictions have more than one row for some (cell_line, drug, concentration_uM); "
                         "a drug on two plates of a cell line?")
    merged = pred[keys + ["effect"]].merge(true[keys + ["effect"]], on=keys, how="left",
                                           suffixes=("_pred", "_true"))
    unmatched = int(merged["effect_true"].isna().sum())
    merged = merged.dropna(subset=["effect_true"])
    y_true, y_pred = merged["effect_true"].to_numpy(str), merged["effect_pred"].to_numpy(str)
    cm = confusion_matrix(y_true, y_pred, labels=list(EFFECTS))
    support = cm.sum(axis=1)
    recall = {e: (float(cm[i, i] / support[i]) if support[i] else None) for i, e in enumerate(EFFECTS)}
    return dict(
        adjusted_rand_index=float(adjusted_rand_score(y_true, y_pred)) if len(merged) else None,
        accuracy=float((y_true == y_pred).mean()) if len(merged) else None,
        recall=recall,
        support={e: int(s) for e, s in zip(EFFECTS, support)},
        confusion_matrix=cm.tolist(),
        confusion_labels=list(EFFECTS),
        n_scored=int(len(merged)),
        n_without_truth=unmatched,
    )
