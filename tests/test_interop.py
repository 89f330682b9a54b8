"""PyTorch interop: the authors' checkpoint loads exactly, our exports load into their model, nothing unsafe runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellssl_jax.interop.convert import flax_to_torch, infer_convae_config, torch_to_flax
from cellssl_jax.interop.export import export_params, load_export
from cellssl_jax.interop.parity import check_params_parity, encode_and_decode
from cellssl_jax.interop.preprocess import extract_features_from_image, preprocess_like_authors, read_grayscale_uint8
from cellssl_jax.interop.torch_zip import CheckpointFormatError, UnsafeCheckpointError, load_state_dict, \
    load_torch_zip
from cellssl_jax.models.convae import ConvAE, init_params, model_from_config

import torch  # the dev/interop extra: a missing torch must fail here, not skip
from torch import nn

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def reference_file(name: str) -> Path:
    """A file of ../shared/reference; missing means skip locally, but FAIL in CI where it must be present."""
    path = REFERENCE / name
    if not path.is_file():
        message = f"reference file {path} is missing"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class Autoencoder(nn.Module):
    """The authors' model as in original_method.md §3.1 (pheno-ml convae/feature_extractor.py), unmodified."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 128, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(128, 64, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True), nn.MaxPool2d(2),
            nn.Conv2d(64, 32, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True),
            nn.Conv2d(32, 4, (3, 3), stride=(1, 1), padding=(1, 1)),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4, 32, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True),
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(32, 64, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True),
            nn.Upsample(scale_factor=2),
            nn.ConvTranspose2d(64, 128, (3, 3), stride=(1, 1), padding=(1, 1)), nn.ReLU(True),
            nn.ConvTranspose2d(128, 1, (3, 3), stride=(1, 1), padding=(1, 1)), nn.Sigmoid(),
        )

    def forward(self, features):
        return self.decoder(self.encoder(features))


def load_into_authors_class(path: Path) -> Autoencoder:
    """Exactly how a PyTorch user loads our export: their class, ``load_state_dict``, nothing of ours."""
    model = Autoencoder()
    if path.suffix == ".pt":
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    return model.eval()


def nchw(a) -> np.ndarray:
    return np.asarray(a).transpose(0, 3, 1, 2)


def flax_outputs(model: ConvAE, params, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latent, reconstruction) of our model, NCHW for comparison with torch."""
    z, y = jax.jit(partial(model.apply, method=encode_and_decode))({"params": params}, x_nchw.transpose(0, 2, 3, 1))
    return nchw(z), nchw(y)


def random_params(model: ConvAE, image_size: int = 128, seed: int = 0) -> dict:
    """Parameters of ``model``'s structure at PyTorch's default init scale, U(±1/√fan_in), drawn with numpy.

    ``init_params`` would do the same but compiles one random-number program per parameter shape (~1 s each here);
    the interop tests only need realistic numbers in the right tree.
    """
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_size=image_size))
    rng = np.random.default_rng(seed)

    def layer(node):
        bound = 1.0 / np.sqrt(np.prod(node["kernel"].shape[:3]))
        return {name: rng.uniform(-bound, bound, node[name].shape).astype(np.float32) for name in ("kernel", "bias")}

    return {part: {name: layer(node) for name, node in layers.items()} for part, layers in shapes.items()}


def torch_outputs(module: nn.Module, x_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        z = module.encoder(torch.from_numpy(x_nchw))
        return z.numpy(), module.decoder(z).numpy()


def max_abs(a, b) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def authors_state_dict():
    return load_state_dict(reference_file("convae_pheno_ml.torch"))


@pytest.fixture(scope="module")
def fresh_params():
    """Our parameters at PyTorch's default init scale: what a trained model of ours exports from."""
    return random_params(ConvAE(), seed=7)


# ---- reading the authors' checkpoint --------------------------------------------------------------------------------

def test_torch_free_reader_reproduces_torch_load(authors_state_dict):
    path = reference_file("convae_pheno_ml.torch")
    # Storages were saved on cuda:0; torch needs map_location on a CPU machine, our reader maps to numpy regardless.
    expected = torch.load(path, map_location="cpu", weights_only=True)
    assert list(authors_state_dict) == list(expected)
    assert authors_state_dict._metadata == expected._metadata
    for key, tensor in expected.items():
        ours = authors_state_dict[key]
        assert ours.dtype == np.float32 and ours.shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(ours, tensor.numpy(), err_msg=key)
    assert sum(v.size for v in authors_state_dict.values()) == 189_381


