"""The only room that names device axes: mesh, shardings, global-batch assembly, multi-host start-up."""

from cellssl_jax.parallel.mesh import (
    DATA_AXIS,
    batch_sharding,
    global_batch,
    initialize_distributed,
    make_data_mesh,
    replicated_sharding,
    replicate,
)

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "global_batch",
    "initialize_distributed",
    "make_data_mesh",
    "replicated_sharding",
    "replicate",
]
