"""Manifest -> TFDS dataset of decoded uint8 images in sharded ArrayRecord files, with a quarantine.

    python -m data_pipelines.build --manifest M --out DIR [--image-size 256] [--max-bad-fraction 0.01]
        [--num-shards N] [--channels a,b,c] [--size-mismatch resize|center_crop|reject]
        [--high-bit-depth reject|rescale] [--workers N] [--image-encoding raw|png|zlib]
        [--record-compression zstd|none] [--png-compress-level 0] [--overwrite]

The output directory holds:

    DIR/dataset.json        channels by name, image size, image_encoding, counts, options, source manifest, build
                            time; written last, so its presence marks a complete build
    DIR/manifest.parquet    the full validated manifest with `row_id` (0..N-1, manifest order) and
                            `quarantine_reason` (missing for rows that made it in); downstream joins metadata on row_id
    DIR/quarantine.csv      row_id, path, reason for every image that was refused
    DIR/tfds/plate_images/1.0.0/   the TFDS dataset (split 'train'); read it with data_pipelines.source.open_source

Each example is {'image': uint8 (S, S, C), 'row_id': int64}, in manifest order (quarantined rows skipped, so the
example index and row_id differ once a row is refused). How the image is stored (`image_encoding`, all lossless):

- 'raw' (default): the array's bytes, a `Tensor(..., encoding='bytes')` feature; decoding is a memory copy.
- 'png': an `Image` feature, 1-4 channels only; by default an uncompressed PNG (see stored_png). Kept for
  datasets meant for other PNG readers.
- 'zlib': a zlib-compressed `Tensor` (the former default for more than 4 channels); TFDS compresses it in the
  writing thread, and the zstd pass below finds nothing left to gain.

Every record may then be compressed by ArrayRecord itself (`record_compression`): 'none' (default) writes
'group_size:1,uncompressed'; 'zstd' writes the options TFDS uses, 'group_size:1' (one record per chunk, for random
access) with zstd level 3 (window_log 20). 'none' is the default because reading is the input pipeline's budget (2,000
images/s per core for decode + 5 crops + augmentation leaves ~70 us for the read). Measured on 1,000 256x256
synthetic-plate images (CPU time, medians): zstd keeps a raw record at 53 KB instead of 66 KB, but its decompression is
most of what reading a raw image costs (ArrayRecord read ~115 us vs ~30 us uncompressed). zstd has no pixel prediction:
what it gains comes from the narrow histogram of the images, not from their smoothness.

What counts as a bad image, and what happens to it (each goes to quarantine.csv with its reason; the build fails
once more than `max_bad_fraction` of the manifest rows are bad):
- empty (0-byte) file, a file PIL cannot identify, a truncated or corrupt file (PIL's LOAD_TRUNCATED_IMAGES stays
  off, so a cut-off JPEG/PNG raises instead of loading grey);
- modes that are not 8-bit gray or colour: palette, 1-bit, 32-bit integer, float. 16-bit gray images are refused
  by default (`high_bit_depth='reject'`): any 16 -> 8 bit mapping is a choice about intensities that should be made
  knowingly. `high_bit_depth='rescale'` maps 0..65535 linearly onto 0..255 (to the nearest), the same mapping for
  every image so that intensities stay comparable across wells and time; data that use only 12 bits will look dark
  and are better converted beforehand with a window of your choice. 16-bit colour files (RGB, gray+alpha), which PIL
  reads as 8-bit keeping each sample's high byte, are refused alike under 'reject' and given that high byte under
  'rescale';
- a channel count other than the manifest's (bands of one image, pages of a multi-page TIFF, or one band per
  path_<ch> file), or channels of different sizes;
- a size other than S x S when `size_mismatch='reject'`; `'resize'` (default) resizes each channel with PIL bilinear
  (non-square sources are stretched), `'center_crop'` takes the central S x S (the authors' preprocessing) and
  refuses sources smaller than S.

Work per image (read, check, resize, PNG-encode when asked) runs in a thread pool (PIL and zlib release the GIL
while decoding, resizing and compressing); results are consumed in manifest order, so the output is the same for any
worker count.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import io
import itertools
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines.manifest import Manifest, ManifestError, load_manifest

DATASET_VERSION = "1.0.0"
SPLIT = "train"
TFDS_SUBDIR = "tfds"
FORMAT_NAME = "cellssl-plate-images"
FORMAT_VERSION = 1
MAX_PNG_CHANNELS = 4  # PNG holds L, LA, RGB, RGBA

SizeMismatch = Literal["resize", "center_crop", "reject"]
HighBitDepth = Literal["reject", "rescale"]
ImageEncoding = Literal["raw", "png", "zlib"]
IMAGE_ENCODINGS: tuple[str, ...] = ("raw", "png", "zlib")
RecordCompression = Literal["zstd", "none"]
# ArrayRecord writer options per record_compression. group_size:1 (one record per chunk) is what TFDS writes and
# what its random-access reader expects; zstd:3 is ArrayRecord's default compression, spelled out so that a change
# of default in either library cannot change the files silently.
ARRAY_RECORD_WRITER_OPTIONS = {"zstd": "group_size:1,zstd:3", "none": "group_size:1,uncompressed"}

# Exceptions PIL and its codecs raise on broken files. Anything else is a bug and must not be quarantined.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
                  Image.DecompressionBombError)
_EIGHT_BIT_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # unsigned 16-bit gray (PNG, TIFF)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a manifest becomes a dataset. See the module docstring for the policies."""

    image_size: int = 256
    size_mismatch: SizeMismatch = "resize"
    high_bit_depth: HighBitDepth = "reject"
    max_bad_fraction: float = 0.01
    num_shards: int | None = None          # None: let TFDS choose from the data size
    workers: int | None = None             # threads; None: one per CPU core; 0 or 1: in the calling thread
    # How images are stored (module docstring). 'raw' makes decoding a memory copy: on 1,000 256x256
    # synthetic-plate images, source read+decode took 165 us vs 315 us for the stored PNG (CPU time, medians),
    # with files of the same size (53.1 vs 53.4 MB).
    image_encoding: ImageEncoding = "raw"
    # ArrayRecord's own per-record compression (module docstring). Same images, raw: 'none' read+decode 74 us
    # instead of 165 us, files 65.7 MB instead of 53.1 MB.
    record_compression: RecordCompression = "none"
    # PNG zlib level (image_encoding='png' only). 0 (default): unfiltered rows in stored deflate blocks (see
    # stored_png); ArrayRecord compresses every record with zstd:3 by default anyway, so PNG compression buys almost
    # no space on noisy cell images and costs time at write and at every read. 1-9: Pillow's encoder at that level.
    png_compress_level: int = 0

    def __post_init__(self):
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.size_mismatch not in ("resize", "center_crop", "reject"):
            raise ValueError(f"size_mismatch must be resize, center_crop or reject, got {self.size_mismatch!r}")
        if self.high_bit_depth not in ("reject", "rescale"):
            raise ValueError(f"high_bit_depth must be reject or rescale, got {self.high_bit_depth!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be positive, got {self.num_shards}")
        if self.image_encoding not in IMAGE_ENCODINGS:
            raise ValueError(f"image_encoding must be one of {', '.join(IMAGE_ENCODINGS)}, "
                             f"got {self.image_encoding!r}")
        if self.record_compression not in ARRAY_RECORD_WRITER_OPTIONS:
            raise ValueError(f"record_compression must be one of {', '.join(ARRAY_RECORD_WRITER_OPTIONS)}, "
                             f"got {self.record_compression!r}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be 0..9, got {self.png_compress_level}")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    dataset_dir: Path
    num_rows: int
    num_examples: int
    num_quarantined: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_rows / self.seconds if self.seconds > 0 else float("inf")


