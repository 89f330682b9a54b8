"""Objectives plugged into the one training loop. A new objective is one file here.

An objective is an object with
- ``batch_keys``: the batch fields besides ``crops`` that it reads (e.g. ``("label",)``); the loop ships only these;
- ``loss(params, inputs, rng) -> (scalar loss, aux dict)``, where ``inputs`` is ``{"image": one crop-batch [B,S,S,C],
  **batch_keys}`` on the global mesh; the loop differentiates it and applies the optimizer;
- ``needs_rng``: whether ``loss`` draws random numbers (its ``rng`` argument is then a fresh key per crop-batch; else
  a placeholder, and the state's key is left alone);
- optionally ``preview(params, image) -> image`` (same shape, in [0, 1]) for the PNG grid the loop writes.
"""

from typing import Any, Mapping, Protocol

import jax


class Objective(Protocol):
    batch_keys: tuple[str, ...]
    needs_rng: bool

    def loss(self, params: Any, inputs: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]: ...
