"""Pooling and classifier heads shared by the backbones: one vector per clip, then LayerNorm + Linear."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.models.tokens import slot_mask
from ast_jax.models.vit import Dtype, dense, layer_norm, trunc_normal, with_names

POOLING = ("attention", "mean")


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


class ClipAttentionPool(nn.Module):
  """One learned query per clip attends (multi-head) to that clip's tokens only: `[rows, clips, width]`."""

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, segment_ids: jax.Array, clips: int) -> jax.Array:
    rows, _, width = tokens.shape
    query = self.param("query", with_names(trunc_normal, None, None, "embed"), (1, 1, width))
    queries = jnp.broadcast_to(query.astype(self.dtype), (rows, clips, width))
    mask = slot_mask(segment_ids, clips)[:, None]  # [rows, 1, clips, tokens]
    return nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, name="attention")(
        queries, tokens, mask=mask)


def masked_mean(tokens: jax.Array, segment_ids: jax.Array, clips: int) -> jax.Array:
  """`[rows, clips, width]`: each clip's mean token (zeros for an empty slot)."""
  weights = slot_mask(segment_ids, clips).astype(jnp.float32)
  total = jnp.einsum("rkt,rtd->rkd", weights, tokens.astype(jnp.float32))
  return total / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
