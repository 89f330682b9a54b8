"""The authors' ``DrugClassifier`` head: Flatten → Linear(features, classes). No softmax here: the objective and the
probes decide how the logits become probabilities (the authors' Softmax-then-CrossEntropyLoss lives behind their
``paper_faithful`` switches, ../shared/docs/original_method.md §8.1)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_linear_init(fan_in: int):
    """torch.nn.Linear's default for weight and bias alike: U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LinearClassifier(nn.Module):
    """[N, ...] features → [N, num_classes] logits, float32; 33 classes × 4,096 features = 135,201 parameters."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        x = features.reshape(features.shape[0], -1).astype(jnp.float32)
        init = torch_linear_init(x.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, name="linear")(x)
