"""Weight conversion: checkpoint layouts from other codebases into ast_jax params, and back."""

from ast_jax.convert.imagenet import imagenet_init, read_state_dict
from ast_jax.convert.posembed import adapt_pos_embed, bilinear_resize, sum_rgb_kernel

__all__ = [
    "adapt_pos_embed",
    "bilinear_resize",
    "imagenet_init",
    "read_state_dict",
    "sum_rgb_kernel",
]
