"""PyTorch / safetensors in and out for the ConvAE.

- ``torch_zip``: read PyTorch zip checkpoints with numpy, no torch, no pickled code executed.
- ``convert``: torch state_dict ↔ Flax params, table-driven (one ``LayerMap`` row per layer).
- ``export``: ``.pt`` / ``.safetensors`` + JSON config; ``torch_module``: the PyTorch model that loads them.
- ``preprocess``: an image file → the authors' 4096 features, preprocessed exactly as they did.
- ``parity``: an export loaded in PyTorch vs our Flax model, max abs differences.
- ``checkpoints``: the Orbax-checkpoint-level functions ``evaluate.py`` calls.

Names are resolved lazily so that importing the torch-free reader does not pull in Orbax, JAX or torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "UnsafeCheckpointError": "torch_zip",
    "CheckpointFormatError": "torch_zip",
    "load_torch_zip": "torch_zip",
    "load_state_dict": "torch_zip",
    "torch_to_flax": "convert",
    "flax_to_torch": "convert",
    "infer_convae_config": "convert",
    "export_params": "export",
    "load_export": "export",
    "extract_features_from_image": "preprocess",
    "import_torch_checkpoint": "checkpoints",
    "export_checkpoint": "checkpoints",
    "check_export_parity": "checkpoints",
    "check_params_parity": "parity",
    "check_golden_parity": "parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
