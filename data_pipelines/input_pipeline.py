"""Grain input pipelines: the seeded multi-crop training stream and the ordered, padded evaluation stream.

Both take ANY random-access source: ``len(source)`` and ``source[i] -> {'image': uint8 [H, W, C], 'row_id': int}``
(``data_pipelines.source.open_source`` over TFDS ArrayRecord, or an in-memory list).

Training (``create_train_dataset``)::

    stream = range(N) → seed(seed).shuffle() → repeat(num_epochs)
    range(global batches) → map(local batch k → (position, stream[position]) for its positions)
             → map(read the batch; multi-crop + augment each image into the batch arrays)
             → to_iter_dataset → mp_prefetch

- The shuffle is GLOBAL (same permutation in every process) and each process takes every ``process_count``-th element
  of the shuffled stream. The union of the processes' k-th local batches is therefore global positions
  [k·B, (k+1)·B) of one stream that does not depend on the process count, every epoch is covered without overlap, and
  no element is ever dropped for good (only the stream's tail when ``num_epochs`` is finite).
- The crops of an element come from a Philox generator keyed by (seed, epoch, source index), not by the element's
  position, the worker that computes it, or the process: the same element gets the same crops whatever the worker
  count, thread count or process count (``element_rng``).
- Batching happens in the ``MapDataset`` and the image work runs per batch: each Grain worker (or reader thread)
  computes whole batches, so the batches are the same with 0, 1 or N workers, the iterator state restores at the
  exact batch, and the crops are written straight into the batch arrays.
- ``input.finish`` decides where the crops become floats. 'host': float32 crops (worker processes hand uint8 to
  this process, which finishes them). 'device': uint8 crops with the flips and rotations done, plus one photometric
  row per crop (brightness, contrast, blur), finished inside the jitted step (``device_finish``): a quarter of the
  bytes per batch and no per-pixel host work. Either way the same floats reach the model (to float32 rounding).

Evaluation (``create_eval_dataset``): the source in order, x/255 then the authors' float antialiased bilinear resize,
strided over processes like training (global batch k = source rows [k·B, (k+1)·B)), the tail padded so every process
yields the same number of full batches; ``valid`` marks the real rows (pads have ``row_id`` -1 and zero images).

Iterator state: ``it = iter(ds)``; ``it.get_state()`` is a JSON-able dict (``{'next_batch': n}``) and
``it.set_state(state)`` continues at the next batch, with or without workers, also under another worker or thread
count than the one that wrote it (``worker_count=-1`` resolves per machine). For Orbax, grain 0.2.18 ships
``grain.checkpoint.CheckpointHandler`` with the ``grain.checkpoint.CheckpointSave(item=it)`` /
``CheckpointRestore(item=it)`` args (one JSON file per process).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from data_pipelines import augment

_RATIO = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default aspect range, which the authors kept


class RandomAccessSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------------------------------------
# Config


def default_input_config() -> ml_collections.ConfigDict:
    """The paper's final multi-crop (1 whole image + 1 crop of 50–75% + 3 of 50% of the area, all 128 px) with its
    augmentations (hflip 0.5, 3×3 Gaussian blur p=0.2, σ∈[0.1, 2]), batch 64, shuffled, repeated forever."""
    cfg = ml_collections.ConfigDict()
    cfg.batch_size = 64  # GLOBAL; each process gets batch_size // process_count
    cfg.size_crops = (128, 128, 128)
    cfg.nmb_crops = (1, 1, 3)
    cfg.min_scale_crops = (1.0, 0.5, 0.5)
    cfg.max_scale_crops = (1.0, 0.75, 0.5)
    cfg.augment = True
    cfg.hflip_p = 0.5
    cfg.blur_p = 0.2
    cfg.blur_sigma = (0.1, 2.0)
    cfg.vflip_p = 0.0
    cfg.rot90 = False
    cfg.brightness = 0.0
    cfg.contrast = 0.0
    cfg.shuffle = True
    cfg.num_epochs = config_dict.placeholder(int)  # None: repeat forever
    # Parallelism. On a CPU-only machine (the 2-core one of platform_notes "Grain"): no worker processes (they cost
    # ~1 s to start and a core each, and the step needs the cores), one reader thread that prepares the next batches
    # while the step runs, so the step does not wait (benchmarks/data_wait.py; BENCHMARKS.md). On an accelerator host
    # worker_count=-1 starts one worker process per core but 4 (resolve_worker_count: 12 of 16 cores kept an H200 ~95%
    # fed in BENCHMARKS.md "GPU").
    cfg.worker_count = -1  # grain worker processes (mp_prefetch), each computing whole batches; -1: auto
    cfg.worker_buffer_size = 2  # batches buffered per worker
    cfg.read_threads = 1  # threads per process computing batches ahead of the step (the kernels release the GIL)
    cfg.prefetch_buffer_size = 2  # batches prefetched by those threads
    # Where x/255 and the photometric augmentations (brightness, contrast, blur) run: 'host' (batches of float32
    # crops), 'device' (uint8 crops + photometric rows, finished inside the jitted step: a quarter of the bytes and no
    # per-pixel host work; data_pipelines.device_finish) or 'auto' (the training loop picks 'device' on an
    # accelerator and 'host' on a CPU, where the "device" is the same cores).
    cfg.finish = "auto"
    return cfg


def one_crop_config(base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """``base`` (default: ``default_input_config()``) switched to the companion paper's "one-crop": the whole image at
    128 px, still augmented unless ``augment`` is turned off."""
    # copy_and_resolve_references: a plain ConfigDict(base) would share placeholder fields (num_epochs) with base.
    cfg = (default_input_config() if base is None else base).copy_and_resolve_references()
    cfg.size_crops = (128,)
    cfg.nmb_crops = (1,)
    cfg.min_scale_crops = (1.0,)
    cfg.max_scale_crops = (1.0,)
    return cfg


def crop_specs(cfg: ml_collections.ConfigDict) -> tuple[augment.CropSpec, ...]:
    """One ``CropSpec`` per output crop, in the batch's order (global crops first)."""
    return augment.expand_crop_specs(cfg.size_crops, cfg.nmb_crops, cfg.min_scale_crops, cfg.max_scale_crops)


