"""Evaluation sweeps: one trained model evaluated with clips capped at several lengths and framed at several
time resolutions q (frame shift `audio.frame_shift * q`), the test ElasticAST was built to pass.

- ElasticAST (packed input): each clip is cut to the length cap (frames at the base frame shift) and keeps its
  own length below it; at resolution q every clip is framed at q times the frame shift. One compiled step serves
  every q (the shift is data); each cap compiles once.
- A fixed-length AST runs at input length = the cap, its positional table moved to that grid by upstream's rule
  (`convert/posembed.py:adapt_pos_embed`: centre cut when shorter, interpolation when longer), as one would run
  an AST at another length; at resolution q its input keeps `audio.target_length` frames at the coarser shift.

Writes `<workdir>/sweep.csv`, `sweep.md` and `sweep.png`.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

log = logging.getLogger(__name__)

METRICS = ("accuracy", "mAP", "mAUC", "d_prime", "loss")


def sweep_points(config: ml_collections.ConfigDict) -> list[tuple[str, int | None, float | None]]:
  """(kind, length, resolution): every length at the base resolution, then every resolution at the base length."""
  sweep = config.eval_sweep
  return ([("length", int(length), None) for length in sweep.lengths]
          + [("resolution", None, float(q)) for q in sweep.resolutions])


def run_sweep(config: ml_collections.ConfigDict, params: Any, inputs: Any, mesh: Any, rules: Any,
              param_shardings: Any, workdir: str, shard_index: int = 0, shard_count: int = 1) -> list[dict[str, Any]]:
  """Evaluates host `params` (in the training layout) at every sweep point; writes the table and the plot."""
  from ast_jax.models import build_model
  from ast_jax.parallel import batch_sharding, put_host_tree, sharded_jit
  from ast_jax.train.steps import make_eval_step, make_packed_eval_step
  from ast_jax.train.trainer import evaluate_params

  host = dict(shard_index=shard_index, shard_count=shard_count)
  records = []
  packed_step = None
  for kind, length, resolution in sweep_points(config):
    if inputs.packed:
      if packed_step is None:
        packed_step = sharded_jit(make_packed_eval_step(build_model(config), config), mesh, rules,
                                  in_shardings=(param_shardings, batch_sharding(mesh)))
        device_params = put_host_tree(params, param_shardings)
      step, point_params = packed_step, device_params
      batches = inputs.eval_batches(**host, length=length, resolution=resolution)
      shown_length = length or config.packing.max_frames
    else:
      point = point_config(config, length, resolution)
      step = sharded_jit(make_eval_step(build_model(point), point), mesh, rules,
                         in_shardings=(param_shardings, batch_sharding(mesh)))
      point_params = put_host_tree(moved_params(params, config, point), param_shardings)
      batches = inputs.eval_batches(**host, config=point)
      shown_length = point.audio.target_length
    metrics = evaluate_params(step, point_params, batches, mesh)
    record = {"sweep": kind, "length": shown_length, "resolution": resolution or 1.0, **metrics}
    records.append(record)
    log.info("sweep %s: length %d, q %.2f: %s %.4f", kind, record["length"], record["resolution"],
             config.train.main_metric, record.get(config.train.main_metric, float("nan")))
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
  from ast_jax.convert.posembed import adapt_pos_embed
  from ast_jax.models.ast import patch_grid

  model = config.model

  def grid(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    return patch_grid(cfg.audio.num_mel_bins, cfg.audio.target_length, model.patch_size, model.fstride, model.tstride,
                      model.get("patch_time", 0))

  moved = dict(params)
  moved["pos_embed"] = adapt_pos_embed(np.asarray(params["pos_embed"]), grid(config), grid(point))
  return moved


def write_sweep(records: Sequence[dict[str, Any]], workdir: str, metric: str) -> None:
  path = os.path.join(workdir, "sweep.csv")
  columns = ["sweep", "length", "resolution", *[m for m in METRICS if m in records[0]], "num_examples"]
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
  header = [f"cap {int(r['length'])}" if r["sweep"] == "length" else f"q = {r['resolution']:g}" for r in first]
  lines = ["| model | " + " | ".join(header) + " | best - worst |", "|---" * (len(header) + 2) + "|"]
  for name, records in runs.items():
    values = [scale * float(r[metric]) for r in records]
    lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {max(values) - min(values):.1f} |")
  return "\n".join(lines) + "\n"


def plot_sweeps(runs: dict[str, Sequence[dict[str, Any]]], metric: str, path: str) -> None:
  """Two panels, the metric against the length cap and against q, one line per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for name, records in runs.items():
    for axis, kind, key in ((axes[0], "length", "length"), (axes[1], "resolution", "resolution")):
      points = [(float(r[key]), float(r[metric])) for r in records if r["sweep"] == kind]
      if points:
        axis.plot(*zip(*points), marker="o", label=name)
  axes[0].set(xlabel="length cap (frames)", ylabel=metric, title="length")
  axes[1].set(xlabel="resolution q (frame shift x q)", title="time resolution")
  for axis in axes:
    axis.grid(alpha=0.3)
  (axes[0] if axes[0].lines else axes[1]).legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
