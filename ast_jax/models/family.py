"""Model families: what the rest of the code may know about a backbone, looked up by `config.model.name`.

Each family module (`models/ast.py`, `models/elastic.py`, `models/aum.py`) ends with `FAMILY = Family(...)`: its
Linen module, how a config becomes the module's arguments, example inputs, the analytic FLOP count, the config
problems only it can spot, the batches it trains on (whole-clip rows or packed rows), the weight formats it reads
and writes, and the cross-cutting options it supports. Nothing outside this registry compares a model's name:
code asks the family.

`config.model.name` is a built-in family (`FAMILIES`) or the dotted path of a module that defines `FAMILY`
(`--config.model.name=my_package.my_family`): a new backbone needs no edit here.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# The built-in families, by the `config.model.name` that selects them (module ast_jax.models.<name>).
FAMILIES = ("ast", "elastic", "aum")

# Cross-cutting config options a family may support (anything not listed is refused by the config checks):
FLEXI_PATCH = "flexi_patch"  # another patch shape at run time: model.flexi_patch_sizes, eval_patch_sizes, run_patch
TIME_COMPRESSION = "time_compression"  # audio.time_pool and train.phases (coarse-to-fine training)
PACKED_ROWS = "packed_rows"  # packed rows when the config has a packing section (configs.common.packed_rows)
OPTIONS = (FLEXI_PATCH, TIME_COMPRESSION, PACKED_ROWS)


def whole_clip_example(config: Any) -> tuple[jax.Array, ...]:
  """One whole-clip row `[1, frames, mel_bins]` of the config's front end (pooled along time in a coarse phase)."""
  from ast_jax.audio.features import FrontEnd

  frames = FrontEnd.from_config(config.audio).frames
  return (jnp.zeros((1, frames, config.audio.num_mel_bins), jnp.float32),)


def no_problems(config: Any) -> list[str]:
  del config
  return []


@dataclasses.dataclass(frozen=True)
class Family:
  """A backbone as the trainer, config checks, converters, predict and bench see it.

  `model(num_classes=..., **kwargs(config))` is the Linen module; its `__call__(spectrogram, layout=None, *,
  train, patch=None)` returns (logits, {"embedding": pooled, "patch_tokens": each patch's output (optional: what
  predict --token_embeddings writes), ...}) for whole-clip rows `[rows, frames, mel_bins]`
  (logits `[rows, classes]`) or, when `trains_packed(config)`, packed rows `[rows, clips, frames, mel_bins]` with a
  `models.tokens.TokenLayout` (logits `[rows, clips, classes]`).
  `flops(config)` returns the analytic count as `models/flops.py:config_flops` documents.
  """

  name: str
  model: type[nn.Module]
  kwargs: Callable[[Any], dict[str, Any]]
  flops: Callable[[Any], dict[str, float]]
  problems: Callable[[Any], list[str]] = no_problems
  example_inputs: Callable[[Any], tuple[Any, ...]] = whole_clip_example
  packed_input: bool = False  # always trains on packed rows of clips of any length (data/packed_batches.py)
  weight_formats: tuple[str, ...] = ("ast_jax",)  # read and written by ast_jax.convert and config.init_from
  options: frozenset[str] = frozenset()  # of OPTIONS

  def build(self, config: Any) -> nn.Module:
    return self.model(num_classes=config.num_classes, **self.kwargs(config))

  def trains_packed(self, config: Any) -> bool:
    """Whether `config` trains and evaluates this family on packed rows (ElasticAST always; a family with the
    PACKED_ROWS option when the config has a packing section) rather than whole-clip rows."""
    return self.packed_input or (PACKED_ROWS in self.options and "packing" in config)


def family_of(name_or_config: Any) -> Family:
  """The family a name (or a config's `model.name`) selects."""
  name = name_or_config if isinstance(name_or_config, str) else name_or_config.model.get("name", "ast")
  if name in FAMILIES:
    module_name = f"ast_jax.models.{name}"
  elif "." in name:
    module_name = name
  else:
    raise ValueError(f"model.name={name!r} is not a model family: choose one of {FAMILIES} or give the dotted path "
                     "of a module that defines FAMILY")
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(f"model.name={name!r}: cannot import {module_name} ({error})") from None
  family = getattr(module, "FAMILY", None)
  if not isinstance(family, Family):
    raise ValueError(f"model.name={name!r}: {module_name} defines no FAMILY = Family(...)")
  return family


def families_with(option: str) -> tuple[str, ...]:
  """The built-in families that support `option`, for messages."""
  return tuple(name for name in FAMILIES if option in family_of(name).options)


def build_model(config: Any) -> nn.Module:
  """The model a config names, with `config.num_classes` outputs."""
  return family_of(config).build(config)


def example_inputs(config: Any) -> tuple[Any, ...]:
  """Inputs of the shapes the config's model takes (one row), for initialisation."""
  return family_of(config).example_inputs(config)


def config_flops(config: Any) -> dict[str, float]:
  """The analytic FLOP count of the config's model and input shape (`models/flops.py`)."""
  return family_of(config).flops(config)
