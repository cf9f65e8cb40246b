"""Weight formats: ast_jax model directories, Hugging Face AST, upstream AST .pth, ImageNet DeiT/ViT (see
WORKSPACE.md)."""

from ast_jax.convert.hf import load_hf, save_hf
from ast_jax.convert.imagenet import imagenet_init, read_state_dict, sum_rgb_kernel
from ast_jax.convert.model_dir import ModelBundle, load_model_dir, save_model_dir
from ast_jax.convert.original import load_original, save_original

__all__ = [
    "ModelBundle",
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