def augment_params(cfg: ml_collections.ConfigDict) -> augment.AugmentParams | None:
    """The config's augmentation settings, or None when ``augment`` is off."""
    if not cfg.augment:
        return None
    params = augment.AugmentParams(
        hflip_p=float(cfg.hflip_p),
        blur_p=float(cfg.blur_p),
        blur_sigma=(float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1])),
        vflip_p=float(cfg.vflip_p),
        rot90=bool(cfg.rot90),
        brightness=float(cfg.brightness),
        contrast=float(cfg.contrast),
    )
    for name in ("hflip_p", "blur_p", "vflip_p"):
        if not 0.0 <= getattr(params, name) <= 1.0:
            raise ValueError(f"input config: {name}={getattr(params, name)} is not a probability")
    if not 0 < params.blur_sigma[0] <= params.blur_sigma[1]:
        raise ValueError(f"input config: blur_sigma={params.blur_sigma} must satisfy 0 < low <= high")
    if params.brightness < 0 or params.contrast < 0:
        raise ValueError("input config: brightness and contrast are jitter amplitudes >= 0")
    return params


# --------------------------------------------------------------------------------------------------------------------
# Per-element work


def element_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one element's crops: Philox keyed by ``seed``, its counter starting at (epoch, index) in the
    high words, so streams of different elements never overlap (an element draws a few hundred numbers)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.Generator(np.random.Philox(key=seed, counter=[0, 0, epoch, index]))


_MASK64 = (1 << 64) - 1
_thread_local = threading.local()


