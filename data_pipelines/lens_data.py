"""The lens task's images: which images, which class each is, which split, and the masks to score maps against.

The authors' selection (../shared/docs/original_method.md §6.2): for every cell line and every class (DMSO, PBS, then
the 31 drugs in their constants order), the wells of that class at its highest concentration, at most 4 wells, and the
last 30 images of each well; labels 0 = DMSO, 1 = PBS, 2… the drugs. They split those images at random, image by image
(10% test, ``random_state=42``), so neighbouring frames of one well, nearly the same picture, sit on both sides.

Here the split is by well (``split_by='well'``, the default): within each (cell line, class) the capped wells are
dealt, in a seeded random order, to test, val and train, so every test image comes from a well the lens and the
probes never saw. ``paper_faithful=True`` restores the authors' image-level 90/10 split with no val part (their probe
selection read the training split). Classes with too few wells to fill every part keep at least one train well and
then one test well; val is empty for them.

Everything here is metadata: ``select_lens_images`` reads a dataset's manifest, ``LabelledSource`` wraps the
random-access source so each element carries its ``label``, and ``load_masks`` reads the signature masks a synthetic
plate wrote beside its images (the manifest's ``mask_path``), for the importance-map scores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from data_pipelines.source import SubsetSource, readable_rows

CONTROLS = ("DMSO", "PBS")  # classes 0 and 1, as in the authors' constants
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LensSelection:
    """The selected images (one row each: row_id, source_index, label, class_name, cell_line, plate, well, site,
    time_h, split) and the class names in label order."""

    table: pd.DataFrame
    classes: tuple[str, ...]

    def part(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.table[self.table.split == split]


def class_order(drugs: Sequence[str]) -> tuple[str, ...]:
    """Controls first (DMSO, PBS), then the catalogue's drugs in the authors' constants order, then any other drug in
    alphabetical order: the label of a drug is the same on every plate that has the same drugs."""
    from data_pipelines.synthetic.catalogue import DRUGS  # the authors' drug order

    present = set(drugs)
    known = [d for d in (*CONTROLS, *DRUGS) if d in present]
    return tuple(known + sorted(present - set(known)))


def select_lens_images(manifest: pd.DataFrame, *, last_n: int = 30, max_wells: int = 4, test_fraction: float = 0.25,
                       val_fraction: float = 0.25, seed: int = 0, paper_faithful: bool = False,
                       classes: Sequence[str] | None = None) -> LensSelection:
    """The lens task's images from a dataset manifest (``data_pipelines.source.load_dataset_manifest``).

    ``classes``: fix the label order (e.g. the one a trained lens was trained with); default ``class_order`` of the
    drugs present. Quarantined rows are skipped; ``source_index`` is the row's index in ``open_source(dataset)``.
    """
    required = ("row_id", "Metadata_Plate", "Metadata_Well", "Metadata_CellLine", "Metadata_Drug",
                "Metadata_Concentration_uM", "Metadata_Time_h")
    missing = [c for c in required if c not in manifest.columns]
    if missing:
        raise ValueError(f"the dataset manifest lacks {missing}; the lens task needs cell line, drug, concentration, "
                         "plate, well and time per image")
    if last_n < 1 or max_wells < 1:
        raise ValueError(f"last_n and max_wells must be >= 1, got {last_n}, {max_wells}")
    frame = readable_rows(manifest)
    if "Metadata_Site" not in frame.columns:
        frame = frame.assign(Metadata_Site=1)

    names = tuple(classes) if classes is not None else class_order(frame.Metadata_Drug.unique())
    frame = frame[frame.Metadata_Drug.isin(names)]  # drugs outside a given class list are not part of the task
    if frame.empty:
        raise ValueError(f"no image of the classes {list(names)} in the manifest")

    # Highest concentration of each (cell line, drug); the first max_wells wells in (plate, well) order.
    top = frame.groupby(["Metadata_CellLine", "Metadata_Drug"]).Metadata_Concentration_uM.transform("max")
    frame = frame[frame.Metadata_Concentration_uM == top]
    wells = (frame[["Metadata_CellLine", "Metadata_Drug", "Metadata_Plate", "Metadata_Well"]].drop_duplicates()
             .sort_values(["Metadata_CellLine", "Metadata_Drug", "Metadata_Plate", "Metadata_Well"]))
    wells = wells.groupby(["Metadata_CellLine", "Metadata_Drug"]).head(max_wells)
    frame = frame.merge(wells, on=list(wells.columns))
    # The last n time points of every field of view.
    frame = frame.sort_values(["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Time_h"])
    frame = frame.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).tail(last_n)

    table = pd.DataFrame({
        "row_id": frame.row_id.to_numpy(np.int64),
        "source_index": frame.source_index.to_numpy(np.int64),
        "label": frame.Metadata_Drug.map({n: i for i, n in enumerate(names)}).to_numpy(np.int32),
        "class_name": frame.Metadata_Drug.to_numpy(),
        "cell_line": frame.Metadata_CellLine.to_numpy(),
        "plate": frame.Metadata_Plate.to_numpy(),
        "well": frame.Metadata_Well.to_numpy(),
        "site": frame.Metadata_Site.to_numpy(),
        "time_h": frame.Metadata_Time_h.to_numpy(np.float64),
    })
    for extra in ("mask_path", "Metadata_Effect"):
        if extra in frame.columns:
            table[extra] = frame[extra].to_numpy()
    if paper_faithful:
        table["split"] = _image_split(len(table), test_fraction=0.1, seed=42)
    else:
        table["split"] = well_split(table, test_fraction, val_fraction, seed)
    table = table.sort_values("row_id").reset_index(drop=True)
    return LensSelection(table=table, classes=names)


def select_with_settings(manifest: pd.DataFrame, settings, *, classes: Sequence[str] | None = None) -> LensSelection:
    """``select_lens_images`` with the ``lens`` section of a lens config (a ConfigDict, or the dict a checkpoint saved
    it as): the one place that maps the settings to the selection, so training and evaluation select alike."""
    return select_lens_images(manifest, last_n=int(settings["last_n"]), max_wells=int(settings["max_wells"]),
                              test_fraction=float(settings["test_fraction"]),
                              val_fraction=float(settings["val_fraction"]), seed=int(settings["split_seed"]),
                              paper_faithful=bool(settings["paper_faithful"]), classes=classes)


def _image_split(n: int, *, test_fraction: float, seed: int) -> np.ndarray:
    """The authors' ``train_test_split(test_size=0.1, random_state=42)`` in spirit: images dealt at random."""
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[: int(np.ceil(test_fraction * n))]] = "test"
    return split


