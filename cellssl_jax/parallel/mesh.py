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


def local_replica(tree):
    """This process's copy of a fully replicated pytree (parameters, metrics), as single-device arrays.

    Every process holds a whole copy of a replicated array, so reading it needs no collective; handing the local copy
    to a locally jitted function (a preview reconstruction on process 0) keeps the other processes out of it.
    """

    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            if not x.sharding.is_fully_replicated:
                raise ValueError("local_replica needs a fully replicated array; this one is split over devices")
            return x.addressable_data(0)  # the copy on this process's first device; no transfer
        return x

    return jax.tree_util.tree_map(one, tree)


def fetch_replicated(tree):
    """A replicated pytree as host numpy arrays (metrics after a step), on every process."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(local_replica(tree)))


def enable_compilation_cache(directory: str | os.PathLike | None, *, min_compile_secs: float = 1.0) -> None:
    """Keep compiled XLA programs on disk so a rerun (a resume after a kill, the next config) skips compilation.

    On CPU the first train step and the parameter initialisation take seconds to tens of seconds to compile (threefry
    in particular); the cache brings a rerun's start-up down to loading. ``JAX_COMPILATION_CACHE_DIR`` in the
    environment wins over ``directory``; ``None``/empty disables. The cached program is the one a fresh compile would
    produce, so results are unchanged.
    """
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or directory
    if not directory:
        return
    directory = os.path.expanduser(str(directory))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