def _reused_element_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """``element_rng(seed, epoch, index)`` without building a generator: this thread's Philox for ``seed`` is reset to
    the element's counter (3 µs instead of 15). Same stream; valid until the thread's next call."""
    cache = getattr(_thread_local, "rngs", None)
    if cache is None:
        cache = _thread_local.rngs = {}
    if seed not in cache:
        bit_generator = np.random.Philox(key=seed)
        cache[seed] = (bit_generator, np.random.Generator(bit_generator),
                       np.array([seed & _MASK64, (seed >> 64) & _MASK64], np.uint64))
    bit_generator, generator, key = cache[seed]
    bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([0, 0, epoch, index], np.uint64), "key": key},
        "buffer": np.zeros(4, np.uint64),
        "buffer_pos": 4,  # empty buffer: the next draw starts at the counter
        "has_uint32": 0,
        "uinteger": 0,
    }
    return generator


def _image_of(element: dict[str, Any], index: int) -> np.ndarray:
    """The element's image as uint8 [H, W, C], or a clear error naming the source row."""
    try:
        image = np.asarray(element["image"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"source row {index}: expected a dict with an 'image' entry, got {type(element)}") from err
    if image.ndim == 2:  # tolerate [H, W] sources: one channel
        image = image[:, :, None]
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"source row {index} (row_id {element.get('row_id')}): image must be uint8 [H, W, C], "
            f"got {image.dtype} with shape {image.shape}"
        )
    return image


def multi_crop_element(
    image: np.ndarray,
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    epoch: int,
    index: int,
    boxes: list[augment.CropBox] | None = None,
) -> tuple[np.ndarray, ...]:
    """The crops the training pipeline gives source row ``index`` in ``epoch`` (for tests, debugging, figures)."""
    return augment.multi_crop(
        image, element_rng(seed, epoch, index), crop_specs(cfg), augment_params(cfg), _RATIO, boxes
    )


class _LocalBatchPairs:
    """map transform: local batch number k → int64 [B_local, 2] of (global stream position, source index).

    Local batch k of process p holds global stream positions (k·B_local + j)·process_count + p, j < B_local: the
    process's strided share of global batch k. Computing the positions here and looking each up in the shuffled stream
    costs ~16 us per element on the 2-core machine, against ~40 us for Grain's generic map_with_index → slice → batch
    chain (per-element bookkeeping), and gives the same elements in the same order (same iterator state too).
    """

    def __init__(self, stream: grain.MapDataset, local_batch: int, process_index: int, process_count: int):
        self._stream = stream
        self._local_batch = local_batch
        self._process_index = process_index
        self._process_count = process_count

    def __call__(self, k: int) -> np.ndarray:
        first = int(k) * self._local_batch
        positions = [(first + j) * self._process_count + self._process_index for j in range(self._local_batch)]
        pairs = np.empty((self._local_batch, 2), np.int64)
        pairs[:, 0] = positions
        pairs[:, 1] = [self._stream[position] for position in positions]
        return pairs


