"""Packing throughput: ElasticAST's train step on packed rows of real clips against a fixed-length AST padded to
the longest clip, both timed through the trainer's own steps (front end on the device included).

  python -m ast_jax.bench.packed_vs_padded --config=configs/fsdd.py:elastic --out=docs/bench/packing_cpu.csv

Cases: the ElasticAST recipe as configured (its resolutions q), the same at q = 1 only, and an AST with the same
backbone and the same patches (non-overlapping, `model.patch_size`) with every clip padded to the longest clip of
the training set, batch `--ast_batch`. Each case: `--batches` real batches are read first (input time is not
timed), the step is compiled, `--warmup` steps run untimed, then the median of the timed steps is taken.
clips/s = clips per step / step time (a packed step's clips vary: their mean over the batches is used);
tokens_per_step is the step's token capacity, real_tokens_per_step the tokens holding clip frames (not padding),
token_efficiency their ratio.
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ast_jax.audio.patches import patch_of

_CONFIG = config_flags.DEFINE_config_file("config", None, "An ElasticAST config (model.name='elastic').",
                                          lock_config=False)
_OUT = flags.DEFINE_string("out", "bench_out/packing/packing.csv", "CSV to write.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Distinct real batches cycled through.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.", lower_bound=0)
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed steps; the median is reported.", lower_bound=1)
_AST_BATCH = flags.DEFINE_integer("ast_batch", 32, "Clips per step of the padded AST.", lower_bound=1)

log = logging.getLogger(__name__)


def padded_ast_config(config: ml_collections.ConfigDict, longest_frames: int, batch: int) -> ml_collections.ConfigDict:
  """The same backbone and patches as an AST: every clip padded to `longest_frames` (rounded up to whole patches)."""
  patch, patch_time = patch_of(config.model)
  ast = ml_collections.ConfigDict({key: value for key, value in config.to_dict().items() if key != "packing"})
  ast.model.name = "ast"
  ast.model.update(fstride=patch, tstride=patch_time)
  ast.audio.target_length = -(-longest_frames // patch_time) * patch_time
  ast.data.update(batch_size=batch, eval_batch_size=batch)
  return ast


def time_case(name: str, config: ml_collections.ConfigDict, sources: Any) -> dict[str, Any]:
  """Builds the trainer's state and step for `config` on one device and times it on real batches."""
  from ast_jax.audio import FrontEnd
  from ast_jax.audio.fbank import num_frames
  from ast_jax.data.inputs import build_input
  from ast_jax.models import build_model, config_flops, family_of
  from ast_jax.parallel import batch_sharding, global_batch, logical_rules, make_mesh, replicated, sharded_jit
  from ast_jax.train.optim import make_optimizer, make_schedule
  from ast_jax.train.steps import make_train_step
  from ast_jax.train.trainer import initial_state

  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh, rules = make_mesh(config.mesh, jax.devices()[:1]), logical_rules(config.sharding_rules)
  inputs = build_input(config, sources, packed=family_of(config).trains_packed(config))
  model = build_model(config)
  schedule = make_schedule(config.optim, inputs.steps_per_epoch, 10 * inputs.steps_per_epoch)
  tx = make_optimizer(config.optim, schedule)
  state, shardings = initial_state(config, model, tx, mesh, rules, jax.random.key(0))
  step = sharded_jit(make_train_step(model, tx, schedule, config, jax.random.key(1)), mesh, rules,
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
  iterator = inputs.train_iterator(config.seed)
  host_batches = [next(iterator) for _ in range(_BATCHES.value)]
  if inputs.packed:
    clips = [float(b["clip_mask"].sum()) for b in host_batches]
    tokens = [float((b["segment_ids"] > 0).sum()) for b in host_batches]
    capacity = config.packing.rows * config.packing.row_tokens
  else:  # real tokens: the patches holding a clip's own frames (at least one per frequency row)
    counts = config_flops(config)
    options = FrontEnd.from_config(config.audio).fbank_options()
    clips = [float(b["clip_mask"].sum()) for b in host_batches]
    def real(num_samples: int) -> int:
      return counts["freq"] * min(counts["time"], max(1, num_frames(int(num_samples), options) // config.model.tstride))

    tokens = [float(sum(real(n) for n in b["num_samples"][b["clip_mask"] > 0])) for b in host_batches]
    capacity = counts["num_patches"] * config.data.batch_size
  batches = [global_batch(mesh, b, rules) for b in host_batches]
  start = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for i in range(_WARMUP.value):
    state, metrics = step(state, batches[(i + 1) % len(batches)])
  jax.block_until_ready(metrics)
  times, used = [], []
  for i in range(_REPEATS.value):
    index = (i + 1 + _WARMUP.value) % len(batches)
    start = time.perf_counter()
    state, metrics = step(state, batches[index])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    used.append(index)
  seconds = statistics.median(times)
  mean_clips = float(np.mean([clips[i] for i in used]))
  mean_tokens = float(np.mean([tokens[i] for i in used]))
  row = dict(case=name, model=config.model.name, patch=config.model.patch_size,
             frames=config.audio.target_length if not inputs.packed else config.packing.max_frames,
             resolutions=" ".join(f"{q:g}" for q in config.packing.resolutions) if inputs.packed else "1",
             rows_or_batch=config.packing.rows if inputs.packed else config.data.batch_size,
             row_tokens=config.packing.row_tokens if inputs.packed else "",
             clips_per_step=mean_clips, tokens_per_step=capacity, real_tokens_per_step=mean_tokens,
             token_efficiency=mean_tokens / capacity,
             compile_s=compile_s, ms_per_step=1e3 * seconds, clips_per_sec=mean_clips / seconds,
             device=jax.devices()[0].device_kind, warmup=_WARMUP.value, repeats=_REPEATS.value,
             date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), jax_version=jax.__version__)
  log.info("%s: %.1f clips/step, %.0f ms/step, %.1f clips/s (compile %.1f s)", name, mean_clips, 1e3 * seconds,
           row["clips_per_sec"], compile_s)
  return row


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  logging.getLogger("ast_jax").setLevel(logging.INFO)
  from ast_jax import data as data_lib
  from ast_jax.audio.fbank import num_frames
  from ast_jax.data.inputs import packing_spec
  from ast_jax.data.packed_batches import clip_lengths
  from ast_jax.models import family_of

  config = _CONFIG.value
  if config is None or not family_of(config).trains_packed(config):
    raise app.UsageError("--config must be an ElasticAST config (e.g. configs/fsdd.py:elastic)")
  sources = data_lib.build_sources(config)
  spec = packing_spec(config)
  longest = max(num_frames(int(min(n, spec.max_samples)), spec.fbank_options())
                for n in clip_lengths(sources.train, spec.sample_rate))
  q1 = ml_collections.ConfigDict(config.to_dict())
  q1.packing.resolutions = (1.0,)
  cases = [("elastic", config), ("elastic_q1", q1),
           ("ast_padded_to_longest", padded_ast_config(config, longest, _AST_BATCH.value))]
  rows = [time_case(name, ml_collections.ConfigDict(case.to_dict()), sources) for name, case in cases]
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
  print(open(_OUT.value).read())


if __name__ == "__main__":
  from ast_jax import runtime

  runtime.restart_with_tcmalloc()
  app.run(main)