def test_import_matches_the_authors_golden_outputs(authors_state_dict):
    params = torch_to_flax(authors_state_dict)
    config = infer_convae_config(authors_state_dict)
    assert config == {"in_channels": 1, "encoder_widths": [128, 64, 32], "latent_channels": 4,
                      "decoder_widths": [32, 64, 128]}
    x = np.load(reference_file("hct15_input_128.npy"))
    golden_z = np.load(reference_file("hct15_features.npy"))
    golden_y = np.load(reference_file("hct15_reconstruction.npy"))
    for formulation in ("plain", "subpixel"):
        z, y = flax_outputs(model_from_config({**config, "formulation": formulation}), params, x)
        assert max_abs(z, golden_z) <= 1e-5, formulation
        assert max_abs(y, golden_y) <= 1e-5, formulation


def test_jpeg_to_features_in_one_call_as_the_authors_did(authors_state_dict):
    jpeg = reference_file("HCT15_example.jpg")
    # The numpy resize follows PyTorch's antialiased kernel: the authors' preprocessed input, bit for bit.
    np.testing.assert_array_equal(preprocess_like_authors(read_grayscale_uint8(jpeg)),
                                  np.load(reference_file("hct15_input_128.npy"))[0, 0])
    features = extract_features_from_image(jpeg, torch_to_flax(authors_state_dict), ConvAE())
    golden = np.load(reference_file("hct15_features.npy")).reshape(-1)  # the authors' encoder(x).reshape(-1)
    assert features.shape == (4096,) and features.dtype == np.float32
    assert max_abs(features, golden) <= 1e-5


def test_colour_image_is_refused_with_its_name(tmp_path):
    from PIL import Image

    path = tmp_path / "rgb.jpg"
    Image.new("RGB", (16, 16)).save(path)
    with pytest.raises(ValueError, match="rgb.jpg.*'RGB'"):
        read_grayscale_uint8(path)


# ---- exporting ours -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_loads_unchanged_into_the_authors_class(tmp_path, fresh_params, suffix):
    (path,) = export_params(fresh_params, {"formulation": "subpixel"}, tmp_path / f"convae{suffix}")
    x = np.random.default_rng(0).random((3, 1, 128, 128), dtype=np.float32)
    tz, ty = torch_outputs(load_into_authors_class(path), x)
    jz, jy = flax_outputs(ConvAE(), fresh_params, x)
    assert max_abs(tz, jz) <= 1e-5
    assert max_abs(ty, jy) <= 1e-5
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["matches_paper_architecture"] and config["differences_from_paper"] == []
    assert config["preprocessing"] == "x/255 then bilinear antialiased resize to 128"
    assert config["dtype"] == "float32" and config["feature_dim"] == 4096
    # readable as any file the process writes (safetensors' temporary file was 0600: shared weights others could
    # not open)
    assert path.stat().st_mode & 0o777 == path.with_suffix(".json").stat().st_mode & 0o777


def test_authors_weights_survive_export_and_reproduce_golden_outputs_in_torch(tmp_path, authors_state_dict):
    paths = export_params(torch_to_flax(authors_state_dict), infer_convae_config(authors_state_dict), tmp_path / "ae")
    assert sorted(p.suffix for p in paths) == [".pt", ".safetensors"]
    x = np.load(reference_file("hct15_input_128.npy"))
    for path in paths:
        state, _ = load_export(path)
        for key, value in authors_state_dict.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{path.name}: {key}")
        z, y = torch_outputs(load_into_authors_class(path), x)
        assert max_abs(z, np.load(reference_file("hct15_features.npy"))) <= 1e-5
        assert max_abs(y, np.load(reference_file("hct15_reconstruction.npy"))) <= 1e-5


