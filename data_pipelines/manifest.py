"""Plate manifests: one table, one row per image, the single input format of every data path.

The convention is pycytominer's: image metadata lives in ``Metadata_*`` columns. Required:

    path (or path_<channel> ...), Metadata_Plate, Metadata_Well, Metadata_Site, Metadata_CellLine,
    Metadata_Drug, Metadata_Concentration_uM, Metadata_Time_h (hours relative to drug addition)

Any other column (``mask_path``, ``Metadata_Frame``, ``Metadata_Replicate``, ``Metadata_Effect``, ...) is kept as is.

Channels:
- ``path_<channel>`` columns: one single-channel file per channel; the channel order is the column order
  (or the order of the ``channels`` argument, which may also select a subset), recorded by name.
- a single ``path`` column: one file per row holding every channel, either as bands of one image (grayscale L,
  RGB, ...) or as the pages of a multi-page TIFF (pages = channels). The names come from the ``channels``
  argument or default to c0, c1, ...; when ``channels`` is not given the count is read from the first row's file
  that opens (a broken one is left to the build's quarantine).

Relative paths (``path``, ``path_*`` and any ``*_path`` column) resolve against the manifest file's directory;
the validated frame holds absolute paths so that a copy of it stays usable wherever it is written.

Validation collects every problem and raises one :class:`ManifestError` that names the file, the row and the
offending value: rows are CSV *lines* for CSV files (header = line 1) and 1-based *data rows* otherwise.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

PATH_COLUMN = "path"
CHANNEL_PATH_PREFIX = "path_"
PLATE, WELL, SITE = "Metadata_Plate", "Metadata_Well", "Metadata_Site"
CELL_LINE, DRUG = "Metadata_CellLine", "Metadata_Drug"
CONCENTRATION, TIME = "Metadata_Concentration_uM", "Metadata_Time_h"
# Tiles cut from one image (morpho-learner's 64x64 pieces; data_pipelines.original_layout) share plate, well, site
# and time: when this column is present it is part of what makes an image unique.
PIECE = "Metadata_Piece"
REQUIRED_METADATA = (PLATE, WELL, SITE, CELL_LINE, DRUG, CONCENTRATION, TIME)
_TEXT_METADATA = (PLATE, WELL, CELL_LINE, DRUG)
_NUMERIC_METADATA = (SITE, CONCENTRATION, TIME)

# Plate formats: rows are letters, columns 1-based numbers.
PLATE_FORMATS = {96: ("H", 12), 384: ("P", 24)}
DEFAULT_CONTROLS = ("DMSO",)
MAX_REPORTED_PROBLEMS = 20
# Keep at most this many messages: a manifest with a million bad rows should not build a million strings.
_MAX_STORED_PROBLEMS = 10_000

_WELL_RE = re.compile(r"^\s*([A-Za-z])\s*0*(\d{1,3})\s*$")
# pandas' default NA strings; used only for columns that are not identifiers or paths, so that a drug named
# "None" or "NA" stays a drug name.
_DEFAULT_NA = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]


class ManifestError(ValueError):
    """A manifest failed validation. ``problems`` holds every message found (capped at 10,000)."""

    def __init__(self, source: str, problems: Sequence[str], *, total: int | None = None,
                 row_note: str = ""):
        self.source = source
        self.problems = list(problems)
        self.total = total if total is not None else len(self.problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        head = f"{source}: {self.total} problem{'s' if self.total != 1 else ''} in the manifest{row_note}:"
        lines = [head, *(f"  - {p}" for p in shown)]
        if self.total > len(shown):
            lines.append(f"  ... and {self.total - len(shown)} more")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes:
      frame: one row per image, RangeIndex, normalised (wells like 'B07', site int64, dose and time float64,
        absolute paths); every extra column kept.
      channels: channel names, in the order the image's last axis will have.
      channel_columns: ('path',) when one file holds all channels, else the ``path_<ch>`` column per channel.
      source: the file it was read from (the image folder for read_original_layout; None when built in memory).
    """

    frame: pd.DataFrame
    channels: tuple[str, ...]
    channel_columns: tuple[str, ...]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def single_file(self) -> bool:
        """True when each row is one file holding all channels (bands or TIFF pages)."""
        return self.channel_columns == (PATH_COLUMN,)

    def image_files(self, i: int) -> tuple[str, ...]:
        """The absolute image path(s) of row ``i``: one per channel, or the single multi-channel file."""
        row = self.frame.iloc[i]
        return tuple(str(row[c]) for c in self.channel_columns)

    def row_label(self, i: int) -> str:
        """How errors name row ``i`` (0-based index into ``frame``)."""
        return _row_labeler(self.source)(i)