class BuildError(RuntimeError):
    """The build was refused (too many bad images, or an output directory in the way)."""


class BadImage(Exception):
    """One image file cannot enter the dataset; ``path`` and ``reason`` go to quarantine.csv."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ------------------------------------------------------------------------------------------------ image reading
@dataclasses.dataclass(frozen=True)
class _ReadSpec:
    """What every row's pixels must become; shared by all worker threads."""

    num_channels: int
    single_file: bool
    channel_columns: tuple[str, ...]
    options: BuildOptions


def read_row_image(files: tuple[str, ...], spec: _ReadSpec) -> np.ndarray:
    """Reads one manifest row into a uint8 (S, S, C) array, or raises BadImage."""
    if spec.single_file:
        planes = _read_planes(files[0], spec.options.high_bit_depth, label=None)
        if len(planes) != spec.num_channels:
            raise BadImage(files[0], f"wrong channel count: {len(planes)} found (bands or pages), "
                                     f"{spec.num_channels} expected")
    else:
        planes = []
        for path, column in zip(files, spec.channel_columns):
            found = _read_planes(path, spec.options.high_bit_depth, label=column)
            if len(found) != 1:
                raise BadImage(path, f"{column}: wrong channel count: {len(found)} bands or pages, "
                                     "1 expected for a per-channel file")
            planes.extend(found)
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise BadImage(files[0], f"channels differ in size (HxW): {sorted(shapes)}")
    planes = _fit_size(planes, files[0], spec.options)
    return np.stack(planes, axis=-1)


