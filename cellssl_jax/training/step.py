"""The train state and the one jitted, sharded training step that every objective runs through.

``make_train_step`` returns ``step_fn(state, batch) -> (state, metrics)``: a single pure function, jitted with the
state donated (its buffers are reused for the new state), the batch split over the mesh's ``data`` axis and the state
replicated. XLA inserts the gradient all-reduce; the function reads the same on 1 device, 8 devices or 2 hosts.

``crop_steps`` decides what a multi-crop batch ``{'crops': (c_0, …, c_{n-1})}`` does:
- ``"per_crop"`` (the paper): each crop-batch takes its own optimizer step, in order, each on the parameters the
  previous one produced: n updates per batch. The n updates are unrolled in the one program by default. With
  ``scan_crops=True`` crops of one size run as a ``lax.scan`` over one compiled body instead: half the compile time, but
  on XLA:CPU (jax 0.10.2, this project's 2-core machine, loaded by other jobs, default XLA flags) the full ConvAE's 5
  crop-steps at 64 px, batch 16, took 165-200 s a batch under ``scan`` against 16-25 s unrolled: convolutions inside a
  while-loop body lose XLA:CPU's fast paths. Try scan on accelerators, where the loop body is the same kernels.
- ``"joint"``: the mean loss over all crops, one update per batch.

A batch may instead carry ``{'crops_uint8': (...), 'photometric': (...)}`` (``input.finish='device'``): the step then
finishes the crops itself (x/255, brightness, contrast, blur; ``data_pipelines.device_finish``) before the first
update, so the host hands over uint8 and does no per-pixel work.

Non-finite guard: an update is applied only when its loss and its gradient norm are finite. If any crop of the batch
is not finite the whole batch is dropped: the returned state is the input state unchanged (same step, parameters and
optimizer state), and ``metrics['finite']`` is False, so the loop can stop with the last good state still in hand and
never checkpoints a poisoned one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from cellssl_jax.models import fused_blocks
from cellssl_jax.parallel import DATA_AXIS, batch_sharding, replicated_sharding
from cellssl_jax.training.objectives.autoencoder import AutoencoderObjective
from data_pipelines import device_finish

CROP_STEPS = ("per_crop", "joint")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: batches consumed (a per_crop batch is n_crops optimizer updates)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), which Orbax stores like any array


def create_train_state(model, optimizer: optax.GradientTransformation, rng: int | jax.Array, *,
                       image_size: int = 128, params=None, mesh=None) -> TrainState:
    """Fresh state: parameters initialised from ``rng`` (unless given), optimizer state, step 0.

    ``rng`` is an int seed or a JAX key. With ``mesh``, the state is replicated over it.
    """
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)

    def init(key, params):
        if params is None:  # Flax derives each parameter's key from `key` by name, so the state may keep `key` itself
            dummy = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
            params = model.init(key, dummy)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(key))

    # One compiled program instead of dozens of eagerly dispatched ops (each its own compilation on CPU).
    out_shardings = replicated_sharding(mesh) if mesh is not None else None
    return jax.jit(init, out_shardings=out_shardings)(key, params)


def _select(pred: jax.Array, on_true, on_false):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


StepFn = Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict]]


def make_train_step(model, optimizer: optax.GradientTransformation, *, loss: str = "bce", crop_steps: str = "joint",
                    mesh, objective=None, scan_crops: bool = False) -> StepFn:
    """One jitted step for ``batch = {'crops': tuple of [B,S,S,C], **objective.batch_keys}`` (global arrays).

    ``objective`` defaults to the autoencoder reconstruction objective with ``loss`` ('bce' | 'mse').
    Metrics (replicated scalars): ``loss`` and ``grad_norm`` (means over the batch's crops; for per_crop each crop's loss
    is taken before its own update, as the authors logged it), ``loss_finite``, ``grad_finite``, ``finite``, and the
    objective's aux scalars (means over crops).
    """
    if crop_steps not in CROP_STEPS:
        raise ValueError(f"crop_steps must be one of {CROP_STEPS}, got {crop_steps!r}")
    objective = objective if objective is not None else AutoencoderObjective(model, loss)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    needs_rng = getattr(objective, "needs_rng", True)

    def update(params, opt_state, inputs, rng, allowed):
        (value, aux), grads = grad_fn(params, inputs, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        loss_ok, grad_ok = jnp.isfinite(value), jnp.isfinite(grad_norm)
        apply = allowed & loss_ok & grad_ok
        params = _select(apply, new_params, params)
        opt_state = _select(apply, new_opt_state, opt_state)
        return params, opt_state, apply, (value, grad_norm, loss_ok, grad_ok, aux)

    def train_step(state: TrainState, batch):
        with fused_blocks.batch_sharded(mesh, DATA_AXIS):  # Pallas kernels per device's share of the batch
            return sharded_train_step(state, batch)

    def sharded_train_step(state: TrainState, batch):
        crops = batch_crops(batch)
        extras = {k: batch[k] for k in objective.batch_keys}
        if needs_rng:
            key, next_key = jax.random.split(jax.random.wrap_key_data(state.rng))
            crop_keys, next_rng = jax.random.split(key, len(crops)), jax.random.key_data(next_key)
        else:  # no PRNG in the program: threefry is slow to compile on CPU, and the state's key stays as it was
            crop_keys, next_rng = jnp.zeros((len(crops),), jnp.uint32), state.rng
        ok = jnp.array(True)

        if crop_steps == "joint":
            def joint_loss(params):
                outs = [objective.loss(params, {"image": c, **extras}, r) for c, r in zip(crops, crop_keys)]
                aux = jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v)), *[a for _, a in outs])
                return jnp.mean(jnp.stack([v for v, _ in outs])), aux

            (value, aux), grads = jax.value_and_grad(joint_loss, has_aux=True)(state.params)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            per_crop = jax.tree_util.tree_map(lambda v: v[None], (value, grad_norm, jnp.isfinite(value),
                                                                   jnp.isfinite(grad_norm), aux))
        elif scan_crops and len({c.shape for c in crops}) == 1:
            def body(carry, xs):
                params, opt_state, allowed = carry
                image, rng = xs
                params, opt_state, allowed, stats = update(params, opt_state, {"image": image, **extras}, rng, allowed)
                return (params, opt_state, allowed), stats

            (params, opt_state, _), per_crop = jax.lax.scan(
                body, (state.params, state.opt_state, ok), (jnp.stack(crops), crop_keys))
        else:
            params, opt_state, allowed, stats = state.params, state.opt_state, ok, []
            for image, rng in zip(crops, crop_keys):
                params, opt_state, allowed, s = update(params, opt_state, {"image": image, **extras}, rng, allowed)
                stats.append(s)
            per_crop = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *stats)

        values, grad_norms, loss_ok, grad_ok, aux = per_crop
        finite = jnp.all(loss_ok) & jnp.all(grad_ok)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=next_rng)
        new_state = _select(finite, new_state, state)  # a non-finite batch leaves the state exactly as it was
        metrics = {"loss": jnp.mean(values), "grad_norm": jnp.mean(grad_norms), "loss_finite": jnp.all(loss_ok),
                   "grad_finite": jnp.all(grad_ok), "finite": finite,
                   **{name: jnp.mean(v) for name, v in aux.items()}}
        return new_state, metrics

    replicated = replicated_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, batch_sharding(mesh)), out_shardings=(replicated, replicated),
                   donate_argnums=0)


def batch_crops(batch: Mapping[str, Any]) -> tuple:
    """The batch's float crops: ``batch['crops']``, or the uint8 crops finished here (``input.finish='device'``)."""
    if "crops_uint8" in batch:
        return tuple(device_finish.finish_crops(c, p) for c, p in zip(batch["crops_uint8"], batch["photometric"]))
    return tuple(batch["crops"])


def updates_per_batch(crop_steps: str, n_crops: int) -> int:
    """Optimizer updates one batch makes: what the step-decay milestones are counted in."""
    return n_crops if crop_steps == "per_crop" else 1
