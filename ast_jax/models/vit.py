"""The ViT encoder shared by every transformer variant: pre-LN blocks, attention with an optional mask.

Parameter names follow timm's ViT (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, `norm2`) so that weight conversion is a
rename plus a transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v as timm/upstream)."""

  num_heads: int
  dropout: float = 0.0
  scale_logits: bool = True  # ElasticAST's released weights were trained without 1/sqrt(d_head)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    """tokens `[batch, length, width]`; mask `[batch, 1 | heads, length, length]` (True = may attend)."""
    batch, length, width = tokens.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=trunc_normal, name="qkv")(tokens)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.scale_logits:
      query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    # Two einsums and a softmax: on CPU this beats the generic dot_product_attention path (REFERENCE.md 7).
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="proj")(mixed)


class Mlp(nn.Module):
  """Linear -> exact (erf) GELU -> Linear; exact GELU keeps parity with the reference weights."""

  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    width = tokens.shape[-1]
    hidden = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal, name="fc1")(tokens)
    hidden = nn.gelu(hidden, approximate=False)
    hidden = nn.Dropout(self.dropout)(hidden, deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name="fc2")(hidden)


class Block(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  scale_logits: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
    normed = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm1")(tokens)
    attended = Attention(self.num_heads, self.attention_dropout, self.scale_logits, self.dtype, name="attn")(
        normed, mask, train=train)
    tokens = tokens + nn.Dropout(self.dropout)(attended, deterministic=not train)
    normed = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm2")(tokens)
    hidden = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(normed, train=train)
    return tokens + nn.Dropout(self.dropout)(hidden, deterministic=not train)


class Encoder(nn.Module):
  """`depth` blocks then the final LayerNorm. Returns `[batch, length, width]`."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  scale_logits: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    # Rematerialisation trades compute for activation memory on long sequences.
    block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
    for index in range(self.depth):
      block = block_cls(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.layer_norm_eps,
                        self.scale_logits, self.dtype, name=f"blocks_{index}")
      tokens = block(tokens, mask, train)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(tokens)
