"""AST: the Audio Spectrogram Transformer (Gong et al. 2021) in Flax Linen.

spectrogram [batch, frames, mel_bins] -> overlapping 16x16 patches (fstride, tstride), frequency-major tokens ->
[cls, dist] prefix + learned positional embedding -> ViT encoder -> pooled (cls + dist) / 2 -> LayerNorm + Linear.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.models.flexi import resize_patch_kernel, resize_pos_grid, scaled_strides
from ast_jax.models.vit import (ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, Dtype, Encoder, dense, layer_norm,
                                trunc_normal, with_names)

# DeiT sizes: (width, depth, heads).
VARIANTS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def patch_grid(mel_bins: int, frames: int, patch_size: int, fstride: int, tstride: int,
               patch_time: int = 0) -> tuple[int, int]:
  """The (frequency, time) patch grid of a spectrogram: ((F - p) // fs + 1, (T - pt) // ts + 1), where the patch
  is p x pt (pt = `patch_time`, or p when 0)."""
  patch_time = patch_time or patch_size
  if mel_bins < patch_size or frames < patch_time:
    raise ValueError(f"spectrogram {mel_bins} mel bins x {frames} frames is smaller than one {patch_size}x{patch_time} "
                     "patch")
  return (mel_bins - patch_size) // fstride + 1, (frames - patch_time) // tstride + 1


class PatchProjection(nn.Module):
  """The patch conv (`kernel` `[patch_freq, patch_time, 1, width]`, `bias`), as `nn.Conv` computes it; at another
  patch shape its kernel is PI-resized (FlexiAST, `models/flexi.py`) and each stride scaled with its patch side."""

  width: int
  shape: tuple[int, int]
  strides: tuple[int, int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array, patch: tuple[int, int] | None = None) -> jax.Array:
    kernel = self.param("kernel", with_names(nn.initializers.lecun_normal(), None, None, None, "embed"),
                        (*self.shape, image.shape[-1], self.width))
    bias = self.param("bias", with_names(nn.initializers.zeros_init(), "embed"), (self.width,))
    strides = self.strides
    if patch is not None and tuple(patch) != tuple(self.shape):
      kernel, strides = resize_patch_kernel(kernel, tuple(patch)), scaled_strides(self.shape, strides, patch)
    image, kernel, bias = nn.dtypes.promote_dtype(image, kernel, bias, dtype=self.dtype)
    out = jax.lax.conv_general_dilated(image, kernel, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + bias


class PatchEmbed(nn.Module):
  """Conv patches (overlapping when the strides are smaller than the patch) on the [batch, mel_bins (height),
  frames (width), 1] image; frequency-major tokens. `patch` (frequency, time) runs patches of that shape with the
  PI-resized kernel instead, the strides scaled with the patch (`models/flexi.py:scaled_strides`)."""

  width: int
  patch_size: int = 16
  fstride: int = 10
  tstride: int = 10
  dtype: Dtype = jnp.float32
  patch_time: int = 0  # > 0: rectangular patches of patch_size bins x patch_time frames

  @nn.compact
  def __call__(self, spectrogram: jax.Array, patch: tuple[int, int] | None = None) -> jax.Array:
    """spectrogram `[batch, frames, mel_bins]` -> tokens `[batch, f * t, width]` (index = f_index * t + t_index)."""
    image = jnp.swapaxes(spectrogram, 1, 2)[..., None]
    patches = PatchProjection(self.width, (self.patch_size, self.patch_time or self.patch_size),
                              (self.fstride, self.tstride), self.dtype, name="proj")(image, patch)
    batch, freq, time, width = patches.shape
    return patches.reshape(batch, freq * time, width)


class AST(nn.Module):
  """Audio Spectrogram Transformer. `__call__` returns (logits `[batch, classes]`, intermediates)."""

  num_classes: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  patch_size: int = 16
  fstride: int = 10
  tstride: int = 10
  patch_time: int = 0  # > 0: rectangular patches of patch_size mel bins x patch_time frames
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6  # timm's, in the backbone
  head_layer_norm_eps: float = 1e-5  # the head's LayerNorm is PyTorch's default, not timm's 1e-6
  attention: str = "auto"  # auto | xla | blockwise | cudnn (ast_jax/models/attention.py)
  remat: str = "none"  # none | full | dots | dots_no_batch
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array, *, train: bool = False, patch: tuple[int, int] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`patch` (frequency, time), static: run at another patch shape (FlexiAST): patches of that shape, the patch
    kernel PI-resized to it, each stride scaled with its patch side (non-overlapping patches stay non-overlapping;
    an overlapping model keeps its overlap ratio and needs whole scaled strides), and the positional grid resized
    (bilinear, antialias) to the new grid."""
    batch, frames, mel_bins = spectrogram.shape
    own = (self.patch_size, self.patch_time or self.patch_size)
    patch = None if patch is None or tuple(patch) == own else tuple(int(size) for size in patch)
    freq, time = patch_grid(mel_bins, frames, self.patch_size, self.fstride, self.tstride, self.patch_time)
    if patch is not None:
      base_grid = (freq, time)
      freq, time = patch_grid(mel_bins, frames, patch[0], *scaled_strides(own, (self.fstride, self.tstride), patch),
                              patch[1])
    tokens = PatchEmbed(self.width, self.patch_size, self.fstride, self.tstride, self.dtype, self.patch_time,
                        name="patch_embed")(spectrogram.astype(self.dtype), patch)
    cls_token = self.param("cls_token", with_names(trunc_normal, None, None, "embed"), (1, 1, self.width))
    dist_token = self.param("dist_token", with_names(trunc_normal, None, None, "embed"), (1, 1, self.width))
    prefix = jnp.concatenate([cls_token, dist_token], axis=1).astype(self.dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(prefix, (batch, 2, self.width)), tokens], axis=1)
    if patch is None:
      pos_embed = self.param("pos_embed", with_names(trunc_normal, None, None, "embed"),
                             (1, freq * time + 2, self.width))
    else:  # the table is stored on the model's own grid
      pos_embed = self.param("pos_embed", with_names(trunc_normal, None, None, "embed"),
                             (1, base_grid[0] * base_grid[1] + 2, self.width))
      pos_embed = resize_pos_grid(pos_embed, base_grid, (freq, time))
    tokens = tokens + pos_embed.astype(self.dtype)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    tokens = Encoder(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout, self.attention_dropout,
                     self.layer_norm_eps, attention=self.attention, remat=self.remat, scan_layers=self.scan_layers,
                     dtype=self.dtype, name="encoder")(tokens, train=train)
    pooled = (tokens[:, 0] + tokens[:, 1]) / 2
    logits = ClassifierHead(self.num_classes, self.head_layer_norm_eps, self.dtype, name="head")(pooled)
    return logits, {"embedding": pooled.astype(jnp.float32), "tokens": tokens}


