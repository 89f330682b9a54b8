"""The training loop: per-crop steps, the non-finite guard, checkpoints that resume bit for bit, and the parallel paths.

Fast tests run the step in this process on one CPU device. The slow ones start real processes: `train.py` on a tiny
built data set (killed with SIGKILL and rerun; two `jax.distributed` processes over gloo) and 8 forced CPU devices.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from PIL import Image

from cellssl_jax.models.convae import ConvAE, model_from_config
from cellssl_jax.parallel import make_data_mesh
from cellssl_jax.training.checkpoint import TrainCheckpointer, find_step_dir, load_params, save_params_checkpoint
from cellssl_jax.training.loop import NonFiniteError, train_and_evaluate
from cellssl_jax.training.objectives.autoencoder import bce_with_logits, binary_entropy
from cellssl_jax.training.optimizer import host_learning_rate, learning_rate_schedule, make_optimizer
from cellssl_jax.training.step import create_train_state, make_train_step

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = REPO / "tests" / "training_config.py"
SMALL = dict(encoder_widths=(4, 4, 4), decoder_widths=(4, 4, 4))


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _crops(sizes, batch=4, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    return tuple(rng.uniform(0, 1, (batch, s, s, channels)).astype(np.float32) for s in sizes)


def _reference_updates(model, tx, params, crops):
    """The authors' loop written out: for each crop-batch, BCE, backward, optimizer.step()."""
    opt_state, losses = tx.init(params), []

    @jax.jit
    def update(p, o, x):
        value, grads = jax.value_and_grad(_bce_loss(model))(p, x)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    for x in crops:
        params, opt_state, value = update(params, opt_state, x)
        losses.append(float(value))
    return params, losses


def _bce_loss(model):
    def loss(p, x):
        return bce_with_logits(model.apply({"params": p}, x, method=lambda m, v: m.decode_logits(m.encode(v))), x)

    return loss


