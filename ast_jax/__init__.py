"""ast_jax: the Audio Spectrogram Transformer family in JAX/Flax."""

__version__ = "0.1.0"
