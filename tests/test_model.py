"""The ConvAE is the paper's model, and its fast formulation computes the same function as the plain one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax import lax

from cellssl_jax.models.convae import ConvAE, conv3x3_vjp, conv_from_one_channel_vjp, conv_to_one_channel_vjp, \
    count_params, init_params, model_from_config, subpixel_kernels, upsample_conv_subpixel, upsample_conv_vjp, \
    upsample_nearest_2x

_DIMS = ("NHWC", "HWIO", "NHWC")


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


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_all_phase_conv_as_one_product_equals_the_convolution(dtype, tol):
    # the 2×2 all-phase convolution as window_patches @ [4·I, 4·O] with its own backward pass: the same output and
    # gradients as XLA's convolution (odd sizes, so a row/column mix-up cannot cancel out)
    from cellssl_jax.models.subpixel import all_phase_conv, all_phase_kernel  # noqa: PLC0415

    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (2, 5, 7, 3)).astype(dtype)
    k_all = all_phase_kernel(0.3 * jax.random.normal(keys[1], (3, 3, 3, 4))).astype(dtype)
    cot = jax.random.normal(keys[2], (2, 6, 8, 16)).astype(dtype)

    def value_and_grads(how):
        y, vjp = jax.vjp(lambda a, k: all_phase_conv(a, k, how), x, k_all)
        return (y, *vjp(cot))

    with jax.default_matmul_precision("highest"):
        want = [np.asarray(a, np.float32) for a in value_and_grads("xla")]
        got = [np.asarray(a, np.float32) for a in value_and_grads("gemm")]
    for name, g, w in zip(("output", "input gradient", "kernel gradient"), got, want, strict=True):
        assert g.shape == w.shape, name
        assert np.abs(g - w).max() <= tol * np.abs(w).max(), (name, np.abs(g - w).max(), np.abs(w).max())
    assert jax.eval_shape(lambda a, k: all_phase_conv(a, k, "gemm"), x, k_all).dtype == dtype
    with pytest.raises(ValueError, match="how must be one of"):
        all_phase_conv(x, k_all, "cudnn")


# The loss is this test's own scalar of the output: a second loss (an MSE case of "subpixel", ~45 s of CPU, dropped)
# would check the same backward pass again with another cotangent.
@pytest.mark.parametrize("formulation,phase_conv", [
    ("subpixel", "xla"), ("plain_1ch", "xla"), ("fused_1ch", "xla"), ("fused_subpixel", "xla"),
    ("fused_subpixel", "gemm")])
def test_fast_formulation_outputs_and_gradients_match_plain(formulation, phase_conv, monkeypatch):
    from cellssl_jax.models import fused_blocks  # noqa: PLC0415

    monkeypatch.setitem(fused_blocks.TUNING, "phase_conv", phase_conv)  # fused_subpixel's all-phase convolution
    params = init_params(ConvAE(), jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, 128, 128, 1))

    def objective(p, formulation):
        y = jnp.clip(ConvAE(formulation=formulation).apply({"params": p}, x), 1e-7, 1 - 1e-7)
        return -jnp.mean(x * jnp.log(y) + (1 - x) * jnp.log1p(-y))

    (l_plain, g_plain) = jax.value_and_grad(objective)(params, "plain")
    (l_fast, g_fast) = jax.value_and_grad(objective)(params, formulation)
    assert abs(float(l_plain) - float(l_fast)) < 1e-6
    y_plain = ConvAE(formulation="plain").apply({"params": params}, x)
    y_fast = ConvAE(formulation=formulation).apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(y_fast), np.asarray(y_plain), atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain), jax.tree_util.tree_leaves(g_fast)):
        scale = float(jnp.abs(a).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the measured warnings are the CPU's")
def test_every_formulation_but_auto_warns_on_the_cpu_with_what_was_measured():
    from cellssl_jax.models.convae import FORMULATIONS  # noqa: PLC0415

    for formulation in FORMULATIONS:
        warning = ConvAE(formulation=formulation).speed_warning()
        if formulation in ("auto", "subpixel_vjp"):
            assert warning is None
        else:  # each carries its own figure, not only the generic sentence
            assert f"formulation {formulation!r} on the CPU is slower than 'auto'" in warning
            assert any(ch.isdigit() for ch in warning.split("batch 64-256)", 1)[1]), warning
    assert "6 minutes" in ConvAE(formulation="fused_subpixel").speed_warning()


def test_formulations_measured_slower_on_a_gpu_warn_there_with_their_figure(monkeypatch):
    from cellssl_jax.models.convae import FORMULATIONS  # noqa: PLC0415

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for formulation in FORMULATIONS:
        warning = ConvAE(formulation=formulation, dtype=jnp.bfloat16).speed_warning()
        if formulation in ("auto", "fused_1ch"):  # auto's choice there
            assert warning is None
        else:
            assert f"formulation {formulation!r} on a GPU is slower than 'auto'" in warning
            assert "images/s" in warning.split("in bf16):", 1)[1], warning
    # float32: auto runs plain; only fused_1ch was timed against it, so only it warns
    warned = {f for f in FORMULATIONS if ConvAE(formulation=f, dtype=jnp.float32).speed_warning() is not None}
    assert warned == {"fused_1ch"}
    assert "against auto's 6,900 (H100, float32" in ConvAE(formulation="fused_1ch").speed_warning()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # nothing measured there: no claim
    assert all(ConvAE(formulation=f).speed_warning() is None for f in FORMULATIONS)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
    model = ConvAE(dtype=jnp.bfloat16)
    params = init_params(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x = jax.random.uniform(jax.random.key(1), (2, 128, 128, 1))
    y = model.apply({"params": params}, x)
    y32 = ConvAE().apply({"params": params}, x)
    assert y.dtype == jnp.float32
    assert float(jnp.abs(y - y32).max()) < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# formulation="subpixel_vjp": hand-written backward passes and micro-batching must compute the plain model's function


def _random_params(model, image_size, seed=0):
    """Parameters of ``model``'s tree with PyTorch's init scale, from numpy: init_params compiles threefry, ~10-25 s."""
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), image_size))
    rng = np.random.default_rng(seed)

    def fill(leaf):
        fan_in = leaf.shape[-2] * 9 if leaf.ndim == 4 else 9
        return jnp.asarray(rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map(fill, shapes)


def _same_conv(x, kernel, bias):
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS) + bias


def _upsample_then_conv(x, kernel, bias):
    return _same_conv(upsample_nearest_2x(x), kernel, bias)


@pytest.mark.parametrize("layer, reference, cin, cout, upsample", [
    (conv3x3_vjp, _same_conv, 5, 7, False),
    (conv_from_one_channel_vjp, _same_conv, 1, 6, False),
    (conv_to_one_channel_vjp, _same_conv, 6, 1, False),
    (upsample_conv_vjp, _upsample_then_conv, 5, 3, True),
])
def test_each_hand_written_backward_matches_autodiff(layer, reference, cin, cout, upsample):
    """Output and all three cotangents (input, kernel, bias) against jax.vjp of the obvious formulation."""
    kx, kk, kb, kd = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (3, 6, 10, cin))  # odd batch, non-square image
    kernel = jax.random.normal(kk, (3, 3, cin, cout))
    bias = jax.random.normal(kb, (cout,))
    out_shape = (3, 12 if upsample else 6, 20 if upsample else 10, cout)
    dy = jax.random.normal(kd, out_shape)

    @jax.jit
    def forward_and_backward(x, kernel, bias, dy):
        (y_ref, vjp_ref), (y, vjp) = jax.vjp(reference, x, kernel, bias), jax.vjp(layer, x, kernel, bias)
        return y_ref, y, vjp_ref(dy), vjp(dy)

    y_ref, y, cot_ref, cot = forward_and_backward(x, kernel, bias, dy)
    assert y.shape == y_ref.shape == out_shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-4)
    for name, got, want in zip(("input", "kernel", "bias"), cot, cot_ref):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-5 * scale, name


def _bce_objective(formulation, micro_batch, x):
    def objective(p):
        model = ConvAE(formulation=formulation, micro_batch=micro_batch)
        logits = model.apply({"params": p}, x, method=lambda m, v: m.decode_logits(m.encode(v)))
        return jnp.mean(jax.nn.softplus(logits) - x * logits)
    return objective


@pytest.fixture(scope="module")
def plain_reference_128():
    params = _random_params(ConvAE(), 128)
    x = jax.random.uniform(jax.random.key(1), (4, 128, 128, 1))
    return params, x, jax.jit(jax.value_and_grad(_bce_objective("plain", None, x)))(params)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch", [0, 2])
def test_subpixel_vjp_loss_and_gradients_match_plain(micro_batch, plain_reference_128):
    """The full model at 128×128: same loss and same gradient for every parameter, in slices of 2 images or whole."""
    params, x, (l_plain, g_plain) = plain_reference_128
    l_fast, g_fast = jax.jit(jax.value_and_grad(_bce_objective("subpixel_vjp", micro_batch, x)))(params)
    assert abs(float(l_plain) - float(l_fast)) < 1e-6
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain), jax.tree_util.tree_leaves(g_fast)):
        scale = float(jnp.abs(a).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) / scale < 1e-4, jax.tree_util.keystr(path)


def test_subpixel_vjp_outputs_and_encoder_stages_match_plain_in_slices():
    params = _random_params(ConvAE(), 32)
    x = jax.random.uniform(jax.random.key(2), (3, 32, 32, 1))
    plain, fast = ConvAE(formulation="plain"), ConvAE(formulation="subpixel_vjp", micro_batch=1)

    @jax.jit
    def outputs(params):
        return [(m.apply({"params": params}, x), m.apply({"params": params}, x, method="encode_layers"))
                for m in (plain, fast)]

    (y_plain, stages_plain), (y_fast, stages_fast) = outputs(params)
    np.testing.assert_allclose(np.asarray(y_fast), np.asarray(y_plain), atol=1e-6)
    assert stages_plain.keys() == stages_fast.keys()
    for key in stages_plain:
        assert stages_fast[key].shape == stages_plain[key].shape, key
        np.testing.assert_allclose(np.asarray(stages_fast[key]), np.asarray(stages_plain[key]), atol=1e-5,
                                   err_msg=key)


def test_subpixel_vjp_works_for_other_channel_counts():
    """A 5-channel model (no one-channel edge layers) in one-image slices, against plain."""
    kw = dict(in_channels=5, encoder_widths=(8, 6, 4), latent_channels=3, decoder_widths=(4, 6, 8))
    params = _random_params(ConvAE(**kw), 8)
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 5))

    def loss(formulation, micro_batch):
        return lambda p: jnp.mean(ConvAE(formulation=formulation, micro_batch=micro_batch, **kw)
                                  .apply({"params": p}, x) ** 2)

    g_plain = jax.jit(jax.grad(loss("plain", None)))(params)
    g_fast = jax.jit(jax.grad(loss("subpixel_vjp", 1)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_plain), jax.tree_util.tree_leaves(g_fast)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * (float(jnp.abs(a).max()) + 1e-12)


def test_auto_picks_the_cpu_formulation_with_one_image_slices():
    model = ConvAE(formulation="auto")
    params = _random_params(model, 16)
    bound = model.bind({"params": params})
    assert jax.default_backend() == "cpu"
    assert bound.resolved_formulation() == "subpixel_vjp" and bound.resolved_micro_batch() == 1
    assert ConvAE(formulation="subpixel").bind({"params": params}).resolved_micro_batch() == 0
    assert model_from_config({"formulation": "auto", "micro_batch": 4}).micro_batch == 4


def test_micro_batch_must_divide_the_batch():
    model = ConvAE(formulation="subpixel_vjp", micro_batch=2)
    params = _random_params(model, 16)
    with pytest.raises(ValueError, match="micro_batch=2 must divide the batch size 3"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((3, 16, 16, 1)))
    with pytest.raises(ValueError, match="formulation must be one of"):
        jax.eval_shape(ConvAE(formulation="winograd").apply, {"params": params}, jnp.zeros((2, 16, 16, 1)))


def test_subpixel_vjp_training_graph_has_only_canonical_convolutions_and_no_first_layer_input_gradient():
    """Why it is loop-safe on XLA:CPU: every convolution of the compiled gradient, inside the micro-batch loop too,
    is NHWC/HWIO → NHWC (autodiff's weight gradients are left non-canonical in a loop body and run a naive loop), and
    the first layer's input gradient (nobody needs it) is gone."""
    model = ConvAE(formulation="subpixel_vjp", micro_batch=1)
    params = _random_params(model, 32)
    x = jnp.ones((2, 32, 32, 1))
    hlo = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum())).lower(params).compile().as_text()
    convs = [line for line in hlo.splitlines() if " convolution(" in line]
    assert "while" in hlo and len(convs) > 10
    assert all("dim_labels=b01f_01io->b01f" in line for line in convs), [c for c in convs if "b01f_01io" not in c]
    one_channel_outputs = [line for line in convs if "f32[1,32,32,1]" in line]
    assert len(one_channel_outputs) == 1  # the last layer's forward; no input gradient of the first layer


def test_subpixel_vjp_bfloat16_keeps_float32_parameters_gradients_and_output():
    model = ConvAE(formulation="subpixel_vjp", micro_batch=1, dtype=jnp.bfloat16)
    params = _random_params(model, 32)
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
    y = jax.jit(model.apply)({"params": params}, x)
    y32 = jax.jit(ConvAE(formulation="plain").apply)({"params": params}, x)
    assert y.dtype == jnp.float32 and float(jnp.abs(y - y32).max()) < 0.05
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).mean()))(params)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("backend,dtype,expected", [
    ("cpu", jnp.float32, "subpixel_vjp"), ("cpu", jnp.bfloat16, "subpixel_vjp"), ("gpu", jnp.bfloat16, "fused_1ch"),
    ("gpu", jnp.float16, "fused_1ch"), ("gpu", jnp.float32, "plain"), ("tpu", jnp.bfloat16, "plain")])
def test_auto_formulation_per_backend(backend, dtype, expected, monkeypatch):
    # What each backend runs: the fastest measured there (BENCHMARKS.md; on an H100 fused_1ch in bf16, plain in
    # float32); TPU unmeasured, the plain form.
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert ConvAE(formulation="auto", dtype=dtype).resolved_formulation() == expected
