"""AST: the Audio Spectrogram Transformer (Gong et al. 2021) in Flax Linen.

spectrogram [rows, frames, mel_bins] -> overlapping 16x16 patches (fstride, tstride), frequency-major tokens ->
[cls, dist] prefix + learned positional embedding -> ViT encoder -> pooled (cls + dist) / 2 -> LayerNorm + Linear.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.audio.patches import patch_grid, patch_of, scaled_strides, stored_patch, strides_of
from ast_jax.models import flops as flops_lib
from ast_jax.models.family import FLEXI_PATCH, TIME_COMPRESSION, Family
from ast_jax.models.positions import resize_table
from ast_jax.models.heads import ClassifierHead
from ast_jax.models.tokens import PatchEmbed, TokenLayout, whole_clip_rows
from ast_jax.models.vit import Dtype, Encoder, trunc_normal, vit_kwargs, with_names


class AST(nn.Module):
  """Audio Spectrogram Transformer. `__call__` returns (logits `[rows, classes]`, intermediates)."""

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
  def __call__(self, spectrogram: jax.Array, layout: TokenLayout | None = None, *, train: bool = False,
               patch: tuple[int, int] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """spectrogram: whole-clip rows `[rows, frames, mel_bins]` (AST takes no packed layout).

    `patch` (frequency, time), static: run at another patch shape (FlexiAST): patches of that shape, the patch
    kernel PI-resized to it, each stride scaled with its patch side (non-overlapping patches stay non-overlapping;
    an overlapping model keeps its overlap ratio and needs whole scaled strides), and the positional grid resized
    (bilinear, antialias) to the new grid."""
    batch, frames, mel_bins = whole_clip_rows(spectrogram, layout, "AST").shape
    own, strides = stored_patch(self.patch_size, self.patch_time), (self.fstride, self.tstride)
    patch = None if patch is None or tuple(patch) == own else tuple(int(size) for size in patch)
    freq, time = patch_grid(mel_bins, frames, own, strides)
    if patch is not None:
      base_grid = (freq, time)
      freq, time = patch_grid(mel_bins, frames, patch, scaled_strides(own, strides, patch))
    tokens = PatchEmbed(self.width, own, strides, self.dtype, name="patch_embed")(spectrogram.astype(self.dtype),
                                                                                 patch)
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
      pos_embed = resize_table(pos_embed, base_grid, (freq, time), rule="antialias")
    tokens = tokens + pos_embed.astype(self.dtype)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    tokens = Encoder(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout, self.attention_dropout,
                     self.layer_norm_eps, attention=self.attention, remat=self.remat, scan_layers=self.scan_layers,
                     dtype=self.dtype, name="encoder")(tokens, train=train)
    pooled = (tokens[:, 0] + tokens[:, 1]) / 2
    logits = ClassifierHead(self.num_classes, self.head_layer_norm_eps, self.dtype, name="head")(pooled)
    return logits, {"embedding": pooled.astype(jnp.float32), "tokens": tokens, "patch_tokens": tokens[:, 2:]}


def flops(config: Any) -> dict[str, float]:
  """AST's analytic FLOPs (models/flops.py): tokens = patches + the 2 prefix tokens; a 'patch' phase counts the
  stored kernel at its run shape, FlexiAST training the expectation over the drawn shapes."""
  from ast_jax.audio.features import FrontEnd

  kwargs = vit_kwargs(config.model, AST)
  width, depth = kwargs["width"], kwargs["depth"]
  patch, strides = patch_of(config.model), strides_of(config.model)
  if config.model.get("run_patch"):  # the stored kernel run at another shape (a 'patch' training phase)
    run_patch = tuple(config.model.run_patch)
    patch, strides = run_patch, scaled_strides(patch, strides, run_patch)
  frames = FrontEnd.from_config(config.audio).frames  # pooled along time in a coarse phase
  freq, time = patch_grid(config.audio.num_mel_bins, frames, patch, strides)
  shape = dict(width=width, depth=depth, mlp_dim=kwargs.get("mlp_ratio", 4) * width, num_tokens=freq * time + 2,
               patch_size=patch, num_patches=freq * time, num_classes=config.num_classes)
  train_flops = None
  if config.model.get("flexi_patch_sizes"):
    shape["num_tokens"], train_flops = flops_lib.flexi_mean(config, shape, patch)
  return flops_lib.summary(shape, freq=freq, time=time, batch=config.data.batch_size, train_flops=train_flops)


FAMILY = Family(
    name="ast",
    model=AST,
    kwargs=lambda config: vit_kwargs(config.model, AST),
    flops=flops,
    weight_formats=("ast_jax", "hf", "original", "imagenet"),
    options=frozenset({FLEXI_PATCH, TIME_COMPRESSION}),
)
