"""Write Flax ConvAE params as a PyTorch ``.pt`` state_dict and/or ``.safetensors``, with a JSON config beside them.

Both files hold the authors' keys and layouts (``encoder.{0,3,6,8}`` Conv2d OIHW, ``decoder.{0,3,6,8}`` ConvTranspose2d
(in, out, kH, kW)) in float32, whatever dtype training computed in, so the authors' own ``Autoencoder`` loads the
paper-shaped export unchanged with ``load_state_dict(torch.load(f, weights_only=True))``.

``.pt`` is written with ``torch.save`` (torch comes with the ``interop`` extra): the format is torch's to define, and a
hand-written zip could drift from what ``torch.load`` expects. Reading needs no torch (``torch_zip``).
``.safetensors`` is written with safetensors' numpy API; its header metadata also carries the config JSON.
The config (``<stem>.json``) describes the architecture, input size and preprocessing, and lists where the model
departs from the paper's.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from cellssl_jax.interop.convert import CONVAE_LAYERS, flax_to_torch, infer_convae_config
from cellssl_jax.interop.preprocess import AUTHORS_INPUT_SIZE
from cellssl_jax.interop.torch_zip import load_state_dict as load_pt_state_dict

FORMATS = {".pt": "pt", ".safetensors": "safetensors"}
CONFIG_FORMAT = "cellssl-jax/convae-export"
CONFIG_VERSION = 1

PAPER_ARCHITECTURE = {
    "in_channels": 1,
    "encoder_widths": [128, 64, 32],
    "latent_channels": 4,
    "decoder_widths": [32, 64, 128],
    "input_size": AUTHORS_INPUT_SIZE,
}


def export_config(model_config: Mapping) -> dict:
    """The JSON document written beside an export, from a model config (``models.convae.model_from_config`` keys)."""
    arch = {
        "in_channels": int(model_config.get("in_channels", 1)),
        "encoder_widths": [int(w) for w in model_config.get("encoder_widths", (128, 64, 32))],
        "latent_channels": int(model_config.get("latent_channels", 4)),
        "decoder_widths": [int(w) for w in model_config.get("decoder_widths", (32, 64, 128))],
        "input_size": int(model_config.get("image_size", AUTHORS_INPUT_SIZE)),
    }
    size, latent = arch["input_size"], arch["latent_channels"]
    differences = [f"{k}: {arch[k]} (paper: {PAPER_ARCHITECTURE[k]})"
                   for k in PAPER_ARCHITECTURE if arch[k] != PAPER_ARCHITECTURE[k]]
    return {
        "format": CONFIG_FORMAT,
        "format_version": CONFIG_VERSION,
        "architecture": "ConvAE (Dmitrenko et al. 2022): 4 Conv2d 3x3 encoder, 4 ConvTranspose2d 3x3 decoder",
        "torch_module": "cellssl_jax.interop.torch_module.Autoencoder",
        **arch,
        "latent_shape": [latent, size // 4, size // 4],
        "feature_dim": latent * (size // 4) ** 2,
        "preprocessing": f"x/255 then bilinear antialiased resize to {size}",
        "feature_order": "encoder output (N, C, H, W) flattened per image, channel-major",
        "dtype": "float32",
        "trained_compute_dtype": str(model_config.get("dtype", "float32")),
        "state_dict_layout": {m.torch_prefix: m.kind for m in CONVAE_LAYERS},
        "matches_paper_architecture": not differences,
        "differences_from_paper": differences,
    }


def config_path_for(weights_path: str | Path) -> Path:
    """``convae.pt`` and ``convae.safetensors`` share ``convae.json``."""
    return Path(weights_path).with_suffix(".json")


def export_paths(out_path: str | Path) -> list[Path]:
    """``X.pt`` / ``X.safetensors`` → that file; anything else is a stem for both."""
    out_path = Path(out_path)
    if out_path.suffix in FORMATS:
        return [out_path]
    return [out_path.with_name(out_path.name + suffix) for suffix in FORMATS]


def save_pt(state_dict: Mapping[str, np.ndarray], path: str | Path) -> Path:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "writing .pt needs PyTorch: pip install 'cellssl-jax[interop]' (or export .safetensors)") from e
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v, np.float32))) for k, v in state_dict.items())
    torch.save(tensors, path)
    return Path(path)


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | Path, config: dict) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}, str(path),
              metadata={"config": json.dumps(config)})
    # safetensors writes through a private temporary file (mode 0600): give the export the permissions of any file
    # this process creates (the umask's), like the .pt and .json beside it, so that others can read shared weights.
    os.chmod(path, 0o666 & ~_umask())
    return Path(path)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would, for every thread, for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def export_params(params, model_config: Mapping, out_path: str | Path) -> list[Path]:
    """Write ``params`` to ``out_path`` (.pt, .safetensors, or a stem for both) plus the config JSON.

    Returns the weight files written (the JSON sits beside them, see :func:`config_path_for`).
    """
    state_dict = flax_to_torch(params)
    config = export_config(model_config)
    written = []
    for path in export_paths(out_path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if FORMATS[path.suffix] == "pt":
            save_pt(state_dict, path)
        else:
            save_safetensors(state_dict, path, config)
        config_path_for(path).write_text(json.dumps(config, indent=2) + "\n")
        written.append(path)
    return written


def load_export(path: str | Path) -> tuple["dict[str, np.ndarray]", dict]:
    """(torch-keyed numpy state_dict, config) of a ``.pt`` / ``.safetensors`` file, without torch.

    The config comes from the JSON beside the file, else the safetensors header, else the tensor shapes (authors'
    files have no config: the shapes say everything the architecture needs, and the input size is the paper's).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        state_dict = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            header_config = (f.metadata() or {}).get("config")
    else:
        state_dict, header_config = load_pt_state_dict(path), None
    json_path = config_path_for(path)
    if json_path.is_file():
        config = json.loads(json_path.read_text())
    elif header_config:
        config = json.loads(header_config)
    else:
        config = export_config(infer_convae_config(state_dict))
    return state_dict, config


def model_config_from_export(config: Mapping) -> dict:
    """The Flax model config (``model_from_config`` keys plus ``image_size``) an export config describes."""
    return {
        "in_channels": config["in_channels"],
        "encoder_widths": list(config["encoder_widths"]),
        "latent_channels": config["latent_channels"],
        "decoder_widths": list(config["decoder_widths"]),
        "image_size": config.get("input_size", AUTHORS_INPUT_SIZE),
        "dtype": "float32",
    }
