"""`config.init_from`: start training from another checkpoint's weights instead of a random initialisation
(AST: ImageNet DeiT/ViT, upstream AST, Hugging Face, ast_jax; AuM: upstream AuM `.pth`, `aum:PATH`)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from ast_jax.convert import hf, model_dir, original, torch_layout
from ast_jax.convert.merge import merge_timm_state
from ast_jax.audio.patches import patch_grid, patch_of, strides_of
from ast_jax.models.family import family_of

log = logging.getLogger(__name__)
KINDS = ("imagenet", "original", "hf", "ast_jax", "aum")


def _grid(model: Mapping[str, Any], mel_bins: int, frames: int) -> tuple[int, int]:
  return patch_grid(mel_bins, frames, patch_of(model), strides_of(model))


def initial_params(init_from: str, template: Mapping[str, Any], config: Any) -> dict[str, Any]:
  """Loads `init_from` ('KIND:PATH') into `template`'s structure; logs what was loaded, adapted and left fresh."""
  kind, _, path = init_from.partition(":")
  if kind not in KINDS or not path:
    raise ValueError(f"config.init_from={init_from!r}: expected 'KIND:PATH' with KIND one of {KINDS}")
  family = family_of(config)
  if kind not in family.weight_formats:
    raise ValueError(f"config.init_from={init_from!r}: a {family.name!r} model reads weights from "
                     f"{', '.join(family.weight_formats)}, not {kind!r}")
  mel_bins, frames = config.audio.num_mel_bins, config.audio.target_length
  target_grid = _grid(config.model, mel_bins, frames)
  if "aum" in family.weight_formats:  # the family's own layout is upstream AuM's state dict
    params, report = _aum_initial_params(kind, path, template, target_grid, family)
    log.info("init from %s: %s", init_from, report.summary())
    return params
  if kind == "imagenet":
    from ast_jax.convert.imagenet import imagenet_init, read_state_dict

    params, report = imagenet_init(read_state_dict(path), template, new_grid=target_grid)
    log.info("init from %s: loaded %d, fresh %s, unused %s", init_from, len(report["loaded"]), report["fresh"],
             report["unused"])
    return params
  if kind == "original":
    params, report = original.load_original(path, template, config.model, mel_bins, frames)
  else:
    if kind == "hf":
      source, _ = hf.load_hf(path)
    else:
      source = model_dir.load_model_dir(path)
    source_grid = _grid(source.config.model, source.config.audio.num_mel_bins, source.config.audio.target_length)
    params, report = merge_timm_state(torch_layout.params_to_timm(source.params), template,
                                      source_grid=source_grid, target_grid=target_grid)
  log.info("init from %s: %s", init_from, report.summary())
  return params


def _aum_initial_params(kind: str, path: str, template: Mapping[str, Any], grid: tuple[int, int],
                        family: Any) -> tuple[dict[str, Any], Any]:
  """Audio Mamba from an upstream AuM `.pth` ('aum:PATH') or an ast_jax AuM model directory ('ast_jax:DIR')."""
  from ast_jax.convert.aum import from_upstream, load_upstream, to_upstream

  if kind == "aum":
    return load_upstream(path, template, grid)
  source = model_dir.load_model_dir(path)
  if family_of(source.config) is not family:
    raise ValueError(f"config.init_from=ast_jax:{path} holds a {family_of(source.config).name!r} model, "
                     f"not a {family.name!r} one")
  return from_upstream(to_upstream(source.params), template, grid)
