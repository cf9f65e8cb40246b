"""Multi-phase coarse-to-fine training (ast_jax/train/phases.py): the compression methods against NumPy and the
Kaldi frame count, the phase switch, the per-phase ledger, resume inside a phase, and config errors."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ast_jax.audio import model_input
from ast_jax.audio.fbank import FbankOptions, num_frames
from ast_jax.audio.features import clip_samples, pool_time
from ast_jax.convert.model_dir import load_model_dir
from ast_jax.models import build_model, config_flops, example_inputs, init_params
from ast_jax.train.config_checks import ConfigError, validate_config
from ast_jax.train.phases import Phase, carry_params, model_grid, parse_phases, phase_config, plan_phases
from ast_jax.train.trainer import train_and_evaluate
from configs import demo


def small_config(phases: str = "", epochs: int = 3):
  config = demo.get_config("smoke")
  config.data.update(num_train_examples=16, num_eval_examples=8, batch_size=4, eval_batch_size=4)
  config.train.update(epochs=epochs, phases=phases, log_every_steps=2, progress_bar=False, tensorboard=False)
  return config


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_time_pooling_matches_numpy(kind):
  x = np.random.default_rng(0).normal(size=(2, 103, 5)).astype(np.float32)
  for factor in (1, 2, 3, 4):
    windows = x[:, :103 // factor * factor].reshape(2, 103 // factor, factor, 5)
    expected = windows.mean(axis=2) if kind == "avg" else windows.max(axis=2)
    np.testing.assert_allclose(pool_time(jnp.asarray(x), kind, factor), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["avg_pool", "max_pool"])
def test_pooled_phase_input_is_the_full_input_pooled(method):
  config = small_config()
  coarse = phase_config(config, Phase(method, 4, 1))
  waves = np.random.default_rng(1).normal(size=(3, 16000)).astype(np.float32)
  lengths = np.array([16000, 9000, 3000])
  full = np.asarray(model_input(waves, lengths, config.audio))
  pooled = np.asarray(model_input(waves, lengths, coarse.audio))
  frames = config.audio.target_length // 4
  assert pooled.shape == (3, frames, config.audio.num_mel_bins)
  windows = full[:, :frames * 4].reshape(3, frames, 4, -1)
  expected = windows.mean(axis=2) if method == "avg_pool" else windows.max(axis=2)
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
  assert example_inputs(coarse)[0].shape == (1, frames, config.audio.num_mel_bins)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_frame_shift_phase_frames_span_the_same_duration(factor):
  """At frame shift 10 C ms the phase's target length is the number of Kaldi frames the full-resolution clip
  duration holds, and its input is the fbank at that shift."""
  config = small_config()
  config.audio.target_length = 100
  coarse = phase_config(config, Phase("frame_shift", factor, 1))
  samples = clip_samples(100, config.audio.sample_rate, config.audio.frame_length, config.audio.frame_shift)
  options = FbankOptions.create(config.audio.sample_rate, frame_length=config.audio.frame_length,
                                frame_shift=10.0 * factor)
  assert coarse.audio.frame_shift == 10.0 * factor
  assert coarse.audio.target_length == num_frames(samples, options) == 99 // factor + 1
  waves = np.random.default_rng(2).normal(size=(2, samples)).astype(np.float32)
  coarse_input = np.asarray(model_input(waves, None, coarse.audio))
  assert coarse_input.shape == (2, coarse.audio.target_length, config.audio.num_mel_bins)
  # Frame t at 10 C ms is frame C t at 10 ms: the same samples, the same window.
  fine = np.asarray(model_input(waves, None, config.audio))
  np.testing.assert_allclose(coarse_input, fine[:, ::factor], rtol=1e-5, atol=1e-5)
  assert coarse.augment.time_mask == -(-config.augment.time_mask // factor)


def test_patch_phase_runs_the_stored_kernel_at_longer_time_patches():
  config = small_config()  # 16x16 patches, strides 10: a 2x phase runs 16x32 patches at time stride 20
  coarse = phase_config(config, Phase("patch", 2, 1))
  assert tuple(coarse.model.run_patch) == (16, 32)
  model = build_model(config)
  spectrogram = jax.random.normal(jax.random.key(0), (2, config.audio.target_length, config.audio.num_mel_bins))
  params = init_params(model, jax.random.key(1), spectrogram)
  _, intermediates = model.apply({"params": params}, spectrogram, patch=(16, 32))
  freq = (config.audio.num_mel_bins - 16) // config.model.fstride + 1
  time = (config.audio.target_length - 32) // (2 * config.model.tstride) + 1
  assert intermediates["tokens"].shape[1] == freq * time + 2 == config_flops(coarse)["tokens"]
  assert model_grid(coarse) == model_grid(config)  # the stored table is kept, resized on the fly


def test_phase_switch_keeps_every_weight_but_interpolates_the_positions():
  config = small_config()
  coarse = phase_config(config, Phase("avg_pool", 2, 1))
  model = build_model(coarse)
  params = jax.tree.map(np.asarray, init_params(model, jax.random.key(0), example_inputs(coarse)[0]))
  moved = carry_params(params, coarse, config)
  (old_f, old_t), (new_f, new_t) = model_grid(coarse), model_grid(config)
  assert old_t < new_t and old_f == new_f
  flat, moved_flat = jax.tree_util.tree_leaves_with_path(params), dict(jax.tree_util.tree_leaves_with_path(moved))
  for path, value in flat:
    if jax.tree_util.keystr(path) != "['pos_embed']":
      np.testing.assert_array_equal(moved_flat[path], value)
  table = params["pos_embed"]
  grid = table[0, 2:].reshape(old_f, old_t, -1)
  # Independent reference: jax.image.resize, bilinear with half-pixel centres (upsampling: antialias is moot).
  expected = jax.image.resize(grid, (new_f, new_t, grid.shape[-1]), "bilinear", antialias=False)
  np.testing.assert_allclose(moved["pos_embed"][0, 2:].reshape(new_f, new_t, -1), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(moved["pos_embed"][:, :2], table[:, :2])


def test_phases_parse_and_plan():
  phases = parse_phases("avg_pool:2:3, full:1:2:lr=2.5e-4:warmup_steps=0")
  assert phases == (Phase("avg_pool", 2, 3), Phase("full", 1, 2, (("lr", 2.5e-4), ("warmup_steps", 0))))
  config = small_config("avg_pool:2:3, full:1:2:lr=2.5e-4:warmup_steps=0", epochs=5)
  plans = plan_phases(config, steps_per_epoch=7)
  assert [(p.first_step, p.end_step) for p in plans] == [(0, 21), (21, 35)]
  assert plans[1].config.optim.lr == 2.5e-4 and plans[1].config.optim.warmup_steps == 0
  assert plans[0].config.optim.lr == config.optim.lr and plans[0].config.audio.time_pool == "avg"


@pytest.mark.parametrize("phases, epochs, message", [
    ("avg_pool:2", 3, "is not 'method:factor:epochs"),
    ("zoom:2:2, full:1:1", 3, "method 'zoom' is not one of"),
    ("avg_pool:1:2, full:1:1", 3, "at least 2 for a compression"),
    ("avg_pool:2:2, full:1:2", 3, "add up to 4 epochs but train.epochs=3"),
    ("full:1:1, avg_pool:2:2", 3, "must end with a 'full' phase"),
    ("avg_pool:200:2, full:1:1", 3, "phase 'avg_pool x200'"),
    ("patch:50:2, full:1:1", 3, "phase .patch x50.*smaller than one 16x800 patch"),
    ("avg_pool:2:2, full:1:1:speed=3", 3, "'speed' is not a config.optim field"),
    ("avg_pool:2:2, full:1:1:lr=fast", 3, "optim.lr='fast' is not a float"),
])
def test_bad_phases_are_config_errors(phases, epochs, message):
  config = small_config(phases, epochs)
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_averaging_must_stay_in_the_last_phase():
  config = small_config("avg_pool:2:2, full:1:1")
  config.train.average_weights = (2, 3)
  with pytest.raises(ConfigError, match="starts before the last phase"):
    validate_config(config)


def final_params(workdir):
  return jax.tree.map(np.asarray, load_model_dir(f"{workdir}/model").params)


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_phase_switch_in_training(tmp_path):
  """Two phases of one epoch (4 steps) each: the ledger counts each phase's FLOPs, and the 'patch' phase trained the
  stored 16x16 kernel and table at 16x32 patches (the shapes never changed)."""
  spec = "patch:2:1, full:1:1"
  straight = train_and_evaluate(small_config(spec, epochs=2), str(tmp_path / "straight"))
  plans = plan_phases(small_config(spec, epochs=2), steps_per_epoch=4)
  assert straight["phase_flops"] == [4 * config_flops(p.config)["train_flops_per_step"] for p in plans]
  assert straight["train_flops"] == sum(straight["phase_flops"]) and len(straight["phase_seconds"]) == 2
  phase1 = ocp.PyTreeCheckpointer().restore(str(tmp_path / "straight" / "checkpoints" / "4" / "state"))["params"]
  final = final_params(tmp_path / "straight")
  assert phase1["pos_embed"].shape == final["pos_embed"].shape == (1, 2 + np.prod(model_grid(plans[1].config)), 64)
  assert phase1["patch_embed"]["proj"]["kernel"].shape[:2] == (16, 16)


@pytest.mark.slow  # resume after kills runs in tests/test_faults.py; inside a phase, here and in tests/test_resume.py
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_resume_inside_a_phase(tmp_path, caplog):
  """A run stopped at step 6, inside the second phase, resumes in that phase at that step and ends with the
  parameters of the uninterrupted run and the same ledger."""
  spec = "patch:2:1, full:1:1"
  straight = train_and_evaluate(small_config(spec, epochs=2), str(tmp_path / "straight"))
  staged = small_config(spec, epochs=2)
  staged.train.max_steps = 6
  assert train_and_evaluate(staged, str(tmp_path / "resumed"))["phase"] == "full"
  with caplog.at_level(logging.INFO):
    resumed = train_and_evaluate(small_config(spec, epochs=2), str(tmp_path / "resumed"))
  messages = [record.getMessage() for record in caplog.records]
  assert any("restored checkpoint at step 6" in m for m in messages)
  assert not any(m.startswith("phase 1/2") for m in messages)  # resumed into phase 2, not before it
  assert any(m.startswith("phase 2/2 (full), model") and "steps 4-8" in m for m in messages)
  assert resumed["step"] == 8 and resumed["phase_flops"] == straight["phase_flops"]
  for a, b in zip(jax.tree.leaves(final_params(tmp_path / "straight")), jax.tree.leaves(final_params(tmp_path /
                                                                                                     "resumed"))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # 10 s; carry_params has its unit test and phased training its run in the default suite
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_the_next_phase_starts_from_the_carried_weights(tmp_path):
  """With lr 0 in the last phase its weights stay where the switch put them: the first phase's final weights with
  the positional table interpolated to the full grid, every other weight unchanged."""
  spec = "avg_pool:2:1, full:1:1:lr=0"
  config = small_config(spec, epochs=2)
  config.data.num_train_examples = 8  # 2 steps per epoch
  train_and_evaluate(config, str(tmp_path))
  plans = plan_phases(config, steps_per_epoch=2)
  phase1 = ocp.PyTreeCheckpointer().restore(str(tmp_path / "checkpoints" / "2" / "state"))["params"]
  expected = carry_params(jax.tree.map(np.asarray, phase1), plans[0].config, plans[1].config)
  final = final_params(tmp_path)
  for path, value in jax.tree_util.tree_leaves_with_path(expected):
    np.testing.assert_allclose(dict(jax.tree_util.tree_leaves_with_path(final))[path], value, rtol=0, atol=1e-7)


def test_run_patch_only_from_a_phase_and_pooled_models_refuse_hf_export():
  from ast_jax.convert import hf
  from ast_jax.convert.model_dir import ModelBundle, bundle_config

  config = small_config()
  config.model.run_patch = (16, 32)
  with pytest.raises(ConfigError, match="model.run_patch is set by a 'patch' phase"):
    validate_config(config)
  pooled = phase_config(small_config(), Phase("max_pool", 2, 1))
  validate_config(pooled)  # pooling on its own is a valid model input
  params = jax.tree.map(np.asarray, init_params(build_model(pooled), jax.random.key(0), example_inputs(pooled)[0]))
  labels = [f"class{i}" for i in range(pooled.num_classes)]
  bundle = ModelBundle(params, bundle_config(pooled.model, pooled.audio, pooled.num_classes), labels)
  with pytest.raises(ValueError, match="pooled 2x along time"):
    hf.hf_config(bundle)


@pytest.mark.slow  # 9 s of training; a coarse-phase model directory predicts in the default suite (test_predict.py)
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_a_checkpoint_of_a_coarse_phase_loads_as_that_phase_model(tmp_path):
  """predict on a workdir stopped inside a coarse phase runs the phase's model (time pooled), not the full one."""
  from ast_jax.convert.model_dir import load_training_checkpoint
  from ast_jax.inference import make_predictor

  config = small_config("max_pool:2:1, full:1:1", epochs=2)
  config.train.max_steps = 4  # the last step of phase 1
  train_and_evaluate(config, str(tmp_path))
  bundle = load_training_checkpoint(str(tmp_path))
  assert (bundle.config.audio.time_pool, bundle.config.audio.time_pool_factor) == ("max", 2)
  predictor = make_predictor(bundle)
  waveform = np.random.default_rng(0).normal(size=predictor.input_samples).astype(np.float32)
  result = predictor.predict([waveform], predictor.input_samples, predictor.input_samples)[0]
  assert result.logits.shape == (1, config.num_classes) and np.all(np.isfinite(result.logits))