class _RecycledBatchArrays:
    """Batch arrays handed out again once nobody but this pool holds them.

    A batch of the default multi-crop is 5 x 4 MB of float32. Fresh arrays of that size come from mmap and are faulted
    in page by page while the crops are written: ~2,500 page faults and 8-16 ms per batch on the 2-core machine,
    125-250 us per image, as much as the crops themselves (benchmarks/input_pipeline.py). Memory that was already
    written costs nothing of that, so arrays whose consumer has let go are reused.

    "Let go" is read from reference counts: the pool's list holds each tuple and the tuple holds its arrays, so a
    tuple (or one of its arrays) with any further reference is still in use: kept in a batch dict, a prefetch buffer,
    a view (``a[:8]`` references ``a``), a memoryview or a zero-copy ``jax`` array. Only unused sets are reused, so
    what a consumer holds is never overwritten. Thread-safe: Grain's reader threads share one transform.
    """

    _MAX_SETS = 8  # more sets than this in use at once (deep prefetch buffers): extra ones are simply not kept

    def __init__(self):
        self._sets: list[tuple[np.ndarray, ...]] = []
        self._lock = threading.Lock()
        # The counts of a set nobody else holds, measured through the same code path (not hard-coded: what
        # getrefcount reports for locals and arguments differs between Python versions).
        probe = (np.empty(0, np.float32),)  # like get()'s local `arrays`, `probe` holds one reference of its own
        self._free_counts = self._reference_counts([probe], 0)

    @staticmethod
    def _reference_counts(sets: list[tuple[np.ndarray, ...]], k: int) -> tuple[int, int]:
        """References to set ``k`` and the most any of its arrays has (indexing, not iterating: an iterator or the
        cached result tuple of enumerate() would hold references of its own)."""
        arrays = sets[k]
        return sys.getrefcount(arrays), max(sys.getrefcount(arrays[i]) for i in range(len(arrays)))

    def get(self, shapes: tuple[tuple[int, ...], ...], dtype=np.float32) -> tuple[np.ndarray, ...]:
        with self._lock:
            for k in range(len(self._sets)):
                arrays = self._sets[k]
                if (tuple(a.shape for a in arrays) == shapes and arrays[0].dtype == dtype
                        and self._reference_counts(self._sets, k) == self._free_counts):
                    # Out of the list while it is being filled: no other thread can be handed it meanwhile.
                    return self._sets.pop(k)
            return tuple(np.empty(shape, dtype) for shape in shapes)

    def put(self, arrays: tuple[np.ndarray, ...]) -> None:
        """Keeps a filled set for later reuse; call before handing it out."""
        with self._lock:
            if len(self._sets) < self._MAX_SETS:
                self._sets.append(arrays)

    def __getstate__(self):  # a worker process starts with an empty pool
        return {}

    def __setstate__(self, state):
        self.__init__()


