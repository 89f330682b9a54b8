"""The paper's convolutional autoencoder (Dmitrenko et al. 2022, §3.1 of original_method.md), in Flax Linen.

Encoder: Conv 1→128, ReLU, MaxPool 2 → Conv 128→64, ReLU, MaxPool 2 → Conv 64→32, ReLU → Conv 32→4 (linear).
Decoder: ConvT 4→32, ReLU, Upsample ×2 → ConvT 32→64, ReLU, Upsample ×2 → ConvT 64→128, ReLU → ConvT 128→1, Sigmoid.
All kernels 3×3, stride 1, padding 1; 189,381 parameters for a 1×128×128 input → 4×32×32 latent.

Layout and naming
-----------------
Activations are NHWC. Every layer is stored as the kernel of a *plain cross-correlation* in HWIO plus a bias, under
``encoder/conv{0..3}`` and ``decoder/conv{0..3}``. A PyTorch ``ConvTranspose2d`` with stride 1 and padding 1 is exactly
such a convolution whose kernel is the transposed-conv weight flipped spatially with in/out channels swapped; the interop
module does that conversion, so the model itself only knows convolutions.

Two formulations of the same function (``formulation``):
- ``"plain"``: the layers as written above; the reference the fast form is tested against.
- ``"subpixel"``: a nearest ×2 upsample followed by a 3×3 conv equals four 2×2 convs on the low-resolution input whose
  outputs are interleaved (pixel shuffle). Same parameters, 2.25× fewer FLOPs in the two upsampling layers, which hold
  ~75% of the model's FLOPs at 128×128. Explicit ``jnp.pad`` + VALID convolutions: with padding inside the conv, XLA:CPU
  emitted a weight-gradient convolution that fell into a naive loop (platform notes).

Mixed precision: ``dtype`` is the compute dtype (e.g. bfloat16); parameters stay float32 and the output sigmoid is
computed in float32 so the loss sees full-precision probabilities.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")

# Rows of the 2-tap kernels that a 3-tap kernel collapses to after a nearest ×2 upsample, per output phase.
# Output row 2i+0 reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i  → taps (K0, K1+K2) over rows (i-1, i).
# Output row 2i+1 reads upsampled rows 2i, 2i+1, 2i+2 = input rows i, i, i+1 → taps (K0+K1, K2) over rows (i, i+1).
_PHASE_TAPS = (
    jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], jnp.float32),
    jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], jnp.float32),
)


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3×3 stride-1 'same' convolution as explicit pad + VALID conv."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMS)
    return y + bias


def _conv_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """The same convolution written the obvious way (SAME padding); used by the plain formulation."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


def subpixel_kernels(kernel: jax.Array) -> jax.Array:
    """3×3 HWIO kernel → (2, 2, 2, 2, I, O): the 2×2 kernel for each output phase (row phase, column phase)."""
    rows = []
    for di in range(2):
        cols = []
        for dj in range(2):
            k = jnp.einsum("ra,abio,cb->rcio", _PHASE_TAPS[di], kernel.astype(jnp.float32), _PHASE_TAPS[dj])
            cols.append(k.astype(kernel.dtype))
        rows.append(jnp.stack(cols))
    return jnp.stack(rows)


