"""PyTorch state_dict ↔ Flax params, driven by a table of layers.

Each :class:`LayerMap` row ties one torch module (``encoder.3``) to one Flax params node (``encoder/conv1``) and says
how its weight is laid out in torch. The conversions are pure transposes and flips, so a round trip is bit-exact.

Kernel layouts (Flax side is always a plain cross-correlation kernel, HWIO):
- ``conv2d``: torch ``Conv2d`` weight OIHW → HWIO is ``transpose(2, 3, 1, 0)``.
- ``conv_transpose2d``: torch ``ConvTranspose2d`` (stride 1, padding k//2) weight (in, out, kH, kW). The transposed conv
  equals a cross-correlation whose kernel is that weight flipped spatially with in/out swapped:
  ``HWIO[a, b, i, o] = W[i, o, kH-1-a, kW-1-b]``.
- ``linear``: torch (out, in) → Flax Dense (in, out). For the lens/classifier heads still to come: add their rows.
Biases are copied as they are.

Adding a module (lens, classifier) is a new table; nothing else here changes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

LayerKind = Literal["conv2d", "conv_transpose2d", "linear"]


@dataclass(frozen=True)
class LayerMap:
    torch_prefix: str  # e.g. "decoder.3": keys "<prefix>.weight" and "<prefix>.bias"
    flax_path: tuple[str, ...]  # e.g. ("decoder", "conv1"): holds "kernel" and "bias"
    kind: LayerKind


# The authors' Autoencoder: nn.Sequential indices of the weighted layers (ReLU/MaxPool/Upsample sit in between).
CONVAE_LAYERS: tuple[LayerMap, ...] = tuple(
    LayerMap(f"{part}.{index}", (part, f"conv{i}"), "conv2d" if part == "encoder" else "conv_transpose2d")
    for part in ("encoder", "decoder")
    for i, index in enumerate((0, 3, 6, 8))
)


def torch_weight_to_flax_kernel(weight: np.ndarray, kind: LayerKind) -> np.ndarray:
    if kind == "conv2d":
        return weight.transpose(2, 3, 1, 0)
    if kind == "conv_transpose2d":
        return weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    if kind == "linear":
        return weight.T
    raise ValueError(f"unknown layer kind {kind!r}")


def flax_kernel_to_torch_weight(kernel: np.ndarray, kind: LayerKind) -> np.ndarray:
    if kind == "conv2d":
        return kernel.transpose(3, 2, 0, 1)
    if kind == "conv_transpose2d":
        return kernel.transpose(2, 3, 0, 1)[:, :, ::-1, ::-1]
    if kind == "linear":
        return kernel.T
    raise ValueError(f"unknown layer kind {kind!r}")


def _as_float32(name: str, array) -> np.ndarray:
    """fp32, C-contiguous. bf16/fp16 values widen exactly; anything non-floating is a mistake worth naming."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
        raise TypeError(f"'{name}' has dtype {array.dtype}, expected a floating-point tensor")
    return np.ascontiguousarray(array.astype(np.float32))


def torch_to_flax(state_dict: Mapping[str, np.ndarray], layers: Sequence[LayerMap] = CONVAE_LAYERS) -> dict:
    """A torch state_dict (numpy or torch tensors) → nested Flax params of float32 numpy arrays.

    Every key must be used and every expected key present: a silently ignored tensor is a wrong model.
    """
    state_dict = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    expected = {f"{m.torch_prefix}.{p}" for m in layers for p in ("weight", "bias")}
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unexpected:
        raise KeyError(f"state_dict does not match the layer table: missing {missing}, unexpected {unexpected}")
    params: dict = {}
    for m in layers:
        node = params
        for part in m.flax_path:
            node = node.setdefault(part, {})
        weight = _as_float32(f"{m.torch_prefix}.weight", state_dict[f"{m.torch_prefix}.weight"])
        node["kernel"] = np.ascontiguousarray(torch_weight_to_flax_kernel(weight, m.kind))
        node["bias"] = _as_float32(f"{m.torch_prefix}.bias", state_dict[f"{m.torch_prefix}.bias"])
    return params


def flax_to_torch(params: Mapping,
                  layers: Sequence[LayerMap] = CONVAE_LAYERS) -> "collections.OrderedDict[str, np.ndarray]":
    """Nested Flax params (any float dtype, e.g. bf16-trained) → torch-keyed float32 numpy state_dict, table order."""
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for m in layers:
        node = params
        for part in m.flax_path:
            if part not in node:
                raise KeyError(f"params have no node '{'/'.join(m.flax_path)}' (needed for torch '{m.torch_prefix}')")
            node = node[part]
        name = "/".join(m.flax_path)
        kernel = _as_float32(f"{name}/kernel", node["kernel"])
        out[f"{m.torch_prefix}.weight"] = np.ascontiguousarray(flax_kernel_to_torch_weight(kernel, m.kind))
        out[f"{m.torch_prefix}.bias"] = _as_float32(f"{name}/bias", node["bias"])
    return out


def infer_convae_config(state_dict: Mapping[str, np.ndarray]) -> dict:
    """The ConvAE model config (as ``models.convae.model_from_config`` reads it) implied by a state_dict's shapes."""
    try:
        enc = [np.shape(state_dict[f"encoder.{i}.weight"]) for i in (0, 3, 6, 8)]  # OIHW
        dec = [np.shape(state_dict[f"decoder.{i}.weight"]) for i in (0, 3, 6, 8)]  # (in, out, kH, kW)
    except KeyError as e:
        raise KeyError(f"not a ConvAE state_dict: no {e.args[0]!r}") from None
    if any(len(s) != 4 or s[2:] != (3, 3) for s in enc + dec):
        raise ValueError(f"ConvAE layers must be 3×3 convolutions; got shapes {enc + dec}")
    return {
        "in_channels": int(enc[0][1]),
        "encoder_widths": [int(s[0]) for s in enc[:3]],
        "latent_channels": int(enc[3][0]),
        "decoder_widths": [int(s[1]) for s in dec[:3]],
    }