def _random_params(model, image_size, seed=0):
    """Parameters of the model's shapes drawn with numpy: no PRNG program to compile (threefry is slow to compile on
    XLA:CPU), which keeps these tests quick; the values are in the range of the model's own initialiser."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, model.in_channels)))
    return jax.tree_util.tree_map(lambda s: rng.uniform(-0.2, 0.2, s.shape).astype(np.float32), shapes["params"])


class _Tiny:
    """One small model, optimizer and initial parameters for the in-process tests; step functions compiled once."""

    def __init__(self):
        self.mesh = make_data_mesh(jax.devices()[:1])
        self.model, self.tx = ConvAE(**SMALL), optax.adam(1e-2)
        self.params = _random_params(self.model, 16)
        self._steps = {}

    def state(self):
        return create_train_state(self.model, self.tx, 0, params=self.params, mesh=self.mesh)

    def step(self, crop_steps, scan_crops=False):
        key = (crop_steps, scan_crops)
        if key not in self._steps:
            self._steps[key] = make_train_step(self.model, self.tx, crop_steps=crop_steps, mesh=self.mesh,
                                               scan_crops=scan_crops)
        return self._steps[key]


@pytest.fixture(scope="module")
def tiny():
    return _Tiny()


# ---------------------------------------------------------------------------------------------------------- fast


def test_bce_from_logits_equals_torch_bceloss_on_the_sigmoid():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 8, 8, 1)).astype(np.float32)
    target = rng.uniform(0, 1, logits.shape).astype(np.float32)
    expected = torch.nn.BCELoss()(torch.sigmoid(torch.from_numpy(logits)), torch.from_numpy(target)).item()
    assert float(bce_with_logits(jnp.asarray(logits), jnp.asarray(target))) == pytest.approx(expected, rel=1e-5)
    # The floor reported as bce_excess = loss - entropy: a perfect prediction (logit of the target) sits on it.
    perfect = np.log(target) - np.log1p(-target)
    assert float(bce_with_logits(jnp.asarray(perfect), jnp.asarray(target))) == \
        pytest.approx(float(jnp.mean(binary_entropy(jnp.asarray(target)))), rel=1e-5)


@pytest.mark.parametrize("crop_steps, updates_per_batch", [("per_crop", 5), ("joint", 1)])
def test_lr_milestones_in_epochs_become_update_counts(crop_steps, updates_per_batch):
    from ml_collections import ConfigDict

    steps_per_epoch = 10
    cfg = ConfigDict({"lr": 1e-3, "milestones_epochs": (5,), "gamma": 0.3})
    schedule = learning_rate_schedule(cfg, updates_per_epoch=steps_per_epoch * updates_per_batch)
    last_of_epoch_5 = 5 * steps_per_epoch * updates_per_batch - 1  # update counts start at 0
    assert float(schedule(last_of_epoch_5)) == pytest.approx(1e-3)
    assert float(schedule(last_of_epoch_5 + 1)) == pytest.approx(3e-4)
    for count in (0, last_of_epoch_5, last_of_epoch_5 + 1, 10 * last_of_epoch_5):
        host = host_learning_rate(cfg, updates_per_epoch=steps_per_epoch * updates_per_batch, count=count)
        assert host == pytest.approx(float(schedule(count)))


SCAN_SIZES, MIXED_SIZES = (16, 16, 16), (16, 8, 8)


@pytest.mark.parametrize("sizes, scan", [(SCAN_SIZES, False), (SCAN_SIZES, True)], ids=["unrolled", "scan"])
def test_per_crop_takes_one_optimizer_step_per_crop_in_order(tiny, sizes, scan):
    crops = _crops(sizes)
    expected_params, expected_losses = _reference_updates(tiny.model, tiny.tx, tiny.params, crops)
    new_state, metrics = tiny.step("per_crop", scan)(tiny.state(), {"crops": crops})
    leaves = zip(jax.tree_util.tree_leaves(_host(new_state.params)), jax.tree_util.tree_leaves(expected_params))
    for got, want in leaves:
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(np.mean(expected_losses), rel=1e-5)
    assert 0 < float(metrics["bce_excess"]) < float(metrics["loss"]) and 0 < float(metrics["mse"]) < 1
    assert int(new_state.step) == 1 and int(new_state.opt_state[0].count) == len(sizes)


def test_joint_takes_one_step_on_the_mean_loss_of_all_crops(tiny):
    crops = _crops(MIXED_SIZES, seed=3)

    @jax.jit
    def expected_update(p):
        grads = jax.grad(lambda q: jnp.mean(jnp.stack([_bce_loss(tiny.model)(q, x) for x in crops])))(p)
        updates, _ = tiny.tx.update(grads, tiny.tx.init(p), p)
        return optax.apply_updates(p, updates)

    expected = expected_update(tiny.params)
    new_state, metrics = tiny.step("joint")(tiny.state(), {"crops": crops})
    for got, want in zip(jax.tree_util.tree_leaves(_host(new_state.params)), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert int(new_state.opt_state[0].count) == 1 and bool(metrics["finite"])


@pytest.mark.parametrize("crop_steps, sizes, scan", [("per_crop", SCAN_SIZES, False), ("per_crop", SCAN_SIZES, True),
                                                     ("joint", MIXED_SIZES, False)])
def test_a_nan_in_any_crop_leaves_the_whole_state_untouched(tiny, crop_steps, sizes, scan):
    state = tiny.state()
    before = _host(state)
    crops = list(_crops(sizes, seed=5))
    crops[2][1, 3, 3, 0] = np.nan  # the third crop: under per_crop the first two would have updated the parameters
    new_state, metrics = tiny.step(crop_steps, scan)(state, {"crops": tuple(crops)})
    assert not bool(metrics["finite"]) and not bool(metrics["loss_finite"])
    for got, want in zip(jax.tree_util.tree_leaves(_host(new_state)), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(got, want)


def test_uint8_crops_are_finished_in_the_step_like_host_floats(tiny):
    """input.finish='device': the step finishes uint8 crops + photometric rows itself and trains as on the floats
    the host would have made of them (augment.finish_crops)."""
    from data_pipelines import augment as A

    rng = np.random.default_rng(8)
    crops_u8 = tuple(rng.integers(0, 256, (4, s, s, 1), dtype=np.uint8) for s in SCAN_SIZES)
    photometric = tuple(np.float32([A.PHOTOMETRIC_IDENTITY, (1.2, 0, 1, 0, 0), (1, 1, 0.7, 0, 0),
                                    (1, 0, 1, *A.gaussian_kernel3(1.3)[:2])]) for _ in SCAN_SIZES)
    floats = tuple(A.finish_crops(c, p) for c, p in zip(crops_u8, photometric))
    want_state, want = tiny.step("per_crop")(tiny.state(), {"crops": floats})
    got_state, got = tiny.step("per_crop")(tiny.state(), {"crops_uint8": crops_u8, "photometric": photometric})
    assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(_host(got_state.params)), jax.tree_util.tree_leaves(_host(want_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _load_config(path: str, arg=None):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_shipped_configs_hold_the_papers_settings_and_the_four_ablations():
    paper = _load_config("configs/paper.py")
    assert (paper.input.batch_size, paper.optimizer.lr, tuple(paper.optimizer.milestones_epochs),
            paper.optimizer.gamma, paper.loss, paper.crop_steps) == (64, 1e-3, (5,), 0.3, "bce", "per_crop")
    assert tuple(paper.input.nmb_crops) == (1, 1, 3) and tuple(paper.input.size_crops) == (128, 128, 128)
    assert paper.input.augment and paper.num_epochs == 5
    demo = _load_config("configs/demo.py")
    assert demo.dataset_dir == "runs/demo/dataset" and demo.total_steps and demo.model == paper.model
    settings = {}
    for arg in ("aug_multi", "aug_one", "noaug_multi", "noaug_one"):
        cfg = _load_config("configs/ablation.py", arg)
        settings[arg] = (cfg.input.augment, int(sum(cfg.input.nmb_crops)))
        assert cfg.optimizer == paper.optimizer and cfg.model == paper.model
    assert settings == {"aug_multi": (True, 5), "aug_one": (True, 1),
                        "noaug_multi": (False, 5), "noaug_one": (False, 1)}
    assert _load_config("configs/ablation.py", "aug_multi").input == paper.input
    # ',demo': the same settings at the demo's size (configs/demo.py), so the four run on a CPU in minutes.
    small = _load_config("configs/ablation.py", "noaug_one,demo")
    assert (small.input.augment, tuple(small.input.size_crops), small.input.batch_size, small.total_steps,
            small.dataset_dir) == (False, (64,), demo.input.batch_size, demo.total_steps, demo.dataset_dir)
    assert _load_config("configs/ablation.py", "aug_multi,demo").input == demo.input
    with pytest.raises(ValueError, match="demo"):
        _load_config("configs/ablation.py", "aug_one,big")
    with pytest.raises(ValueError, match="aug_one"):
        _load_config("configs/ablation.py", None)


def test_params_checkpoint_round_trips_and_rebuilds_the_model(tmp_path):
    model = ConvAE(**SMALL, latent_channels=3)
    params = _random_params(model, 16)
    model_cfg = {"in_channels": 1, "encoder_widths": [4, 4, 4], "latent_channels": 3, "decoder_widths": [4, 4, 4],
                 "formulation": "plain", "dtype": "float32", "image_size": 16}
    step_dir = save_params_checkpoint(tmp_path / "imported", params, model_cfg)
    assert step_dir == (tmp_path / "imported" / "checkpoints" / "0").absolute()
    for path in (tmp_path / "imported", step_dir):
        loaded, loaded_cfg = load_params(path)
        assert loaded_cfg == model_cfg
        for got, want in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, want)
    rebuilt = model_from_config(loaded_cfg)
    z = rebuilt.apply({"params": loaded}, jnp.zeros((1, 16, 16, 1)), method="encode")
    assert z.shape == (1, 4, 4, 3)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        find_step_dir(tmp_path)


def _memory_source(n=48, size=40, seed=0):
    """Smooth random images (an autoencoder can learn them): an in-memory stand-in for data_pipelines.source."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = rng.uniform(0, 255, (size // 8, size // 8)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
        images.append(smooth.astype(np.uint8)[..., None])
    return [{"image": im, "row_id": np.int64(i)} for i, im in enumerate(images)]


