"""Encoder features of every image of a built dataset, streamed to Parquet.

One row per image: every ``Metadata_*`` column of the dataset's manifest (joined by ``row_id``), then feature columns
``f0000…``. Memory is bounded by the batch: batches go through the sharded encoder and straight into a
``pyarrow.parquet.ParquetWriter``.

Feature modes (``mode``):
- ``"latent"``: the flattened 4×32×32 latent, channel-major (C, H, W) like the authors' ``encoder(x).reshape(-1)``, so
  features from imported authors' weights line up with theirs column for column.
- ``"pooled"``: translation-invariant statistics: per-channel mean and standard deviation over positions of the chosen
  encoder stages (default: all four, ``block1``, ``block2``, ``block3`` and ``latent``: 2 × (128 + 64 + 32 + 4) = 456
  features for the paper's widths). The flattened latent depends on where cells sit in the field; a drug that changes
  cell count or shape but not layout can drown in that positional noise, while per-channel statistics keep what the
  cells look like and how many there are.

Why all four stages by default (measured 2026-11-26 on two rendered demo plates, seeds 0 and 1, features of the demo
ConvAE of ``make demo`` (40 steps), temporal defaults: features in DMSO-spread units, k=8, radius-3 DTW,
NOISE_MULTIPLE 2, the cytotoxic rule before its last change; mean ARI over clustering seeds 0–4, plate seed 0 / seed
1): block1–3 + latent 0.93 / 0.91 (0.95 / 0.88 with the final rule); block1 alone 0.95 / 0.91; block2, block3 and
latent (the earlier default) 0.65 / 0.76 (raw features 0.76 / 0.55); block2 alone 0.50 / 0.26; the flattened latent
(raw, as the paper) 0.58 / 0.57 (final rule). This briefly trained encoder keeps most of its signal in the first stage
(55 of its 64 block2 channel means are constant to 1e-6 over the demo plate); a well-trained one may carry it deeper,
and all four stages cover both.
The Parquet schema metadata records the mode, the feature names (e.g. ``block3/mean/c05``) and the checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from cellssl_jax import parallel
from cellssl_jax.models.convae import ConvAE, flatten_channel_major

log = logging.getLogger(__name__)

FEATURE_MODES = ("latent", "pooled")
DEFAULT_POOLED_LAYERS = ("block1", "block2", "block3", "latent")


def features_function(model: ConvAE, modes: Sequence[str], layers: Sequence[str] = DEFAULT_POOLED_LAYERS):
    """``f(params, images[N,H,W,C]) -> {mode: float32 [N, F]}``: every mode from ONE pass of the encoder.

    The features are computed image by image inside the model's micro-batch slices (``encode_layers(summarize=)``),
    so only they are gathered over the batch. On the 2-core CPU at batch 256 (BENCHMARKS.md) this ran latent +
    pooled at 107–120 images/s, against 47 for one encoder pass per mode and 67–79 over the whole batch at once.
    """
    unknown = [m for m in modes if m not in FEATURE_MODES]
    if unknown:
        raise ValueError(f"unknown feature mode {unknown[0]!r}; choose one of {FEATURE_MODES}")

    def summarize(stages):
        out = {}
        if "latent" in modes:
            out["latent"] = flatten_channel_major(stages["latent"])
        if "pooled" in modes:
            out["pooled"] = jnp.concatenate([s for name in layers for s in _mean_and_std(stages[name])], axis=1)
        return out

    def features(params, images):
        return model.apply({"params": params}, images, summarize=summarize, method="encode_layers")

    return features


def _mean_and_std(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-channel mean and standard deviation over positions of [N, H, W, C], float32.

    The sums over positions are products with a ones vector: XLA:CPU's reduction over those (major) axes was the
    slower part in one-image slices (latent + pooled: 100 images/s with jnp.mean/std, 120 with the products)."""
    a = a.astype(jnp.float32).reshape(a.shape[0], -1, a.shape[-1])
    weights = jnp.full((a.shape[1],), 1.0 / a.shape[1], jnp.float32)
    mean = jnp.einsum("p,npc->nc", weights, a, precision="highest")
    var = jnp.einsum("p,npc->nc", weights, jnp.square(a - mean[:, None]), precision="highest")
    return mean, jnp.sqrt(var)


def feature_function(model: ConvAE, mode: str = "latent", layers: Sequence[str] = DEFAULT_POOLED_LAYERS):
    """``f(params, images[N,H,W,C]) -> float32 [N, F]`` for one feature mode."""
    features = features_function(model, (mode,), layers)
    return lambda params, images: features(params, images)[mode]