class _TrainBatch:
    """map transform on a batch of (position, source index) pairs → {'crops', 'row_id'} (+ 'label' when the source's
    elements carry one). Picklable for workers.

    Working on whole batches lets every crop be written straight into its row of the batch arrays (no per-crop
    allocation, no stacking copy). Images are read and cropped ONE AT A TIME, not read as a batch first: each
    image's buffers (record bytes, decoded image, transposed planes, ~200 KB) are then freed before the next is
    read and malloc hands the same, already mapped pages back. Holding a batch of 64 decoded images (~12 MB) made
    glibc return that memory to the OS after every batch and fault it in again page by page, which cost more CPU
    than the decoding itself (~200 us per image measured on the 2-core machine; benchmarks/input_pipeline.py).
    """

    def __init__(self, source: RandomAccessSource, cfg: ml_collections.ConfigDict, seed: int, *,
                 uint8_hand_over: bool = False):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._source = source
        self._length = len(source)
        self._specs = crop_specs(cfg)
        self._params = augment_params(cfg)
        self._seed = seed
        self._uint8 = uint8_hand_over
        self._arrays = _RecycledBatchArrays()

    def __call__(self, pairs: np.ndarray) -> dict[str, Any]:
        positions, indices = pairs[:, 0].tolist(), pairs[:, 1].tolist()
        crops: tuple[np.ndarray, ...] | None = None
        row_ids = np.empty(len(indices), np.int64)
        labels: np.ndarray | None = None  # filled when the source's elements carry a 'label' (the lens task)
        photometric = (np.empty((len(self._specs), len(indices), len(augment.PHOTOMETRIC_COLUMNS)), np.float32)
                       if self._uint8 else None)
        for j, (position, index) in enumerate(zip(positions, indices)):
            element = self._source[index]
            image = _image_of(element, index)
            if crops is None:  # the channel count is known once the first image is read
                channels = image.shape[2]
                crops = self._arrays.get(tuple((len(indices), s.size, s.size, channels) for s in self._specs),
                                         np.uint8 if self._uint8 else np.float32)
            elif image.shape[2] != crops[0].shape[3]:
                raise ValueError(f"source row {index} (row_id {element.get('row_id')}): {image.shape[2]} channels, "
                                 f"but this batch's first image has {crops[0].shape[3]}")
            rng = _reused_element_rng(self._seed, position // self._length, index)
            rows = [c[j] for c in crops]
            if self._uint8:
                photometric[:, j] = augment.multi_crop_uint8(image, rng, self._specs, self._params, _RATIO, rows)
            else:
                augment.multi_crop(image, rng, self._specs, self._params, _RATIO, out=rows)
            row_ids[j] = element["row_id"]
            if "label" in element:
                if labels is None:
                    labels = np.empty(len(indices), np.int32)
                labels[j] = element["label"]
        self._arrays.put(crops)
        extra = {"label": labels} if labels is not None else {}
        if self._uint8:
            return {"crops_uint8": crops, "photometric": tuple(photometric), "row_id": row_ids, **extra}
        return {"crops": crops, "row_id": row_ids, **extra}


class _FinishUint8Batch:
    """Parent-side map after the worker processes (``finish='host'``): uint8 crops + photometric rows → the float32
    batch ``_TrainBatch`` computes in-process (bit for bit; ``augment.finish_crops``), into recycled arrays.

    Why: Grain hands every worker batch over in a NEW shared-memory block, whose pages fault in one by one, in the
    worker as it copies the batch in and in this process as it reads it. For 5 x 4 MB of float32 crops that was
    ~0.5 ms of worker CPU per image on the 2-core machine, more than computing the crops; uint8 crops are a quarter
    of the bytes, and x/255 plus the occasional blur cost ~40 us per image here (benchmarks/input_pipeline.py).
    With ``finish='device'`` even that is left to the accelerator and the uint8 batch goes on as it is.
    """

    def __init__(self):
        self._arrays = _RecycledBatchArrays()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        crops_u8 = batch["crops_uint8"]
        crops = self._arrays.get(tuple(c.shape for c in crops_u8))
        for k, (c, target) in enumerate(zip(crops_u8, crops)):
            augment.finish_crops(c, batch["photometric"][k], out=target)
        self._arrays.put(crops)
        extra = {"label": np.asarray(batch["label"])} if "label" in batch else {}
        return {"crops": crops, "row_id": np.asarray(batch["row_id"]), **extra}


class _EvalElement:
    """map transform: padded global index → {'image', 'row_id', 'valid'}; indices past the source are padding."""

    def __init__(self, source: RandomAccessSource, image_size: int | None, pad_shape: tuple[int, ...]):
        self._source = source
        self._length = len(source)
        self._image_size = image_size
        self._pad_shape = pad_shape

    def __call__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index >= self._length:
            return {"image": np.zeros(self._pad_shape, np.float32), "row_id": np.int64(-1), "valid": np.bool_(False)}
        element = self._source[index]
        image = augment.eval_preprocess(_image_of(element, index), self._image_size)
        if image.shape != self._pad_shape:
            raise ValueError(
                f"source row {index} (row_id {element['row_id']}): preprocessed image has shape {image.shape}, "
                f"but row 0 gave {self._pad_shape}; give image_size to resize all images alike"
            )
        return {"image": image, "row_id": np.int64(element["row_id"]), "valid": np.bool_(True)}


# --------------------------------------------------------------------------------------------------------------------
# Pipelines


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: worker processes unpickling the pipeline need not import JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is the GLOBAL batch and must be a positive multiple of "
            f"process_count={process_count}"
        )
    return batch_size // process_count


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker start-up reads absl flags; outside ``absl.app.run`` they are unparsed and it raises
    ``UnparsedFlagAccessError`` (platform_notes "Grain"). Parse just the program name, leaving real CLIs alone."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])


def _to_iter(ds: grain.MapDataset, read_threads: int, prefetch_buffer_size: int, worker_count: int,
             worker_buffer_size: int, after_workers=None) -> grain.IterDataset:
    # Grain's default ReadOptions (16 threads, 500 elements) oversubscribe a small machine: set them explicitly.
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=int(prefetch_buffer_size))
    )
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(worker_count), per_worker_buffer_size=int(worker_buffer_size))
        )
        if after_workers is not None:
            it_ds = it_ds.map(after_workers)
    return it_ds


