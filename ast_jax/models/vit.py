"""The ViT encoder shared by every transformer variant: pre-LN blocks, attention with an optional mask or segment ids.

Parameter names follow timm's ViT (`qkv`, `proj`, `fc1`, `fc2`, `norm1`, `norm2`) so that weight conversion is a
rename plus a transpose (and, for the attention's per-head kernels, a reshape). Every parameter carries logical axis
names and activations are constrained by name (`ast_jax/parallel/sharding.py` maps names to mesh axes); outside a
mesh the names are inert. Blocks are stacked by `ast_jax/models/stack.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from ast_jax.models.attention import attend, attention_weights
from ast_jax.models.stack import REMAT_POLICIES, stack_blocks

Dtype = Any
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)


def with_names(init: Callable[..., Any], *names: str | None) -> Callable[..., Any]:
  """An initialiser whose parameter carries logical axis names (one per dimension)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, in_name: str | None, out_name: str | None, dtype: Dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=with_names(trunc_normal, in_name, out_name),
                  bias_init=with_names(nn.initializers.zeros_init(), out_name))


class HeadsDense(nn.Module):
  """A Dense over the last `in_axes` input axes into `features` axes: kernel `[*in, *features]`, bias `[*features]`,
  each axis with a logical name (the attention's per-head projections). Initialised as the flat Dense
  `[prod(in), prod(features)]` it reshapes."""

  features: tuple[int, ...]
  in_axes: int
  kernel_names: tuple[str | None, ...]
  bias_names: tuple[str | None, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    features, in_axes = tuple(self.features), self.in_axes

    def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
      flat = (math.prod(shape[:in_axes]), math.prod(shape[in_axes:]))
      return trunc_normal(key, flat, dtype).reshape(shape)

    kernel = self.param("kernel", with_names(kernel_init, *self.kernel_names),
                        (*inputs.shape[inputs.ndim - in_axes:], *features), jnp.float32)
    bias = self.param("bias", with_names(nn.initializers.zeros_init(), *self.bias_names), features, jnp.float32)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    contracted = tuple(range(inputs.ndim - in_axes, inputs.ndim))
    return jax.lax.dot_general(inputs, kernel, ((contracted, tuple(range(in_axes))), ((), ()))) + bias


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
  """Multi-head self-attention with a fused qkv projection, q, k and v in that order as timm/upstream.

  Parameters are laid out per head, so that tensor parallelism splits heads and never the q/k/v boundary:
  `qkv/kernel` `[embed, 3, heads, head_dim]`, `qkv/bias` `[3, heads, head_dim]`, `proj/kernel`
  `[heads, head_dim, embed]`, `proj/bias` `[embed]` (timm's `[3 * embed, embed]` rows are q, k, v, each heads-major:
  `ast_jax/convert/torch_layout.py` reshapes).
  """

  num_heads: int
  dropout: float = 0.0
  scale_logits: bool = True  # ElasticAST's released weights were trained without 1/sqrt(d_head)
  implementation: str = "auto"  # ast_jax/models/attention.py
  max_segments: int = 0  # the most segments a row holds (packed cuDNN's segment grid); 0: the row length
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """tokens `[batch, length, width]`; mask `[batch, 1 | heads, length, length]` (True = may attend) or segment ids
    `[batch, length]` (0 = padding; a token attends to its own segment only)."""
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention implementation {self.implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    width = tokens.shape[-1]
    head_dim = width // self.num_heads
    qkv = HeadsDense((3, self.num_heads, head_dim), 1, ("embed", None, "heads", None), (None, "heads", None),
                     self.dtype, name="qkv")(tokens)
    query, key, value = (constrain(qkv[:, :, i], "batch", "length", "act_heads", None) for i in range(3))
    if self.scale_logits:
      query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    if self.dropout and train:  # dropout on the attention weights needs them materialised
      weights = attention_weights(query, key, mask, segment_ids=segment_ids).astype(value.dtype)
      weights = nn.Dropout(self.dropout)(weights, deterministic=False)
      mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    else:
      mixed = attend(query, key, value, mask, self.implementation, segment_ids=segment_ids,
                     max_segments=self.max_segments or None)
    mixed = constrain(mixed, "batch", "length", "act_heads", None)
    return HeadsDense((width,), 2, ("heads", None, "embed"), ("embed",), self.dtype, name="proj")(mixed)


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
  max_segments: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array | None = None, train: bool = False,
               segment_ids: jax.Array | None = None) -> jax.Array:
    tokens = constrain(tokens, "batch", "length", "act_embed")
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm1")(tokens)
    attended = Attention(self.num_heads, self.attention_dropout, self.scale_logits, self.attention, self.max_segments,
                         self.dtype, name="attn")(normed, mask, segment_ids=segment_ids, train=train)
    tokens = tokens + nn.Dropout(self.dropout)(attended, deterministic=not train)
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm2")(tokens)
    hidden = Mlp(self.mlp_dim, self.dropout, self.dtype, name="mlp")(normed, train=train)
    return tokens + nn.Dropout(self.dropout)(hidden, deterministic=not train)


class _ScanBlock(Block):
  """A Block in the form `stack_blocks` runs (nn.scan's): (tokens, mask, train, segment_ids) -> (tokens, None)."""

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
               max_segments: int = 0, train: bool = False) -> jax.Array:
    """tokens `[batch, length, width]`; an optional mask or segment ids `[batch, length]` as `Attention` takes, with
    at most `max_segments` segments per row (0: unknown)."""
    fields = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
                  attention_dropout=self.attention_dropout, layer_norm_eps=self.layer_norm_eps,
                  scale_logits=self.scale_logits, attention=self.attention, max_segments=max_segments,
                  dtype=self.dtype)
    # Blocks take (tokens, mask, train, segment_ids): nn.remat counts `self`, so `train` is static argument 3.
    tokens = stack_blocks(_ScanBlock, fields, tokens, mask, train, segment_ids, depth=self.depth,
                          scan_layers=self.scan_layers, remat=self.remat, static_argnums=(3,))
    return layer_norm(self.layer_norm_eps, self.dtype, "norm")(tokens)