def feature_names(model: ConvAE, mode: str, layers: Sequence[str] = DEFAULT_POOLED_LAYERS,
                  image_size: int = 128) -> list[str]:
    """Human-readable names of the feature columns, in column order."""
    latent_hw = image_size // 4
    if mode == "latent":
        return [f"latent/c{c}/y{y:02d}/x{x:02d}" for c in range(model.latent_channels)
                for y in range(latent_hw) for x in range(latent_hw)]
    widths = {"block1": model.encoder_widths[0], "block2": model.encoder_widths[1],
              "block3": model.encoder_widths[2], "latent": model.latent_channels}
    return [f"{name}/{stat}/c{c:02d}" for name in layers for stat in ("mean", "std") for c in range(widths[name])]


def column_names(n_features: int) -> list[str]:
    width = max(4, len(str(n_features - 1)))
    return [f"f{i:0{width}d}" for i in range(n_features)]


# Below this many images, auto (worker_count=-1) reads with the one thread: ~0.45 ms an image on one core
# (benchmarks/input_pipeline.py, "eval" row: ~2 s for 4,096 images) against worker processes that take ~1 s each to
# start (platform notes) before they read anything.
_WORKERS_FROM_IMAGES = 4096


def extract_features(
    params,
    model: ConvAE,
    dataset_dir: str | Path,
    out_path: str | Path | dict[str, str | Path],
    *,
    mode: str = "latent",
    layers: Sequence[str] = DEFAULT_POOLED_LAYERS,
    batch_size: int = 256,
    image_size: int = 128,
    mesh=None,
    progress: bool = True,
    provenance: dict | None = None,
    source_indices: Sequence[int] | None = None,
    worker_count: int = -1,
) -> Path | dict[str, Path]:
    """Run the encoder over a built dataset and write one Parquet row per image.

    ``source_indices``: only these records of the dataset (positions in ``open_source``, e.g. the ``source_index`` of
    ``data_pipelines.source.readable_rows``), in that order; default every image.

    ``out_path`` may be a dict ``{mode: path}`` to write several feature modes from ONE pass over the images (the
    encoder runs once; reading and resizing the images is most of the cost). ``batch_size`` is global: split over
    every process and device. Only process 0 writes; other processes send their rows to it.

    The images are read and resized ahead of the encoder, by one reader thread (so reading overlaps the encoder on a
    CPU) and, on an accelerator, by ``worker_count`` processes (-1: one per core but 4, as in training, for
    ``_WORKERS_FROM_IMAGES`` images or more; the encoder there runs ~100× faster than one core resizes images).
    """
    from data_pipelines.input_pipeline import create_eval_dataset, resolve_worker_count
    from data_pipelines.source import SubsetSource, load_dataset_manifest, open_source

    outputs = {m: Path(p) for m, p in out_path.items()} if isinstance(out_path, dict) else {mode: Path(out_path)}
    dataset_dir = Path(dataset_dir)
    mesh = mesh or parallel.make_data_mesh()
    n_proc, proc = jax.process_count(), jax.process_index()
    if batch_size % jax.device_count():
        batch_size += jax.device_count() - batch_size % jax.device_count()
        log.info("batch size rounded up to %d to split over %d devices", batch_size, jax.device_count())
    local_batch = batch_size // n_proc

    manifest = load_dataset_manifest(dataset_dir).set_index("row_id", drop=False)
    meta_cols = [c for c in manifest.columns if c.startswith("Metadata_")]
    source = open_source(dataset_dir)
    if source_indices is not None:
        source = SubsetSource(source, source_indices)
    workers = resolve_worker_count(worker_count, accelerator=jax.default_backend() != "cpu")
    if worker_count == -1 and len(source) < _WORKERS_FROM_IMAGES:
        workers = 0  # a small subset (the compare and lens tasks): one reader thread is done before workers start
    batches = create_eval_dataset(source, image_size=image_size, batch_size=local_batch, process_index=proc,
                                  process_count=n_proc, worker_count=workers, read_threads=1)

    params = parallel.replicate(params, mesh)
    step = jax.jit(features_function(model, tuple(outputs), layers),
                   in_shardings=(parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=parallel.batch_sharding(mesh))

    # One Arrow type per metadata column, from the whole manifest: a batch whose optional text column is empty (or
    # holds a missing value, NaN under pandas' string dtype) must not fail or change the file's schema mid-write.
    meta_types = metadata_types(manifest[meta_cols])
    writers: dict[str, _ModeWriter] = {}
    for m, path in outputs.items():
        names = feature_names(model, m, layers, image_size)
        record = {"mode": m, "layers": list(layers) if m == "pooled" else ["latent"], "feature_names": names,
                  "image_size": image_size, **(provenance or {})}
        writers[m] = _ModeWriter(path, column_names(len(names)), record, meta_types)

    n_images = len(source)
    written = 0
    bar = tqdm(total=n_images, desc=f"features ({', '.join(outputs)})", unit="img",
               disable=not progress or proc != 0)
    try:
        for batch in batches:
            images = parallel.global_batch(batch["image"], mesh)
            feats = step(params, images)
            if n_proc > 1:
                from jax.experimental import multihost_utils

                feats, row_id, valid = multihost_utils.process_allgather(
                    (feats, batch["row_id"], batch["valid"]), tiled=True)
            else:
                row_id, valid = batch["row_id"], batch["valid"]
            row_id, valid = np.asarray(row_id), np.asarray(valid, bool)
            bar.update(int(valid.sum()))
            if proc != 0 or not valid.any():
                continue
            meta = manifest.loc[row_id[valid], meta_cols].reset_index(drop=True)
            for m, f in feats.items():
                f = np.asarray(f)[valid]
                if not np.isfinite(f).all():
                    bad = row_id[valid][~np.isfinite(f).all(axis=1)]
                    raise FloatingPointError(f"non-finite {m} features for dataset rows {bad[:10].tolist()}")
                writers[m].write(meta, f)
            written += int(valid.sum())
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if proc == 0 and written != n_images:
        raise RuntimeError(f"wrote {written} feature rows for a dataset of {n_images} images in {dataset_dir}")
    log.info("wrote %d rows of %s features to %s", written, "/".join(outputs), ", ".join(map(str, outputs.values())))
    return outputs if isinstance(out_path, dict) else outputs[mode]


class _ModeWriter:
    """A ParquetWriter opened on the first batch (the schema comes from the first table)."""

    def __init__(self, path: Path, columns: list[str], record: dict, meta_types: dict | None = None):
        self.path, self.columns, self.meta_types = path, columns, meta_types or {}
        self.schema_meta = {"cellssl_jax.features": json.dumps(record)}
        self._writer = None

    def write(self, meta: pd.DataFrame, feats: np.ndarray) -> None:
        table = _table(meta, feats, self.columns, self.schema_meta, self.meta_types)
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def metadata_types(meta: pd.DataFrame) -> dict:
    """The Arrow type of every metadata column, read off all its rows (missing values are nulls)."""
    return {c: pa.array(meta[c].to_numpy(), from_pandas=True).type for c in meta.columns}


def _table(meta: pd.DataFrame, feats: np.ndarray, columns: list[str], schema_meta: dict,
           meta_types: dict | None = None) -> pa.Table:
    meta_types = meta_types or {}
    arrays = [pa.array(meta[c].to_numpy(), type=meta_types.get(c), from_pandas=True) for c in meta.columns]
    arrays += [pa.array(feats[:, i].astype(np.float32)) for i in range(feats.shape[1])]
    table = pa.Table.from_arrays(arrays, names=list(meta.columns) + columns)
    return table.replace_schema_metadata(schema_meta)


def read_feature_metadata(path: str | Path) -> dict:
    """The mode, layer and feature-name record written with a features file."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"cellssl_jax.features")
    return json.loads(raw) if raw else {}


def extract_from_checkpoint(checkpoint: str | Path, data: str | Path, out_path, **kwargs):
    """Load parameters and model config from any checkpoint the project writes (trained, imported, or a lens run:
    its frozen pretrained encoder; ``training.checkpoint.load_encoder_params``) and extract.

    ``data``: a built dataset folder, or a manifest, which the data room builds first into ``<stem>_dataset`` beside
    ``out_path`` (the first one, when ``out_path`` is a dict of modes; a finished build of the same manifest there is
    reused; this room never reads image files itself)."""
    from cellssl_jax.models.convae import model_from_config
    from cellssl_jax.training.checkpoint import load_encoder_params
    from data_pipelines.build import as_built_dataset

    params, model_cfg, description = load_encoder_params(checkpoint)  # first: a wrong path fails before a build
    first_out = Path(next(iter(out_path.values())) if isinstance(out_path, dict) else out_path)
    dataset_dir = as_built_dataset(data, first_out.parent / f"{first_out.stem}_dataset")
    log.info("features of %s", description)
    model = model_from_config(model_cfg)
    return extract_features(params, model, dataset_dir, out_path,
                            provenance={"checkpoint": str(checkpoint), "encoder": description}, **kwargs)
