"""Model families, looked up by `config.model.name` (models/family.py), and the pieces they share: the tokeniser
(tokens.py), positional tables (positions.py), the ViT encoder (vit.py), heads (heads.py), block stacking
(stack.py) and FLOP counts (flops.py)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from ast_jax.models.family import Family, build_model, config_flops, example_inputs, family_of


def init_params(model: nn.Module, rng: jax.Array, *inputs: Any) -> Any:
  """Freshly initialised parameters as plain arrays (the logical axis names stripped; see parallel/sharding.py
  for creating them sharded). `inputs` (a spectrogram, and a token layout for packed rows) only fix the shapes."""
  return jax.jit(lambda rng, inputs: nn.meta.unbox(model.init(rng, *inputs)["params"]))(rng, inputs)


__all__ = ["Family", "build_model", "config_flops", "example_inputs", "family_of", "init_params"]