def create_train_dataset(
    source: RandomAccessSource,
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    accelerator: bool = False,
) -> grain.IterDataset:
    """Local batches ``{'crops': tuple of float32 [B_local, S_k, S_k, C] in [0, 1], 'row_id': int64 [B_local]}``, plus
    ``'label': int32 [B_local]`` when the source's elements carry a ``label`` (data_pipelines.lens_data).

    ``cfg.finish = 'device'`` gives ``{'crops_uint8': tuple of uint8 [B_local, S_k, S_k, C], 'photometric': tuple of
    float32 [B_local, 5], ...}`` instead of ``'crops'``; ``device_finish.finish_crops`` turns each pair into the same
    crops. ``accelerator``: whether the batches feed an accelerator (the training loop knows the backend; this room
    does not): it decides what ``finish='auto'`` and ``worker_count=-1`` become.

    ``cfg.batch_size`` is global; ``B_local = batch_size // process_count``. Crops are in ``crop_specs(cfg)`` order.
    Defaults of ``process_*`` come from ``jax.process_index()`` / ``jax.process_count()``.
    """
    finish = resolve_finish(cfg.get("finish", "host"), accelerator=accelerator)
    worker_count = resolve_worker_count(cfg.worker_count, accelerator=accelerator)
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch = _local_batch_size(int(cfg.batch_size), process_count)
    crop_specs(cfg), augment_params(cfg)  # validate the config here, not in a worker
    length = len(source)
    if length == 0:
        raise ValueError("the training source is empty")

    ds = grain.MapDataset.range(length)
    if cfg.shuffle:
        ds = ds.seed(seed).shuffle()
    stream = ds.repeat(cfg.num_epochs)
    # Whole global batches only, so every process yields the same number of local batches (the stream's tail is
    # dropped when num_epochs is finite).
    global_batches = len(stream) // int(cfg.batch_size)
    if global_batches == 0:
        raise ValueError(f"{length} images × {cfg.num_epochs} epochs do not fill one global batch of {cfg.batch_size}")
    ds = grain.MapDataset.range(global_batches).map(_LocalBatchPairs(stream, local_batch, process_index,
                                                                     process_count))
    # Worker processes always hand over uint8 crops; with finish='host' this process finishes them (_FinishUint8Batch).
    uint8_hand_over = worker_count > 0 or finish == "device"
    ds = ds.map(_TrainBatch(source, cfg, seed, uint8_hand_over=uint8_hand_over))
    after_workers = _FinishUint8Batch() if uint8_hand_over and finish == "host" else None
    return _TrainStream(ds, lambda batches: _to_iter(batches, cfg.read_threads, cfg.prefetch_buffer_size,
                                                     worker_count, cfg.worker_buffer_size, after_workers))


class _TrainStream(grain.IterDataset):
    """The training batches (a MapDataset over local batch numbers) as an IterDataset whose iterator state is just
    the number of batches yielded: ``{'next_batch': n}``.

    The batches do not depend on the worker or thread count, but Grain's own iterator states do (a ``mp_prefetch``
    state holds one entry per worker): a checkpoint taken with N workers could not be restored with another count
    (KeyError / IndexError inside Grain), and ``worker_count=-1`` picks the count from the machine's cores. This
    state restores under any worker and thread count. States written by Grain's iterators before this existed are
    handed to the same Grain iterator as before (they restore with the worker count they were written with)."""

    def __init__(self, batches: grain.MapDataset, to_iter):
        super().__init__()
        self._batches = batches
        self._to_iter = to_iter

    def __iter__(self) -> grain.DatasetIterator:
        return _TrainStreamIterator(self._batches, self._to_iter)

    def __str__(self) -> str:
        return "TrainStream"