def test_configured_width_model_through_the_shipped_module(tmp_path):
    from cellssl_jax.interop.torch_module import load_exported

    model_config = {"in_channels": 3, "encoder_widths": [24, 16, 8], "latent_channels": 6,
                    "decoder_widths": [8, 16, 24], "image_size": 64, "dtype": "bfloat16"}
    params = random_params(model_from_config(model_config), image_size=64, seed=3)
    paths = export_params(params, model_config, tmp_path / "small")
    config = json.loads((tmp_path / "small.json").read_text())
    assert not config["matches_paper_architecture"]
    assert "in_channels: 3 (paper: 1)" in config["differences_from_paper"]
    assert "input_size: 64 (paper: 128)" in config["differences_from_paper"]
    assert config["latent_shape"] == [6, 16, 16] and config["trained_compute_dtype"] == "bfloat16"
    for path in paths:
        module = load_exported(path)
        assert module.encoder[8].out_channels == 6 and module.decoder[8].out_channels == 3
        report = check_params_parity(params, model_config, path, n=3, seed=1)
        assert report["weights_bit_exact"] and report["input_shape"] == [3, 3, 64, 64]
        assert report["features_max_abs_diff"] <= 1e-5 and report["reconstruction_max_abs_diff"] <= 1e-5


def test_jax_torch_jax_round_trip_is_bit_exact(tmp_path, fresh_params):
    paths = export_params(fresh_params, {}, tmp_path / "rt")
    via_torch = torch_to_flax(torch.load(tmp_path / "rt.pt", weights_only=True))  # torch tensors in
    via_files = [torch_to_flax(load_export(p)[0]) for p in paths]  # torch-free readers
    for back in [via_torch, *via_files]:
        leaves = jax.tree_util.tree_leaves_with_path(fresh_params)
        assert len(leaves) == len(jax.tree_util.tree_leaves(back)) == 16
        for key, leaf in leaves:
            restored = back
            for k in key:
                restored = restored[k.key]
            assert restored.dtype == np.float32
            np.testing.assert_array_equal(restored, leaf, err_msg=jax.tree_util.keystr(key))


def test_bfloat16_params_are_written_as_float32(tmp_path, fresh_params):
    bf16 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), fresh_params)
    (path,) = export_params(bf16, {}, tmp_path / "bf16.safetensors")
    state, _ = load_export(path)
    expected = flax_to_torch(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), bf16))
    for key, value in expected.items():
        assert state[key].dtype == np.float32
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_mismatched_state_dict_is_named():
    state = flax_to_torch(random_params(ConvAE()))
    state["decoder.9.weight"] = state.pop("decoder.8.weight")
    with pytest.raises(KeyError, match=r"missing \['decoder.8.weight'\].*unexpected \['decoder.9.weight'\]"):
        torch_to_flax(state)


# ---- refusing unsafe or broken files --------------------------------------------------------------------------------

