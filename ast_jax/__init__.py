"""ast_jax: the Audio Spectrogram Transformer family in JAX/Flax."""

__version__ = "0.1.0"

from ast_jax import runtime as _runtime

_runtime.skip_absent_tpu()  # libtpu installed for AOT pod compiles, no TPU here: keep CPU runs quiet