class ClassifierHead(nn.Module):
  """LayerNorm + Linear on the pooled embedding; outputs raw logits in float32."""

  num_classes: int
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array) -> jax.Array:
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm")(pooled)
    logits = dense(self.num_classes, "embed", "classes", self.dtype, "dense")(normed)
    return logits.astype(jnp.float32)


def model_kwargs(model_config: Mapping[str, Any], module: type = AST) -> dict[str, Any]:
  """Resolves a `config.model` (variant name or explicit width/depth/num_heads) into `module`'s constructor
  kwargs (AST's, or another ViT-backbone model's: the fields it shares with `config.model`)."""
  variant = model_config.get("variant", "base")
  if variant and variant not in VARIANTS:
    raise ValueError(f"unknown AST variant {variant!r}; choose one of {sorted(VARIANTS)} or set width/depth/num_heads")
  width, depth, num_heads = VARIANTS[variant] if variant else (0, 0, 0)
  width = model_config.get("width") or width
  depth = model_config.get("depth") or depth
  num_heads = model_config.get("num_heads") or num_heads
  if not (width and depth and num_heads):
    raise ValueError("config.model needs a variant or all of width, depth and num_heads")
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(model_config.get("dtype", "float32"))
  if dtype is None:
    raise ValueError(f"config.model.dtype must be float32 or bfloat16, not {model_config.get('dtype')!r}")
  remat = model_config.get("remat", "none")
  remat = {True: "full", False: "none"}.get(remat, remat)  # model directories written before remat policies
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat must be one of {sorted(REMAT_POLICIES)}, not {remat!r}")
  attention = model_config.get("attention", "auto")
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, not {attention!r}")
  fields = {f.name for f in dataclasses.fields(module)}
  extra = {key: model_config[key] for key in ("mlp_ratio", "patch_size", "patch_time", "fstride", "tstride",
                                               "dropout", "attention_dropout", "layer_norm_eps",
                                               "head_layer_norm_eps", "scan_layers", "pooling", "positions",
                                               "scale_logits")
           if key in model_config and key in fields}
  return dict(width=width, depth=depth, num_heads=num_heads, dtype=dtype, remat=remat, attention=attention, **extra)
