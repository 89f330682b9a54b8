"""The only room that names device axes: mesh, shardings, global-batch assembly, multi-host start-up (and the
compilation cache that start-up turns on)."""

from cellssl_jax.parallel.mesh import (
    DATA_AXIS,
    batch_sharding,
    enable_compilation_cache,
    fetch_replicated,
    global_batch,
    initialize_distributed,
    local_replica,
    make_data_mesh,
    replicated_sharding,
    replicate,
)

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "enable_compilation_cache",
    "fetch_replicated",
    "global_batch",
    "initialize_distributed",
    "local_replica",
    "make_data_mesh",
    "replicated_sharding",
    "replicate",
]