def _tiny_config(crop_steps="per_crop", **changes):
    cfg = _load_config("tests/training_config.py", crop_steps)
    cfg.input.size_crops, cfg.input.nmb_crops = (16, 16), (1, 2)
    cfg.model.encoder_widths, cfg.model.decoder_widths = (4, 4, 4), (4, 4, 4)
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (cfg if not section else cfg[section])[name] = value
    return cfg


@pytest.mark.parametrize("finish", ["host", "device"])
def test_a_nan_stops_the_run_with_its_step_and_the_last_checkpoint_restores(tmp_path, finish):
    """Also with input.finish='device' (uint8 batches; the NaN then enters through a photometric row)."""
    source = _memory_source()
    cfg = _tiny_config(**{"total_steps": 8, "debug.inject_nan_at_step": 5, "image_every": 0, "input.finish": finish})
    with pytest.raises(NonFiniteError, match=r"step 5: non-finite loss .*latest good checkpoint: step 3"):
        train_and_evaluate(cfg, tmp_path, source=source)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]  # nothing written at or after the poisoned step
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]

    # The last checkpoint restores whole: state (as train.py would resume it) and the parameters for other commands.
    model = model_from_config(cfg.model)
    tx, _ = make_optimizer(cfg.optimizer, updates_per_epoch=10)  # the structure matters here, not the numbers
    abstract = jax.eval_shape(lambda: create_train_state(model, tx, 0, image_size=16))
    state, step = TrainCheckpointer(tmp_path).restore(abstract, None, mesh=make_data_mesh())
    assert step == 3 and int(state.step) == 3 and int(state.opt_state[0].count) == 3 * 3  # 3 crops per batch
    params, _ = load_params(tmp_path)
    for restored, loaded in zip(jax.tree_util.tree_leaves(_host(state.params)), jax.tree_util.tree_leaves(params)):
        assert np.isfinite(loaded).all()
        np.testing.assert_array_equal(restored, loaded)


