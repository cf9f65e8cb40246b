"""Weight formats: ast_jax model directories, Hugging Face AST, upstream AST .pth, ImageNet DeiT/ViT (see WORKSPACE.md)."""

from ast_jax.convert.hf import load_hf, save_hf
from ast_jax.convert.imagenet import imagenet_init, read_state_dict
from ast_jax.convert.model_dir import ModelBundle, load_model_dir, save_model_dir
from ast_jax.convert.original import load_original, save_original
from ast_jax.convert.posembed import adapt_pos_embed, bilinear_resize, sum_rgb_kernel

__all__ = [
    "ModelBundle",
    "adapt_pos_embed",
    "bilinear_resize",
    "imagenet_init",
    "load_hf",
    "load_model_dir",
    "load_original",
    "read_state_dict",
    "save_hf",
    "save_model_dir",
    "save_original",
    "sum_rgb_kernel",
]
