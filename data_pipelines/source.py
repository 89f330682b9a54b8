"""Random access to a dataset written by data_pipelines.build: the face the input pipeline reads.

    source = open_source("runs/data/plate")        # len(source), source[i] -> {'image', 'row_id'}
    table = load_dataset_manifest("runs/data/plate")  # metadata; join on row_id
    info = dataset_info("runs/data/plate")            # channels, image size, counts, options

``source[i]`` is ``{'image': np.uint8 [H, W, C] (writable), 'row_id': np.int64}``; decoding happens per access.
TFDS hands over each record's bytes as stored (``DeserializeMethod.RAW_BYTES``); they are parsed here as the
tf.train.Example TFDS writes, and the image is decoded by the dataset's ``image_encoding``: 'raw' (the default since
it exists) is one copy out of the record (np.frombuffer alone would be read-only), 'zlib' a zlib.decompress first,
'png' a PIL decode straight into the final shape. Why not TFDS's own NumPy decoding: its generic feature-dict
walk cost ~55 us per 256x256 raw image (more than parsing and copying together), and for PNG it adds a grayscale
``np.repeat`` copy (~1.5x the decode). Datasets built before 'raw' existed ('png' for 1-4 channels, 'zlib' for
more) open unchanged.
The source pickles as its directory and split only and opens the TFDS files again on first use in each process,
so Grain worker processes get it cheaply.
"""

from __future__ import annotations

import functools
import io
import json
import math
import operator
import os
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

DATASET_JSON = "dataset.json"
MANIFEST_PARQUET = "manifest.parquet"
IMAGE_ENCODINGS = ("raw", "png", "zlib")  # what data_pipelines.build writes into dataset.json's image_encoding


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


def readable_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest rows that made it into the dataset (not quarantined), in record order, with ``source_index``: the
    row's index in ``open_source(dataset)``. The build writes the readable rows in manifest order, so the n-th of them
    is record n."""
    frame = manifest
    if "quarantine_reason" in frame.columns:
        frame = frame[frame.quarantine_reason.isna()]
    return frame.reset_index(drop=True).assign(source_index=np.arange(len(frame), dtype=np.int64))


class SubsetSource:
    """Some records of another random-access source, in the given order: ``subset[i] = base[indices[i]]``.

    Picklable as its parts, so Grain worker processes get it like the base source.
    """

    def __init__(self, base, indices: Sequence[int]):
        self._base = base
        self._indices = np.asarray(indices, np.int64)
        if self._indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {self._indices.shape}")
        if len(self._indices) and not 0 <= self._indices.min() <= self._indices.max() < len(base):
            raise IndexError(f"indices outside the {len(base)} records of {base!r}")
        self.image_shape = getattr(base, "image_shape", None)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._base[int(self._indices[index])]


class RandomAccessSource:
    """A Grain-compatible random-access source (``__len__``, ``__getitem__``) over a built dataset."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
        self._dataset_dir = str(Path(dataset_dir).resolve())
        info = dataset_info(self._dataset_dir)
        self._tfds_dir = os.path.join(self._dataset_dir, info["tfds"]["data_dir"])
        self._split = split
        self.channels: tuple[str, ...] = tuple(info["channels"])
        self.image_shape: tuple[int, int, int] = tuple(info["image_shape"])
        self.image_encoding: str = info.get("image_encoding")
        if self.image_encoding not in IMAGE_ENCODINGS:
            raise ValueError(f"{Path(self._dataset_dir) / DATASET_JSON}: image_encoding "
                             f"{self.image_encoding!r} is not one of {', '.join(IMAGE_ENCODINGS)}")
        self._image_bytes = math.prod(self.image_shape)
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
                    self._source = builder.as_data_source(
                        self._split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        return self._source

    def __len__(self) -> int:
        if self._length is None:
            self._length = len(self._opened())
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = self._checked(index)
        return self._record(self._opened()[i], i)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Batch read (Grain and PyTorch use it when present).

        One record at a time on purpose: ArrayRecord's own batch read fans out to a thread pool, which on the
        2-core machine cost more CPU *and* more wall time per image (266 vs 174 us CPU, 461 vs 236 us wall per
        256x256 raw record, batches of 64, measured while the machine was shared). Parallelism belongs to
        Grain's workers.
        """
        checked = [self._checked(i) for i in indices]  # all checked first: a bad index reads nothing
        source = self._opened()
        return [self._record(source[i], i) for i in checked]

    def _checked(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a source of {n} images")
        return i

    def _record(self, record: bytes, index: int) -> dict[str, np.ndarray]:
        """One serialized tf.train.Example (features 'image': bytes, 'row_id': int64) as arrays."""
        feature = _tf_example().FromString(record).features.feature
        try:
            stored = feature["image"].bytes_list.value[0]
            row_id = feature["row_id"].int64_list.value[0]
        except (KeyError, IndexError) as err:
            raise ValueError(f"{self._tfds_dir} split {self._split!r}, example {index}: no image bytes or row_id "
                             f"in the record (features: {sorted(feature)})") from err
        return {"image": self._decoded_image(stored, index), "row_id": np.int64(row_id)}

    def _decoded_image(self, stored: bytes, index: int) -> np.ndarray:
        """The stored bytes of example ``index`` as a writable uint8 array of image_shape."""
        encoding = self.image_encoding
        if encoding == "png":
            with Image.open(io.BytesIO(stored)) as decoded:
                image = np.array(decoded)  # a writable copy (np.asarray of a PIL image is read-only)
            return image.reshape(self.image_shape)
        if encoding == "zlib":
            stored = zlib.decompress(stored)
        if len(stored) != self._image_bytes:
            raise ValueError(f"{self._tfds_dir} split {self._split!r}, example {index}: {len(stored)} image bytes "
                             f"({encoding}), {self._image_bytes} expected for uint8 {self.image_shape}")
        # .copy(): an array over the bytes object is read-only, and augmentations write in place
        return np.frombuffer(stored, dtype=np.uint8).reshape(self.image_shape).copy()

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


@functools.cache
def _tf_example():
    """The tf.train.Example message TFDS serializes every example as (TFDS's own copy: no TensorFlow needed).

    Imported on first use, like TFDS itself: dataset_info() and load_dataset_manifest() stay light.
    """
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example


def open_source(dataset_dir: str | os.PathLike, split: str = "train") -> RandomAccessSource:
    """Opens a built dataset for random access. ``split`` accepts TFDS slicing, e.g. 'train[:10%]'."""
    return RandomAccessSource(dataset_dir, split)