def _read_planes(path: str, high_bit_depth: HighBitDepth, label: str | None) -> list[np.ndarray]:
    """Every channel of one file as 2-D uint8 arrays: the bands of each page, pages in order."""
    prefix = f"{label}: " if label else ""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage(path, f"{prefix}empty file (0 bytes)")
    except OSError as err:
        raise BadImage(path, f"{prefix}cannot stat file ({err})") from err
    planes: list[np.ndarray] = []
    try:
        with Image.open(path) as image:
            pages = getattr(image, "n_frames", 1)
            for page in range(pages):
                if page:
                    image.seek(page)
                _refuse_silent_16_bit(image, path, prefix, high_bit_depth)
                image.load()
                found = _bands_as_uint8(image, path, prefix, high_bit_depth)
                if pages > 1 and len(found) != 1:
                    raise BadImage(path, f"{prefix}page {page} has {len(found)} bands; a multi-page file must "
                                         "hold one channel per page")
                planes.extend(found)
    except BadImage:
        raise
    except Image.UnidentifiedImageError as err:
        raise BadImage(path, f"{prefix}not a readable image ({err})") from err
    except _DECODE_ERRORS as err:
        raise BadImage(path, f"{prefix}truncated or corrupt image ({type(err).__name__}: {err})") from err
    return planes


def _refuse_silent_16_bit(image: Image.Image, path: str, prefix: str, high_bit_depth: HighBitDepth) -> None:
    """PIL opens 16-bit colour files (RGB, gray+alpha) as 8-bit modes and keeps only the high byte of each sample;
    the decoder's raw mode ('RGB;16B', 'LA;16B') still says what the file holds. Under 'reject' that is refused like
    16-bit gray; under 'rescale' the high byte (v // 256, within one level of the linear map) is taken."""
    if image.mode not in _EIGHT_BIT_MODES or high_bit_depth != "reject":
        return
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw_mode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
        if isinstance(raw_mode, str) and ";16" in raw_mode:
            raise BadImage(path, f"{prefix}16-bit image (mode {image.mode}, stored as {raw_mode}), 8-bit expected; "
                                 "high_bit_depth='rescale' accepts it (PIL keeps the high byte of 16-bit colour)")