def well_split(table: pd.DataFrame, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Whole wells to test / val / train within each (cell line, class), at least one train well, then one test.

    ``table`` has one row per image with ``cell_line``, ``class_name``, ``plate`` and ``well``; returns the part of
    each row (object array of 'train' / 'val' / 'test')."""
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ValueError(f"test_fraction {test_fraction} and val_fraction {val_fraction} must leave a train part")
    rng = np.random.default_rng(seed)
    assignment: dict[tuple, str] = {}
    keys = table[["cell_line", "class_name", "plate", "well"]].drop_duplicates()
    for _, group in keys.groupby(["cell_line", "class_name"], sort=True):
        # From one canonical order (sorted), so that the same seed deals the same wells whatever the table's row
        # order (a shuffled or re-sorted features file, each encoder's file in compare)
        group_wells = sorted(tuple(r) for r in group[["plate", "well"]].itertuples(index=False))
        group_wells = [group_wells[i] for i in rng.permutation(len(group_wells))]
        n = len(group_wells)
        n_test = min(max(1, int(round(test_fraction * n))), n - 1) if n > 1 else 0
        n_val = min(int(round(val_fraction * n)), n - 1 - n_test)
        for i, (plate, well) in enumerate(group_wells):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            assignment[(group.cell_line.iloc[0], group.class_name.iloc[0], plate, well)] = part
    return np.array([assignment[k] for k in zip(table.cell_line, table.class_name, table.plate, table.well)],
                    dtype=object)


class LabelledSource(SubsetSource):
    """A random-access source over some rows of another, each element with its ``label`` (np.int32) added."""

    def __init__(self, base, source_indices: Sequence[int], labels: Sequence[int]):
        super().__init__(base, source_indices)
        self._labels = np.asarray(labels, np.int32)
        if self._indices.shape != self._labels.shape:
            raise ValueError(f"{len(self._indices)} indices but {len(self._labels)} labels")

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        element = dict(super().__getitem__(index))
        element["label"] = self._labels[index]
        return element


def labelled_source(dataset_dir: str | os.PathLike, selection: LensSelection, split: str) -> LabelledSource:
    """The images of one split of a selection, with labels, from a built dataset."""
    from data_pipelines.source import open_source

    part = selection.part(split)
    if part.empty:
        raise ValueError(f"the lens selection has no {split!r} images")
    return LabelledSource(open_source(dataset_dir), part.source_index.to_numpy(), part.label.to_numpy())


def load_masks(paths: Sequence[str], *, base_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The signature masks (uint8 0/255, [N, H, W]) at ``paths`` (a synthetic plate's ``mask_path`` column)."""
    from PIL import Image

    masks = []
    for i, raw in enumerate(paths):
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"row {i} of the selection has no mask_path; only synthetic plates write masks")
        path = Path(raw) if base_dir is None or os.path.isabs(raw) else Path(base_dir) / raw
        if not path.is_file():
            raise FileNotFoundError(f"row {i}: mask {path} not found (the plate folder moved or was deleted?)")
        with Image.open(path) as image:
            masks.append(np.array(image.convert("L")))
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"masks of different shapes: {sorted(shapes)}")
    return np.stack(masks) if masks else np.zeros((0, 0, 0), np.uint8)
