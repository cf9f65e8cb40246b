"""ElasticAST through the trainer: packed training and evaluation, packing efficiency in the logs, exact resume,
the evaluation sweeps (ElasticAST and fixed-length AST), and config errors that name the field."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest

from ast_jax.train.config_checks import ConfigError, validate_config
from ast_jax.train.trainer import train_and_evaluate
from configs import demo


def elastic_config(**train):
  config = demo.get_config("elastic")
  config.data.update(num_train_examples=96, num_eval_examples=24)
  config.model.update(width=32, depth=1, num_heads=2)
  config.packing.update(rows=2, eval_rows=2)
  config.train.update(epochs=2, log_every_steps=1, progress_bar=False, tensorboard=False, **train)
  config.optim.update(warmup_steps=2)
  return config


def read_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as handle:
    return [json.loads(line) for line in handle]


def read_params(workdir):
  from ast_jax.convert.model_dir import load_model_dir

  return load_model_dir(os.path.join(workdir, "model")).params


def test_elastic_trains_logs_packing_and_resumes_exactly(tmp_path):
  config = elastic_config(max_steps=6)
  straight = train_and_evaluate(config, str(tmp_path / "straight"))
  assert straight["num_examples"] == 24 and 0.0 <= straight["accuracy"] <= 1.0
  assert straight["packing_efficiency"] > 0.8 and straight["padded_efficiency"] < 0.6
  # measured on the batches (the mean over logged steps) and planned for the epoch: both close, both high
  assert abs(straight["train_packing_efficiency"] - straight["packing_efficiency"]) < 0.1

  # Stopped after step 3 (a checkpoint), then the same run to step 6: the same parameters.
  train_and_evaluate(elastic_config(max_steps=3), str(tmp_path / "resumed"))
  resumed = train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["step"] == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               read_params(tmp_path / "straight"), read_params(tmp_path / "resumed"))


def read_sweep(workdir):
  with open(os.path.join(workdir, "sweep.csv")) as handle:
    return list(csv.DictReader(handle))


@pytest.mark.slow  # 9 s; the ElasticAST learning test on FSDD writes a resolution sweep in the default run
@pytest.mark.parametrize("arg", ["elastic", "smoke"])
def test_sweep_writes_a_row_per_length_and_resolution(tmp_path, arg):
  config = elastic_config(max_steps=2) if arg == "elastic" else demo.get_config("smoke")
  config.data.update(num_train_examples=32, num_eval_examples=16)
  config.train.update(max_steps=2, progress_bar=False, tensorboard=False)
  config.eval_sweep.update(lengths=(64, 150), resolutions=(1.0, 2.5))
  train_and_evaluate(config, str(tmp_path))
  rows = read_sweep(tmp_path)
  assert [(r["sweep"], float(r["length"]), float(r["resolution"])) for r in rows][:2] == [
      ("length", 64.0, 1.0), ("length", 150.0, 1.0)]
  assert [float(r["resolution"]) for r in rows[2:]] == [1.0, 2.5]
  assert all(int(r["num_examples"]) == 16 and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
  assert os.path.getsize(tmp_path / "sweep.png") > 1000 and "cap 64" in (tmp_path / "sweep.md").read_text()
  # Evaluating at the trained length and resolution repeats the final evaluation.
  final = read_records(tmp_path)[-1]
  same = rows[2] if arg == "smoke" else rows[1]  # AST: q = 1 at its length; ElasticAST: cap 150 = max_frames
  np.testing.assert_allclose(float(same["loss"]), final["loss"], rtol=1e-4)


def test_fixed_ast_sweep_moves_the_positional_table():
  from ast_jax.train.eval_sweep import moved_params, point_config

  config = demo.get_config("smoke")  # 64 mel bins x 128 frames, 16x16 patches at stride 16: 4 x 8 tokens
  params = {"pos_embed": np.arange(1 * 34 * 2, dtype=np.float32).reshape(1, 34, 2), "other": np.ones(3)}
  longer = point_config(config, 256, None)
  assert longer.audio.target_length == 256 and config.audio.target_length == 128
  moved = moved_params(params, config, longer)
  assert moved["pos_embed"].shape == (1, 2 + 4 * 16, 2) and moved["other"] is params["other"]
  np.testing.assert_array_equal(moved["pos_embed"][:, :2], params["pos_embed"][:, :2])  # cls, dist untouched
  coarser = point_config(config, None, 2.0)
  assert coarser.audio.frame_shift == 20.0 and coarser.audio.target_length == 128


@pytest.mark.parametrize("override, message", [
    (dict(packing=dict(row_tokens=16)), "packing.row_tokens=16 cannot hold the longest clip"),
    (dict(packing=dict(resolutions=(0.5, 1.0))), "packing.resolutions"),
    (dict(packing=dict(method="next_fit")), "packing.method"),
    (dict(model=dict(positions="relative")), "model.positions"),
    (dict(model=dict(tstride=8)), "ElasticAST's patches do not overlap"),
    (dict(augment=dict(mixup=0.5)), "augment.mixup and augment.roll must be 0"),
    (dict(eval_sweep=dict(lengths=(600,))), "model.max_time_patches=9 rows cannot index 37 time patches"),
])
def test_bad_elastic_configs_name_the_field(override, message):
  config = elastic_config()
  for section, values in override.items():
    config[section].update(values)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate_config(config)


def test_fractional_positions_accept_lengths_beyond_the_table():
  config = elastic_config()
  config.model.positions = "fractional"
  config.eval_sweep.lengths = (600,)
  validate_config(config)


def test_packed_rows_accumulate_gradients_like_one_batch():
  """The one train step splits packed rows into micro-batches as it splits whole-clip rows: the update equals the
  update of the whole batch (each micro-batch weighted by its share of the real clips)."""
  import optax

  from ast_jax import data as data_lib
  from ast_jax.data.inputs import build_input
  from ast_jax.models import build_model, example_inputs, init_params
  from ast_jax.train.state import create_train_state
  from ast_jax.train.steps import make_train_step

  config = elastic_config()
  config.packing.rows = 4
  inputs = build_input(config, data_lib.build_sources(config), packed=True)
  batch = next(inputs.train_iterator(config.seed))
  assert batch["segment_ids"].shape[0] == 4 and len(set(batch["clip_mask"].sum(-1))) > 1  # rows differ in clips
  model = build_model(config)
  params = init_params(model, jax.random.key(0), *example_inputs(config))
  tx = optax.sgd(1.0)
  updated = {}
  for accum in (1, 2):
    config.train.grad_accum_steps = accum
    step = jax.jit(make_train_step(model, tx, lambda count: 1.0, config, jax.random.key(1)))
    state, metrics = step(create_train_state(params, tx, False), batch)
    updated[accum] = (float(metrics["loss"]), state.params)
  assert updated[1][0] == pytest.approx(updated[2][0], rel=1e-5)
  for one, two in zip(jax.tree.leaves(updated[1][1]), jax.tree.leaves(updated[2][1])):
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-6)

