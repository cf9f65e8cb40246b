"""The ViT encoder shared by every transformer variant: pre-LN blocks, attention with an optional mask or segment ids.

Parameter names follow timm's ViT (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, `norm2`) so that weight conversion is a
rename plus a transpose. Every parameter carries logical axis names and activations are constrained by name
(`ast_jax/parallel/sharding.py` maps names to mesh axes); outside a mesh the names are inert.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from ast_jax.models.attention import attend, attention_weights

Dtype = Any
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the elementwise work
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def with_names(init: Callable[..., Any], *names: str | None) -> Callable[..., Any]:
  """An initialiser whose parameter carries logical axis names (one per dimension)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, in_name: str | None, out_name: str | None, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=with_names(trunc_normal, in_name, out_name),
                  bias_init=with_names(nn.initializers.zeros_init(), out_name))


def layer_norm(epsilon: float, dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name,
                      scale_init=with_names(nn.initializers.ones_init(), "norm"),
                      bias_init=with_names(nn.initializers.zeros_init(), "norm"))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), as torch.nn.GELU(). Its backward pass reuses Phi(x) from the forward pass
  (d/dx = Phi(x) + x * phi(x)), which saves an erf per element of the backward pass."""
  return x * _normal_cdf(x)


def _normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2))))


def _gelu_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  cdf = _normal_cdf(x)
  return x * cdf, (x, cdf)


def _gelu_backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
  x, cdf = residuals
  pdf = jnp.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
  return (grad * (cdf + x * pdf),)


gelu.defvjp(_gelu_forward, _gelu_backward)


def constrain(tokens: jax.Array, *names: str | None) -> jax.Array:
  return nn.with_logical_constraint(tokens, names)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v as timm/upstream)."""

  num_heads: int
  dropout: float = 0.0
  scale_logits: bool = True  # ElasticAST's released weights were trained without 1/sqrt(d_head)
  implementation: str = "auto"  # ast_jax/models/attention.py
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """tokens `[batch, length, width]`; mask `[batch, 1 | heads, length, length]` (True = may attend) or segment ids
    `[batch, length]` (0 = padding; a token attends to its own segment only)."""
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {self.implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    batch, length, width = tokens.shape
    head_dim = width // self.num_heads
    qkv = dense(3 * width, "embed", "qkv", self.dtype, "qkv")(tokens)
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    query, key, value = (constrain(qkv[:, :, i], "batch", "length", "act_heads", None) for i in range(3))
    if self.scale_logits:
      query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    if self.dropout and train:  # dropout on the attention weights needs them materialised
      weights = attention_weights(query, key, mask, segment_ids=segment_ids).astype(value.dtype)
      weights = nn.Dropout(self.dropout)(weights, deterministic=False)
      mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    else:
      mixed = attend(query, key, value, mask, self.implementation, segment_ids=segment_ids)
    mixed = constrain(mixed, "batch", "length", "act_heads", None).reshape(batch, length, width)
    return dense(width, "heads", "embed", self.dtype, "proj")(mixed)


class Mlp(nn.Module):
  """Linear -> exact (erf) GELU -> Linear; exact GELU keeps parity with the reference weights."""

  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    width = tokens.shape[-1]
    hidden = dense(self.hidden, "embed", "mlp", self.dtype, "fc1")(tokens)
    hidden = constrain(gelu(hidden), "batch", "length", "act_mlp")
    hidden = nn.Dropout(self.dropout)(hidden, deterministic=not train)
    return dense(width, "mlp", "embed", self.dtype, "fc2")(hidden)


class Block(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  scale_logits: bool = True
  attention: str = "auto"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, train: bool = False,
               segment_ids: jax.Array | None = None) -> jax.Array:
    tokens = constrain(tokens, "batch", "length", "act_embed")
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm1")(tokens)
    attended = Attention(self.num_heads, self.attention_dropout, self.scale_logits, self.attention, self.dtype,
                         name="attn")(normed, mask, segment_ids=segment_ids, train=train)
    tokens = tokens + nn.Dropout(self.dropout)(attended, deterministic=not train)
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm2")(tokens)
    hidden = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(normed, train=train)
    return tokens + nn.Dropout(self.dropout)(hidden, deterministic=not train)


class _ScanBlock(Block):
  """A Block in nn.scan's (carry, input) -> (carry, output) form."""

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, train: bool = False,
               segment_ids: jax.Array | None = None):
    return super().__call__(tokens, mask, train, segment_ids), None


class Encoder(nn.Module):
  """`depth` blocks then the final LayerNorm. Returns `[batch, length, width]`.

  Unscanned, the blocks are `blocks_0 ... blocks_{depth-1}`; with `scan_layers` they are one `blocks` module
  whose parameters are stacked on a leading 'layers' axis (`ast_jax.models.layers` converts between the two).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_dropout: float = 0.0
  layer_norm_eps: float = 1e-6
  scale_logits: bool = True
  attention: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """tokens `[batch, length, width]`; an optional mask or segment ids `[batch, length]` as `Attention` takes."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    block_cls = _ScanBlock if self.scan_layers else Block
    if self.remat != "none":
      # Rematerialisation trades compute for activation memory on long sequences. Blocks take (tokens, mask, train,
      # segment_ids) by position: static_argnums counts `self`, so 3 is `train`.
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], static_argnums=(3,),
                           prevent_cse=not self.scan_layers)
    block = functools.partial(block_cls, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout,
                              self.layer_norm_eps, self.scale_logits, self.attention, self.dtype)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      blocks = scanned(self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.layer_norm_eps,
                       self.scale_logits, self.attention, self.dtype, name="blocks")
      tokens, _ = blocks(tokens, mask, train, segment_ids)
    else:
      for index in range(self.depth):
        tokens = block(name=f"blocks_{index}")(tokens, mask, train, segment_ids)
    return layer_norm(self.layer_norm_eps, self.dtype, "norm")(tokens)