# DeiT sizes: (width, depth, heads).
VARIANTS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config.model fields a ViT-backbone module takes as they are, when it has the field.
_PASSED_FIELDS = ("mlp_ratio", "patch_size", "patch_time", "fstride", "tstride", "dropout", "attention_dropout",
                  "layer_norm_eps", "head_layer_norm_eps", "scan_layers", "pooling", "positions", "scale_logits")


def vit_kwargs(model_config: Any, module: type[nn.Module]) -> dict[str, Any]:
  """Resolves a `config.model` (variant name or explicit width/depth/num_heads) into the constructor kwargs of
  `module`, a model on this encoder (AST, ElasticAST): the fields it shares with `config.model`."""
  variant = model_config.get("variant", "base")
  if variant and variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)} or set width/depth/num_heads")
  width, depth, num_heads = VARIANTS[variant] if variant else (0, 0, 0)
  width = model_config.get("width") or width
  depth = model_config.get("depth") or depth
  num_heads = model_config.get("num_heads") or num_heads
  if not (width and depth and num_heads):
    raise ValueError("config.model needs a variant or all of width, depth and num_heads")
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
  dtype = DTYPES.get(model_config.get("dtype", "float32"))
  if dtype is None:
    raise ValueError(f"config.model.dtype must be one of {tuple(DTYPES)}, not {model_config.get('dtype')!r}")
  remat = model_config.get("remat", "none")
  remat = {True: "full", False: "none"}.get(remat, remat)  # model directories written before remat policies
  if remat not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat must be one of {sorted(REMAT_POLICIES)}, not {remat!r}")
  attention = model_config.get("attention", "auto")
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, not {attention!r}")
  fields = {field.name for field in dataclasses.fields(module)}
  extra = {key: model_config[key] for key in _PASSED_FIELDS if key in model_config and key in fields}
  return dict(width=width, depth=depth, num_heads=num_heads, dtype=dtype, remat=remat, attention=attention, **extra)
