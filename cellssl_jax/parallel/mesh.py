"""Data parallelism over every device of every host.

One mesh axis, ``data``: the batch is split along it, parameters and optimizer state are replicated. ``jax.jit`` with
``NamedSharding`` does the rest (XLA inserts the gradient all-reduce). Each process feeds only its local slice of the
global batch (Grain shards the data per process), and ``jax.make_array_from_process_local_data`` assembles the global
array without any host ever holding the whole batch.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
log = logging.getLogger(__name__)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
) -> None:
    """Start multi-host JAX when asked to.

    On TPU pods and SLURM/GPU clusters ``jax.distributed.initialize()`` finds everything from the environment; pass
    ``coordinator_address``/``num_processes``/``process_id`` (or set ``CELLSSL_COORDINATOR``, ``CELLSSL_NUM_PROCESSES``,
    ``CELLSSL_PROCESS_ID``) for a manual launch, e.g. several CPU processes on one machine. Does nothing when neither
    arguments nor environment ask for more than one process.
    """
    coordinator_address = coordinator_address or os.environ.get("CELLSSL_COORDINATOR")
    if num_processes is None and "CELLSSL_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["CELLSSL_NUM_PROCESSES"])
    if process_id is None and "CELLSSL_PROCESS_ID" in os.environ:
        process_id = int(os.environ["CELLSSL_PROCESS_ID"])
    auto = os.environ.get("CELLSSL_DISTRIBUTED", "").lower() in ("1", "true", "auto")
    if coordinator_address is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes need an explicit collectives implementation to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if coordinator_address is not None:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
             jax.device_count())


def make_data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all global devices (or the given ones), axis ``data``.

    Auto axis types: the batch sharding is given explicitly at jit boundaries; inside, XLA's partitioner propagates it.
    """
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; everything else whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """Put a pytree (parameters, optimizer state, RNG) on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def global_batch(local_batch, mesh: Mesh):
    """Assemble a global, batch-sharded array pytree from this process's local slice.

    The global batch size is ``local * process_count``; each local batch must divide evenly over local devices.
    """
    sharding = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        n_local = len(mesh.local_devices)
        if x.shape[0] % n_local:
            raise ValueError(
                f"local batch of {x.shape[0]} does not split over {n_local} local devices; "
                "choose a batch size divisible by the device count"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(one, local_batch)
