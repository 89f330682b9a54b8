"""Objectives plugged into the one training loop. A new objective is one file here and its line in ``SETUPS``.

An objective's file holds two things.

The objective: an object with
- ``batch_keys``: the batch fields besides ``crops`` that it reads (e.g. ``("label",)``); the loop ships only these;
- ``loss(params, inputs, rng) -> (scalar loss, aux dict)``, where ``inputs`` is ``{"image": one crop-batch [B,S,S,C],
  **batch_keys}`` on the global mesh; the loop differentiates it and applies the optimizer;
- ``needs_rng``: whether ``loss`` draws random numbers (its ``rng`` argument is then a fresh key per crop-batch; else
  a placeholder, and the state's key is left alone);
- optionally ``preview(params, image) -> image`` (same shape, in [0, 1]) for the PNG grid the loop writes.

``setup(config, source) -> ObjectiveSetup``: everything else the loop needs to train it from a config (the images it
trains on, the model, the optimizer, the starting parameters, what the checkpoint records), so that the loop itself
has no branch per objective.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import jax
import optax

# config.objective → "module:function" returning an ObjectiveSetup; imported only when chosen.
SETUPS = {"autoencoder": "cellssl_jax.training.objectives.autoencoder:setup",
          "lens": "cellssl_jax.training.objectives.lens:setup"}


class Objective(Protocol):
    batch_keys: tuple[str, ...]
    needs_rng: bool

    def loss(self, params: Any, inputs: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]: ...


@dataclass(frozen=True)
class ObjectiveSetup:
    source: Any  # the random-access source the loop trains on (the given one, or a selection of it)
    model: Any  # the ConvAE whose speed settings the loop reports
    objective: Objective
    model_record: dict  # the checkpoint's 'model' section (models.convae.model_from_config rebuilds the model)
    make_optimizer: Callable[[int], optax.GradientTransformation]  # optimizer updates per epoch → the optimizer
    initial_params: Any = None  # None: the model's own initialisation (step.create_train_state)
    record: dict = field(default_factory=dict)  # more entries of the run's config.json, e.g. the lens's classes


def setup_objective(config, source) -> ObjectiveSetup:
    """The setup of ``config.objective`` (default ``'autoencoder'``) for ``source``."""
    name = config.get("objective", "autoencoder")
    if name not in SETUPS:
        raise ValueError(f"config.objective must be one of {tuple(SETUPS)}, got {name!r}")
    module, function = SETUPS[name].split(":")
    return getattr(importlib.import_module(module), function)(config, source)