def write_checkpoint_zip(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A file laid out exactly like torch.save's zip, with whatever pickle we hand it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
        for key, raw in (records or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write_checkpoint_zip(tmp_path / "evil.pt", pickle.dumps({"encoder.0.weight": _WritesMarker(marker)},
                                                                    protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*'(posix|os|nt)\.system'"):
        load_torch_zip(path)
    assert not marker.exists()
    # And through the import entry point: refused the same way, no checkpoint written.
    from cellssl_jax.interop.checkpoints import import_torch_checkpoint

    with pytest.raises(UnsafeCheckpointError):
        import_torch_checkpoint(path, tmp_path / "run")
    assert not marker.exists() and not (tmp_path / "run").exists()
    # The payload is live: a plain unpickler runs it.
    with zipfile.ZipFile(path) as zf:
        pickle.loads(zf.read("archive/data.pkl"))
    assert marker.exists()


def test_malicious_global_hidden_after_real_tensors_is_refused(tmp_path):
    """A genuine torch-written state_dict whose pickle has one extra entry calling a builtin."""
    marker = tmp_path / "pwned2"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    with zipfile.ZipFile(good) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        records = {n.split("/data/")[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
        data_pkl = zf.read(f"{prefix}/data.pkl")
    code = f"open({str(marker)!r}, 'w').close()".encode()
    payload = b"cbuiltins\nexec\n(X" + len(code).to_bytes(4, "little") + code + b"tR"  # exec(code)
    # Replace the final STOP with: push the payload call, then SETITEM it under key 'x' on the dict, then STOP.
    evil_pkl = data_pkl[:-1] + b"X\x01\x00\x00\x00x" + payload + b"s."
    path = write_checkpoint_zip(tmp_path / "evil2.pt", evil_pkl, records)
    with pytest.raises(UnsafeCheckpointError, match="'builtins.exec'"):
        load_torch_zip(path)
    assert not marker.exists()
    pickle.loads(payload + b".")  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_out_of_bounds_tensor_geometry_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    with zipfile.ZipFile(buf) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        records = {n.split("/data/")[1]: zf.read(n) for n in zf.namelist() if "/data/" in n}
        data_pkl = zf.read(f"{prefix}/data.pkl")
    # Size (4,) → (400,): a strided view would read far past the 16-byte storage.
    evil = data_pkl.replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    assert evil != data_pkl
    with pytest.raises(CheckpointFormatError, match="reaches element 399, but the storage holds 4"):
        load_torch_zip(write_checkpoint_zip(tmp_path / "oob.pt", evil, records))


def test_non_zip_file_is_refused(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointFormatError, match="legacy.pt: not a PyTorch zip checkpoint"):
        load_torch_zip(path)


# ---- the Orbax-checkpoint entry points evaluate.py calls -----------------------------------------------------------

@pytest.mark.slow
def test_import_export_and_parity_through_checkpoints(tmp_path):
    from cellssl_jax.interop.checkpoints import check_export_parity, export_checkpoint, import_torch_checkpoint
    from cellssl_jax.training.checkpoint import load_params

    step_dir = import_torch_checkpoint(reference_file("convae_pheno_ml.torch"), tmp_path / "authors")
    params, model_config = load_params(step_dir)
    assert model_config["encoder_widths"] == [128, 64, 32] and model_config["image_size"] == 128
    paths = export_checkpoint(tmp_path / "authors", tmp_path / "export" / "convae.pt")
    assert paths == [tmp_path / "export" / "convae.pt"] and (tmp_path / "export" / "convae.json").is_file()
    # Our export imports back to the same parameters, bit for bit, through both Orbax checkpoints.
    params_back, config_back = load_params(import_torch_checkpoint(paths[0], tmp_path / "reimported"))
    assert config_back == model_config
    for (key, leaf), back in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(params_back)):
        np.testing.assert_array_equal(back, leaf, err_msg=jax.tree_util.keystr(key))
    report = check_export_parity(tmp_path / "authors", paths[0], n=2, seed=0)
    assert report["weights_bit_exact"]
    # The authors' weights are large (|w| up to 32): on random inputs both float32 implementations sit ~1e-5 from the
    # float64 answer, so the bound is relative to PyTorch's own float32 rounding rather than an absolute 1e-5.
    assert report["features_max_abs_diff"] <= 3 * report["float32_rounding_features"] + 1e-6
    assert report["reconstruction_max_abs_diff"] <= 3 * report["float32_rounding_reconstruction"] + 1e-6


def test_reader_handles_the_tensor_kinds_torch_save_writes(tmp_path):
    """Views with offsets and strides, shared storages, scalars, bf16/int/bool, and keep_vars Parameters."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    saved = {
        "transposed": base.t(),  # non-contiguous view
        "slice": base[1:3, 2:5],  # storage offset + strides, shares base's storage
        "base": base,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "bf16": torch.linspace(-2, 2, 7).to(torch.bfloat16),
        "half": torch.linspace(-1, 1, 5).half(),
        "int": torch.arange(5, dtype=torch.int64) - 2,
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "kinds.pt"
    torch.save(saved, path)
    ours = load_torch_zip(path)
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for key, tensor in theirs.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        got = ours[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[key]
        assert got.shape == expected.shape and got.dtype == expected.dtype, key
        np.testing.assert_array_equal(got, expected, err_msg=key)
    assert ours["bf16"].dtype.name == "bfloat16"


def test_an_import_reruns_into_its_workdir_and_never_into_a_training_run(tmp_path):
    """`evaluate.py import-torch` twice into one workdir (and the demo's interop stage when it reruns) used to stop
    on Orbax's StepAlreadyExistsError; a workdir with a training run's steps is refused, not mixed with it."""
    from cellssl_jax.training.checkpoint import load_params, save_params_checkpoint

    first = {"w": np.zeros(3, np.float32)}
    second = {"w": np.ones(3, np.float32)}
    save_params_checkpoint(tmp_path / "authors", first, {})
    step_dir = save_params_checkpoint(tmp_path / "authors", second, {"image_size": 64})
    params, config = load_params(tmp_path / "authors")
    assert step_dir.name == "0" and config == {"image_size": 64}
    np.testing.assert_array_equal(params["w"], second["w"])
    (tmp_path / "train" / "checkpoints" / "20").mkdir(parents=True)  # what a training run leaves
    with pytest.raises(FileExistsError, match=r"training run's checkpoints \(steps \[20\]\)"):
        save_params_checkpoint(tmp_path / "train", first, {})