def _bands_as_uint8(image: Image.Image, path: str, prefix: str, high_bit_depth: HighBitDepth) -> list[np.ndarray]:
    mode = image.mode
    if mode in _EIGHT_BIT_MODES:
        array = np.asarray(image)
        return [array] if array.ndim == 2 else [array[..., k] for k in range(array.shape[-1])]
    if mode in _SIXTEEN_BIT_MODES:
        if high_bit_depth == "reject":
            raise BadImage(path, f"{prefix}16-bit image (mode {mode}), 8-bit expected; "
                                 "high_bit_depth='rescale' maps 0..65535 linearly onto 0..255")
        wide = np.asarray(image).astype(np.uint32)
        return [((wide * 255 + 32767) // 65535).astype(np.uint8)]
    what = {"1": "1-bit image", "P": "palette image", "PA": "palette image", "I": "32-bit integer image",
            "F": "floating-point image"}.get(mode, "unsupported image mode")
    raise BadImage(path, f"{prefix}{what} (mode {mode}), 8-bit gray or colour expected")


def _fit_size(planes: list[np.ndarray], path: str, options: BuildOptions) -> list[np.ndarray]:
    size = options.image_size
    height, width = planes[0].shape
    if (height, width) == (size, size):
        return planes
    if options.size_mismatch == "reject":
        raise BadImage(path, f"size {height}x{width} (HxW), {size}x{size} expected (resizing is off)")
    if options.size_mismatch == "center_crop":
        if height < size or width < size:
            raise BadImage(path, f"size {height}x{width} (HxW) is smaller than the {size}x{size} centre crop")
        top, left = (height - size) // 2, (width - size) // 2
        return [p[top:top + size, left:left + size] for p in planes]
    # One band at a time: PIL resizes RGBA with premultiplied alpha, which would mix channel 4 into channels 1-3.
    return [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR)) for p in planes]


def encode_image(array: np.ndarray, compress_level: int = 0,
                 encoding: ImageEncoding = "png") -> bytes | np.ndarray:
    """The value the dataset's image feature is given for a uint8 (H, W, C) array.

    'png': PNG bytes (1-4 channels); level 0 uses :func:`stored_png`, levels 1-9 Pillow's encoder (adaptive row
    filters, zlib at that level). 'raw' and 'zlib': the C-contiguous array itself; its `Tensor` feature turns it into
    bytes (and compresses them for 'zlib').
    """
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}; one of {', '.join(IMAGE_ENCODINGS)}")
    if encoding != "png":
        return np.ascontiguousarray(array)
    channels = array.shape[-1]
    if channels > MAX_PNG_CHANNELS:
        raise ValueError(f"PNG holds at most {MAX_PNG_CHANNELS} channels, got {channels}; use 'raw' or 'zlib'")
    if compress_level == 0:
        return stored_png(array)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if channels == 1 else array).save(buffer, format="PNG",
                                                                     compress_level=compress_level)
    return buffer.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # gray, gray+alpha, RGB, RGBA


