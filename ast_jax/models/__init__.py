"""Model families. `build_model(config)` picks one by `config.model.name`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from ast_jax.models.ast import AST, VARIANTS, patch_grid


def build_model(config: Any) -> nn.Module:
  """The model a config names, with `config.num_classes` outputs."""
  name = config.model.get("name", "ast")
  if name == "ast":
    from ast_jax.models.ast import model_kwargs

    return AST(num_classes=config.num_classes, **model_kwargs(config.model))
  if name == "elastic":
    from ast_jax.models.elastic import ElasticAST, elastic_kwargs

    return ElasticAST(num_classes=config.num_classes, **elastic_kwargs(config))
  if name == "aum":
    from ast_jax.models.aum import AuM, aum_kwargs

    return AuM(num_classes=config.num_classes, **aum_kwargs(config.model))
  raise ValueError(f"unknown model {name!r}; available: 'ast', 'elastic', 'aum'")


def example_inputs(config: Any) -> tuple[jax.Array, ...]:
  """Inputs of the shapes the config's model takes (one example or row), for initialisation."""
  import jax.numpy as jnp

  if config.model.get("name", "ast") == "elastic":
    tokens, values = 8, config.model.patch_size * (config.model.get("patch_time") or config.model.patch_size)
    zeros = jnp.zeros((1, tokens), jnp.int32)
    return (jnp.zeros((1, tokens, values), jnp.float32), jnp.ones((1, tokens), jnp.int32), zeros, zeros,
            jnp.ones((1, config.packing.max_clips), jnp.int32))
  from ast_jax.audio.features import FrontEnd

  frames = FrontEnd.from_config(config.audio).frames  # pooled along time in a coarse training phase
  return (jnp.zeros((1, frames, config.audio.num_mel_bins), jnp.float32),)


def init_params(model: nn.Module, rng: jax.Array, spectrogram: jax.Array) -> Any:
  """Freshly initialised parameters as plain arrays (the logical axis names stripped; see parallel/sharding.py
  for creating them sharded). spectrogram `[batch, frames, mel_bins]` only fixes the shapes."""
  return jax.jit(lambda rng, x: nn.meta.unbox(model.init(rng, x)["params"]))(rng, spectrogram)


__all__ = ["AST", "VARIANTS", "build_model", "example_inputs", "init_params", "patch_grid"]