def upsample_conv_subpixel(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """conv3x3(upsample_nearest_2x(x)) computed as four 2×2 convs on x, interleaved."""
    n, h, w, _ = x.shape
    k2 = subpixel_kernels(kernel)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = []
    for di in range(2):
        row = []
        for dj in range(2):
            window = xp[:, di : di + h + 1, dj : dj + w + 1, :]
            row.append(lax.conv_general_dilated(window, k2[di, dj], (1, 1), "VALID", dimension_numbers=_DIMS))
        phases.append(jnp.stack(row, axis=3))  # (n, h, w, 2[dj], o)
    y = jnp.stack(phases, axis=2)  # (n, h, 2[di], w, 2[dj], o)
    return y.reshape(n, 2 * h, 2 * w, -1) + bias


class ConvAE(nn.Module):
    """The paper's ConvAE; widths and channels configurable (a 5-channel Cell Painting model is a config change)."""

    in_channels: int = 1
    encoder_widths: Sequence[int] = (128, 64, 32)
    latent_channels: int = 4
    decoder_widths: Sequence[int] = (32, 64, 128)
    formulation: str = "subpixel"  # "plain" | "subpixel": same function, different speed
    dtype: Any = jnp.float32  # compute dtype; parameters are always float32

    def setup(self):
        if self.formulation not in ("plain", "subpixel"):
            raise ValueError(f"formulation must be 'plain' or 'subpixel', got {self.formulation!r}")
        if len(self.encoder_widths) != 3 or len(self.decoder_widths) != 3:
            raise ValueError("the paper's ConvAE has exactly three hidden widths in encoder and decoder")
        self.encoder = _Stack(self._encoder_channels(), name="encoder")
        self.decoder = _Stack(self._decoder_channels(), name="decoder")

    def _encoder_channels(self):
        e = self.encoder_widths
        return ((self.in_channels, e[0]), (e[0], e[1]), (e[1], e[2]), (e[2], self.latent_channels))

    def _decoder_channels(self):
        d = self.decoder_widths
        return ((self.latent_channels, d[0]), (d[0], d[1]), (d[1], d[2]), (d[2], self.in_channels))

    def encode(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) in [0, 1] → latent (N, H/4, W/4, latent_channels), linear output."""
        return self.encode_layers(x)["latent"]

    def encode_layers(self, x: jax.Array) -> dict[str, jax.Array]:
        """Every encoder stage's output: 'block1' (after conv0+ReLU+pool), 'block2', 'block3' (conv2+ReLU), 'latent'.

        Feature extraction pools the intermediate stages into translation-invariant statistics; XLA drops the
        stages a caller does not use.
        """
        conv = _conv_reference if self.formulation == "plain" else _conv
        layers = self.encoder.layers(self.dtype)
        x = x.astype(self.dtype)
        b1 = max_pool_2x2(nn.relu(conv(x, *layers[0])))
        b2 = max_pool_2x2(nn.relu(conv(b1, *layers[1])))
        b3 = nn.relu(conv(b2, *layers[2]))
        return {"block1": b1, "block2": b2, "block3": b3, "latent": conv(b3, *layers[3])}

    def decode_logits(self, z: jax.Array) -> jax.Array:
        layers = self.decoder.layers(self.dtype)
        z = z.astype(self.dtype)
        if self.formulation == "plain":
            x = upsample_nearest_2x(nn.relu(_conv_reference(z, *layers[0])))
            x = upsample_nearest_2x(nn.relu(_conv_reference(x, *layers[1])))
            x = nn.relu(_conv_reference(x, *layers[2]))
            return _conv_reference(x, *layers[3]).astype(jnp.float32)
        x = nn.relu(_conv(z, *layers[0]))
        x = nn.relu(upsample_conv_subpixel(x, *layers[1]))
        x = nn.relu(upsample_conv_subpixel(x, *layers[2]))
        return _conv(x, *layers[3]).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent → reconstruction in [0, 1], float32."""
        return nn.sigmoid(self.decode_logits(z))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


class _Stack(nn.Module):
    """Four 3×3 conv layers' parameters, named conv0..conv3 with HWIO kernels."""

    channels: Sequence[tuple[int, int]]

    def setup(self):
        self.convs = [_ConvParams(cin, cout, name=f"conv{i}") for i, (cin, cout) in enumerate(self.channels)]

    def layers(self, dtype):
        return [c(dtype) for c in self.convs]


class _ConvParams(nn.Module):
    cin: int
    cout: int

    @nn.compact
    def __call__(self, dtype):
        kernel = self.param("kernel", _torch_default_kernel_init(self.cin), (3, 3, self.cin, self.cout), jnp.float32)
        bias = self.param("bias", _torch_default_bias_init(self.cin), (self.cout,), jnp.float32)
        return kernel.astype(dtype), bias.astype(dtype)


def _torch_default_kernel_init(fan_in_channels: int):
    """PyTorch's Conv2d default (kaiming_uniform a=√5 → U(±1/√fan_in)), so training starts where the authors' did."""
    bound = 1.0 / (fan_in_channels * 9) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _torch_default_bias_init(fan_in_channels: int):
    return _torch_default_kernel_init(fan_in_channels)


def model_from_config(cfg) -> ConvAE:
    """Build the model from a config's ``model`` section (ml_collections.ConfigDict or dict)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[get("dtype", "float32")]
    return ConvAE(
        in_channels=get("in_channels", 1),
        encoder_widths=tuple(get("encoder_widths", (128, 64, 32))),
        latent_channels=get("latent_channels", 4),
        decoder_widths=tuple(get("decoder_widths", (32, 64, 128))),
        formulation=get("formulation", "subpixel"),
        dtype=dtype,
    )


def init_params(model: ConvAE, rng: jax.Array, image_size: int = 128) -> dict:
    x = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
    return model.init(rng, x)["params"]


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