def stored_png(array: np.ndarray) -> bytes:
    """A valid 8-bit PNG of a (H, W, C<=4) uint8 array: rows unfiltered, deflate in 'stored' (level 0) blocks.

    Why not Pillow at level 0: Pillow still chooses a filter for every row by trying all five, which is most of
    its encode time, and the filtered rows cost time again when decoding. ArrayRecord compresses each record with
    zstd anyway, so the bytes on disk barely change. Measured on 100 noisy 256x256 grayscale images, same process:
    encode 0.34 ms vs Pillow level 0 4.5 ms, PIL decode 0.39 ms vs 0.93 ms, 52.5 vs 51.8 KiB per record on disk.
    """
    height, width, channels = array.shape
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = array.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOR_TYPE[channels], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)), _png_chunk(b"IEND", b"")))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# -------------------------------------------------------------------------------------------------- TFDS builder
class PlateImages(tfds.core.GeneratorBasedBuilder):
    """Images of a manifest as uint8 (S, S, C) plus the manifest row they came from (TFDS name: plate_images)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Images and row_id; metadata lives in manifest.parquet beside the dataset."}

    def __init__(self, *, manifest: Manifest, options: BuildOptions, progress: bool = True, **kwargs):
        # Set before super().__init__, which already asks for _info().
        self._manifest = manifest
        self._options = options
        self._progress = progress
        self.quarantine: list[tuple[int, str, str]] = []
        super().__init__(**kwargs)

    # TFDS looks for a checksums file beside the builder's code, and for a builder defined in a package that lookup
    # imports `importlib_resources` (not a dependency; ModuleNotFoundError without it). Nothing is downloaded here,
    # so there is nothing to checksum: say the builder has no code path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        size, channels = self._options.image_size, len(self._manifest.channels)
        image = image_feature((size, size, channels), self._options.image_encoding)
        return tfds.core.DatasetInfo(
            builder=self,
            description="Cell images from a plate manifest; join metadata on row_id with manifest.parquet.",
            features=tfds.features.FeaturesDict({"image": image, "row_id": np.int64}),
            # Keep manifest order: example i is the i-th accepted row. Shuffling is the input pipeline's job.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(channels=list(self._manifest.channels), image_size=size),
        )

    def _example_writer(self) -> tfds.core.writer.ExampleWriter:
        # TFDS's hook for a custom writer: the same ArrayRecord files, with our writer options.
        return _ArrayRecordWriter(ARRAY_RECORD_WRITER_OPTIONS[self._options.record_compression])

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        manifest, options = self._manifest, self._options
        spec = _ReadSpec(len(manifest.channels), manifest.single_file, manifest.channel_columns, options)
        rows = len(manifest)
        allowed_bad = math.floor(options.max_bad_fraction * rows + 1e-9)  # 0.29 * 100 is 28.999...
        columns = [manifest.frame[c].tolist() for c in manifest.channel_columns]
        tasks = ((row_id, tuple(col[row_id] for col in columns)) for row_id in range(rows))

        def work(task):
            row_id, files = task
            try:
                image = read_row_image(files, spec)
                return row_id, encode_image(image, options.png_compress_level, options.image_encoding), None
            except BadImage as bad:
                return row_id, None, bad

        workers = options.workers if options.workers is not None else (os.cpu_count() or 1)
        results = _ordered_map(work, tasks, workers=workers, window=8 * max(workers, 1))
        # closing(): on a stop, shut the thread pool down now rather than whenever the generator is collected
        with contextlib.closing(results), _progress_bar(rows, self._progress) as bar:
            for row_id, encoded, bad in results:
                bar.update(1)
                if bad is not None:
                    self.quarantine.append((row_id, bad.path, bad.reason))
                    bar.set_postfix(quarantined=len(self.quarantine))
                    if len(self.quarantine) > allowed_bad:
                        raise _TooManyBad(len(self.quarantine), row_id + 1, rows, allowed_bad)
                    continue
                yield row_id, {"image": encoded, "row_id": row_id}
        if rows and len(self.quarantine) == rows:  # TFDS cannot write an empty split (it asserts)
            raise _TooManyBad(len(self.quarantine), rows, rows, allowed_bad)


class _ArrayRecordWriter(tfds.core.writer.ExampleWriter):
    """Writes each shard as TFDS's ArrayRecord adapter does, but with the given ArrayRecord writer options."""

    def __init__(self, writer_options: str):
        super().__init__(file_format=tfds.core.file_adapters.FileFormat.ARRAY_RECORD)
        self.writer_options = writer_options

    def write(self, path, examples) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(os.fspath(path), self.writer_options)
        try:
            for _, serialized in examples:
                writer.write(serialized)
        finally:
            writer.close()
        return None  # like TFDS's adapter: ArrayRecord keeps its own index, no record positions to report


def image_feature(shape: tuple[int, int, int], encoding: ImageEncoding) -> tfds.features.FeatureConnector:
    """The TFDS feature that stores uint8 images of ``shape`` with ``encoding`` (module docstring)."""
    if encoding == "png":
        if shape[-1] > MAX_PNG_CHANNELS:
            raise ValueError(f"PNG holds at most {MAX_PNG_CHANNELS} channels, got {shape[-1]}; use 'raw' or 'zlib'")
        return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format="png")
    if encoding == "raw":
        return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
    if encoding == "zlib":
        return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)
    raise ValueError(f"unknown image encoding {encoding!r}; one of {', '.join(IMAGE_ENCODINGS)}")


class _TooManyBad(Exception):
    def __init__(self, bad: int, seen: int, rows: int, allowed: int):
        what = (f"all {rows} images are bad: nothing to write" if bad == rows
                else f"{bad} bad images in the first {seen} of {rows} rows; at most {allowed} allowed")
        super().__init__(what)
        self.bad, self.seen, self.rows, self.allowed = bad, seen, rows, allowed


