"""ElasticAST (docs/BACKGROUND.md section 2): the ViT encoder on packed rows of clips of any length.

spectrogram slots `[rows, clips, frames, mel_bins]` + the packer's token layout -> non-overlapping patches gathered
into rows `[rows, row_tokens, patch_freq * patch_time]` (`models/tokens.py`) -> linear patch embedding ->
+ factorised positions (a frequency table and a time table, indexed by each patch's position inside its own clip)
-> the shared ViT encoder with attention masked to each token's own clip -> one pooled vector per clip (a learned
query attending to its clip, or the masked mean) -> LayerNorm + Linear.

Whole-clip rows `[rows, frames, mel_bins]` (no layout) run too: one clip per row, logits `[rows, classes]`.
The encoder, attention implementations and head are the AST's; only the tokeniser, positions, mask and pooling
differ.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.audio.patches import patch_of, stored_patch
from ast_jax.models import flops as flops_lib
from ast_jax.models.family import Family
from ast_jax.models.heads import POOLING, ClassifierHead, ClipAttentionPool, masked_mean
from ast_jax.models.positions import fractional_rows
from ast_jax.models.tokens import TokenLayout, one_patch_row, packed_patches
from ast_jax.models.vit import Dtype, Encoder, dense, trunc_normal, vit_kwargs, with_names

POSITIONS = ("integer", "fractional")


class ElasticAST(nn.Module):
  """`__call__(spectrogram, layout)` -> (logits `[rows, clips, classes]`, {"embedding": `[rows, clips, width]`,
  "tokens" and "patch_tokens": `[rows, row_tokens, width]`, in the layout's order}). Slots without a clip give meaningless outputs; the caller masks them
  with the batch's `clip_mask`."""

  num_classes: int
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  patch_size: int = 16
  patch_time: int = 0  # > 0: rectangular patches of patch_size mel bins x patch_time frames
  max_freq_patches: int = 8  # 128 mel bins
  max_time_patches: int = 64  # 1024 frames
  pooling: str = "attention"
  positions: str = "integer"  # integer: table row = in-clip position; fractional: any length spans the table
  scale_logits: bool = True  # False: upstream ElasticAST's unscaled attention logits (its released weights)
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  head_layer_norm_eps: float = 1e-5
  attention: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, spectrogram: jax.Array, layout: TokenLayout | None = None, *, train: bool = False,
               patch: tuple[int, int] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """spectrogram: packed slots `[rows, clips, frames, mel_bins]` with their `layout`, or whole-clip rows
    `[rows, frames, mel_bins]`. ElasticAST runs at its own patch shape (`patch` must be None or that shape)."""
    if self.pooling not in POOLING:
      raise ValueError(f"pooling {self.pooling!r} is not one of {POOLING}")
    if self.positions not in POSITIONS:
      raise ValueError(f"positions {self.positions!r} is not one of {POSITIONS}")
    own = stored_patch(self.patch_size, self.patch_time)
    if patch is not None and tuple(patch) != own:
      raise ValueError(f"ElasticAST runs at its own {own} patches, not {tuple(patch)}")
    whole_clips = layout is None
    patches, layout = packed_patches(spectrogram, layout, own)
    tokens = dense(self.width, None, "embed", self.dtype, "patch_embed")(patches.astype(self.dtype))
    freq_table = self.param("pos_embed_freq", with_names(trunc_normal, None, "embed"),
                            (self.max_freq_patches, self.width))
    time_table = self.param("pos_embed_time", with_names(trunc_normal, None, "embed"),
                            (self.max_time_patches, self.width))
    segment_ids = layout.segment_ids
    if self.positions == "fractional":
      extents = jnp.take_along_axis(layout.time_patches, jnp.maximum(segment_ids - 1, 0), axis=1)
      time_rows = fractional_rows(time_table, layout.time_positions, extents)
    else:
      time_rows = time_table[layout.time_positions]
    tokens = tokens + (freq_table[layout.freq_positions] + time_rows).astype(self.dtype)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    encoder = Encoder(self.depth, self.num_heads, self.mlp_ratio * self.width, self.dropout, self.attention_dropout,
                      self.layer_norm_eps, self.scale_logits, attention=self.attention, remat=self.remat,
                      scan_layers=self.scan_layers, dtype=self.dtype, name="encoder")
    # Each token attends to its own clip only: the blockwise kernel masks block by block from the segment ids.
    tokens = encoder(tokens, segment_ids=segment_ids, max_segments=layout.clips, train=train)
    if self.pooling == "attention":
      pooled = ClipAttentionPool(self.num_heads, self.dtype, name="pool")(tokens, segment_ids, layout.clips)
    else:
      pooled = masked_mean(tokens, segment_ids, layout.clips)
    if whole_clips:
      pooled = pooled[:, 0]
    logits = ClassifierHead(self.num_classes, self.head_layer_norm_eps, self.dtype, name="head")(pooled)
    return logits, {"embedding": pooled.astype(jnp.float32), "tokens": tokens, "patch_tokens": tokens}


def elastic_kwargs(config: Any) -> dict[str, Any]:
  """ElasticAST constructor kwargs from a config: the backbone from `config.model` (as AST), the tables' sizes
  from `config.audio` and `config.packing`."""
  kwargs = vit_kwargs(config.model, ElasticAST)
  patch_freq, patch_time = patch_of(config.model)
  kwargs.update(max_freq_patches=config.audio.num_mel_bins // patch_freq,
                max_time_patches=config.model.get("max_time_patches") or config.packing.max_frames // patch_time)
  return kwargs


def example_inputs(config: Any) -> tuple[jax.Array, TokenLayout]:
  """One packed row of one clip slot holding one patch (the shapes only fix the parameters)."""
  patch_freq, patch_time = patch_of(config.model)
  return one_patch_row(patch_time, patch_freq)


def flops(config: Any) -> dict[str, float]:
  """An "example" is a packed row of `packing.row_tokens` tokens, counted whole: padding tokens and attention
  between clips of a row are computed by the dense kernels, so they are counted too."""
  kwargs = vit_kwargs(config.model, ElasticAST)
  patch = patch_of(config.model)
  freq, time = config.audio.num_mel_bins // patch[0], config.packing.max_frames // patch[1]
  tokens = config.packing.row_tokens
  shape = dict(width=kwargs["width"], depth=kwargs["depth"], mlp_dim=kwargs.get("mlp_ratio", 4) * kwargs["width"],
               num_tokens=tokens, patch_size=patch, num_patches=tokens,
               num_classes=config.num_classes * config.packing.max_clips)
  return flops_lib.summary(shape, freq=freq, time=time, batch=config.packing.rows)


def config_problems(config: Any) -> list[str]:
  """ElasticAST's own options on packed rows: pooling, positions, a table for the longest clip, patches that do
  not overlap."""
  if "packing" not in config:
    return [f"model.name={config.model.name!r} trains on packed rows and needs a packing section: build the config "
            "with configs.common.elastic(config)"]
  packing, model = config.packing, config.model
  patch, patch_time = patch_of(model)
  problems = []  # the packing section itself: train/config_checks.py, for every family that packs rows
  for field, value, choices in (("model.pooling", model.pooling, POOLING), ("model.positions", model.positions,
                                                                             POSITIONS)):
    if value not in choices:
      problems.append(f"{field}={value!r} is not one of {choices}")
  if model.positions == "integer":
    table = model.max_time_patches or packing.max_frames // patch_time
    longest = max([packing.max_frames, *config.eval_sweep.lengths]) // patch_time
    if longest > table:
      problems.append(f"model.max_time_patches={table} rows cannot index {longest} time patches (packing.max_frames "
                      "or an eval_sweep length): raise max_time_patches or use model.positions='fractional'")
  if (model.fstride, model.tstride) != (patch, patch_time):
    problems.append(f"model.fstride/tstride={model.fstride}/{model.tstride}: ElasticAST's patches do not overlap; "
                    f"set them to the patch's size {patch}/{patch_time}")
  return problems


FAMILY = Family(
    name="elastic",
    model=ElasticAST,
    kwargs=elastic_kwargs,
    flops=flops,
    problems=config_problems,
    example_inputs=example_inputs,
    packed_input=True,
    weight_formats=("ast_jax", "torch"),
)
