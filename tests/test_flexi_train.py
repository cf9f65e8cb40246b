"""FlexiAST through the model and the trainer: any patch size at inference, one compiled train step per size,
flexifying an ordinary AST checkpoint, and the patch-size sweep."""

from __future__ import annotations

import csv
import functools
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from ast_jax.audio import model_input
from ast_jax.models import build_model
from ast_jax.models.ast import AST
from ast_jax.models.tokens import PatchEmbed
from tests.references import flexi_patch_embed
from ast_jax.train.config_checks import ConfigError, validate_config
from ast_jax.train.losses import classification_loss
from ast_jax.train.state import create_train_state
from ast_jax.train.steps import make_train_step
from ast_jax.train.trainer import step_patch, train_and_evaluate
from configs import demo


def small_ast(**fields):
  return AST(num_classes=4, width=32, depth=1, num_heads=2, patch_size=16, fstride=16, tstride=16, **fields)


def test_patch_embed_at_any_size_is_the_pi_resized_conv():
  spectrogram = jax.random.normal(jax.random.key(0), (2, 128, 64))
  embed = PatchEmbed(32, (16, 16), (16, 16))
  params = nn.meta.unbox(embed.init(jax.random.key(1), spectrogram)["params"])
  kernel, bias = params["proj"]["kernel"], params["proj"]["bias"]
  for patch in [(8, 8), (24, 24), (16, 32), (12, 20)]:
    ours = embed.apply({"params": params}, spectrogram, patch)
    np.testing.assert_allclose(ours, flexi_patch_embed(spectrogram, kernel, bias, patch), rtol=1e-5, atol=1e-5)
  # its own size: the ordinary strided conv
  own = embed.apply({"params": params}, spectrogram)
  np.testing.assert_array_equal(own, embed.apply({"params": params}, spectrogram, (16, 16)))
  np.testing.assert_allclose(own, flexi_patch_embed(spectrogram, kernel, bias, 16), rtol=1e-5, atol=1e-5)


