"""Evaluation sweeps: one trained model evaluated with clips capped at several lengths, framed at several time
resolutions q (frame shift `audio.frame_shift * q`), and (an AST with non-overlapping patches) run at several patch
sizes: the tests ElasticAST and FlexiAST were built to pass.

- ElasticAST (packed input): each clip is cut to the length cap (frames at the base frame shift) and keeps its
  own length below it; at resolution q every clip is framed at q times the frame shift. One compiled step serves
  every q (the shift is data); each cap compiles once.
- A fixed-length AST runs at input length = the cap, its positional table moved to that grid by upstream's rule
  (`models/positions.py`, rule 'upstream': centre cut when shorter, interpolation when longer), as one would run
  an AST at another length; at resolution q its input keeps `audio.target_length` frames at the coarser shift.
- Patch sizes (`config.eval_patch_sizes`, AST only): the model at patch p (square, or time-only with
  `model.flexi_axes='time'`), its kernel PI-resized (`models/flexi.py`) and its positional grid resized
  (`models/positions.py`).

Writes `<workdir>/sweep.csv`, `sweep.md` and `sweep.png`.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from ast_jax.audio.patches import patch_of

log = logging.getLogger(__name__)

METRICS = ("accuracy", "mAP", "mAUC", "d_prime", "loss")


def sweep_points(config: ml_collections.ConfigDict) -> list[tuple[str, int | None, float | None, int | None]]:
  """(kind, length, resolution, patch): every length at the base resolution, every resolution at the base length,
  then every patch size."""
  sweep = config.eval_sweep
  return ([("length", int(length), None, None) for length in sweep.lengths]
          + [("resolution", None, float(q), None) for q in sweep.resolutions]
          + [("patch", None, None, int(p)) for p in config.get("eval_patch_sizes", ())])


def patch_shape_of(config: ml_collections.ConfigDict, size: int) -> tuple[int, int]:
  """A swept patch size as (frequency, time): square, or time-only with `model.flexi_axes='time'`."""
  from ast_jax.models.flexi import flexi_shape

  return flexi_shape(config, size)


def run_sweep(config: ml_collections.ConfigDict, params: Any, inputs: Any, mesh: Any, rules: Any,
              param_shardings: Any, workdir: str, shard_index: int = 0, shard_count: int = 1) -> list[dict[str, Any]]:
  """Evaluates host `params` (in the training layout) at every sweep point; writes the table and the plot."""
  from ast_jax.models import build_model
  from ast_jax.parallel import batch_sharding, put_host_tree, sharded_jit
  from ast_jax.train.evaluate import evaluate_params
  from ast_jax.train.steps import make_eval_step

  host = dict(shard_index=shard_index, shard_count=shard_count)
  records = []
  packed_step = None
  for kind, length, resolution, patch in sweep_points(config):
    if patch is not None:
      shape = patch_shape_of(config, patch)
      step = sharded_jit(make_eval_step(build_model(config), config, shape), mesh, rules,
                         in_shardings=(param_shardings, batch_sharding(mesh, rules)))
      point_params = put_host_tree(params, param_shardings)
      batches = inputs.eval_batches(**host)
      shown_length = config.audio.target_length
    elif inputs.packed:
      if packed_step is None:
        packed_step = sharded_jit(make_eval_step(build_model(config), config), mesh, rules,
                                  in_shardings=(param_shardings, batch_sharding(mesh, rules)))
        device_params = put_host_tree(params, param_shardings)
      step, point_params = packed_step, device_params
      batches = inputs.eval_batches(**host, length=length, resolution=resolution)
      shown_length = length or config.packing.max_frames
    else:
      point = point_config(config, length, resolution)
      step = sharded_jit(make_eval_step(build_model(point), point), mesh, rules,
                         in_shardings=(param_shardings, batch_sharding(mesh, rules)))
      point_params = put_host_tree(moved_params(params, config, point), param_shardings)
      batches = inputs.eval_batches(**host, config=point)
      shown_length = point.audio.target_length
    metrics = evaluate_params(step, point_params, batches, mesh, rules)
    own = patch_of(config.model)[1]
    record = {"sweep": kind, "length": shown_length, "resolution": resolution or 1.0, "patch": patch or own,
              **metrics}
    records.append(record)
    log.info("sweep %s: length %d, q %.2f, patch %d: %s %.4f", kind, record["length"], record["resolution"],
             record["patch"], config.train.main_metric, record.get(config.train.main_metric, float("nan")))
  if jax.process_index() == 0:
    write_sweep(records, workdir, config.train.main_metric)
  return records


def point_config(config: ml_collections.ConfigDict, length: int | None, resolution: float | None
                 ) -> ml_collections.ConfigDict:
  """A fixed-length AST's config at one sweep point: input length `length`, or frame shift times `resolution`."""
  point = ml_collections.ConfigDict(config.to_dict())
  if length is not None:
    point.audio.target_length = int(length)
  if resolution is not None:
    point.audio.frame_shift = config.audio.frame_shift * float(resolution)
  return point


