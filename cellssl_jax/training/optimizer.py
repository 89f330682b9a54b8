"""Adam with the paper's step decay, with milestones given in epochs and converted to optimizer updates.

The authors stepped ``MultiStepLR(milestones=[5], gamma=0.3)`` once per epoch, so every update of epoch index ≥ 5 (the
sixth epoch on) runs at 0.3 × lr. Optax counts updates, not epochs: a milestone of ``m`` epochs becomes
``m × updates_per_epoch`` updates, where one batch is ``n_crops`` updates under ``crop_steps='per_crop'`` and one update
under ``'joint'``. ``piecewise_constant_schedule`` scales from the update whose count equals the boundary on, which is
exactly the first update of the milestone epoch.
"""

from __future__ import annotations

from typing import Callable

import optax


def _boundaries(cfg_opt, updates_per_epoch: int) -> dict[int, float]:
    if updates_per_epoch <= 0:
        raise ValueError(f"updates_per_epoch must be positive, got {updates_per_epoch}")
    boundaries: dict[int, float] = {}
    for milestone in cfg_opt.get("milestones_epochs", ()):
        boundary = int(round(float(milestone) * updates_per_epoch))
        boundaries[boundary] = boundaries.get(boundary, 1.0) * float(cfg_opt.get("gamma", 0.3))
    return boundaries


def learning_rate_schedule(cfg_opt, *, updates_per_epoch: int) -> Callable:
    """lr(update count) for the ``optimizer`` config section, as an optax schedule (traced inside the step)."""
    return optax.piecewise_constant_schedule(float(cfg_opt.lr), _boundaries(cfg_opt, updates_per_epoch) or None)


def host_learning_rate(cfg_opt, *, updates_per_epoch: int, count: int) -> float:
    """The same schedule's value in plain Python, for logs (no device work, nothing to compile)."""
    lr = float(cfg_opt.lr)
    for boundary, scale in _boundaries(cfg_opt, updates_per_epoch).items():
        if count >= boundary:
            lr *= scale
    return lr


def make_optimizer(cfg_opt, *, updates_per_epoch: int) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, lr schedule). PyTorch's Adam defaults (β = 0.9, 0.999; ε = 1e-8 outside the square root) = optax's."""
    name = cfg_opt.get("name", "adam")
    schedule = learning_rate_schedule(cfg_opt, updates_per_epoch=updates_per_epoch)
    if name == "adam":
        tx = optax.adam(schedule, b1=cfg_opt.get("b1", 0.9), b2=cfg_opt.get("b2", 0.999), eps=cfg_opt.get("eps", 1e-8))
    elif name == "adamw":
        tx = optax.adamw(schedule, weight_decay=cfg_opt.get("weight_decay", 1e-4))
    else:
        raise ValueError(f"optimizer.name must be 'adam' or 'adamw', got {name!r}")
    return tx, schedule