def test_ast_runs_at_every_patch_size_and_its_own_size_is_unchanged():
  model = small_ast()
  spectrogram = jax.random.normal(jax.random.key(0), (2, 128, 64))
  variables = model.init(jax.random.key(1), spectrogram)
  base, _ = model.apply(variables, spectrogram)
  np.testing.assert_array_equal(base, model.apply(variables, spectrogram, patch=(16, 16))[0])
  for patch in [(8, 8), (10, 10), (32, 32), (16, 8)]:
    logits, intermediates = jax.jit(lambda v, x, p=patch: model.apply(v, x, patch=p))(variables, spectrogram)
    assert logits.shape == (2, 4) and np.all(np.isfinite(logits))
    assert intermediates["tokens"].shape[1] == 2 + (64 // patch[0]) * (128 // patch[1])
  overlapping = AST(num_classes=4, width=32, depth=1, num_heads=2, patch_size=16, fstride=10, tstride=10)
  overlap_variables = overlapping.init(jax.random.key(1), spectrogram)
  # An overlapping model keeps its overlap ratio: strides (10, 10) become (10, 20) at 16 x 32 patches.
  _, intermediates = overlapping.apply(overlap_variables, spectrogram, patch=(16, 32))
  assert intermediates["tokens"].shape[1] == 2 + ((64 - 16) // 10 + 1) * ((128 - 32) // 20 + 1)
  with pytest.raises(ValueError, match="whole number"):  # stride 10 at 12 / 16 of the patch: 7.5
    overlapping.apply(overlap_variables, spectrogram, patch=(12, 12))


def flexi_config(**train):
  config = demo.get_config("smoke")
  config.data.update(num_train_examples=32, num_eval_examples=8, batch_size=4, eval_batch_size=4)
  config.model.flexi_patch_sizes = (8, 16, 32)
  config.train.update(log_every_steps=1, **train)
  return config


def test_random_patch_per_step_compiles_each_size_once(tmp_path, caplog):
  config = flexi_config(max_steps=8)
  shapes = [step_patch(config, step) for step in range(8)]
  assert set(shapes) == {(8, 8), (16, 16), (32, 32)} and shapes == [step_patch(config, s) for s in range(8)]
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.DEBUG):
      record = train_and_evaluate(config, str(tmp_path))
  finally:
    jax.config.update("jax_log_compiles", False)
  assert record["step"] == 8 and np.isfinite(record["loss"])
  messages = [r.getMessage() for r in caplog.records]
  compiled = [m for m in messages if "Compiling" in m and "train_step" in m]
  assert len(compiled) == 3, compiled  # one per patch size, never again
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train step for patch")]
  assert sorted(m.split()[4] for m in logged) == ["16x16", "32x32", "8x8"]


@pytest.mark.slow  # 13 s each; per-step patch sizes train in test_random_patch_per_step_compiles_each_size_once
@pytest.mark.parametrize("distill", [False, True])
def test_base_weight_adds_the_stored_size_loss(distill):
  """flexi_base_weight w: a step at a drawn size p takes (1 - w) loss(p) + w loss(stored size), with the drawn size's
  targets the labels or (flexi_distill) the stored size's own predictions; a step at the stored size is unchanged."""
  config = flexi_config()
  config.augment.update(freq_mask=0, time_mask=0, roll=0, mixup=0.0)  # deterministic features
  config.model.update(flexi_base_weight=0.25, flexi_distill=distill)
  validate_config(config)
  model = build_model(config)
  batch_size, samples = 4, int(config.audio.sample_rate * 0.4)
  waveforms = 0.1 * jax.random.normal(jax.random.key(0), (batch_size, samples))
  labels = jax.nn.one_hot(np.array([0, 1, 2, 3]) % config.num_classes, config.num_classes)
  mask = np.ones(batch_size, np.float32)
  batch = {"waveform": waveforms[:, None], "num_samples": np.full((batch_size, 1), samples, np.int32),
           "label": labels[:, None], "clip_mask": mask[:, None]}  # whole-clip rows (data/batch.py)
  features = model_input(waveforms, np.full(batch_size, samples, np.int32), config.audio.to_dict())
  params = model.init(jax.random.key(1), features)["params"]
  state = create_train_state(params, optax.sgd(0.0), False)

  @functools.partial(jax.jit, static_argnums=0)
  def loss_at(patch, targets):
    logits, _ = model.apply({"params": params}, features, patch=patch)
    return classification_loss(logits, targets, mask, "ce"), logits

  base, base_logits = loss_at((16, 16), labels)
  drawn_targets = jax.nn.softmax(base_logits) if distill else labels
  expected = 0.75 * loss_at((8, 8), drawn_targets)[0] + 0.25 * base
  for patch, loss in (((8, 8), expected), ((16, 16), base)):
    step = jax.jit(make_train_step(model, optax.sgd(0.0), lambda _: 0.0, config, jax.random.key(2), patch))
    np.testing.assert_allclose(step(state, batch)[1]["loss"], loss, rtol=1e-5)


@pytest.mark.slow  # two trainer runs; the default suite covers init_from (test_recipes) and patch-size steps here
def test_flexify_an_ast_checkpoint_and_sweep_patch_sizes(tmp_path):
  source = demo.get_config("smoke")  # an ordinary AST (16x16 patches at stride 16)
  source.data.update(num_train_examples=16, num_eval_examples=8, batch_size=4, eval_batch_size=4)
  source.train.max_steps = 2
  train_and_evaluate(source, str(tmp_path / "ast"))
  config = flexi_config(max_steps=3)
  config.init_from = f"ast_jax:{tmp_path / 'ast' / 'model'}"
  config.eval_patch_sizes = (8, 16, 32)
  train_and_evaluate(config, str(tmp_path / "flexi"))
  with open(tmp_path / "flexi" / "sweep.csv") as handle:
    rows = list(csv.DictReader(handle))
  assert [(r["sweep"], int(float(r["patch"]))) for r in rows] == [("patch", 8), ("patch", 16), ("patch", 32)]
  assert all(int(r["num_examples"]) == 8 for r in rows)
  assert os.path.getsize(tmp_path / "flexi" / "sweep.png") > 1000


@pytest.mark.parametrize("override, message", [
    (dict(fstride=10, tstride=10), "need non-overlapping patches"),
    (dict(flexi_patch_sizes=(8, 200)), "patch size 200"),
    (dict(flexi_axes="freq"), "model.flexi_axes"),
    (dict(flexi_base_weight=1.0), "flexi_base_weight=1.0 must be in"),
    (dict(flexi_patch_sizes=(), flexi_base_weight=0.5), "set model.flexi_patch_sizes"),
    (dict(flexi_distill=True), "set model.flexi_base_weight > 0"),
    (dict(flexi_patch_weights=(1, 2)), "must be 3 non-negative weights"),
    (dict(flexi_patch_weights=(0, 0, 0)), "not all zero"),
])
def test_bad_flexi_configs_name_the_field(override, message):
  config = flexi_config()
  config.model.update(override)
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_patch_weights_set_how_often_each_size_is_drawn():
  config = flexi_config()
  config.model.flexi_patch_weights = (6, 3, 1)
  validate_config(config)
  draws = [step_patch(config, step)[0] for step in range(3000)]
  shares = [draws.count(size) / len(draws) for size in (8, 16, 32)]
  np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.03)
  assert draws == [step_patch(config, step)[0] for step in range(3000)]  # a function of (seed, step)


@pytest.mark.parametrize("arg", [None, "speaker", "elastic", "flexi", "patch8", "patch16", "coarse_to_fine"])
def test_fsdd_recipes_validate(arg):
  from configs import fsdd

  config = fsdd.get_config(arg)
  validate_config(config)
  if arg == "flexi":  # sizes drawn by weight, the stored 16x16 loss at every other size
    assert config.model.flexi_patch_sizes[0] == 8 and config.model.flexi_base_weight > 0
    assert {step_patch(config, step) for step in range(200)} == {(s, s) for s in config.eval_patch_sizes}
  if arg == "coarse_to_fine":  # the AST recipe's 30 epochs, the last phase at full resolution
    from ast_jax.train.phases import phases_of

    phases = phases_of(config)
    assert sum(p.epochs for p in phases) == fsdd.get_config().train.epochs and phases[-1].method == "full"


def test_time_only_sizes_keep_the_frequency_size():
  from ast_jax.train.eval_sweep import patch_shape_of

  config = flexi_config()
  config.model.flexi_axes = "time"
  validate_config(config)
  assert {step_patch(config, step) for step in range(30)} == {(16, 8), (16, 16), (16, 32)}
  assert patch_shape_of(config, 8) == (16, 8)
