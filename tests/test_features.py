"""Feature extraction: one Parquet row per image, metadata joined by row_id, values equal to the encoder's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cellssl_jax.features import extract_features, read_feature_metadata
from cellssl_jax.models.convae import ConvAE, init_params
from data_pipelines.augment import eval_preprocess
from data_pipelines.build import BuildOptions, build_dataset
from data_pipelines.source import open_source

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plate")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):  # not a multiple of the batch: the padded last batch must not leak rows
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
        rows.append({"path": path.name, "Metadata_Plate": "P1", "Metadata_Well": f"B{i + 1:02d}",
                     "Metadata_Site": 1, "Metadata_CellLine": "HT29",
                     "Metadata_Drug": "DMSO" if i < 3 else "Cladribine",
                     "Metadata_Concentration_uM": 0.0 if i < 3 else 1.1, "Metadata_Time_h": float(i),
                     "Metadata_Extra": f"x{i}"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    out = tmp_path_factory.mktemp("ds") / "dataset"
    build_dataset(folder / "manifest.csv", out, BuildOptions(image_size=64), progress=False)
    return out


def _expected(params, model, dataset_dir, image_size):
    src = open_source(dataset_dir)
    images = np.stack([eval_preprocess(src[i]["image"], image_size) for i in range(len(src))])
    return images, np.asarray([src[i]["row_id"] for i in range(len(src))])


def test_latent_and_pooled_features_in_one_pass(dataset, tmp_path):
    model = ConvAE(**SMALL)
    params = init_params(model, jax.random.key(0), image_size=32)
    out = extract_features(params, model, dataset, {"latent": tmp_path / "l.parquet", "pooled": tmp_path / "p.parquet"},
                           batch_size=4, image_size=32, progress=False)
    latent, pooled = pd.read_parquet(out["latent"]), pd.read_parquet(out["pooled"])
    assert len(latent) == len(pooled) == 11
    # Metadata first, all Metadata_ columns kept (extras too), then f0000…
    assert list(latent.columns[:8]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_CellLine",
                                        "Metadata_Drug", "Metadata_Concentration_uM", "Metadata_Time_h",
                                        "Metadata_Extra"]
    fcols = [c for c in latent.columns if c.startswith("f")]
    assert fcols[0] == "f0000" and len(fcols) == 4 * 8 * 8
    assert sorted(latent["Metadata_Extra"]) == sorted(f"x{i}" for i in range(11))

    images, row_ids = _expected(params, model, dataset, 32)
    z = np.asarray(model.apply({"params": params}, images, method="encode"))
    want = z.transpose(0, 3, 1, 2).reshape(len(z), -1)  # channel-major, as the authors' reshape(-1)
    order = np.argsort(row_ids)
    got = latent[fcols].to_numpy()
    np.testing.assert_allclose(got, want[order], atol=1e-5)

    stages = model.apply({"params": params}, images, method="encode_layers")
    b3 = np.asarray(stages["block3"])
    pcols = [c for c in pooled.columns if c.startswith("f")]
    meta = read_feature_metadata(out["pooled"])
    assert meta["mode"] == "pooled" and len(meta["feature_names"]) == len(pcols)
    i_mean = meta["feature_names"].index("block3/mean/c00")
    i_std = meta["feature_names"].index("block3/std/c00")
    np.testing.assert_allclose(pooled[pcols[i_mean]].to_numpy(), b3[order, :, :, 0].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(pooled[pcols[i_std]].to_numpy(), b3[order, :, :, 0].std(axis=(1, 2)), atol=1e-5)
    # The default pooled features cover every encoder stage, the first included (mean and std per channel).
    assert meta["layers"] == ["block1", "block2", "block3", "latent"]
    assert len(pcols) == 2 * (8 + 8 + 8 + model.latent_channels)
    b1 = np.asarray(stages["block1"])
    i_b1 = meta["feature_names"].index("block1/std/c07")
    np.testing.assert_allclose(pooled[pcols[i_b1]].to_numpy(), b1[order, :, :, 7].std(axis=(1, 2)), atol=1e-5)


@pytest.mark.slow
def test_worker_processes_read_the_same_features(dataset, tmp_path):
    """What an accelerator host does by default (worker processes reading and resizing ahead): the same rows."""
    model = ConvAE(**SMALL)
    params = init_params(model, jax.random.key(0), image_size=32)
    kwargs = dict(mode="pooled", batch_size=4, image_size=32, progress=False)
    in_process = pd.read_parquet(extract_features(params, model, dataset, tmp_path / "a.parquet", worker_count=0,
                                                  **kwargs))
    workers = pd.read_parquet(extract_features(params, model, dataset, tmp_path / "b.parquet", worker_count=2,
                                               **kwargs))
    pd.testing.assert_frame_equal(in_process, workers)


_SHARDED = r"""
import sys, jax, numpy as np
from cellssl_jax.features import extract_features
from cellssl_jax.models.convae import ConvAE, init_params
model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))
params = init_params(model, jax.random.key(0), image_size=32)
assert jax.device_count() == int(sys.argv[3]), jax.devices()
extract_features(params, model, sys.argv[1], sys.argv[2], batch_size=8, image_size=32, progress=False)
"""


def test_sharded_extraction_on_8_devices_equals_one_device(dataset, tmp_path):
    outs = {}
    for n in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        out = tmp_path / f"f{n}.parquet"
        subprocess.run([sys.executable, "-c", _SHARDED, str(dataset), str(out), str(n)], check=True, env=env,
                       cwd=ROOT, timeout=300)
        outs[n] = pd.read_parquet(out)
    a, b = outs[1], outs[8]
    assert a["Metadata_Well"].tolist() == b["Metadata_Well"].tolist()
    fcols = [c for c in a.columns if c.startswith("f")]
    np.testing.assert_allclose(a[fcols].to_numpy(), b[fcols].to_numpy(), atol=1e-6)
    assert pq.read_schema(tmp_path / "f8.parquet").metadata[b"cellssl_jax.features"]


_TWO_PROCESSES = r"""
import sys, jax
from cellssl_jax.parallel import initialize_distributed
initialize_distributed()  # CELLSSL_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID from the environment
from cellssl_jax.features import extract_features
from cellssl_jax.models.convae import ConvAE, init_params
model = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8))
params = init_params(model, jax.random.key(0), image_size=32)
assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(), jax.devices())
extract_features(params, model, sys.argv[1], sys.argv[2], batch_size=4, image_size=32, progress=False)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_write_the_same_features_as_one(dataset, tmp_path):
    """Each process reads its own share of the rows; process 0 gathers and writes every row once, in one file."""
    one = tmp_path / "one.parquet"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _SHARDED, str(dataset), str(one), "1"], check=True, env=env, cwd=ROOT,
                   timeout=300)
    two, port = tmp_path / "two.parquet", _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(dataset), str(two)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(env, CELLSSL_COORDINATOR=f"127.0.0.1:{port}", CELLSSL_NUM_PROCESSES="2",
                                       CELLSSL_PROCESS_ID=str(i)))
             for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    a, b = pd.read_parquet(one), pd.read_parquet(two)
    assert len(b) == len(a) == 11 and b["Metadata_Well"].is_unique
    assert list(a.columns) == list(b.columns)
    b = b.set_index("Metadata_Well").loc[a["Metadata_Well"]].reset_index()[list(a.columns)]
    fcols = [c for c in a.columns if c.startswith("f")]
    np.testing.assert_allclose(a[fcols].to_numpy(), b[fcols].to_numpy(), atol=1e-6)
    assert a["Metadata_Extra"].tolist() == b["Metadata_Extra"].tolist()


