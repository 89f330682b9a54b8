"""Random access to a dataset written by data_pipelines.build: the face the input pipeline reads.

    source = open_source("runs/data/plate")        # len(source), source[i] -> {'image', 'row_id'}
    table = load_dataset_manifest("runs/data/plate")  # metadata; join on row_id
    info = dataset_info("runs/data/plate")            # channels, image size, counts, options

``source[i]`` is ``{'image': np.uint8 [H, W, C] (writable), 'row_id': np.int64}``; decoding happens per access.
PNG images are read with TFDS's decoding skipped and decoded here with PIL straight into the final shape: TFDS's
own NumPy decoding adds a grayscale ``np.repeat`` copy and costs ~1.5x more per image (measured on 256x256 images).
The source pickles as its directory and split only and opens the TFDS files again on first use in each process,
so Grain worker processes get it cheaply.
"""

from __future__ import annotations

import io
import json
import operator
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

DATASET_JSON = "dataset.json"
MANIFEST_PARQUET = "manifest.parquet"


def dataset_info(dataset_dir: str | os.PathLike) -> dict:
    """The build's dataset.json: channels, image_size, image_shape, counts, options, source manifest, build time."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{Path(dataset_dir).resolve()} is not a finished dataset build (no {DATASET_JSON}); "
                                "build one with: python -m data_pipelines.build --manifest M --out DIR")
    return json.loads(path.read_text())


def load_dataset_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """The validated manifest stored with the dataset: every column of the input plus row_id and quarantine_reason."""
    dataset_info(dataset_dir)  # same clear error for an unfinished build
    return pd.read_parquet(Path(dataset_dir) / MANIFEST_PARQUET)


class RandomAccessSource:
    """A Grain-compatible random-access source (``__len__``, ``__getitem__``) over a built dataset."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
        self._dataset_dir = str(Path(dataset_dir).resolve())
        info = dataset_info(self._dataset_dir)
        self._tfds_dir = os.path.join(self._dataset_dir, info["tfds"]["data_dir"])
        self._split = split
        self.channels: tuple[str, ...] = tuple(info["channels"])
        self.image_shape: tuple[int, int, int] = tuple(info["image_shape"])
        self._png = info["image_encoding"] == "png"
        self._source = None
        self._length: int | None = None
        self._lock = threading.Lock()

    # Opening reads TFDS's JSON files and the ArrayRecord indices: do it once per process, on first use.
    def _opened(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    import tensorflow_datasets as tfds

                    builder = tfds.builder_from_directory(self._tfds_dir)
                    decoders = {"image": tfds.decode.SkipDecoding()} if self._png else None
                    self._source = builder.as_data_source(self._split, decoders=decoders)
        return self._source

    def __len__(self) -> int:
        if self._length is None:
            self._length = len(self._opened())
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._record(self._opened()[self._checked(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Batch read (Grain and PyTorch use it when present): one ArrayRecord call for all indices."""
        records = self._opened().__getitems__([self._checked(i) for i in indices])
        return [self._record(r) for r in records]

    def _checked(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a source of {n} images")
        return i

    def _record(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = example["image"]
        if self._png:  # PNG bytes: TFDS decoding was skipped
            with Image.open(io.BytesIO(image)) as decoded:
                image = np.array(decoded)  # a writable copy (np.asarray of a PIL image is read-only)
        elif not image.flags.writeable:
            image = image.copy()
        return {"image": image.reshape(self.image_shape), "row_id": np.int64(example["row_id"])}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None  # reopened lazily in the receiving process
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"RandomAccessSource({self._dataset_dir!r}, split={self._split!r}, channels={self.channels}, "
                f"image_shape={self.image_shape})")


def open_source(dataset_dir: str | os.PathLike, split: str = "train") -> RandomAccessSource:
    """Opens a built dataset for random access. ``split`` accepts TFDS slicing, e.g. 'train[:10%]'."""
    return RandomAccessSource(dataset_dir, split)
