"""PyTorch weights ↔ this project's Orbax checkpoints, and the parity check of an export against its checkpoint.

These are the functions ``evaluate.py import-torch`` / ``evaluate.py export`` call.
"""

from __future__ import annotations

from pathlib import Path

from cellssl_jax.interop.convert import torch_to_flax
from cellssl_jax.interop.export import export_params, load_export, model_config_from_export
from cellssl_jax.interop.parity import check_params_parity
from cellssl_jax.training.checkpoint import load_params, save_params_checkpoint


def import_torch_checkpoint(weights_path: str | Path, workdir: str | Path) -> Path:
    """A ConvAE ``.pt``/``.torch`` state_dict (the authors' or our export) or ``.safetensors`` → an Orbax checkpoint.

    Reads with the torch-free restricted reader: a file whose pickle names anything beyond tensors is refused before
    any of it runs. Returns the checkpoint step directory under ``<workdir>/checkpoints``.
    """
    state_dict, config = load_export(weights_path)
    return save_params_checkpoint(workdir, torch_to_flax(state_dict), model_config_from_export(config))


def export_checkpoint(checkpoint_path: str | Path, out_path: str | Path) -> list[Path]:
    """A checkpoint (workdir, checkpoints folder or step folder; a lens run exports its lens) → ``.pt`` and/or
    ``.safetensors`` by ``out_path``'s suffix (any other name is a stem for both), each with ``<stem>.json`` beside
    it. Returns the weight files."""
    params, model_config = load_params(checkpoint_path)
    return export_params(convae_params(params), model_config, out_path)


def check_export_parity(checkpoint_path: str | Path, exported_path: str | Path, n: int = 4, seed: int = 0) -> dict:
    """Load ``exported_path`` into the PyTorch module and compare it with the checkpoint's Flax model (see
    :func:`check_params_parity`)."""
    params, model_config = load_params(checkpoint_path)
    return check_params_parity(convae_params(params), model_config, exported_path, n=n, seed=seed)


def convae_params(params):
    """The ConvAE in a checkpoint's parameters. A lens run (configs/lens.py) holds {'lens', 'classifier',
    'pretrained', 'feature_norm'}: its ConvAE is the lens, exported in the same layout as the authors' saved lenses
    (``lens_at_5.torch``, an ``Autoencoder`` state_dict); the pretrained AE it started from is exported from its own
    run, and the classifier head is not exported."""
    return params["lens"] if "lens" in params else params