def _ordered_map(fn: Callable, items: Iterable, *, workers: int, window: int) -> Iterator:
    """map() over a thread pool with at most ``window`` items in flight, results in input order.

    Bounded so that a slow consumer never makes the pool hold the whole dataset in memory.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="build")
    try:
        iterator = iter(items)
        pending = collections.deque(executor.submit(fn, item) for item in itertools.islice(iterator, window))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(iterator, 1):
                pending.append(executor.submit(fn, item))
            yield result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class _progress_bar:
    """A tqdm bar, or a silent stand-in when progress is off."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, unit="img", desc="build", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)


# ---------------------------------------------------------------------------------------------------- the build
_OUTPUTS = ("dataset.json", "manifest.parquet", "quarantine.csv", TFDS_SUBDIR)


def build_dataset(manifest: Manifest | str | os.PathLike, out_dir: str | os.PathLike,
                  options: BuildOptions | None = None, *, overwrite: bool = False,
                  progress: bool = True) -> BuildReport:
    """Builds the dataset described in the module docstring and returns counts and timing.

    ``manifest`` is a validated Manifest or a path given to load_manifest (ManifestError on bad input). Raises
    BuildError when more than ``options.max_bad_fraction`` of the rows are bad, or every row is (quarantine.csv is still
    written, and no dataset is left behind), when ``out_dir`` holds a previous build and ``overwrite`` is off, or when
    PNG is asked for more than 4 channels.
    """
    options = options or BuildOptions()
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if options.image_encoding == "png" and len(manifest.channels) > MAX_PNG_CHANNELS:
        raise BuildError(f"image_encoding='png' holds at most {MAX_PNG_CHANNELS} channels, the manifest has "
                         f"{len(manifest.channels)} ({', '.join(manifest.channels)}); use 'raw' or 'zlib'")
    out = Path(out_dir).resolve()
    _prepare_output_dir(out, overwrite)

    tfds.disable_progress_bar()  # ours counts images; TFDS's bars would only interleave with it
    builder = PlateImages(manifest=manifest, options=options, progress=progress,
                          data_dir=str(out / TFDS_SUBDIR), file_format="array_record")
    start = time.perf_counter()
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=options.num_shards))
    except _TooManyBad as too_many:
        _write_quarantine(out, builder.quarantine)
        shutil.rmtree(out / TFDS_SUBDIR, ignore_errors=True)
        examples = "; ".join(f"{manifest.row_label(r)} (row_id {r}) {p}: {why}"
                             for r, p, why in builder.quarantine[:3])
        where = f" of {manifest.source}" if manifest.source is not None else ""
        raise BuildError(
            f"build stopped: {too_many} (max_bad_fraction={options.max_bad_fraction} of {too_many.rows} rows"
            f"{where}). "
            f"Bad images so far are listed in {out / 'quarantine.csv'}; e.g. {examples}") from None
    seconds = time.perf_counter() - start

    quarantine = builder.quarantine
    _write_quarantine(out, quarantine)
    table = manifest.frame.copy()
    table.insert(0, "row_id", np.arange(len(table), dtype=np.int64))
    reasons = pd.Series(pd.NA, index=table.index, dtype="str")
    for row_id, _, reason in quarantine:
        reasons.iat[row_id] = reason
    table["quarantine_reason"] = reasons
    table.to_parquet(out / "manifest.parquet", index=False)

    num_examples = len(table) - len(quarantine)
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "channels": list(manifest.channels),
        "image_size": options.image_size,
        "image_shape": [options.image_size, options.image_size, len(manifest.channels)],
        "image_dtype": "uint8",
        "image_encoding": options.image_encoding,
        "counts": {
            "manifest_rows": len(table),
            "examples": num_examples,
            "quarantined": len(quarantine),
            "plates": int(table["Metadata_Plate"].nunique()),
        },
        "source_manifest": str(manifest.source) if manifest.source is not None else None,
        "build_time_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(seconds, 3),
        "options": dataclasses.asdict(options),
        "tfds": {
            "data_dir": os.path.relpath(builder.data_dir, out),
            "name": builder.name,
            "version": str(builder.version),
            "split": SPLIT,
            "file_format": "array_record",
            "array_record_writer_options": ARRAY_RECORD_WRITER_OPTIONS[options.record_compression],
        },
        "row_id": "example['row_id'] indexes manifest.parquet's row_id; examples keep manifest order and skip "
                  "quarantined rows",
    }
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out / "dataset.json")  # last: a dataset.json means the build finished
    return BuildReport(dataset_dir=out, num_rows=len(table), num_examples=num_examples,
                       num_quarantined=len(quarantine), seconds=seconds)