def test_text_metadata_with_missing_values_is_written(tmp_path):
    """The dataset manifest comes back from Parquet with pandas' string dtype, whose missing value is NaN: an optional
    text column (empty in the first batch, filled in a later one) must be written as nulls in one schema."""
    import io

    from cellssl_jax.features import extract

    manifest = pd.DataFrame({"Metadata_Well": ["A01", "A02", "A03", "A04"],
                             "Metadata_Note": [None, None, "edge well", None]})
    buf = io.BytesIO()
    manifest.to_parquet(buf)
    manifest = pd.read_parquet(io.BytesIO(buf.getvalue()))  # as load_dataset_manifest reads it
    path = tmp_path / "f.parquet"
    writer = extract._ModeWriter(path, extract.column_names(3), {}, extract.metadata_types(manifest))
    for start in (0, 2):  # two batches, as extract_features writes them
        writer.write(manifest.iloc[start:start + 2].reset_index(drop=True), np.zeros((2, 3), np.float32))
    writer.close()
    back = pd.read_parquet(path)
    assert back["Metadata_Note"].isna().tolist() == [True, True, False, True]
    assert back["Metadata_Note"].iloc[2] == "edge well"


def test_a_lens_run_gives_the_features_of_its_frozen_pretrained_encoder(dataset, tmp_path):
    """`evaluate.py features --checkpoint <lens run>` used to hand the lens run's whole parameter tree to the ConvAE
    (a flax ScopeParamNotFoundError); its features are those of the frozen encoder the lens was trained against."""
    from cellssl_jax.features import extract_from_checkpoint
    from cellssl_jax.training.checkpoint import save_params_checkpoint

    model = ConvAE(**SMALL)
    pretrained = init_params(model, jax.random.key(0), image_size=32)
    lens = init_params(model, jax.random.key(1), image_size=32)
    model_config = {**SMALL, "image_size": 32}
    save_params_checkpoint(tmp_path / "pretrained", pretrained, model_config)
    save_params_checkpoint(tmp_path / "lens", {"lens": lens, "pretrained": pretrained,
                                               "classifier": {"kernel": np.zeros((256, 3), np.float32)},
                                               "feature_norm": {"mean": np.zeros(256, np.float32)}}, model_config)
    kwargs = dict(batch_size=4, image_size=32, progress=False)
    want = pd.read_parquet(extract_from_checkpoint(tmp_path / "pretrained", dataset, tmp_path / "p.parquet",
                                                   mode="latent", **kwargs))
    # {mode: path}, as make demo writes both modes in one pass
    got_path = extract_from_checkpoint(tmp_path / "lens", dataset, {"latent": tmp_path / "l.parquet"}, **kwargs)["latent"]
    pd.testing.assert_frame_equal(pd.read_parquet(got_path), want)
    assert "frozen pretrained encoder" in read_feature_metadata(got_path)["encoder"]
