"""The ConvAE is the paper's model, and its fast formulation computes the same function as the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellssl_jax.models.convae import ConvAE, count_params, init_params, subpixel_kernels, upsample_conv_subpixel, \
    upsample_nearest_2x


def test_parameter_count_matches_the_paper():
    params = init_params(ConvAE(), jax.random.key(0))
    assert count_params(params) == 189_381
    enc = count_params(params["encoder"])
    assert enc == 94_692 and count_params(params["decoder"]) == 94_689


def test_shapes_latent_and_range():
    model = ConvAE()
    params = init_params(model, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 128, 128, 1))
    z = model.apply({"params": params}, x, method="encode")
    y = model.apply({"params": params}, x)
    assert z.shape == (3, 32, 32, 4) and y.shape == (3, 128, 128, 1)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_configurable_channels_and_widths():
    model = ConvAE(in_channels=5, encoder_widths=(32, 16, 8), latent_channels=6, decoder_widths=(8, 16, 32))
    params = init_params(model, jax.random.key(0), image_size=64)
    y = model.apply({"params": params}, jnp.zeros((2, 64, 64, 5)))
    z = model.apply({"params": params}, jnp.zeros((2, 64, 64, 5)), method="encode")
    assert y.shape == (2, 64, 64, 5) and z.shape == (2, 16, 16, 6)


def test_subpixel_upsample_conv_equals_upsample_then_conv():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k1, (2, 9, 7, 5))
    kernel = jax.random.normal(k2, (3, 3, 5, 6))
    bias = jax.random.normal(k3, (6,))
    ref = jax.lax.conv_general_dilated(upsample_nearest_2x(x), kernel, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    fast = upsample_conv_subpixel(x, kernel, bias)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5, rtol=1e-5)
    # Each phase kernel sums the same 9 taps: the total weight is preserved four times over.
    np.testing.assert_allclose(np.asarray(subpixel_kernels(kernel).sum(axis=(0, 1, 2, 3))),
                               4 * np.asarray(kernel.sum(axis=(0, 1))), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_fast_formulation_outputs_and_gradients_match_plain(loss):
    params = init_params(ConvAE(), jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, 128, 128, 1))

    def objective(p, formulation):
        y = ConvAE(formulation=formulation).apply({"params": p}, x)
        if loss == "mse":
            return jnp.mean((y - x) ** 2)
        y = jnp.clip(y, 1e-7, 1 - 1e-7)
        return -jnp.mean(x * jnp.log(y) + (1 - x) * jnp.log1p(-y))

    (l_plain, g_plain) = jax.value_and_grad(objective)(params, "plain")
    (l_fast, g_fast) = jax.value_and_grad(objective)(params, "subpixel")
    assert abs(float(l_plain) - float(l_fast)) < 1e-6
    y_plain = ConvAE(formulation="plain").apply({"params": params}, x)
    y_fast = ConvAE(formulation="subpixel").apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y_fast), np.asarray(y_plain), atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain), jax.tree_util.tree_leaves(g_fast)):
        scale = float(jnp.abs(a).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
    model = ConvAE(dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = jax.random.uniform(jax.random.key(1), (2, 128, 128, 1))
    y = model.apply({"params": params}, x)
    y32 = ConvAE().apply({"params": params}, x)
    assert y.dtype == jnp.float32
    assert float(jnp.abs(y - y32).max()) < 0.05