def moved_params(params: Any, config: ml_collections.ConfigDict, point: ml_collections.ConfigDict) -> Any:
  """`params` with the positional table moved from `config`'s patch grid to `point`'s."""
  from ast_jax.audio.patches import patch_grid, patch_of, strides_of
  from ast_jax.models.positions import resize_table

  def grid(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    return patch_grid(cfg.audio.num_mel_bins, cfg.audio.target_length, patch_of(config.model), strides_of(config.model))

  moved = dict(params)
  moved["pos_embed"] = resize_table(params["pos_embed"], grid(config), grid(point), rule="upstream")
  return moved


def write_sweep(records: Sequence[dict[str, Any]], workdir: str, metric: str) -> None:
  path = os.path.join(workdir, "sweep.csv")
  columns = ["sweep", "length", "resolution", "patch", *[m for m in METRICS if m in records[0]], "num_examples"]
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
  with open(os.path.join(workdir, "sweep.md"), "w") as handle:
    handle.write(sweep_table({os.path.basename(os.path.normpath(workdir)): records}, metric))
  plot_sweeps({os.path.basename(os.path.normpath(workdir)): records}, metric, os.path.join(workdir, "sweep.png"))
  log.info("sweep written to %s (.csv, .md, .png)", os.path.splitext(path)[0])


def read_sweep(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "sweep.csv")) as handle:
    return [{key: value if key == "sweep" else float(value) for key, value in row.items()}
            for row in csv.DictReader(handle)]


def sweep_table(runs: dict[str, Sequence[dict[str, Any]]], metric: str) -> str:
  """A markdown table: one row per run, one column per sweep point, the metric in % for accuracy/mAP."""
  scale = 100.0 if metric in ("accuracy", "mAP", "mAUC") else 1.0
  first = next(iter(runs.values()))
  labels = {"length": lambda r: f"cap {int(r['length'])}", "resolution": lambda r: f"q = {r['resolution']:g}",
            "patch": lambda r: f"p = {int(r['patch'])}"}
  header = [labels[r["sweep"]](r) for r in first]
  lines = ["| model | " + " | ".join(header) + " | best - worst |", "|---" * (len(header) + 2) + "|"]
  for name, records in runs.items():
    values = [scale * float(r[metric]) for r in records]
    lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {max(values) - min(values):.1f} |")
  return "\n".join(lines) + "\n"


def plot_sweeps(runs: dict[str, Sequence[dict[str, Any]]], metric: str, path: str) -> None:
  """One panel per swept kind (length cap, q, patch size), the metric against it, one line per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(kind, label) for kind, label in (("length", "length cap (frames)"),
                                              ("resolution", "resolution q (frame shift x q)"),
                                              ("patch", "patch size"))
            if any(r["sweep"] == kind for records in runs.values() for r in records)]
  figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
  for axis, (kind, label) in zip(axes[0], panels):
    for name, records in runs.items():
      points = [(float(r[kind]), float(r[metric])) for r in records if r["sweep"] == kind]
      if points:
        axis.plot(*zip(*points), marker="o", label=name)
    axis.set(xlabel=label, title=kind)
    axis.grid(alpha=0.3)
    axis.legend()
  axes[0][0].set(ylabel=metric)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