class _TrainStreamIterator(grain.DatasetIterator):
    def __init__(self, batches: grain.MapDataset, to_iter, start: int = 0):
        self._batches = batches
        self._to_iter = to_iter
        self._next_batch = start
        self._legacy = False  # restored from a Grain iterator state: get_state is that iterator's
        super().__init__(iter(to_iter(batches[start:] if start else batches)))

    def __next__(self):
        batch = next(self._parent)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state() if self._legacy else {"next_batch": self._next_batch}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.close()
        if "next_batch" in state:
            start = int(state["next_batch"])
            self._parents = (iter(self._to_iter(self._batches[start:] if start else self._batches)),)
            self._next_batch, self._legacy = start, False
        else:
            self._parents = (iter(self._to_iter(self._batches)),)
            self._parent.set_state(state)
            self._legacy = True
        self._ctx = self._parent._ctx  # pylint: disable=protected-access

    def close(self) -> None:
        self._parent.close()
        super().close()


FINISH_PLACES = ("host", "device", "auto")


def resolve_finish(finish: str, *, accelerator: bool) -> str:
    """``input.finish`` → 'host' or 'device'; 'auto' is 'device' when training runs on an accelerator."""
    if finish not in FINISH_PLACES:
        raise ValueError(f"input.finish must be one of {FINISH_PLACES}, got {finish!r}")
    if finish == "auto":
        return "device" if accelerator else "host"
    return finish


def resolve_worker_count(worker_count: int, *, accelerator: bool, cpu_count: int | None = None) -> int:
    """``input.worker_count`` → a number of worker processes; -1 (auto): none on a CPU-only machine, where the step
    needs the cores, and on an accelerator host one per core but 4 (left to the training process, its reader and the
    system), at least 1 and at most 32."""
    worker_count = int(worker_count)
    if worker_count >= 0:
        return worker_count
    if worker_count != -1:
        raise ValueError(f"input.worker_count must be >= 0 or -1 (auto), got {worker_count}")
    if not accelerator:
        return 0
    if cpu_count is None:  # the cores this process may run on (a container's or job's share), where the OS says
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpu_count - 4, 32))


def create_eval_dataset(
    source: RandomAccessSource,
    *,
    image_size: int | None = 128,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 0,
    prefetch_buffer_size: int = 2,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """Ordered local batches ``{'image': float32 [B_local, S, S, C] in [0, 1], 'row_id': int64, 'valid': bool}``.

    ``batch_size`` is GLOBAL, as in training. Images are x/255 then resized to ``image_size`` with the authors'
    antialiased bilinear float resize (``image_size=None``: native size, x/255 only). The last global batch is padded
    (``valid`` False, ``row_id`` -1, zero image), so every process yields ``ceil(N / batch_size)`` full batches.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch = _local_batch_size(int(batch_size), process_count)
    length = len(source)
    if length == 0:
        raise ValueError("the evaluation source is empty")
    pad_shape = augment.eval_preprocess(_image_of(source[0], 0), image_size).shape
    padded = math.ceil(length / batch_size) * batch_size
    ds = grain.MapDataset.range(padded)[process_index::process_count]
    ds = ds.map(_EvalElement(source, image_size, pad_shape))
    ds = ds.batch(local_batch, drop_remainder=True)  # every local shard is a whole number of batches
    return _to_iter(ds, read_threads, prefetch_buffer_size, worker_count, worker_buffer_size)


def batches_per_epoch(num_images: int, batch_size: int) -> int:
    """Global (= local) batches per pass over ``num_images`` in training: the stream has no epoch boundary, so this is
    the mean number of steps per epoch, for schedules and logging."""
    return num_images // batch_size


__all__: Sequence[str] = (
    "default_input_config",
    "one_crop_config",
    "crop_specs",
    "augment_params",
    "element_rng",
    "multi_crop_element",
    "create_train_dataset",
    "resolve_finish",
    "resolve_worker_count",
    "create_eval_dataset",
    "batches_per_epoch",
)
