"""The authors' image files and plate metadata -> a Manifest.

Filenames (dmitrav/pheno-ml, after cropping):

    {CELL}_{CLx}_{Px}_{WELL}_{k}_{YYYY}y{MM}m{DD}d_{HH}h{MM}m.jpg     e.g. ACHN_CL3_P2_C15_1_2019y08m30d_00h21m.jpg

``CLx`` is kept as ``Metadata_Clone`` (its meaning is unknown), ``Px`` is the plate of the cell line, ``k`` the site.
The variants of dmitrav/morpho-learner are read too: the drug and dose inserted after the well
(``..._{WELL}_{DRUG}_c={conc}_{k}_...``), the drug alone (``..._{WELL}_{DRUG}_{k}_...``), and the ``_{piece}``
suffix of its 64x64 cuts (kept as ``Metadata_Piece``). A drug and dose in the name are used when no plate metadata
is given.

Plate metadata: ``{metadata_dir}/{CELL}_{CLx}_{Px}.csv`` with columns ``Drug``, ``Final_conc_uM``, ``Well`` (Row and
Column are not needed). Wells whose Drug is empty were not used by the authors (their code skips them); their images
are dropped, with a logged count, unless ``unmapped_wells='error'``.

Time relative to drug addition (``Metadata_Time_h``), in order of preference:
1. ``global_metadata``: the authors' ``pheno-ml-metadata.csv`` (columns ``cell``, ``Well``, ``source_plate``
   (P1/P2), ``Time.gmt``, ``Time`` in hours, ``Conf``). Like their code, the rows of one cell line/plate/well are
   sorted by ``Time.gmt`` and matched in order to that well's image times; when the counts differ, rows with an
   empty ``Conf`` are dropped first (their rule), and a remaining mismatch is an error.
2. ``drug_addition``: the drug-addition time of every plate (one datetime, or a mapping from plate id
   ``{CELL}_{CLx}_{Px}`` to datetime); hours = filename timestamp - drug addition.
3. neither: hours since the plate's first image plus ``first_image_time_h`` (the first image's time relative to drug
   addition, e.g. -2.0 if imaging started two hours before the drug). With the default 0.0 the zero is the first
   image, which is not the drug addition in general: pass one of the above when the time axis matters.
The filename timestamp itself is kept as ``Metadata_Timestamp`` (ISO 8601, no time zone).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines import manifest as mf

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".png")

_FILENAME_RE = re.compile(
    r"""^(?P<cell_line>[A-Za-z0-9-]+)_(?P<clone>CL\d+)_(?P<plate>P\d+)_
        (?P<well>[A-Pa-p]\d{1,2})_
        (?:(?P<drug>[^_]+?)(?:_c=(?P<concentration>[^_]+))?_)?
        (?P<site>\d+)_
        (?P<year>\d{4})y(?P<month>\d{2})m(?P<day>\d{2})d_(?P<hour>\d{2})h(?P<minute>\d{2})m
        (?:_(?P<piece>\d+))?
        \.(?P<ext>jpe?g|tiff?|png)$""",
    re.VERBOSE | re.IGNORECASE,
)
_EXAMPLE = "ACHN_CL3_P2_C15_1_2019y08m30d_00h21m.jpg"


def parse_filename(name: str | os.PathLike) -> dict:
    """Metadata in one of the authors' image names (directories are ignored).

    Returns: cell_line, clone, plate ('P2'), plate_id ('ACHN_CL3_P2'), well (normalised, 'C15'), site (int),
    timestamp (naive datetime), drug and concentration_uM (None unless in the name), piece (int or None).
    Raises ValueError naming the file and the expected pattern when the name does not match.
    """
    base = os.path.basename(os.fspath(name))
    match = _FILENAME_RE.match(base)
    if match is None:
        raise ValueError(f"{name}: not an image name of the form "
                         f"{{CELL}}_{{CLx}}_{{Px}}_{{WELL}}_{{k}}_{{YYYY}}y{{MM}}m{{DD}}d_{{HH}}h{{MM}}m.jpg "
                         f"(e.g. {_EXAMPLE})")
    g = match.groupdict()
    try:
        timestamp = dt.datetime(int(g["year"]), int(g["month"]), int(g["day"]), int(g["hour"]), int(g["minute"]))
    except ValueError as err:
        raise ValueError(f"{name}: invalid date/time in the name ({err})") from None
    concentration = None
    if g["concentration"] is not None:
        try:
            concentration = float(g["concentration"])
        except ValueError:
            raise ValueError(f"{name}: concentration {g['concentration']!r} after 'c=' is not a number") from None
    well = f"{g['well'][0].upper()}{int(g['well'][1:]):02d}"
    return {
        "cell_line": g["cell_line"],
        "clone": g["clone"],
        "plate": g["plate"],
        "plate_id": f"{g['cell_line']}_{g['clone']}_{g['plate']}",
        "well": well,
        "site": int(g["site"]),
        "timestamp": timestamp,
        "drug": g["drug"],
        "concentration_uM": concentration,
        "piece": int(g["piece"]) if g["piece"] is not None else None,
    }


def read_original_layout(image_root: str | os.PathLike, metadata_dir: str | os.PathLike | None, *,
                         global_metadata: str | os.PathLike | None = None,
                         drug_addition: dt.datetime | Mapping[str, dt.datetime] | None = None,
                         first_image_time_h: float = 0.0,
                         channel_name: str = "phase",
                         unmapped_wells: str = "drop",
                         ignore_unmatched_names: bool = False,
                         check_files: bool = True) -> mf.Manifest:
    """Finds the authors' images under ``image_root`` (recursively) and returns a validated Manifest.

    Args:
      image_root: folder searched recursively for .jpg/.jpeg/.tif/.tiff/.png files (hidden files skipped).
      metadata_dir: folder of per-plate CSVs ``{CELL}_{CLx}_{Px}.csv``; None to take drug and dose from the names
        (morpho-learner layout).
      global_metadata, drug_addition, first_image_time_h: the time axis; see the module docstring.
      channel_name: the name of the single (grayscale) channel.
      unmapped_wells: 'drop' (default, logged) or 'error' for images of wells without a drug in the metadata.
      ignore_unmatched_names: skip (and log) files whose names do not parse instead of raising.
    """
    if unmapped_wells not in ("drop", "error"):
        raise ValueError(f"unmapped_wells must be 'drop' or 'error', got {unmapped_wells!r}")
    root = Path(image_root).resolve()
    source = str(root)
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise mf.ManifestError(source, [f"no image files ({', '.join(IMAGE_SUFFIXES)}) found"])

    records, unmatched = [], []
    for path in files:
        try:
            parsed = parse_filename(path.name)
        except ValueError as err:
            unmatched.append(str(err))
            continue
        parsed["path"] = str(path)
        records.append(parsed)
    if unmatched and not ignore_unmatched_names:
        raise mf.ManifestError(source, unmatched)
    if unmatched:
        log.warning("%s: skipped %d files whose names do not parse, e.g. %s", source, len(unmatched), unmatched[0])
    if not records:
        raise mf.ManifestError(source, ["no image name matches the authors' convention"])
    table = pd.DataFrame.from_records(records)

    problems: list[str] = []
    if metadata_dir is not None:
        table = _attach_plate_metadata(table, Path(metadata_dir), unmapped_wells, problems)
    else:
        for column, what in (("drug", "drug"), ("concentration_uM", "dose ('c=')")):
            missing = table[column].isna()
            if missing.any():
                problems.append(f"{table.loc[missing, 'path'].iloc[0]}: no {what} in the name and no metadata_dir "
                                f"({int(missing.sum())} such files)")
    if problems:
        raise mf.ManifestError(source, problems)

    table["time_h"] = _hours(table, global_metadata, drug_addition, first_image_time_h, source)

    frame = pd.DataFrame({
        "path": table["path"],
        mf.PLATE: table["plate_id"],
        mf.WELL: table["well"],
        mf.SITE: table["site"],
        mf.CELL_LINE: table["cell_line"],
        mf.DRUG: table["drug"],
        mf.CONCENTRATION: table["concentration_uM"],
        mf.TIME: table["time_h"],
        "Metadata_Clone": table["clone"],
        "Metadata_PlateName": table["plate"],
        "Metadata_Timestamp": [t.isoformat() for t in table["timestamp"]],
    })
    if table["piece"].notna().any():
        frame["Metadata_Piece"] = table["piece"]
    return mf.validate(frame, source=root, base_dir=root, check_files=check_files, channels=[channel_name])


def _attach_plate_metadata(table: pd.DataFrame, metadata_dir: Path, unmapped_wells: str,
                           problems: list[str]) -> pd.DataFrame:
    """Drug and dose per image from ``{metadata_dir}/{plate_id}.csv``."""
    keep = np.ones(len(table), dtype=bool)
    dropped: dict[str, int] = {}
    for plate_id, idx in table.groupby("plate_id", sort=True).groups.items():
        csv = metadata_dir / f"{plate_id}.csv"
        if not csv.is_file():
            problems.append(f"{csv}: plate metadata not found (needed for {len(idx)} images of plate {plate_id})")
            continue
        meta = pd.read_csv(csv, dtype={"Well": str, "Drug": str}, keep_default_na=False,
                           na_values={"Final_conc_uM": ["", "NA", "NaN", "nan"]})
        lacking = [c for c in ("Well", "Drug", "Final_conc_uM") if c not in meta.columns]
        if lacking:
            problems.append(f"{csv}: missing column(s) {', '.join(lacking)}")
            continue
        by_well: dict[str, tuple[str, float]] = {}
        for line, (well, drug, dose) in enumerate(zip(meta["Well"], meta["Drug"], meta["Final_conc_uM"]), start=2):
            norm = _normalise_well(well)
            if norm is None:
                problems.append(f"{csv} line {line}: Well {well!r} is not a well name")
            elif norm in by_well:
                problems.append(f"{csv} line {line}: well {norm} listed twice")
            elif drug.strip():
                value = pd.to_numeric(pd.Series([dose]), errors="coerce").iloc[0]
                if not np.isfinite(value) or value < 0:
                    shown = "is empty" if pd.isna(dose) else f"{dose!r} is not a dose >= 0"
                    problems.append(f"{csv} line {line}: Final_conc_uM of well {norm} ({drug.strip()}) {shown}")
                by_well[norm] = (drug.strip(), dose)
        for i in idx:
            entry = by_well.get(table.at[i, "well"])
            if entry is None:
                keep[i] = False
                dropped[plate_id] = dropped.get(plate_id, 0) + 1
                if unmapped_wells == "error":
                    problems.append(f"{table.at[i, 'path']}: well {table.at[i, 'well']} has no drug in {csv}")
                continue
            table.at[i, "drug"], table.at[i, "concentration_uM"] = entry
    if dropped and unmapped_wells == "drop":
        log.warning("dropped %d images of wells without a drug in the plate metadata (%s)",
                    sum(dropped.values()), ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())))
    return table.loc[keep].reset_index(drop=True)


def _normalise_well(text: str) -> str | None:
    match = re.match(r"^\s*([A-Pa-p])0*(\d{1,2})\s*$", str(text))
    if match is None or int(match.group(2)) == 0:
        return None
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def _hours(table: pd.DataFrame, global_metadata, drug_addition, first_image_time_h: float, source: str) -> np.ndarray:
    timestamps = pd.to_datetime(table["timestamp"])
    if global_metadata is not None:
        return _hours_from_global_metadata(table, Path(global_metadata), source)
    if drug_addition is not None:
        hours = np.empty(len(table))
        missing = []
        for plate_id, idx in table.groupby("plate_id").groups.items():
            start = drug_addition.get(plate_id) if isinstance(drug_addition, Mapping) else drug_addition
            if start is None:
                missing.append(plate_id)
                continue
            hours[np.asarray(idx)] = (timestamps.loc[idx] - pd.Timestamp(start)).dt.total_seconds() / 3600.0
        if missing:
            raise mf.ManifestError(source, [f"no drug_addition time for plate(s) {', '.join(sorted(missing))}"])
        return hours
    first = timestamps.groupby(table["plate_id"]).transform("min")
    return ((timestamps - first).dt.total_seconds() / 3600.0 + first_image_time_h).to_numpy()


def _hours_from_global_metadata(table: pd.DataFrame, path: Path, source: str) -> np.ndarray:
    """The authors' alignment: per cell line/plate/well, metadata rows by Time.gmt matched to image times in order."""
    meta = pd.read_csv(path)
    lacking = [c for c in ("cell", "Well", "source_plate", "Time.gmt", "Time") if c not in meta.columns]
    if lacking:
        raise mf.ManifestError(str(path), [f"missing column(s) {', '.join(lacking)}"])
    meta = meta.assign(_well=[_normalise_well(w) for w in meta["Well"]],
                       _gmt=pd.to_datetime(meta["Time.gmt"], errors="coerce"))
    groups = {key: g.sort_values("_gmt", kind="stable") for key, g in meta.groupby(["cell", "source_plate", "_well"])}
    hours = np.full(len(table), np.nan)
    problems = []
    for (cell, plate, well), idx in table.groupby(["cell_line", "plate", "well"]).groups.items():
        image_times = sorted(set(table.loc[idx, "timestamp"]))
        rows = groups.get((cell, plate, well))
        if rows is None:
            problems.append(f"{path}: no rows for cell {cell}, source_plate {plate}, well {well}")
            continue
        if len(rows) != len(image_times) and "Conf" in rows.columns:
            rows = rows[rows["Conf"].notna()]  # the authors' rule when images and metadata disagree
        if len(rows) != len(image_times):
            problems.append(f"{path}: {len(rows)} time points for {cell} {plate} {well}, "
                            f"but {len(image_times)} image times under {source}")
            continue
        time_of = dict(zip(image_times, rows["Time"].astype(float)))
        hours[np.asarray(idx)] = [time_of[t] for t in table.loc[idx, "timestamp"]]
    if problems:
        raise mf.ManifestError(str(path), problems)
    return hours


def example_filename(cell_line: str, clone: str, plate: str, well: str, site: int, when: dt.datetime,
                     *, drug: str | None = None, concentration_uM: float | None = None,
                     suffix: str = ".jpg") -> str:
    """The authors' name for an image (the inverse of parse_filename); used to write test fixtures."""
    drug_part = ""
    if drug is not None:
        drug_part = f"_{drug}" + (f"_c={concentration_uM}" if concentration_uM is not None else "")
    return (f"{cell_line}_{clone}_{plate}_{well}{drug_part}_{site}_"
            f"{when:%Y}y{when:%m}m{when:%d}d_{when:%H}h{when:%M}m{suffix}")