def test_finishing_on_device_trains_like_finishing_on_the_host(tmp_path):
    """The loop with input.finish='device' (what 'auto' picks on an accelerator) on the same stream: the same
    parameters to float32 rounding, and the same preview images (finished on the host for the PNG)."""
    source = _memory_source()
    params, previews = {}, {}
    for finish in ("host", "device"):
        cfg = _tiny_config(**{"total_steps": 4, "image_every": 2, "input.finish": finish, "input.blur_p": 0.5,
                              "input.brightness": 0.2})
        train_and_evaluate(cfg, tmp_path / finish, source=source)
        params[finish], _ = load_params(tmp_path / finish)
        previews[finish] = sorted((tmp_path / finish / "images").glob("*.png"))
    for a, b in zip(jax.tree_util.tree_leaves(params["host"]), jax.tree_util.tree_leaves(params["device"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert [p.name for p in previews["host"]] == [p.name for p in previews["device"]] and previews["host"]
    for a, b in zip(previews["host"], previews["device"]):
        np.testing.assert_array_equal(np.asarray(Image.open(a))[:, :16], np.asarray(Image.open(b))[:, :16])


def test_a_finite_input_stream_that_ends_early_keeps_its_last_steps(tmp_path):
    """input.num_epochs=1 over 48 images of batch 8 ends the stream after 6 of the 12 steps: the state after step 6
    is checkpointed and logged (not only the last every_steps checkpoint, 4), and the summary says where it ended."""
    source = _memory_source()
    cfg = _tiny_config(**{"total_steps": 12, "image_every": 0, "input.num_epochs": 1, "checkpoint.every_steps": 4,
                          "log_every": 4})
    summary = train_and_evaluate(cfg, tmp_path, source=source)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6] and summary["last_checkpoint"] == 6 and summary["end_step"] == 6
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 4, 6]


def test_the_log_says_how_long_the_loop_waited_for_data(tmp_path, caplog):
    """metrics.jsonl carries data_wait_ms / data_wait_fraction: with no reader thread and a source that takes 25 ms
    an image, each batch of 8 keeps the loop waiting at least 200 ms (a lower bound, whatever the machine). The log
    also says which formulation 'auto' became."""
    caplog.set_level(logging.INFO, logger="cellssl_jax.training.loop")
    images = _memory_source()

    class SlowSource:
        def __len__(self):
            return len(images)

        def __getitem__(self, index):
            time.sleep(0.025)
            return images[index]

    cfg = _tiny_config(**{"total_steps": 3, "image_every": 0, "input.read_threads": 0})
    summary = train_and_evaluate(cfg, tmp_path, source=SlowSource())
    assert 0 < summary["data_wait_fraction"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "data_wait_ms" not in rows[0]  # the first step (compilation) is not timed
    for row in rows[1:]:
        assert row["data_wait_ms"] >= 200 and 0 < row["data_wait_fraction"] <= 1, row
    assert "model: formulation subpixel_vjp (configured 'auto'), micro-batch 1" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "formulation" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------- slow


_XLA_CACHE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """The subprocesses of this module compile the same programs: let them share a compilation cache."""
    _XLA_CACHE["dir"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield
    _XLA_CACHE.clear()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "CELLSSL_", "JAX_COMPILATION"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
    if "dir" in _XLA_CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE["dir"]
    return env


def _run(cmd, timeout=180, **env):
    done = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_one_step_on_8_devices_equals_one_device():
    """Also with uint8 crops finished in the step (input.finish='device', the accelerator default): the photometric
    rows are split over the devices with their crops."""
    script = textwrap.dedent("""
        import jax, numpy as np, optax
        from cellssl_jax.models.convae import ConvAE
        from cellssl_jax.parallel import make_data_mesh, global_batch, replicate
        from cellssl_jax.training.step import create_train_state, make_train_step
        from data_pipelines.augment import PHOTOMETRIC_IDENTITY, finish_crops, gaussian_kernel3
        assert jax.device_count() == 8, jax.devices()
        rng = np.random.default_rng(0)
        crops_u8 = tuple(rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8) for _ in range(3))
        photometric = np.float32([PHOTOMETRIC_IDENTITY] * 16)
        photometric[::3, 3:] = gaussian_kernel3(1.5)[:2]  # every third image blurred
        photometric = (photometric,) * 3
        crops = tuple(finish_crops(c, p) for c, p in zip(crops_u8, photometric))
        model, tx = ConvAE(encoder_widths=(8, 8, 8), decoder_widths=(8, 8, 8)), optax.adam(1e-3)
        # Parameters drawn on the host (no PRNG program to compile); each mesh gets its own copy of the same state.
        rng_p = np.random.default_rng(1)
        shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))["params"]
        params = jax.tree_util.tree_map(lambda s: rng_p.uniform(-0.2, 0.2, s.shape).astype(np.float32), shapes)
        start = jax.device_get(create_train_state(model, tx, 0, params=params))
        out = []
        for mesh, images in ((make_data_mesh(jax.devices()[:1]), {"crops": crops}),
                             (make_data_mesh(), {"crops": crops}),
                             (make_data_mesh(), {"crops_uint8": crops_u8, "photometric": photometric})):
            step = make_train_step(model, tx, crop_steps="per_crop", mesh=mesh)
            batch = global_batch(images, mesh)
            assert all(len(leaf.sharding.device_set) == mesh.size for leaf in jax.tree_util.tree_leaves(batch))
            state, metrics = step(replicate(start, mesh), batch)
            out.append((jax.device_get(state.params), float(metrics["loss"])))
        (p1, l1), *others = out
        worst = 0.0
        for p8, l8 in others:
            assert abs(l1 - l8) <= 1e-6 * abs(l1), (l1, l8)
            for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
                worst = max(worst, float(np.abs(a - b).max()))
        print("max |dparam|", worst)
    """)
    _run([sys.executable, "-c", script], XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _write_tiny_plate(folder: Path, n=48, size=40) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, item in enumerate(_memory_source(n, size)):
        name = f"img_{i:03d}.png"
        Image.fromarray(item["image"][..., 0]).save(folder / name)
        rows.append({"path": name, "Metadata_Plate": "P1", "Metadata_Well": f"B{i % 20 + 1}",
                     "Metadata_Site": i // 20 + 1,
                     "Metadata_CellLine": "ACHN", "Metadata_Drug": "DMSO" if i % 4 == 0 else "Docetaxel",
                     "Metadata_Concentration_uM": 0.1, "Metadata_Time_h": float(i % 3)})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("plate")
    manifest = _write_tiny_plate(root / "raw")
    _run([sys.executable, "-m", "data_pipelines.build", "--manifest", str(manifest), "--out", str(root / "dataset"),
          "--image-size", "40", "--workers", "1"])
    return root / "dataset"


def _train_cmd(dataset: Path, workdir: Path, *flags: str):
    return [sys.executable, "train.py", f"--config={TEST_CONFIG}", f"--workdir={workdir}",
            f"--config.dataset_dir={dataset}", "--config.image_every=0", *flags]


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(_train_cmd(tiny_dataset, workdir))
    return workdir


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_and_rerun_resumes_to_the_same_parameters_bit_for_bit(tiny_dataset, uninterrupted_run, tmp_path):
    workdir = tmp_path / "run"
    cmd = _train_cmd(tiny_dataset, workdir)
    proc = subprocess.Popen(cmd + ["--config.debug.sleep_after_step_s=0.4"], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not (workdir / "checkpoints" / "6" / "commit_success.txt").exists():
            assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < 12

    done = _run(cmd)  # the same command again
    assert "trained steps 6→12" in done.stdout or f"trained steps {killed_at}→12" in done.stdout, done.stdout
    resumed, reference = load_params(workdir)[0], load_params(uninterrupted_run)[0]
    for got, want in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(reference)):
        np.testing.assert_array_equal(got, want)  # bit for bit
    assert [row["step"] for row in _metrics(workdir)] == list(range(1, 13))  # one history, no duplicated steps
    assert [row["loss"] for row in _metrics(workdir)] == [row["loss"] for row in _metrics(uninterrupted_run)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_process(tiny_dataset, uninterrupted_run, tmp_path):
    workdir, port = tmp_path / "two", _free_port()
    procs = [subprocess.Popen(_train_cmd(tiny_dataset, workdir), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(CELLSSL_COORDINATOR=f"127.0.0.1:{port}", CELLSSL_NUM_PROCESSES="2",
                                       CELLSSL_PROCESS_ID=str(i)))
             for i in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert sorted(p.name for p in (workdir / "checkpoints" / "12" / "data_iter").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    two, one = _metrics(workdir), _metrics(uninterrupted_run)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(load_params(workdir)[0]),
                         jax.tree_util.tree_leaves(load_params(uninterrupted_run)[0])):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_tracks_the_float32_loss(tiny):
    crops = _crops(SCAN_SIZES, seed=7)
    model16 = ConvAE(**SMALL, dtype=jnp.bfloat16)
    step16 = make_train_step(model16, tiny.tx, crop_steps="per_crop", mesh=tiny.mesh)
    state16, metrics16 = step16(tiny.state(), {"crops": crops})
    _, metrics32 = tiny.step("per_crop")(tiny.state(), {"crops": crops})
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state16.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state16.opt_state[0].mu))
    assert bool(metrics16["finite"])
    assert float(metrics16["loss"]) == pytest.approx(float(metrics32["loss"]), rel=2e-2)
