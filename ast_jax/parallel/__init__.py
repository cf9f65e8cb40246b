"""Device mesh, logical-axis sharding rules, host-to-global batches and multi-host start-up."""

from ast_jax.parallel.mesh import batch_axes, batch_sharding, data_parallel_size, global_batch, make_mesh, replicated
from ast_jax.parallel.sharding import (create_sharded, logical_rules, partitioning, put_host_tree, sharded_jit,
                                       shardings_of, to_host)

__all__ = ["batch_axes", "batch_sharding", "create_sharded", "data_parallel_size", "global_batch", "logical_rules",
           "make_mesh", "partitioning", "put_host_tree", "replicated", "sharded_jit", "shardings_of", "to_host"]
