"""Checkpoints of a training run, on Orbax, and the two functions other rooms use to read and write them.

Layout (one Orbax ``CheckpointManager`` under ``<workdir>/checkpoints``)::

    <workdir>/checkpoints/<step>/
        params/       the model parameters (float32 pytree)
        train_state/  {'opt_state', 'step', 'rng'}: the rest of the TrainState
        data_iter/    the Grain iterator state, one JSON file per process (Grain's own Orbax handler)
        config/       the run's config as JSON; its 'model' section (plus 'image_size') rebuilds the model

``save_params_checkpoint`` writes the same layout at step 0 with only ``params`` and ``config`` (what the PyTorch import
writes), and ``load_params`` needs nothing else, so every command that reads a model accepts both.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and writing continues in the
background while training goes on. A step directory appears under its final name only when complete (Orbax writes to
a temporary name and renames), so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import grain.checkpoint  # registers Grain's CheckpointSave/CheckpointRestore with Orbax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from cellssl_jax.parallel import replicated_sharding

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "train_state", "data_iter", "config")


class TrainCheckpointer:
    """Save and restore a run's TrainState, Grain iterator and config under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, asynchronous: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=asynchronous)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config_dict: dict) -> None:
        """Start saving ``state`` (a TrainState) at ``step``; returns before the files are written."""
        args = {
            "params": ocp.args.StandardSave(state.params),
            "train_state": ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
            "config": ocp.args.JsonSave(config_dict),
        }
        if data_iterator is not None:
            # Grain's handler reads the iterator state synchronously inside save(), so it is the state after `step`
            # batches even though the arrays are written later.
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_state, data_iterator, *, mesh, step: int | None = None):
        """(state, step) restored into the structure of ``abstract_state`` (replicated on ``mesh``).

        ``data_iterator`` is set to its saved position in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        if not (self.directory / str(step) / "train_state").is_dir():
            raise ValueError(
                f"{self.directory / str(step)} holds parameters only (written by save_params_checkpoint / an import), "
                "not a training state to resume; start training in a fresh --workdir")
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated_sharding(mesh)), abstract_state)
        args = {
            "params": ocp.args.StandardRestore(target.params),
            "train_state": ocp.args.StandardRestore(
                {"opt_state": target.opt_state, "step": target.step, "rng": target.rng}),
        }
        if data_iterator is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        rest = restored["train_state"]
        state = abstract_state.replace(params=restored["params"], opt_state=rest["opt_state"], step=rest["step"],
                                       rng=rest["rng"])
        return state, step

    def saved_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return _read_json_item(self.directory / str(step) / "config")

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params_checkpoint(workdir: str | Path, params, model_config: dict) -> Path:
    """Write ``params`` as a step-0 checkpoint under ``<workdir>/checkpoints`` (the import CLI's output).

    ``model_config`` is the ``model`` config section (a dict; add ``image_size`` when the model was trained on a size
    other than 128). Returns the step directory. An earlier step-0 checkpoint (a previous import into the same
    workdir) is replaced; a workdir holding a training run's steps is refused rather than mixed with it.
    """
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
    steps = sorted(manager.all_steps())
    if any(steps):
        manager.close()
        raise FileExistsError(f"{directory} holds a training run's checkpoints (steps {steps}); write these weights "
                              "to another workdir")
    if steps:
        manager.delete(0)
    config = {"model": _plain(model_config)}
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config)),
                 force=True)
    manager.wait_until_finished()
    manager.close()
    return directory / "0"


def find_step_dir(checkpoint_path: str | Path, step: int | None = None) -> Path:
    """A run's workdir, its ``checkpoints`` folder, or a step folder → the step folder (latest step by default)."""
    path = Path(checkpoint_path).absolute()
    if (path / "params").is_dir():
        if step is not None and path.name != str(step):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not {step}")
        return path
    directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / "params").is_dir()) \
        if directory.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint found at {path}: expected a workdir with checkpoints/<step>/params, "
            "a checkpoints folder, or a step folder")
    if step is None:
        return directory / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} under {directory}; steps there: {steps}")
    return directory / str(step)


def load_params(checkpoint_path: str | Path, step: int | None = None) -> tuple[Any, dict]:
    """(params as numpy arrays, model config dict) from a workdir or step folder; the latest step by default.

    The model config is the run's ``model`` section plus ``image_size`` (the crop size it was trained on) when known;
    ``cellssl_jax.models.convae.model_from_config`` accepts it as is.
    """
    step_dir = find_step_dir(checkpoint_path, step)
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(epath.Path(step_dir / "params"))
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    # Restore onto this process's first device whatever topology wrote them (a checkpoint of a 2-host run reads on a
    # laptop), then hand back host numpy arrays.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
    restored = handler.restore(epath.Path(step_dir / "params"), args=ocp.args.StandardRestore(target))
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(restored))
    handler.close()
    config = _read_json_item(step_dir / "config") or {}
    if "model" not in config:
        raise ValueError(f"{step_dir / 'config'} has no 'model' section; cannot tell which model these parameters fit")
    return params, config["model"]


def load_encoder_params(checkpoint_path: str | Path, step: int | None = None) -> tuple[Any, dict, str]:
    """(params, model config, what they are) of the ConvAE whose encoder gives a run's features.

    That is the run's own ConvAE, except for a lens run (configs/lens.py; params ``{'lens', 'classifier',
    'pretrained', 'feature_norm'}``): the lens changes images, not the encoder, so its features are those of the
    frozen pretrained ConvAE it was trained against (``export`` of a lens run writes the lens instead).
    """
    params, model_config = load_params(checkpoint_path, step)
    if set(params) >= {"pretrained", "lens"}:
        return params["pretrained"], model_config, f"{checkpoint_path} (a lens run: its frozen pretrained encoder)"
    return params, model_config, str(checkpoint_path)


def load_config(checkpoint_path: str | Path, step: int | None = None) -> dict:
    """The run config saved with a checkpoint (``{}`` when it has none), from a workdir or step folder."""
    return _read_json_item(find_step_dir(checkpoint_path, step) / "config") or {}


def _read_json_item(item_dir: Path) -> dict | None:
    """An Orbax JSON item (``JsonSave``) as a dict; Orbax's JSON handler names its file ``metadata``."""
    path = item_dir / "metadata"
    return json.loads(path.read_text()) if path.is_file() else None


def _plain(tree):
    """ConfigDict / tuples → JSON-ready dicts and lists."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if isinstance(tree, dict):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_plain(v) for v in tree]
    return tree
