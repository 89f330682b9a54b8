"""Which images each comparison task reads (../shared/docs/original_method.md §4.2–§4.4), from metadata alone.

Works on any table with the ``Metadata_*`` columns: a dataset manifest (to pick the records whose features to
extract) or a features Parquet (to pick rows of features already extracted). Every task reads the wells of each
(cell line, drug) at that pair's highest concentration, and the last frames of each field of view:

- ``replicates`` (task A): every drug and control, the last 5 frames, all wells (replicate pairs are formed later).
- ``controls`` (task B): drugs, the last 15 frames, against the controls (DMSO, PBS), the last 23 frames: the
  authors' counts, chosen by them to balance the two classes on their plate. The authors trained and reported on the
  same images; here the wells are split into train / val / test within each (cell line, drug) (``well_split``), so a
  probe is chosen on val wells and scored on test wells it never saw.
- ``clustering`` (task C): drugs only, the last 10 frames.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_pipelines.lens_data import CONTROLS, well_split

TASKS = ("replicates", "controls", "clustering")
REQUIRED = ("Metadata_Plate", "Metadata_Well", "Metadata_CellLine", "Metadata_Drug", "Metadata_Concentration_uM",
            "Metadata_Time_h")
# The authors' frame counts per well (§4.2–§4.4).
PAPER_FRAMES = {"replicates": 5, "drugs": 15, "controls": 23, "clustering": 10}


def select_compare_rows(meta: pd.DataFrame, *, frames: dict[str, int] | None = None,
                        controls: tuple[str, ...] = CONTROLS, test_fraction: float = 0.25,
                        val_fraction: float = 0.25, seed: int = 0) -> pd.DataFrame:
    """The rows of ``meta`` any task reads, with boolean columns ``replicates``, ``controls``, ``clustering`` (which
    task reads the row), ``is_drug`` and ``split`` (the controls task's part, by well; ``None`` for rows that task
    does not read). The input's columns and index are kept, so ``source_index`` or feature columns travel along.
    """
    missing = [c for c in REQUIRED if c not in meta.columns]
    if missing:
        raise ValueError(f"the table lacks {missing}; the comparison needs plate, well, cell line, drug, "
                         "concentration and time per image")
    frames = {**PAPER_FRAMES, **(frames or {})}
    if min(frames.values()) < 1:
        raise ValueError(f"frame counts must be >= 1, got {frames}")
    site = meta["Metadata_Site"] if "Metadata_Site" in meta.columns else pd.Series(1, index=meta.index)
    top = meta.groupby(["Metadata_CellLine", "Metadata_Drug"]).Metadata_Concentration_uM.transform("max")
    frame = meta[meta.Metadata_Concentration_uM == top].assign(_site=site)
    # Rank of each frame from the end of its field of view: 0 is the last time point.
    from_end = (frame.groupby(["Metadata_Plate", "Metadata_Well", "_site"]).Metadata_Time_h
                .rank(method="first", ascending=False).astype(int) - 1)
    is_drug = ~frame.Metadata_Drug.isin(controls)
    out = frame.drop(columns="_site").assign(
        is_drug=is_drug.to_numpy(),
        replicates=(from_end < frames["replicates"]).to_numpy(),
        controls=np.where(is_drug, from_end < frames["drugs"], from_end < frames["controls"]),
        clustering=(is_drug & (from_end < frames["clustering"])).to_numpy())
    if not is_drug.any():
        raise ValueError("no drug wells in the table: every row is a control " f"({sorted(controls)})")
    if is_drug.all():
        raise ValueError(f"no control wells ({sorted(controls)}) in the table: the controls task needs them")
    out = out[out.replicates | out.controls | out.clustering].copy()

    part = out[out.controls]
    parts = well_split(pd.DataFrame({"cell_line": part.Metadata_CellLine.to_numpy(),
                                     "class_name": part.Metadata_Drug.to_numpy(),
                                     "plate": part.Metadata_Plate.to_numpy(), "well": part.Metadata_Well.to_numpy()}),
                       test_fraction, val_fraction, seed)
    out["split"] = None
    out.loc[part.index, "split"] = parts
    return out


def task_rows(selection: pd.DataFrame, task: str) -> pd.DataFrame:
    """The rows one task reads, in a stable order (cell line, plate, well, time, then site when there is one), the
    same whatever the order of the table: the probe's shuffles and the clustering's tie-breaks follow row order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    rows = selection[selection[task]]
    keys = ["Metadata_CellLine", "Metadata_Plate", "Metadata_Well", "Metadata_Time_h"]
    return rows.sort_values(keys + ["Metadata_Site"] * ("Metadata_Site" in rows.columns), kind="stable")
