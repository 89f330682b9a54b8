"""Distance-to-control curves: from per-image feature profiles to the scaled series that are clustered.

Two stages, each with one entry point:

1. ``distances_from_features(table)``: per plate, first put every feature in units of the plate's DMSO replicate
   spread (``feature_scale='dmso'``, the default; see ``dmso_feature_spread``), then average the replicate wells (and
   sites) of every (drug, concentration) at each time point, average the plate's DMSO wells (those at one
   concentration, ``control_rows``: the original took the DMSO wells at 367 µM) the same way, and measure
   the distance between the two at every time point (the control time matched to the nearest control time, or to the
   earlier one as the original code did). Also a DMSO-vs-DMSO noise curve per plate (the DMSO wells split in two
   halves), written with ``drug == 'DMSO'``: it is what "no effect" looks like on that plate. The result is the long
   table written as ``distances.csv``.
2. ``build_series(distances)``: keep post-drug points, denoise with a rolling median, cut every series to a common
   length and scale; the result is the matrix the DTW clustering sees. ``--distances FILE.csv`` enters here, so
   both inputs share every step after the distances.

Names follow the project: ``cell_line, drug, concentration_uM, time_h, plate`` in tables, ``Metadata_*`` in Parquet.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import scipy.sparse as sp

log = logging.getLogger(__name__)

CONTROL_DRUG = "DMSO"
# PBS is a second control: the original processed it like a drug and dropped it from figures; so do we.
CONTROL_DRUGS = ("DMSO", "PBS")
METRICS = ("euclidean", "cosine", "correlation", "braycurtis")
SCALES = ("plate", "noise", "cell_drug", "none")
DEFAULT_SCALE = "noise"
# How features are weighed before the distance: 'dmso' divides each feature by its DMSO replicate spread on the plate
# (a diagonal Mahalanobis distance to the control's noise); 'none' is the paper's raw Euclidean distance.
FEATURE_SCALES = ("dmso", "none")
DEFAULT_FEATURE_SCALE = "dmso"
# Under 'dmso', a feature whose DMSO spread is below this fraction of the plate's largest feature spread is dropped,
# not amplified: an undertrained encoder has dead or nearly dead ReLU channels (on the demo checkpoint 55 of 64
# block2 means have no spread at all, others ~1e-7 of the live ones), whose float rounding would otherwise be blown
# up to unit noise. Measured on the demo plate (seed 1, pooled features, k=8, radius 3, 5 clustering seeds): ARI
# 0.91 with a cut at 1e-2, 0.87 at 1e-3.
MIN_RELATIVE_SPREAD = 1e-2
# pandas rolling(5).median() in the original (toxicity-classifier parsing_distances.py).
ROLLING_WINDOW = 5
# The 'plate' reference: this percentile of all drug-curve values on a plate. A high percentile rather than the max
# so one outlying point does not set the unit; high enough that the strong effects of a plate land near 1.
PLATE_REFERENCE_PERCENTILE = 95.0

ID_COLUMNS = ["cell_line", "plate", "drug", "concentration_uM"]
DISTANCE_COLUMNS = ["cell_line", "drug", "concentration_uM", "time_h", "distance", "plate"]

META_PLATE = "Metadata_Plate"
META_WELL = "Metadata_Well"
META_SITE = "Metadata_Site"
META_CELL = "Metadata_CellLine"
META_DRUG = "Metadata_Drug"
META_CONC = "Metadata_Concentration_uM"
META_TIME = "Metadata_Time_h"
REQUIRED_META = (META_PLATE, META_WELL, META_CELL, META_DRUG, META_CONC, META_TIME)

_FEATURE_NAME = re.compile(r"^f\d+$")
# A features file larger than this (rows × features × 4 bytes) is read one plate at a time: the paper's ~1M images ×
# 4096 latent features would be 16 GB at once, one plate ~0.4 GB. Files written plate after plate (the dataset's
# order) let pyarrow skip the other plates' row groups.
MAX_FEATURES_IN_MEMORY_BYTES = 2 << 30


# ----------------------------------------------------------------------------------------------------------------------
# Reading features


def feature_columns(columns) -> list[str]:
    """Every column named 'f' followed by digits (f0000…f4095, or fewer after pooling), in file order."""
    return [c for c in columns if _FEATURE_NAME.match(str(c))]


def read_features(path: str | Path, *, plate=None) -> pd.DataFrame:
    """Read a features Parquet file (or only the rows of one plate) and check it.

    Raises ValueError naming the file (and the first offending row) for a missing column, no feature column,
    a missing value in a metadata column we use, or a non-finite feature.
    """
    path = Path(path)
    filters = None if plate is None else [(META_PLATE, "==", plate)]
    table = pq.read_table(path, filters=filters).to_pandas()
    check_feature_table(table, source=str(path) if plate is None else f"{path} (rows of plate {plate!r})")
    return table


def check_feature_table(table: pd.DataFrame, *, source: str = "features table") -> list[str]:
    """Validate a feature table in memory; returns its feature columns."""
    missing = [c for c in REQUIRED_META if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing metadata column(s) {missing}; found {list(table.columns)[:12]}…")
    feats = feature_columns(table.columns)
    if not feats:
        raise ValueError(f"{source}: no feature columns (names like 'f0000')")
    for col in REQUIRED_META + ((META_SITE,) if META_SITE in table.columns else ()):
        bad = table[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{source}: row {row} has no value in {col}")
    times = pd.to_numeric(table[META_TIME], errors="coerce").to_numpy()
    if not np.isfinite(times).all():
        row = int(np.flatnonzero(~np.isfinite(times))[0])
        raise ValueError(f"{source}: row {row}: {META_TIME} = {table[META_TIME].iloc[row]!r} is not a number")
    values = table[feats].to_numpy()
    finite = np.isfinite(values)
    if not finite.all():
        row, col = map(int, np.argwhere(~finite)[0])
        raise ValueError(f"{source}: row {row}, column {feats[col]} is not finite ({values[row, col]})")
    keys = [META_PLATE, META_WELL] + ([META_SITE] if META_SITE in table.columns else []) + [META_TIME]
    dup = table.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)[:4].tolist()
        raise ValueError(f"{source}: rows {rows} repeat the same {keys}: one image per site and time expected")
    return feats


# ----------------------------------------------------------------------------------------------------------------------
# Averaging trajectories


@dataclass(frozen=True)
class Trajectory:
    """Mean profile of a set of wells at each time index: ``profiles[t]`` at ``time_h[t]``."""

    time_h: np.ndarray  # (T,)
    profiles: np.ndarray  # (T, F)
    wells: tuple[str, ...]


def mean_trajectory(rows: pd.DataFrame, features: np.ndarray, *, label: str) -> Trajectory | None:
    """Average the images of some wells at each time index, every well weighing the same.

    As in the original (pheno-ml ``get_average_sample_encodings``), time points are matched by their index in each
    well's time-ordered sequence, not by exact timestamps: a plate reader images wells minutes apart, so exact
    times rarely agree. Each (well, site) sequence whose length differs from the group's most frequent length is
    dropped (the original's rule), with a warning; sites of one well are averaged first so a well with more sites
    does not weigh more. The time of a point is the mean time of the images averaged into it.

    ``rows`` holds the metadata of the wells (any order), ``features`` the matching rows of the feature matrix.
    """
    if len(rows) == 0:
        return None
    site = rows[META_SITE].to_numpy() if META_SITE in rows.columns else np.zeros(len(rows), dtype=int)
    frame = pd.DataFrame({
        "well": rows[META_WELL].astype(str).to_numpy(),
        "site": site,
        "time": rows[META_TIME].to_numpy(dtype=float),
        "row": np.arange(len(rows)),
    }).sort_values(["well", "site", "time"], kind="stable")
    frame["t_idx"] = frame.groupby(["well", "site"], sort=False).cumcount()
    lengths = frame.groupby(["well", "site"], sort=False)["t_idx"].transform("size")
    modal = int(lengths.groupby([frame["well"], frame["site"]]).first().mode().max())
    keep = lengths.to_numpy() == modal
    if not keep.all():
        dropped = sorted(set(frame.loc[~keep, "well"]))
        warnings.warn(f"{label}: dropping well(s)/site(s) {dropped} whose number of time points differs "
                      f"from the most frequent ({modal})", stacklevel=2)
        frame = frame[keep]
    sites_per_well = frame.groupby("well")["site"].transform("nunique").to_numpy()
    weight = 1.0 / sites_per_well  # sites of a well share the well's unit weight at each time index
    t_idx = frame["t_idx"].to_numpy()
    # One sparse (T × rows) averaging matrix: each time index is the weighted mean of its rows.
    avg = sp.csr_matrix((weight, (t_idx, frame["row"].to_numpy())), shape=(modal, len(rows)))
    norm = np.asarray(avg.sum(axis=1)).ravel()
    avg = sp.diags(1.0 / norm) @ avg
    profiles = np.asarray(avg @ features.astype(np.float64, copy=False))
    time_h = np.asarray(avg @ rows[META_TIME].to_numpy(dtype=float)).ravel()
    return Trajectory(time_h=time_h, profiles=profiles, wells=tuple(sorted(set(frame["well"]))))


def control_time_index(times: np.ndarray, control_times: np.ndarray, *, floor: bool = False) -> np.ndarray:
    """Index of the control time matched to each time in ``times``.

    Nearest by default (ties go to the earlier control point). ``floor=True`` reproduces the original code: its
    ``get_closest_time_point_index`` always returned the left neighbour, i.e. the latest control time not after
    the drug time; a drug time before every control time gets the first control point.
    """
    control_times = np.asarray(control_times, dtype=float)
    times = np.asarray(times, dtype=float)
    if np.any(np.diff(control_times) < 0):
        raise ValueError("control times must be sorted")
    right = np.searchsorted(control_times, times, side="right")  # first control time > t
    left = np.clip(right - 1, 0, len(control_times) - 1)
    if floor:
        return left
    nxt = np.clip(right, 0, len(control_times) - 1)
    choose_next = np.abs(control_times[nxt] - times) < np.abs(times - control_times[left])
    return np.where(choose_next, nxt, left)


def rowwise_distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Distance between matching rows of ``a`` and ``b``, same definitions as ``scipy.spatial.distance``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "euclidean":
        return np.sqrt(((a - b) ** 2).sum(axis=1))
    if metric in ("cosine", "correlation"):
        if metric == "correlation":
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
        dot = (a * b).sum(axis=1)
        norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.clip(1.0 - dot / norms, 0.0, 2.0)
    if metric == "braycurtis":
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(a - b).sum(axis=1) / np.abs(a + b).sum(axis=1)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def time_index(rows: pd.DataFrame) -> np.ndarray:
    """Position of every image in its (well, site) time-ordered sequence, in the order of ``rows``: the time
    matching of ``mean_trajectory`` (images of different wells at the same index were taken at the same round)."""
    site = rows[META_SITE].to_numpy() if META_SITE in rows.columns else np.zeros(len(rows), dtype=int)
    frame = pd.DataFrame({"well": rows[META_WELL].astype(str).to_numpy(), "site": site,
                          "time": rows[META_TIME].to_numpy(dtype=float)})
    order = frame.sort_values(["well", "site", "time"], kind="stable").index.to_numpy()
    t_idx = np.empty(len(rows), dtype=int)
    t_idx[order] = frame.loc[order].groupby(["well", "site"], sort=False).cumcount().to_numpy()
    return t_idx


def dmso_feature_spread(rows: pd.DataFrame, features: np.ndarray, *, label: str = "") -> np.ndarray:
    """Replicate spread of every feature among a plate's DMSO images: the standard deviation across the DMSO
    images taken at the same time index, root-mean-square over the time indices (so the growth of the culture over
    time, the same in every DMSO well, does not count as spread). ``rows`` and ``features`` are the DMSO rows.

    Dividing by it makes a distance count replicate-noise units per feature: without it the Euclidean distance is
    ruled by whichever channels have the largest raw magnitude, whatever their noise (measured on the demo plate:
    pooled features of block1–3 and the latent, ARI 0.59 raw vs 0.91–0.93 standardised, two plate seeds).
    """
    t_idx = time_index(rows)
    x = np.asarray(features, dtype=np.float64)
    variances = []
    for t in np.unique(t_idx):
        at_t = x[t_idx == t]
        if len(at_t) >= 2:
            variances.append(at_t.var(axis=0, ddof=1))
    if not variances:
        raise ValueError(f"{label}: feature_scale='dmso' needs at least 2 {CONTROL_DRUG} images per time point "
                         f"to measure the replicate spread; use feature_scale='none'")
    return np.sqrt(np.mean(variances, axis=0))


def standardise_by_dmso(meta: pd.DataFrame, features: np.ndarray, *, plate: str = "",
                        is_control: np.ndarray | None = None) -> np.ndarray:
    """The plate's features in units of their DMSO replicate spread; features without spread (below
    ``MIN_RELATIVE_SPREAD`` × the largest) are dropped. Returns the (n_images, n_kept) matrix. ``is_control``: the
    control rows (default: ``control_rows``)."""
    if is_control is None:
        is_control, _ = control_rows(meta, plate=plate)
    spread = dmso_feature_spread(meta[is_control], features[is_control], label=f"plate {plate!r}")
    keep = spread >= MIN_RELATIVE_SPREAD * spread.max() if spread.max() > 0 else np.zeros(len(spread), bool)
    if not keep.any():
        raise ValueError(f"plate {plate!r}: no feature varies among the {CONTROL_DRUG} wells; "
                         f"use feature_scale='none'")
    if not keep.all():
        log.info("plate %r: %d of %d features have no DMSO spread (dead channels) and are left out",
                 plate, int((~keep).sum()), len(keep))
    return np.asarray(features, dtype=np.float64)[:, keep] / spread[keep]


def _distance_rows(drug_traj: Trajectory, control: Trajectory, *, metric: str, floor: bool) -> tuple:
    idx = control_time_index(drug_traj.time_h, control.time_h, floor=floor)
    return drug_traj.time_h, rowwise_distance(drug_traj.profiles, control.profiles[idx], metric)


def unmatched_control_times(times: np.ndarray, control_times: np.ndarray, *, floor: bool = False) -> np.ndarray:
    """How far (h) each time in ``times`` lies from its matched control time, where that is more than one control
    frame interval (the median step of ``control_times``); 0 elsewhere. Non-zero entries are compared with a control
    image of another time: the plate's control wells miss images there (or stop earlier than the drug wells)."""
    control_times = np.asarray(control_times, dtype=float)
    times = np.asarray(times, dtype=float)
    if len(control_times) < 2:
        return np.zeros(len(times))
    interval = float(np.median(np.diff(control_times)))
    gap = np.abs(times - control_times[control_time_index(times, control_times, floor=floor)])
    return np.where(gap > interval, gap, 0.0)


