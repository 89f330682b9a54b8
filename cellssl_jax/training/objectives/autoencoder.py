"""Reconstruction objective of the paper's ConvAE: the crop is its own target.

``bce`` is the paper's ``nn.BCELoss()`` between the sigmoid output and the crop (a soft target in [0, 1]), computed from
the decoder's logits (``log σ(z)`` / ``log(1 - σ(z))`` via softplus) so that saturated pixels give a finite loss and
gradient instead of PyTorch's clamp at log = -100. The value is the same wherever PyTorch's is finite. ``mse`` is the
mean squared error of the sigmoid output.

Even for bfloat16 compute, the logits come back as float32 (the model casts its last layer), so the loss is float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import jax.scipy.special

from cellssl_jax.training.objectives import ObjectiveSetup

LOSSES = ("bce", "mse")


def bce_with_logits(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Mean binary cross-entropy of sigmoid(logits) against a soft target: softplus(z) - t·z, stable for any z."""
    return jnp.mean(jax.nn.softplus(logits) - target * logits)


def binary_entropy(p: jax.Array) -> jax.Array:
    """-p·log p - (1-p)·log(1-p), elementwise, 0 at p = 0 or 1: the lowest BCE any prediction reaches on target p."""
    return -(jax.scipy.special.xlogy(p, p) + jax.scipy.special.xlogy(1.0 - p, 1.0 - p))


@dataclass(frozen=True)
class AutoencoderObjective:
    model: object  # a flax.linen module with encode(x) and decode_logits(z), e.g. models.convae.ConvAE
    loss_name: str = "bce"
    batch_keys: tuple[str, ...] = ()
    needs_rng: bool = False

    def __post_init__(self):
        if self.loss_name not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss_name!r}")

    def logits(self, params, image: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, image, method=lambda m, x: m.decode_logits(m.encode(x)))

    def loss(self, params, inputs: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        del rng  # deterministic objective
        target = inputs["image"].astype(jnp.float32)
        logits = self.logits(params, inputs["image"])
        mse = jnp.mean((jax.nn.sigmoid(logits) - target) ** 2)
        if self.loss_name == "mse":
            return mse, {}
        value = bce_with_logits(logits, target)
        # BCE against a soft target cannot go below the target's own entropy (0.6883 on the authors' example image,
        # where their model reached 0.6900): the excess is the part training can remove, and mse the readable error.
        aux = {"bce_excess": value - jnp.mean(binary_entropy(jax.lax.stop_gradient(target))), "mse": mse}
        return value, jax.lax.stop_gradient(aux)

    def preview(self, params, image: jax.Array) -> jax.Array:
        """The reconstruction in [0, 1] (float32), for the input-vs-reconstruction grid."""
        return jax.nn.sigmoid(self.logits(params, image))


def model_record(config) -> dict:
    """The ``model`` section as stored with every checkpoint, plus the crop size the model was trained on."""
    record = json.loads(config.model.to_json_best_effort())
    record["image_size"] = int(config.input.size_crops[0])
    return record


def setup(config, source) -> ObjectiveSetup:
    """The ConvAE of ``config.model``, trained on every image of ``source`` with ``config.loss`` and
    ``config.optimizer``."""
    from cellssl_jax.models.convae import model_from_config
    from cellssl_jax.training.optimizer import make_optimizer

    model = model_from_config(config.model)
    return ObjectiveSetup(
        source=source, model=model, objective=AutoencoderObjective(model, config.loss),
        model_record=model_record(config),
        make_optimizer=lambda updates_per_epoch: make_optimizer(config.optimizer,
                                                                updates_per_epoch=updates_per_epoch)[0])
