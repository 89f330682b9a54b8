"""The one training loop: data → sharded step → non-finite guard → logs → checkpoints, resuming by itself.

``train_and_evaluate(config, workdir)`` is all ``train.py`` calls. A rerun of the same command on the same workdir
restores the latest checkpoint (TrainState and the Grain iterator position) and continues; because the data order is
a pure function of (seed, position) and XLA on one machine is deterministic, the resumed run ends with the same
parameters, bit for bit, as one that was never interrupted (tests/test_training.py).

``config.objective`` picks what is trained: ``'autoencoder'`` (the ConvAE, default) or ``'lens'`` (configs/lens.py:
the lens task's labelled images, a frozen pretrained ConvAE and a classifier). Each objective's file in
``objectives/`` says, through its ``setup``, what it trains on and with what (``objectives.ObjectiveSetup``); the loop
asks which one it runs only to refuse evaluators (``config.evals``) for a lens, since they score a ConvAE encoder.

Steps count batches. Under ``crop_steps='per_crop'`` one batch is ``n_crops`` optimizer updates; the learning-rate
milestones are converted with that in mind (optimizer.py).

Evaluators (``config.evals``, big_vision's habit): each named one with ``every_steps > 0`` runs on the current
parameters every that many steps and at the last, and its scalars go to metrics.jsonl as ``eval/<name>/<figure>``
(``EVALUATORS`` maps names to the plug-ins; ``compare`` is the authors' encoder comparison, cellssl_jax/compare).

Non-finite values: the step refuses to apply a non-finite update (step.py); the loop reads each step's metrics one
step late (so the host does not stall the device) and stops with ``NonFiniteError`` naming the step and the quantity.
The bad state is never saved: a checkpoint is written only after its step's metrics were read and found finite.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from cellssl_jax.parallel import fetch_replicated, global_batch, local_replica, make_data_mesh
from cellssl_jax.training.checkpoint import TrainCheckpointer
from cellssl_jax.training.objectives import setup_objective
from cellssl_jax.training.optimizer import host_learning_rate
from cellssl_jax.training.step import create_train_state, make_train_step, updates_per_batch
from cellssl_jax.training.writers import MetricWriter, reconstruction_grid

log = logging.getLogger(__name__)

# Evaluator plug-ins by name: "module:Class", constructed with (dataset_dir, seed=..., **settings) and exposing
# due(step, total_steps) and run(params, model, out_dir) -> {name: float}. Imported only when switched on.
EVALUATORS = {"compare": "cellssl_jax.compare.evaluator:CompareEvaluator"}


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient; the run stopped and its last checkpoint is intact."""


def run_plan(config, num_images: int) -> dict:
    """Steps, epochs and optimizer updates a config implies for a data set of ``num_images``."""
    batch_size = int(config.input.batch_size)
    steps_per_epoch = num_images // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the data set has {num_images} images, fewer than one global batch of {batch_size}")
    if config.get("total_steps"):
        total_steps = int(config.total_steps)
    elif config.get("num_epochs"):
        total_steps = int(round(float(config.num_epochs) * steps_per_epoch))
    else:
        raise ValueError("the config needs num_epochs or total_steps")
    n_crops = int(sum(config.input.nmb_crops))
    upb = updates_per_batch(config.crop_steps, n_crops)
    return {"num_images": num_images, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps, "n_crops": n_crops, "updates_per_batch": upb,
            "updates_per_epoch": steps_per_epoch * upb}


