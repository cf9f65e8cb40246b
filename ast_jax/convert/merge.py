"""Loading a checkpoint into a model's parameters without silent partial loads.

Every checkpoint tensor is either used or reported as unused; every model tensor is either loaded, adapted
(positional embedding to a new grid) or reported as fresh (a head of another size). A backbone tensor that is
missing or has the wrong shape is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

import numpy as np

from ast_jax.convert import torch_layout

log = logging.getLogger(__name__)
HEAD_NAMES = ("mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias")


@dataclasses.dataclass
class LoadReport:
  loaded: list[str] = dataclasses.field(default_factory=list)
  adapted: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f"{len(self.loaded)} tensors loaded, adapted: {self.adapted or 'none'}, fresh: {self.fresh or 'none'}, "
            f"unused from the checkpoint: {self.unused or 'none'}")


def merge_timm_state(state: Mapping[str, np.ndarray], template: Mapping[str, Any], *,
                     source_grid: tuple[int, int], target_grid: tuple[int, int],
                     ignore: tuple[str, ...] = ()) -> tuple[dict[str, Any], LoadReport]:
  """Fills `template` (freshly initialised AST params) from `state` (timm names, see torch_layout).

  The positional embedding is cut or interpolated from `source_grid` to `target_grid` (rule 'upstream'); a head of
  another class count stays fresh; names in `ignore` (e.g. DeiT's ImageNet heads) are reported unused.
  """
  from ast_jax.models.positions import resize_table

  target = torch_layout.params_to_timm(template)
  report = LoadReport()
  problems = []
  merged = {}
  for name, fresh in target.items():
    if name not in state:
      if name in HEAD_NAMES:
        merged[name] = fresh
        report.fresh.append(name)
      else:
        problems.append(f"{name}: missing from the checkpoint (model expects {fresh.shape})")
      continue
    value = np.asarray(state[name], np.float32)
    if name == "pos_embed" and value.shape != fresh.shape:
      value = resize_table(value, source_grid, target_grid, rule="upstream")
      report.adapted.append(f"pos_embed {source_grid} -> {target_grid}")
    if value.shape != fresh.shape:
      if name in HEAD_NAMES:
        merged[name] = fresh
        report.fresh.append(f"{name} (checkpoint {value.shape}, model {fresh.shape})")
        report.unused.append(name)
        continue
      problems.append(f"{name}: checkpoint {value.shape}, model {fresh.shape}")
      continue
    merged[name] = value
    report.loaded.append(name)
  report.unused += sorted(set(state) - set(target))
  if problems:
    raise ValueError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
  unexpected = [name for name in report.unused if not name.startswith(ignore) and name not in HEAD_NAMES]
  if unexpected:
    log.warning("checkpoint tensors not used by the model: %s", unexpected)
  return torch_layout.timm_to_params(merged, torch_layout.depth_of(template), torch_layout.heads_of(template)), report