def split_halves(wells) -> tuple[list[str], list[str]]:
    """Deterministic split of wells into two halves: alternate in sorted name order (spreads plate positions)."""
    wells = sorted(wells)
    return wells[0::2], wells[1::2]


def _mode_value(values: np.ndarray) -> float:
    vals, counts = np.unique(values, return_counts=True)
    return float(vals[np.argmax(counts)])


def control_rows(meta: pd.DataFrame, *, plate: str = "", concentration_uM: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(is_control, is_dmso)`` masks of one plate's rows. The control is the DMSO wells at one concentration, as
    the original's (DMSO with ``Final_conc_uM == 367``): ``concentration_uM``, by default the plate's most common
    DMSO concentration (by wells). DMSO wells at other concentrations are neither control nor drug: left out, with
    a warning."""
    is_dmso = meta[META_DRUG].astype(str).to_numpy() == CONTROL_DRUG
    if not is_dmso.any():
        raise ValueError(f"plate {plate!r}: no {CONTROL_DRUG} wells to serve as control")
    dose = meta[META_CONC].to_numpy(dtype=float)
    if concentration_uM is None:
        concentration_uM = _mode_value(meta[is_dmso].groupby(META_WELL, sort=True)[META_CONC].first().to_numpy(float))
    is_control = is_dmso & np.isclose(dose, concentration_uM)
    if not is_control.any():
        raise ValueError(f"plate {plate!r}: no {CONTROL_DRUG} wells at {concentration_uM:g} µM; its {CONTROL_DRUG} "
                         f"wells are at {sorted(set(dose[is_dmso].tolist()))} µM")
    left_out = is_dmso & ~is_control
    if left_out.any():
        wells = meta[META_WELL].astype(str).to_numpy()
        warnings.warn(f"plate {plate!r}: the control is the {len(set(wells[is_control]))} {CONTROL_DRUG} wells at "
                      f"{concentration_uM:g} µM; {len(set(wells[left_out]))} {CONTROL_DRUG} wells at "
                      f"{sorted(set(dose[left_out].tolist()))} µM are left out", stacklevel=3)
    return is_control, is_dmso


def distances_for_plate(meta: pd.DataFrame, features: np.ndarray, *, metric: str = "euclidean",
                        floor: bool = False, noise_curve: bool = True, plate: str = "",
                        feature_scale: str = DEFAULT_FEATURE_SCALE,
                        control_concentration_uM: float | None = None) -> pd.DataFrame:
    """Distance-to-control curves of every (drug, concentration) of one plate and cell line, all time points.

    ``feature_scale='dmso'`` first divides every feature by its DMSO replicate spread (``standardise_by_dmso``);
    'none' measures the raw features (the paper). The control: ``control_rows``."""
    if feature_scale not in FEATURE_SCALES:
        raise ValueError(f"unknown feature_scale {feature_scale!r}; choose one of {FEATURE_SCALES}")
    is_control, is_dmso = control_rows(meta, plate=plate, concentration_uM=control_concentration_uM)
    cell_lines = meta[META_CELL].astype(str).unique()
    if len(cell_lines) != 1:
        raise ValueError(f"plate {plate!r}: expected one cell line per call, got {list(cell_lines)}")
    cell_line = cell_lines[0]
    if feature_scale == "dmso":
        features = standardise_by_dmso(meta, features, plate=plate, is_control=is_control)
    ctrl_meta = meta[is_control]
    control = mean_trajectory(ctrl_meta, features[is_control], label=f"{plate} {CONTROL_DRUG}")
    out = []
    unmatched = []  # (drug, concentration, points, largest gap) of the series compared with a control of another time
    groups = meta[~is_dmso].groupby([META_DRUG, META_CONC], sort=True).indices
    for (drug_name, conc), pos in groups.items():
        sel = np.flatnonzero(~is_dmso)[pos]
        traj = mean_trajectory(meta.iloc[sel], features[sel], label=f"{plate} {drug_name} {conc}")
        times, dist = _distance_rows(traj, control, metric=metric, floor=floor)
        gaps = unmatched_control_times(times, control.time_h, floor=floor)
        if gaps.any():
            unmatched.append((drug_name, conc, int((gaps > 0).sum()), float(gaps.max())))
        out.append(pd.DataFrame({"drug": str(drug_name), "concentration_uM": float(conc), "time_h": times,
                                 "distance": dist}))
    if unmatched:
        worst = max(unmatched, key=lambda u: u[3])
        warnings.warn(f"plate {plate!r}: {len(unmatched)} drug series have time points with no {CONTROL_DRUG} image "
                      f"within one control frame interval (e.g. {worst[0]} {worst[1]}: {worst[2]} points, the "
                      f"matched control time up to {worst[3]:.3g} h away; control images missing, or the control "
                      f"wells stop before the drug wells): their distances compare different times", stacklevel=2)
    if noise_curve:
        half_a, half_b = split_halves(control.wells)
        if half_a and half_b:
            wells = ctrl_meta[META_WELL].astype(str).to_numpy()
            ctrl_feats = features[is_control]
            in_a, in_b = np.isin(wells, half_a), np.isin(wells, half_b)
            traj_a = mean_trajectory(ctrl_meta[in_a], ctrl_feats[in_a], label=f"{plate} DMSO half A")
            traj_b = mean_trajectory(ctrl_meta[in_b], ctrl_feats[in_b], label=f"{plate} DMSO half B")
            n = min(len(traj_a.time_h), len(traj_b.time_h))
            dist = rowwise_distance(traj_a.profiles[:n], traj_b.profiles[:n], metric)
            out.append(pd.DataFrame({"drug": CONTROL_DRUG,
                                     "concentration_uM": _mode_value(ctrl_meta[META_CONC].to_numpy(float)),
                                     "time_h": 0.5 * (traj_a.time_h[:n] + traj_b.time_h[:n]), "distance": dist}))
        else:
            warnings.warn(f"plate {plate!r}: fewer than 2 DMSO wells, no DMSO-vs-DMSO noise curve", stacklevel=2)
    result = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=DISTANCE_COLUMNS)
    result["cell_line"] = cell_line
    result["plate"] = str(plate)
    return result[DISTANCE_COLUMNS]


def distances_from_parquet(path: str | Path, *, metric: str = "euclidean", paper_faithful: bool = False,
                           noise_curve: bool = True, progress: bool = True,
                           feature_scale: str = DEFAULT_FEATURE_SCALE,
                           control_concentration_uM: float | None = None) -> pd.DataFrame:
    """``distances_from_features`` on a Parquet file, reading one plate at a time when the file is large."""
    path = Path(path)
    meta = pq.ParquetFile(path).metadata
    n_features = len(feature_columns(meta.schema.names))
    if meta.num_rows * n_features * 4 <= MAX_FEATURES_IN_MEMORY_BYTES:
        return distances_from_features(read_features(path), metric=metric, paper_faithful=paper_faithful,
                                       noise_curve=noise_curve, source=str(path), progress=progress,
                                       feature_scale=feature_scale, control_concentration_uM=control_concentration_uM)
    from tqdm.auto import tqdm

    plates = pq.read_table(path, columns=[META_PLATE]).column(0).unique().to_pylist()
    out = [distances_from_features(read_features(path, plate=plate), metric=metric, paper_faithful=paper_faithful,
                                   noise_curve=noise_curve, source=f"{path} (plate {plate!r})", progress=False,
                                   feature_scale=feature_scale, control_concentration_uM=control_concentration_uM)
           for plate in tqdm(sorted(plates), desc="distances per plate", disable=not progress)]
    return pd.concat(out, ignore_index=True)


def distances_from_features(table: pd.DataFrame, *, metric: str = "euclidean", paper_faithful: bool = False,
                            noise_curve: bool = True, source: str = "features table",
                            progress: bool = True, feature_scale: str = DEFAULT_FEATURE_SCALE,
                            control_concentration_uM: float | None = None) -> pd.DataFrame:
    """Raw distance-to-control curves of every plate: the rows of ``distances.csv`` (all time points).

    ``paper_faithful`` matches the control time by floor (the original's behaviour) instead of nearest.
    ``feature_scale``: 'dmso' (default) weighs features by their DMSO replicate spread, per plate; 'none' (paper).
    ``control_concentration_uM``: the DMSO concentration of the control wells (the original's: 367); default: each
    plate's most common (``control_rows``).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if feature_scale not in FEATURE_SCALES:
        raise ValueError(f"unknown feature_scale {feature_scale!r}; choose one of {FEATURE_SCALES}")
    feats = check_feature_table(table, source=source)
    values = table[feats].to_numpy()
    out = []
    from tqdm.auto import tqdm

    plates = table.groupby([META_PLATE, META_CELL], sort=True).indices
    for (plate, _cell), rows in tqdm(plates.items(), desc="distances per plate", disable=not progress):
        out.append(distances_for_plate(table.iloc[rows], values[rows], metric=metric, floor=paper_faithful,
                                       noise_curve=noise_curve, plate=str(plate), feature_scale=feature_scale,
                                       control_concentration_uM=control_concentration_uM))
    return pd.concat(out, ignore_index=True)


# ----------------------------------------------------------------------------------------------------------------------
# From raw distances to clustered series


def read_distances(path: str | Path) -> pd.DataFrame:
    """Read a ``distances.csv`` (ours, or the user's) and check it; ``plate`` is optional."""
    path = Path(path)
    table = pd.read_csv(path)
    return check_distance_table(table, source=str(path))


def check_distance_table(table: pd.DataFrame, *, source: str = "distances table") -> pd.DataFrame:
    required = ["cell_line", "drug", "concentration_uM", "time_h", "distance"]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(table.columns)}")
    table = table.copy()
    if "plate" not in table.columns:
        table["plate"] = ""  # then the per-plate reference is per cell line
    table["plate"] = table["plate"].fillna("").astype(str)
    for col in ("cell_line", "drug"):
        bad = table[col].isna().to_numpy()
        if bad.any():
            raise ValueError(f"{source}: row {int(np.flatnonzero(bad)[0])} has no {col}")
        table[col] = table[col].astype(str)
    for col in ("concentration_uM", "time_h", "distance"):
        num = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(num)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{source}: row {row}: {col} = {table[col].iloc[row]!r} is not a finite number")
        table[col] = num
    if (table["distance"] < 0).any():
        row = int(np.flatnonzero(table["distance"].to_numpy() < 0)[0])
        raise ValueError(f"{source}: row {row}: negative distance")
    dup = table.duplicated(ID_COLUMNS + ["time_h"], keep=False).to_numpy()
    if dup.any():
        raise ValueError(f"{source}: rows {np.flatnonzero(dup)[:4].tolist()} repeat a series and time point")
    return table


@dataclass(frozen=True)
class SeriesSet:
    """The processed series: ``values[i]`` (scaled distance) at ``time_h[i]`` for the series ``meta.iloc[i]``."""

    meta: pd.DataFrame  # ID_COLUMNS, one row per series, index 0..n-1
    values: np.ndarray  # (n, L)
    time_h: np.ndarray  # (n, L)
    reference: pd.DataFrame  # the scale applied: cell_line, plate (or drug), reference value(s)
    scale: str

    def is_control(self, controls=CONTROL_DRUGS) -> np.ndarray:
        return self.meta["drug"].isin(controls).to_numpy()

    def to_frame(self) -> pd.DataFrame:
        """Wide table: id columns, then ``s00, s01, …`` (the processed series points)."""
        width = max(2, len(str(self.values.shape[1] - 1)))
        cols = {f"s{j:0{width}d}": self.values[:, j] for j in range(self.values.shape[1])}
        return pd.concat([self.meta.reset_index(drop=True), pd.DataFrame(cols)], axis=1)


def denoise(values: np.ndarray, window: int = ROLLING_WINDOW) -> np.ndarray:
    """Trailing rolling median along time, without the incomplete head.

    Equals ``pandas.Series(v).rolling(window).median()`` with the first ``window - 1`` (NaN) points dropped: point j
    of the result is the median of raw points j … j+window-1, so the output is ``window - 1`` points shorter and
    each value describes the end of its window (a lag of (window-1)/2 steps, the original's edge handling).
    """
    values = np.asarray(values, dtype=float)
    if values.shape[-1] < window:
        raise ValueError(f"a series of {values.shape[-1]} points is shorter than the median window {window}")
    windows = np.lib.stride_tricks.sliding_window_view(values, window, axis=-1)
    return np.median(windows, axis=-1)


def build_series(distances: pd.DataFrame, *, scale: str = DEFAULT_SCALE, paper_faithful: bool = False,
                 window: int = ROLLING_WINDOW, controls=CONTROL_DRUGS) -> SeriesSet:
    """Post-drug points → rolling median → common length → scale.

    Steps, in order:
    - keep ``time_h > 0``; with ``paper_faithful`` also drop the first post-drug point, as the original's
      ``[1:min_length+1]`` slice did;
    - rolling median (see ``denoise``); with ``paper_faithful`` also drop the last point (the original did);
    - cut every series to the shortest one (keeping the earliest points), so all series share one length;
    - scale (see ``scale_series``).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    table = check_distance_table(distances)
    table = table[table["time_h"] > 0].sort_values(ID_COLUMNS + ["time_h"], kind="stable")
    if table.empty:
        raise ValueError("no post-drug (time_h > 0) distances")
    metas, raw_vals, raw_times = [], [], []
    for key, grp in table.groupby(ID_COLUMNS, sort=True):
        v, t = grp["distance"].to_numpy(float), grp["time_h"].to_numpy(float)
        if paper_faithful:
            v, t = v[1:], t[1:]
        if len(v) < window:
            raise ValueError(f"series {dict(zip(ID_COLUMNS, key))} has {len(v)} post-drug points, fewer than "
                             f"the rolling-median window {window}")
        sm = denoise(v, window)
        t = t[window - 1:]
        if paper_faithful:
            sm, t = sm[:-1], t[:-1]
        metas.append(key)
        raw_vals.append(sm)
        raw_times.append(t)
    lengths = np.array([len(v) for v in raw_vals])
    length = int(lengths.min())
    if length < 2:
        raise ValueError("processed series have fewer than 2 points; need more time points")
    if (lengths > length).any():
        log.info("cutting %d of %d series from up to %d to %d points (shortest series)",
                 int((lengths > length).sum()), len(lengths), int(lengths.max()), length)
    meta = pd.DataFrame(metas, columns=ID_COLUMNS)
    values = np.stack([v[:length] for v in raw_vals])
    times = np.stack([t[:length] for t in raw_times])
    scaled, reference = scale_series(meta, values, scale=scale, controls=controls)
    return SeriesSet(meta=meta, values=scaled, time_h=times, reference=reference, scale=scale)


def scale_series(meta: pd.DataFrame, values: np.ndarray, *, scale: str = DEFAULT_SCALE,
                 controls=CONTROL_DRUGS) -> tuple[np.ndarray, pd.DataFrame]:
    """Scale the processed series; returns (scaled values, table of the reference used).

    - ``'noise'`` (default): divide every series of a (cell line, plate) by the median of that plate's
      DMSO-vs-DMSO noise curve (needs the ``drug == 'DMSO'`` rows ``distances_from_features`` writes). Values are in
      units of replicate noise: a drug with no effect at any concentration stays flat at ~1, on every plate, even on
      a plate where nothing works; one threshold ("k × noise", ``effects.NOISE_MULTIPLE``) then means the same on
      every plate.
    - ``'plate'``: divide by the 95th percentile of the plate's drug-curve values (controls excluded). No-effect
      drugs stay low next to the plate's effective drugs, but a cell line resistant to every drug has only noise
      to set its unit, and that noise is stretched to ~1.
    - ``'cell_drug'``: the paper's: min–max scale all concentrations of a (cell line, drug) jointly to [0, 1].
      A drug with no effect at any concentration is stretched to full-range noise.
    - ``'none'``: raw distances.

    Why 'noise' is the default (measured on synthetic feature tables from tests/test_temporal.py: 5 cell lines,
    one resistant, sensitivities 0.6–1.6×, 64 features, noise 0.05/0.10/0.15, 3 seeds, k = 8, radius-3 DTW):
    mean ARI of the recovered effects 0.79 with 'noise', 0.78 'none', 0.40 'plate' (its resistant line's noise
    came out as effects); 'cell_drug' reached 0.28–0.32 in a first run of the same benchmark (noise 0.05, 0.15).
    """
    values = np.asarray(values, dtype=float)
    out = values.copy()
    if scale == "none":
        return out, pd.DataFrame({"scale": ["none"], "reference": [1.0]})
    if scale == "cell_drug":
        rows = []
        for (cell, drug), idx in meta.groupby(["cell_line", "drug"], sort=True).indices.items():
            lo, hi = values[idx].min(), values[idx].max()
            span = hi - lo if hi > lo else 1.0
            out[idx] = (values[idx] - lo) / span
            rows.append((cell, drug, lo, hi))
        return out, pd.DataFrame(rows, columns=["cell_line", "drug", "min", "max"])
    if scale not in ("plate", "noise"):
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    rows = []
    is_control = meta["drug"].isin(controls).to_numpy()
    for (cell, plate), idx in meta.groupby(["cell_line", "plate"], sort=True).indices.items():
        if scale == "plate":
            drug_idx = idx[~is_control[idx]]
            ref = float(np.percentile(values[drug_idx], PLATE_REFERENCE_PERCENTILE)) if len(drug_idx) else np.nan
        else:
            noise_idx = idx[(meta["drug"].to_numpy()[idx] == CONTROL_DRUG)]
            if not len(noise_idx):
                raise ValueError(f"scale='noise' needs the DMSO-vs-DMSO noise curve (rows with drug == "
                                 f"'{CONTROL_DRUG}') for cell line {cell!r}, plate {plate!r}; distances computed "
                                 f"from features have it when the plate has at least two {CONTROL_DRUG} wells "
                                 f"(one half against the other), otherwise choose scale='plate'")
            ref = float(np.median(values[noise_idx]))
        if not np.isfinite(ref) or ref <= 0:
            warnings.warn(f"cell line {cell!r}, plate {plate!r}: no usable {scale} reference ({ref}); left unscaled",
                          stacklevel=2)
            ref = 1.0
        out[idx] = values[idx] / ref
        rows.append((cell, plate, ref))
    return out, pd.DataFrame(rows, columns=["cell_line", "plate", "reference"])


def noise_level(series: SeriesSet) -> float | None:
    """Median of the scaled DMSO-vs-DMSO noise series, or None when there are none (or the scale makes it moot).

    Under 'cell_drug' the noise curve is stretched to [0, 1] like any drug, so it no longer measures noise.
    """
    if series.scale == "cell_drug":
        return None
    noise = series.meta["drug"].to_numpy() == CONTROL_DRUG
    if not noise.any():
        return None
    return float(np.median(series.values[noise]))
