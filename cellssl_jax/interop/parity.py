"""Does an export compute what our model computes? Load it into the PyTorch module and compare outputs."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np

from cellssl_jax.interop.convert import flax_to_torch
from cellssl_jax.interop.export import load_export


def encode_and_decode(model, x):
    """(latent, reconstruction) in one pass, so one compiled program serves both comparisons."""
    z = model.encode(x)
    return z, model.decode(z)


def check_params_parity(params, model_config: Mapping, exported_path: str | Path, n: int = 4, seed: int = 0) -> dict:
    """Max abs differences between the Flax model (float32) and the export loaded in ``torch_module.Autoencoder``.

    Inputs are ``n`` uniform [0, 1) images of the model's size, drawn with ``seed``. Also reports whether the exported
    tensors equal the params bit for bit, and, as the yardstick for the differences, how far PyTorch's own float32
    result lies from its float64 result (``float32_rounding_*``): two correct float32 implementations can differ by
    about twice that. Needs torch.
    """
    import jax
    import torch

    from cellssl_jax.interop.torch_module import load_exported
    from cellssl_jax.models.convae import model_from_config

    exported_path = Path(exported_path)
    exported_state, config = load_export(exported_path)
    expected_state = flax_to_torch(params)
    weights_equal = exported_state.keys() == expected_state.keys() and all(
        np.array_equal(exported_state[k], expected_state[k]) for k in expected_state)

    size = int(config["input_size"])
    x = np.random.default_rng(seed).random((n, config["in_channels"], size, size), dtype=np.float32)
    torch_model = load_exported(exported_path)
    with torch.no_grad():
        t_features = torch_model.encoder(torch.from_numpy(x)).numpy()
        t_recon = torch_model.decoder(torch.from_numpy(t_features)).numpy()
        torch_model.double()
        f64_features = torch_model.encoder(torch.from_numpy(x).double()).numpy()
        f64_recon = torch_model.decoder(torch.from_numpy(f64_features)).numpy()

    # The export is float32; compare against the float32 computation whatever dtype training used.
    model = model_from_config({**dict(model_config), "dtype": "float32"})
    x_nhwc = x.transpose(0, 2, 3, 1)
    variables = {"params": jax.tree_util.tree_map(np.asarray, params)}
    j_features, j_recon = map(np.asarray, jax.jit(partial(model.apply, method=encode_and_decode))(variables, x_nhwc))

    return {
        "exported_path": str(exported_path),
        "n": n,
        "seed": seed,
        "input_shape": list(x.shape),
        "weights_bit_exact": bool(weights_equal),
        "features_max_abs_diff": float(np.abs(t_features - j_features.transpose(0, 3, 1, 2)).max()),
        "reconstruction_max_abs_diff": float(np.abs(t_recon - j_recon.transpose(0, 3, 1, 2)).max()),
        "float32_rounding_features": float(np.abs(t_features - f64_features).max()),
        "float32_rounding_reconstruction": float(np.abs(t_recon - f64_recon).max()),
        "torch_version": torch.__version__,
    }


def check_golden_parity(checkpoint_path: str | Path, reference_dir: str | Path) -> dict:
    """Max abs differences between a checkpoint's model and the authors' PyTorch outputs on the HCT-15 example.

    ``reference_dir`` holds ``hct15_input_128.npy`` (1×1×128×128), ``hct15_features.npy`` (1×4×32×32) and
    ``hct15_reconstruction.npy``, computed with the original PyTorch model; meaningful for the authors' weights.
    """
    import jax

    from cellssl_jax.models.convae import model_from_config
    from cellssl_jax.training.checkpoint import load_params

    reference_dir = Path(reference_dir)
    params, model_config = load_params(checkpoint_path)
    x = np.load(reference_dir / "hct15_input_128.npy")
    golden_z = np.load(reference_dir / "hct15_features.npy")
    golden_y = np.load(reference_dir / "hct15_reconstruction.npy")
    model = model_from_config({**dict(model_config), "dtype": "float32"})
    z, y = jax.jit(partial(model.apply, method=encode_and_decode))({"params": params}, x.transpose(0, 2, 3, 1))
    return {
        "features_max_abs_diff": float(np.abs(np.asarray(z).transpose(0, 3, 1, 2) - golden_z).max()),
        "reconstruction_max_abs_diff": float(np.abs(np.asarray(y).transpose(0, 3, 1, 2) - golden_y).max()),
    }
