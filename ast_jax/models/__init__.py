"""Model families. `build_model(config)` picks one by `config.model.name`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from ast_jax.models.ast import AST, VARIANTS, patch_grid


def build_model(config: Any) -> nn.Module:
  """The model a config names, with `config.num_classes` outputs."""
  name = config.model.get("name", "ast")
  if name == "ast":
    from ast_jax.models.ast import model_kwargs

    return AST(num_classes=config.num_classes, **model_kwargs(config.model))
  raise ValueError(f"unknown model {name!r}; available: 'ast'")


__all__ = ["AST", "VARIANTS", "build_model", "patch_grid"]