def as_built_dataset(data: str | os.PathLike, build_dir: str | os.PathLike) -> Path:
    """``data`` as a built dataset folder: ``data`` itself when it holds a finished build (a dataset.json); else
    ``data`` is a manifest, built into ``build_dir`` with the default options, or the build found there when it was
    made from this manifest file after the file last changed (so that rerunning a command does not build again).

    Only the manifest file's time is compared: images changed in place after the build are not noticed (remove
    ``build_dir`` to build again). A ``build_dir`` left half-built by an interrupted run is built anew."""
    data = Path(data)
    if (data / "dataset.json").exists():
        return data
    if data.is_dir():
        raise BuildError(f"{data} is a folder without a finished build (no dataset.json): give a built dataset "
                         "(python -m data_pipelines.build) or a manifest file")
    if not data.exists():
        raise BuildError(f"{data}: no such manifest file or built dataset folder")
    out = Path(build_dir).resolve()
    info_path = out / "dataset.json"
    if info_path.exists():
        source = json.loads(info_path.read_text()).get("source_manifest")
        if source is not None and Path(source).resolve() == data.resolve() \
                and info_path.stat().st_mtime >= data.stat().st_mtime:
            return out
        built_from = f"a build of {source}" if source is not None else "a build of an in-memory manifest"
        raise BuildError(f"{out} holds {built_from}, not of {data} as it is now (another manifest, or one changed "
                         "since): remove that folder to build it again, or give a built dataset")
    build_dataset(data, out, overwrite=True)  # no finished build there: only what an interrupted run left
    return out


def _prepare_output_dir(out: Path, overwrite: bool) -> None:
    present = [name for name in _OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise BuildError(f"{out} already holds a build ({', '.join(present)}); pass overwrite=True / --overwrite")
    for name in present:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_quarantine(out: Path, quarantine: list[tuple[int, str, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(quarantine, columns=["row_id", "path", "reason"])
    frame.to_csv(out / "quarantine.csv", index=False)


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True, help="CSV or Parquet manifest")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    parser.add_argument("--num-shards", type=int, default=None)
    parser.add_argument("--channels", default=None,
                        help="comma-separated channel names (select/reorder path_<ch> columns, or name the "
                             "channels of a single 'path' file)")
    parser.add_argument("--size-mismatch", choices=["resize", "center_crop", "reject"], default="resize")
    parser.add_argument("--high-bit-depth", choices=["reject", "rescale"], default="reject")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: CPU cores)")
    parser.add_argument("--image-encoding", choices=list(IMAGE_ENCODINGS), default="raw",
                        help="how images are stored: raw bytes (default; fastest to read), png (1-4 channels) "
                             "or zlib; ArrayRecord then compresses each record, see --record-compression")
    parser.add_argument("--record-compression", choices=list(ARRAY_RECORD_WRITER_OPTIONS), default="none",
                        help="ArrayRecord's per-record compression: none (default; ~4x faster reads) or zstd "
                             "(~20%% smaller files)")
    parser.add_argument("--png-compress-level", type=int, default=0,
                        help="PNG zlib level 0-9 (default 0: ArrayRecord compresses records anyway)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    channels = args.channels.split(",") if args.channels else None
    options = BuildOptions(image_size=args.image_size, size_mismatch=args.size_mismatch,
                           high_bit_depth=args.high_bit_depth, max_bad_fraction=args.max_bad_fraction,
                           num_shards=args.num_shards, workers=args.workers,
                           image_encoding=args.image_encoding, record_compression=args.record_compression,
                           png_compress_level=args.png_compress_level)
    try:
        manifest = load_manifest(args.manifest, channels=channels)
        report = build_dataset(manifest, args.out, options, overwrite=args.overwrite)
    except (ManifestError, BuildError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{report.num_examples} images written to {report.dataset_dir} "
          f"({report.num_quarantined} quarantined) in {report.seconds:.1f} s "
          f"= {report.images_per_second:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