# ----------------------------------------------------------------------------------------------------- reading
def load_manifest(path: str | os.PathLike, *, check_files: bool = True,
                  channels: Sequence[str] | None = None, plate_format: int | str = "auto",
                  controls: Sequence[str] = DEFAULT_CONTROLS) -> Manifest:
    """Reads a CSV or Parquet manifest and validates it (see :func:`validate`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ManifestError(str(path), ["manifest file not found"])
    frame = _read_table(path)
    return validate(frame, source=path, base_dir=path.parent, check_files=check_files,
                    channels=channels, plate_format=plate_format, controls=controls)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        sep = "\t" if suffix == ".tsv" else ","
        header = pd.read_csv(path, sep=sep, nrows=0).columns
        # Identifiers, paths and the numeric required columns are read as text: identifiers must not turn into
        # numbers ('01' plates) or NaN (a drug named 'None'), and a bad dose must be reported as written.
        as_text = [c for c in header if c in _TEXT_METADATA or c in _NUMERIC_METADATA or _is_path_column(c)]
        na_values = {c: _DEFAULT_NA for c in header if c not in as_text}
        return pd.read_csv(path, sep=sep, dtype={c: str for c in as_text}, keep_default_na=False,
                           na_values=na_values)
    raise ManifestError(str(path), [f"unsupported manifest format {suffix!r}: use .csv or .parquet"])


def write_manifest(manifest: Manifest | pd.DataFrame, path: str | os.PathLike, *,
                   relative_paths: bool = False) -> Path:
    """Writes a manifest as CSV or Parquet (chosen by suffix).

    ``relative_paths=True`` rewrites path columns relative to the output file's directory, so the manifest and its
    images can move together; otherwise paths are written as they are (absolute after :func:`load_manifest`).
    """
    path = Path(path)
    frame = manifest.frame if isinstance(manifest, Manifest) else manifest
    frame = frame.copy()
    if relative_paths:
        out_dir = str(path.resolve().parent)
        for col in frame.columns:
            if _is_path_column(col):
                frame[col] = [p if _is_missing(p) else os.path.relpath(str(p), out_dir) for p in frame[col]]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        raise ValueError(f"{path}: unsupported manifest format {suffix!r}: use .csv or .parquet")
    return path


# -------------------------------------------------------------------------------------------------- validation
def validate(frame: pd.DataFrame, *, source: str | os.PathLike | None = None,
             base_dir: str | os.PathLike | None = None, check_files: bool = True,
             channels: Sequence[str] | None = None, plate_format: int | str = "auto",
             controls: Sequence[str] = DEFAULT_CONTROLS) -> Manifest:
    """Checks and normalises a manifest table; raises :class:`ManifestError` listing every problem found.

    Checks: required columns; path columns (``path`` xor ``path_<ch>``); empty values; files exist
    (``check_files``); wells fit the plate format (``plate_format`` 96, 384, or 'auto': 96 when all of a plate's
    wells fit it, else 384) and are normalised to zero-padded 'B07'; site is a non-negative integer; dose is a
    finite number >= 0 and time a finite number; no two rows share a file, nor plate/well/site/time (and
    ``Metadata_Piece``, the tile of a cut image, when that column is present); every plate
    has at least one well of a control drug (``controls``, case-insensitive; default DMSO).

    Args:
      frame: the table, one row per image.
      source: the file it came from, used in messages (and to say whether rows are CSV lines).
      base_dir: where relative paths resolve (default: the current directory).
      channels: channel names; see the module docstring.
    """
    source_path = Path(source) if source is not None else None
    source_name = str(source_path) if source_path is not None else "<manifest table>"
    label = _row_labeler(source_path)
    row_note = (" (rows are CSV lines; the header is line 1)" if _is_csv(source_path)
                else " (rows are 1-based data rows)")

    def fail(problems: list[tuple[float, str]], total: int | None = None) -> ManifestError:
        problems.sort(key=lambda p: p[0])
        return ManifestError(source_name, [m for _, m in problems], total=total, row_note=row_note)

    problems = _ProblemList()
    columns = list(frame.columns)
    missing = [c for c in REQUIRED_METADATA if c not in columns]
    if missing:
        problems.add(-1, f"missing required column(s): {', '.join(missing)} (columns present: {columns})")
    channel_columns, names, column_problem = _channel_layout(columns, channels)
    if column_problem:
        problems.add(-1, column_problem)
    if problems:
        raise fail(problems.items)
    if len(frame) == 0:
        raise fail([(-1, "the manifest has no rows")])

    frame = frame.reset_index(drop=True).copy()
    base = os.path.abspath(base_dir) if base_dir is not None else os.getcwd()
    if source_path is not None and source_path.is_dir() and PATH_COLUMN in frame.columns:
        # Rows of a table made from a folder (read_original_layout) mean nothing to the user: name the file too.
        row_of, files = label, frame[PATH_COLUMN].astype("str").tolist()

        def label(i):
            return f"{row_of(i)} ({files[int(i)]})"

    # --- text identifiers
    for col in _TEXT_METADATA:
        text, empty = _as_text(frame[col])
        for i in np.flatnonzero(empty):
            problems.add(i, f"{label(i)}: {col} is empty")
        frame[col] = text

    # --- wells
    wells, well_rows, well_cols = _parse_wells(frame[WELL])
    for i in np.flatnonzero(pd.isna(wells) & ~(frame[WELL] == "").to_numpy()):
        problems.add(i, f"{label(i)}: {WELL} {frame.at[i, WELL]!r} is not a well name like 'B07'")
    _check_plate_format(frame[PLATE], frame[WELL].tolist(), wells, well_rows, well_cols, plate_format, label,
                        problems)
    frame[WELL] = pd.Series(wells, dtype="str").where(~pd.isna(wells), frame[WELL])

    # --- numbers
    site = _numeric(frame[SITE], SITE, label, problems, integer=True, minimum=0)
    dose = _numeric(frame[CONCENTRATION], CONCENTRATION, label, problems, minimum=0.0)
    time = _numeric(frame[TIME], TIME, label, problems)

    # --- paths
    path_cols = [c for c in columns if _is_path_column(c)]
    for col in path_cols:
        text, empty = _as_text(frame[col])
        required = col in channel_columns  # image paths; other *_path columns are resolved but not checked
        resolved = [None if e else _resolve(p, base) for p, e in zip(text, empty)]
        if required:
            for i in np.flatnonzero(empty):
                problems.add(i, f"{label(i)}: {col} is empty")
        if required and check_files:
            for i, p in enumerate(resolved):
                if p is not None and not os.path.isfile(p):
                    problems.add(i, f"{label(i)}: {col} file not found: {p} (written {text[i]!r})")
        frame[col] = pd.Series(resolved, dtype="str")  # missing optional paths (mask_path) stay missing

    # --- duplicates: the same image file twice, or the same plate/well/site/time twice
    _check_duplicate_files(frame, channel_columns, label, problems)
    # (only among rows whose key fields are valid: a bad well is reported once, not again as a duplicate)
    key_ok = (~pd.isna(wells) & (frame[PLATE] != "").to_numpy() & np.isfinite(site.to_numpy())
              & np.isfinite(time.to_numpy()))
    keys = pd.DataFrame({PLATE: frame[PLATE], WELL: frame[WELL], SITE: site, TIME: time})
    if PIECE in frame.columns:
        keys[PIECE] = frame[PIECE].to_numpy()
    _check_duplicate_keys(keys, np.flatnonzero(key_ok), label, problems)

    # --- every plate needs DMSO (or another control) wells: distances and effects are measured against them
    _check_controls(frame, controls, label, problems)

    if problems:
        raise fail(problems.items, total=problems.total)

    frame[SITE] = site.astype("int64")
    frame[CONCENTRATION] = dose.astype("float64")
    frame[TIME] = time.astype("float64")

    if names is None:  # one file per row and no names given: count the channels in the first readable file
        count = _probe_first_readable(frame[PATH_COLUMN].tolist(), label, source_name)
        names = tuple(f"c{k}" for k in range(count))
    return Manifest(frame=frame, channels=tuple(names), channel_columns=tuple(channel_columns),
                    source=source_path)


def probe_channel_count(path: str, row_label: str = "row 1", source: str = "<manifest>") -> int:
    """Channels in one image file: the page count of a multi-page TIFF, else the band count (L=1, RGB=3)."""
    from PIL import Image  # imported here: the manifest itself needs no imaging library

    try:
        with Image.open(path) as image:
            pages = getattr(image, "n_frames", 1)
            return pages if pages > 1 else len(image.getbands())
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing here
        raise ManifestError(source, [f"{row_label}: cannot read {path} to count its channels ({err}); "
                                     "pass channels=[...]"]) from err


# A bad image is the build's to quarantine, not a reason to refuse the manifest: the channel count is read from the
# first file that opens, looking at most this many rows far.
_MAX_PROBED_FILES = 100


def _probe_first_readable(paths: list[str], label, source_name: str) -> int:
    first_error = None
    for i, path in enumerate(paths[:_MAX_PROBED_FILES]):
        try:
            return probe_channel_count(path, label(i), source_name)
        except ManifestError as err:
            first_error = first_error or err
    raise first_error


# ------------------------------------------------------------------------------------------------------ helpers
class _ProblemList:
    """Problems with the row they concern (-1 for the whole file), capped at _MAX_STORED_PROBLEMS, plus a count."""

    def __init__(self):
        self.items: list[tuple[float, str]] = []
        self.total = 0

    def add(self, row: float, message: str) -> None:
        self.total += 1
        if len(self.items) < _MAX_STORED_PROBLEMS:
            self.items.append((float(row), message))

    def __bool__(self) -> bool:
        return self.total > 0


def _is_csv(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() in (".csv", ".tsv", ".txt")


def _row_labeler(source: Path | None):
    if _is_csv(source):
        lines: list[int] = []

        def line_of(i) -> str:
            if not lines:  # read only when a problem is reported
                lines.extend(_csv_record_lines(source))
            i = int(i)
            return f"line {lines[i] if i < len(lines) else i + 2}"
        return line_of
    return lambda i: f"row {int(i) + 1}"


def _csv_record_lines(path: Path) -> list[int]:
    """The file line each data record of a CSV starts on: pandas skips blank lines and a quoted field may span
    lines, so record i is not always on line i + 2."""
    starts, end = [], 1
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        next(reader, None)  # the header
        end = reader.line_num
        for record in reader:
            if len(record) > 1 or (record and record[0].strip()):  # as pandas' skip_blank_lines
                starts.append(end + 1)
            end = reader.line_num
    return starts


def _is_path_column(name: str) -> bool:
    return name == PATH_COLUMN or name.startswith(CHANNEL_PATH_PREFIX) or name.endswith("_path")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _channel_layout(columns: list[str], channels: Sequence[str] | None):
    """Returns (channel path columns, channel names or None when they must be probed, problem or None)."""
    per_channel = [c for c in columns if c.startswith(CHANNEL_PATH_PREFIX)]
    if PATH_COLUMN in columns and per_channel:
        return [], None, (f"both 'path' and per-channel columns {per_channel} are present; "
                          "use 'path' for one file per row or path_<channel> columns, not both")
    if PATH_COLUMN in columns:
        names = tuple(channels) if channels is not None else None
        if names is not None and (len(names) == 0 or len(set(names)) != len(names)):
            return [], None, f"channels must be distinct names, got {list(names)}"
        return [PATH_COLUMN], names, None
    if not per_channel:
        return [], None, "no image path column: add 'path' or path_<channel> columns"
    available = {c[len(CHANNEL_PATH_PREFIX):]: c for c in per_channel}
    if channels is None:
        return per_channel, tuple(available), None
    unknown = [c for c in channels if c not in available]
    if unknown or len(set(channels)) != len(channels) or not channels:
        return [], None, (f"channels {list(channels)} do not match the path columns "
                          f"(available: {list(available)})")
    return [available[c] for c in channels], tuple(channels), None


def _as_text(series: pd.Series) -> tuple[list[str], np.ndarray]:
    """Values as stripped strings ('' for missing) and a mask of the empty ones."""
    text = series.astype("str").str.strip().fillna("")  # astype keeps missing values missing
    return text.tolist(), (text == "").to_numpy()


def _parse_wells(series: pd.Series):
    """Normalised well names ('B07', NaN when unparseable) and their 1-based row and column numbers."""
    parts = series.astype("str").str.extract(_WELL_RE)
    number = pd.to_numeric(parts[1], errors="coerce").fillna(0).astype("int64").to_numpy()
    ok = (parts[0].notna() & (number > 0)).to_numpy()
    letter = parts[0].fillna("A").str.upper()
    rows = np.where(ok, letter.map(lambda c: ord(c) - ord("A") + 1).to_numpy(dtype=np.int64), 0)
    cols = np.where(ok, number, 0)
    names = (letter + pd.Series(number, index=letter.index).map("{:02d}".format)).to_numpy(dtype=object)
    names[~ok] = np.nan
    return names, rows, cols


def _check_plate_format(plates, written, wells, rows, cols, plate_format, label, problems: _ProblemList) -> None:
    if plate_format not in ("auto", 96, 384):
        raise ValueError(f"plate_format must be 'auto', 96 or 384, got {plate_format!r}")
    valid = ~pd.isna(wells)
    codes, names = pd.factorize(plates)
    if plate_format == "auto":  # a plate is a 96-well plate when all its (valid) wells fit one
        fits96 = pd.Series(~valid | ((rows <= 8) & (cols <= 12)))
        is96 = fits96.groupby(codes).transform("all").to_numpy()
    else:
        is96 = np.full(len(plates), plate_format == 96)
    last_row = np.where(is96, 8, 16)
    last_col = np.where(is96, 12, 24)
    for i in np.flatnonzero(valid & ((rows > last_row) | (cols > last_col))):
        fmt = 96 if is96[i] else 384
        letter, columns = PLATE_FORMATS[fmt]
        problems.add(i, f"{label(i)}: {WELL} {written[i]!r} is not a well of a {fmt}-well plate "
                        f"(A-{letter} x 1-{columns}; plate {names[codes[i]]!r})")


def _numeric(series: pd.Series, column: str, label, problems: _ProblemList, *, integer: bool = False,
             minimum: float | None = None) -> pd.Series:
    raw = series.tolist()
    values = pd.to_numeric(series, errors="coerce").astype("float64")
    for i in np.flatnonzero(~np.isfinite(values.to_numpy())):
        shown = raw[i]
        what = "is empty" if _is_missing(shown) or str(shown).strip() == "" else f"is not a finite number: {shown!r}"
        problems.add(i, f"{label(i)}: {column} {what}")
    finite = np.isfinite(values.to_numpy())
    if integer:
        for i in np.flatnonzero(finite & (values.to_numpy() != np.round(values.to_numpy()))):
            problems.add(i, f"{label(i)}: {column} must be an integer, got {raw[i]!r}")
    if minimum is not None:
        for i in np.flatnonzero(finite & (values.to_numpy() < minimum)):
            problems.add(i, f"{label(i)}: {column} must be >= {minimum:g}, got {raw[i]!r}")
    return values


def _resolve(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, path))  # join keeps an absolute path as it is


def _check_duplicate_files(frame: pd.DataFrame, channel_columns, label, problems: _ProblemList) -> None:
    cells = [(p, i, col) for col in channel_columns for i, p in enumerate(frame[col].tolist())
             if isinstance(p, str) and p]
    first: dict[str, tuple[int, str]] = {}
    for p, i, col in sorted(cells, key=lambda c: (c[1], channel_columns.index(c[2]))):
        if p in first:
            j, col_j = first[p]
            where = "the same row" if j == i else label(j)
            problems.add(i, f"{label(i)}: duplicate image file {p} ({col}; already used by {where}, {col_j})")
        else:
            first[p] = (i, col)


def _check_duplicate_keys(keys: pd.DataFrame, rows: np.ndarray, label, problems: _ProblemList) -> None:
    subset = keys.iloc[rows]
    group = subset.groupby(list(keys.columns), sort=False, dropna=False).ngroup().to_numpy()
    first_of_group = pd.Series(rows).groupby(group).transform("min").to_numpy()
    for i, j in zip(rows, first_of_group):
        if i == j:
            continue
        piece = f", piece {keys.at[i, PIECE]}" if PIECE in keys.columns else ""
        problems.add(i, f"{label(i)}: duplicate plate/well/site/time{'/piece' if piece else ''} "
                        f"({keys.at[i, PLATE]!r}, {keys.at[i, WELL]!r}, site {keys.at[i, SITE]:g}, "
                        f"{keys.at[i, TIME]:g} h{piece}) already at {label(j)}")


def _check_controls(frame: pd.DataFrame, controls: Sequence[str], label, problems: _ProblemList) -> None:
    wanted = {c.upper() for c in controls}
    is_control = frame[DRUG].str.upper().isin(wanted).to_numpy()
    plates = frame[PLATE].to_numpy()
    for plate, idx in pd.Series(np.arange(len(frame))).groupby(plates, sort=False).groups.items():
        idx = np.asarray(idx)
        if not is_control[idx].any():
            problems.add(idx[0], f"plate {plate!r} (first at {label(idx[0])}) has no {'/'.join(controls)} "
                                 f"wells: every plate needs control wells for its drug effects")
