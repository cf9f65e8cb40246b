"""Device mesh and host-to-global batch placement."""

from ast_jax.parallel.mesh import global_batch, make_mesh, replicated

__all__ = ["global_batch", "make_mesh", "replicated"]