def train_and_evaluate(config, workdir: str | Path, *, source=None) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds a checkpoint). Returns a summary dict.

    ``source``: a random-access source to use instead of ``open_source(config.dataset_dir)`` (tests, notebooks).
    """
    from data_pipelines.input_pipeline import create_train_dataset  # the data room's face

    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    if source is None:
        from data_pipelines.source import open_source

        if not config.get("dataset_dir"):
            raise ValueError(
                "config.dataset_dir is empty; pass --config.dataset_dir=DIR (a data_pipelines.build output)")
        source = open_source(config.dataset_dir)
    _check_channels(config, source)
    chosen = setup_objective(config, source)
    source, model, objective = chosen.source, chosen.model, chosen.objective
    plan = run_plan(config, len(source))
    mesh = make_data_mesh()
    if plan["batch_size"] % mesh.size:
        raise ValueError(f"input.batch_size={plan['batch_size']} must be a multiple of the {mesh.size} devices")

    image_size = int(config.input.size_crops[0])
    optimizer = chosen.make_optimizer(plan["updates_per_epoch"])
    log.info("model: formulation %s (configured %r), micro-batch %s, compute dtype %s; %d %s device(s)",
             model.resolved_formulation(), model.formulation, model.resolved_micro_batch() or "whole batch",
             np.dtype(model.dtype).name, jax.device_count(), jax.default_backend())
    if (slow := model.speed_warning()) is not None:
        log.warning("%s", slow)
    evaluators = build_evaluators(config, config.get("objective", "autoencoder"))
    train_step = make_train_step(model, optimizer, loss=config.loss, crop_steps=config.crop_steps, mesh=mesh,
                                 objective=objective, scan_crops=bool(config.get("scan_crops", False)))
    preview = jax.jit(objective.preview)

    iterator = iter(create_train_dataset(source, config.input, seed=int(config.seed), process_index=jax.process_index(),
                                         process_count=jax.process_count(),
                                         accelerator=jax.default_backend() != "cpu"))
    config_record = json.loads(config.to_json_best_effort())
    config_record["model"] = chosen.model_record
    config_record["plan"] = plan
    config_record.update(chosen.record)

    ck_cfg = config.checkpoint
    checkpointer = TrainCheckpointer(workdir, keep=int(ck_cfg.keep), asynchronous=bool(ck_cfg.get("async", True)))
    init = functools.partial(create_train_state, model, optimizer, int(config.seed), image_size=image_size,
                             params=chosen.initial_params)
    start_step = checkpointer.latest_step()
    if start_step is not None:
        state, start_step = checkpointer.restore(jax.eval_shape(init), iterator, mesh=mesh)
        _log_config_changes(checkpointer.saved_config(start_step), config_record, is_main)
    else:
        state, start_step = init(mesh=mesh), 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_record, indent=2))

    total_steps = plan["total_steps"]
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    debug = config.get("debug") or {}
    inject_nan_at = int(debug.get("inject_nan_at_step") or 0)
    sleep_after_step = float(debug.get("sleep_after_step_s") or 0.0)
    log_every, image_every = int(config.log_every), int(config.get("image_every") or 0)
    every_steps = int(ck_cfg.every_steps)

    window = _Window()
    progress = tqdm(total=total_steps, initial=start_step, disable=not is_main, desc="train", unit="step",
                    dynamic_ncols=True)
    last_saved = start_step if start_step else None
    pending = None  # (step, metrics, (when its batch was asked for, seconds waited)) dispatched, not yet read back
    summary = {"start_step": start_step, "total_steps": total_steps}
    end_step = total_steps  # the last step trained: earlier when a finite input stream (input.num_epochs) runs out

    def record(step: int, metrics, data_wait: tuple[float, float]) -> None:
        host = fetch_replicated(metrics)
        if not bool(host["finite"]):
            bad = [name for name, key in (("loss", "loss_finite"), ("gradient", "grad_finite")) if not host[key]]
            where = f"latest good checkpoint: step {last_saved}" if last_saved is not None else "no checkpoint yet"
            raise NonFiniteError(
                f"step {step}: non-finite {' and '.join(bad)} (loss={float(host['loss'])}, "
                f"grad_norm={float(host['grad_norm'])}); the update was not applied and nothing was saved after it "
                f"({where} in {checkpointer.directory})")
        window.add({k: float(v) for k, v in host.items() if not k.endswith("finite")})
        window.wait.add(*data_wait)
        summary["final_loss"] = float(host["loss"])
        first = step == start_step + 1  # includes compilation: logged, but not timed
        if not first:
            run_wait.add(*data_wait)
        if first or step % log_every == 0 or step == end_step:
            log_row(step, first)

    def log_row(step: int, first: bool) -> None:
        row = window.flush(plan["batch_size"], timed=not first)
        row["epoch"] = step / plan["steps_per_epoch"]
        row["lr"] = host_learning_rate(config.optimizer, updates_per_epoch=plan["updates_per_epoch"],
                                       count=(step - 1) * plan["updates_per_batch"])
        if first:
            row["first_step_s"] = summary["first_step_s"] = time.perf_counter() - t_start
        writer.write(step, row)
        if "images_per_s" in row:
            summary["images_per_s"] = row["images_per_s"]
        progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row.get('images_per_s', 0):.1f}",
                             data_wait=f"{100 * row.get('data_wait_fraction', 0):.0f}%")

    t_start = time.perf_counter()
    run_wait = _DataWait()  # the whole run's, after the first step
    try:
        for step in range(start_step + 1, total_steps + 1):
            t_wait = time.perf_counter()
            try:
                local = next(iterator)
            except StopIteration:
                log.warning("the input stream ended at step %d (input.num_epochs is set); stopping", step - 1)
                end_step = step - 1
                break
            data_wait = (t_wait, time.perf_counter() - t_wait)
            images = _batch_images(local)
            if step == inject_nan_at:  # debug switch: poison one pixel of this batch
                images = _with_nan(images)
            batch = global_batch({**images, **{k: local[k] for k in objective.batch_keys}}, mesh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                record(*pending)
            pending = (step, metrics, data_wait)
            if step == start_step + 1 or step % every_steps == 0 or step == total_steps:
                record(*pending)  # a checkpoint only of a state whose step was read back finite
                pending = None
                if step % every_steps == 0 or step == total_steps:
                    checkpointer.save(step, state, iterator, config_record)
                    last_saved = step
            if is_main and image_every and step % image_every == 0:
                _write_preview(writer, step, preview, state, _first_crop_on_host(images))
            due = [name for name, ev in evaluators.items() if ev.due(step, total_steps)]
            if due and pending is not None:
                record(*pending)  # evaluate only a state whose step was read back finite
                pending = None
            for name in due:
                scalars = evaluators[name].run(local_replica(state.params), model,
                                               workdir / "evals" / name / f"step_{step}")
                writer.write(step, {f"eval/{name}/{key}": value for key, value in scalars.items()})
                summary.setdefault("evals", {})[name] = scalars
            progress.update(1)
            if sleep_after_step:
                time.sleep(sleep_after_step)
        if pending is not None:
            record(*pending)
        if start_step < end_step < total_steps:  # the stream ended early: keep the steps trained since the last save
            if window.values:
                log_row(end_step, first=False)
            if last_saved != end_step:
                checkpointer.save(end_step, state, iterator, config_record)
                last_saved = end_step
    finally:
        progress.close()
        checkpointer.close()  # waits for asynchronous saves of good states
        writer.close()
    summary.update(wall_s=time.perf_counter() - t_start, last_checkpoint=last_saved, end_step=end_step, plan=plan)
    if run_wait.seconds:
        summary["data_wait_fraction"] = run_wait.fraction()
    return summary


def build_evaluators(config, objective_name: str) -> dict:
    """The evaluators ``config.evals`` switches on (``every_steps > 0``), constructed once, by name."""
    active = {name: dict(settings) for name, settings in (config.get("evals") or {}).items()
              if int(settings.get("every_steps") or 0) > 0}
    if not active:
        return {}
    unknown = sorted(set(active) - set(EVALUATORS))
    if unknown:
        raise ValueError(f"config.evals: unknown evaluator(s) {unknown}; known: {sorted(EVALUATORS)}")
    if objective_name != "autoencoder":
        raise ValueError(f"config.evals evaluate the ConvAE's encoder; objective {objective_name!r} trains a lens "
                         "(compare its ConvAE with `evaluate.py compare --encoder NAME=LENS_RUN`)")
    if not config.get("dataset_dir"):
        raise ValueError("config.evals need config.dataset_dir (the evaluators read the dataset's manifest)")
    built = {}
    for name, settings in active.items():
        module, cls = EVALUATORS[name].split(":")
        built[name] = getattr(importlib.import_module(module), cls)(config.dataset_dir, seed=int(config.seed),
                                                                    **settings)
        log.info("evaluator %s: every %d steps", name, int(settings["every_steps"]))
    return built


class _Window:
    """Means of the step metrics (loss, gradient norm, the objective's aux), throughput and the time the loop waited
    for the input pipeline since the last log row."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.values: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()
        self.timed_steps = 0
        self.wait = _DataWait()

    def add(self, scalars: dict[str, float]):
        for name, value in scalars.items():
            self.values.setdefault(name, []).append(value)
        self.timed_steps += 1

    def flush(self, batch_size: int, *, timed: bool = True) -> dict:
        elapsed = time.perf_counter() - self.t0
        row = {name: float(np.mean(values)) for name, values in self.values.items()}
        if timed and elapsed > 0:
            row["images_per_s"] = self.timed_steps * batch_size / elapsed
            if self.wait.seconds:
                row["data_wait_ms"] = 1e3 * float(np.mean(self.wait.seconds))
                row["data_wait_fraction"] = self.wait.fraction()
        self.restart()
        return row


class _DataWait:
    """Time the loop spent in ``next(iterator)`` over some steps: the pipeline was not ready (the device sat idle
    unless it still had queued steps). Each step's batch was asked for at ``started`` (perf_counter) and took
    ``seconds``; steps are read back one late, so the share is taken of the wall time since the first step's request."""

    def __init__(self):
        self.seconds: list[float] = []
        self.since: float | None = None

    def add(self, started: float, seconds: float):
        self.seconds.append(seconds)
        if self.since is None:
            self.since = started

    def fraction(self) -> float:
        return float(np.sum(self.seconds)) / (time.perf_counter() - self.since)


def _batch_images(local: dict) -> dict:
    """The image part of a pipeline batch: float crops, or uint8 crops + photometric rows (finished in the step)."""
    if "crops_uint8" in local:
        return {"crops_uint8": tuple(local["crops_uint8"]), "photometric": tuple(local["photometric"])}
    return {"crops": tuple(local["crops"])}


def _with_nan(images: dict) -> dict:
    """``images`` with one value of the first crop poisoned: a pixel, or (uint8 crops) the first image's brightness."""
    key = "crops" if "crops" in images else "photometric"
    first = np.array(images[key][0], dtype=np.float32 if key == "crops" else None, copy=True)
    first.reshape(-1)[0] = np.nan
    return {**images, key: (first,) + tuple(images[key][1:])}


def _first_crop_on_host(images: dict, n: int = 8) -> np.ndarray:
    """The first crop of the first ``n`` images as float32, finished on the host when the step finishes them."""
    if "crops" in images:
        return np.asarray(images["crops"][0][:n])
    from data_pipelines.augment import finish_crops

    return finish_crops(np.asarray(images["crops_uint8"][0][:n]), np.asarray(images["photometric"][0][:n]))


def _write_preview(writer: MetricWriter, step: int, preview, state, local_crops: np.ndarray, n: int = 8) -> None:
    images = np.asarray(local_crops[:n], np.float32)
    params = local_replica(state.params)
    recon = np.asarray(preview(params, images))
    writer.write_image(step, "reconstruction", reconstruction_grid(images, recon, max_images=n))


def _check_channels(config, source) -> None:
    shape = getattr(source, "image_shape", None)
    if shape is None and len(source):
        shape = np.asarray(source[0]["image"]).shape
    channels = shape[-1] if shape is not None and len(shape) == 3 else 1
    if int(config.model.in_channels) != channels:
        raise ValueError(f"model.in_channels={config.model.in_channels} but the data set's images have {channels} "
                         f"channel(s); set --config.model.in_channels={channels}")


def _log_config_changes(saved: dict | None, current: dict, is_main: bool) -> None:
    if not saved or not is_main:
        return
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
