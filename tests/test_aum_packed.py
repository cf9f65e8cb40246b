"""Audio Mamba on packed rows (models/packed_sequence.py): every clip gets its own CLS token where a whole clip has it,
its own zero scan state and a convolution that stops at its edges, so its logits do not depend on what it is packed
with; a clip that fills the positional table is the whole-clip model's sequence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.aum import AuM, cls_positions, sequence_order
from ast_jax.models.packed_sequence import insert_clip_tokens, scan_resets
from tests.test_elastic import GRIDS, ROW_TOKENS, clip_spectrograms, packed_input

MAX_TIME = 5  # the longest clip of GRIDS fills the table: 4 x 5 patches


def run(model, params, spectrograms, plan, row_tokens):
  slots, layout = packed_input(spectrograms, plan, row_tokens)
  logits, _ = jax.jit(model.apply)({"params": params}, slots, layout)
  return np.asarray(logits)


def make(bidirectional="fo_bi", cls_position="middle", scan="recompute"):
  model = AuM(num_classes=5, width=16, depth=1, bidirectional=bidirectional, cls_position=cls_position, scan=scan,
              scan_chunk=4, max_time_patches=MAX_TIME)
  variables = jax.jit(model.init)(jax.random.key(0), *packed_input(clip_spectrograms(), [[0, 1, 2]], ROW_TOKENS))
  return model, nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("cls_position", ["middle", "head_tail", "tail", "none"])
def test_insert_clip_tokens_matches_each_clip_built_alone(cls_position):
  counts, row_tokens, clips = (5, 2, 4), 14, 4  # three clips, one empty slot, three padding tokens
  segment_ids = np.zeros((1, row_tokens), np.int32)
  segment_ids[0, :11] = np.repeat([1, 2, 3], counts)
  tokens = np.arange(row_tokens, dtype=np.float32)[None, :, None] + 1  # token i holds i + 1
  prefix = len(cls_positions(1, cls_position))
  clip_tokens = -np.arange(1, clips * prefix + 1, dtype=np.float32).reshape(1, clips, prefix, 1)

  def positions_of(count):
    return tuple(jnp.broadcast_to(p, count.shape) for p in cls_positions(count, cls_position))

  sequence, segments, cls_index = insert_clip_tokens(jnp.asarray(tokens), jnp.asarray(segment_ids),
                                                     jnp.asarray(clip_tokens), positions_of)
  expected, start = [], 0
  for slot, count in enumerate(counts):
    clip = jnp.asarray(tokens[:, start:start + count])
    prefixed = jnp.concatenate([jnp.asarray(clip_tokens[:, slot]), clip], axis=1)
    expected.append(np.asarray(sequence_order(prefixed, cls_positions(count, cls_position)))[0, :, 0])
    start += count
  expected = np.concatenate(expected + [tokens[0, 11:, 0], clip_tokens[0, 3:].reshape(-1)])
  np.testing.assert_array_equal(np.asarray(sequence)[0, :, 0], expected)
  assert np.asarray(segments)[0].tolist() == [1] * (5 + prefix) + [2] * (2 + prefix) + [3] * (4 + prefix) + [0] * (
      3 + prefix)
  flat = np.asarray(sequence)[0, :, 0]
  np.testing.assert_array_equal(flat[np.asarray(cls_index)[0]], clip_tokens[0, ..., 0])


def test_scan_resets_mark_each_clip_start_in_the_scan_direction():
  segment_ids = jnp.asarray([[1, 1, 2, 2, 2, 0, 0]])
  assert np.asarray(scan_resets(segment_ids, False))[0].tolist() == [1, 0, 1, 0, 0, 1, 0]
  assert np.asarray(scan_resets(segment_ids, True))[0].tolist() == [0, 1, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("bidirectional, cls_position", [
    ("bi_bi", "head_tail"),  # both branches' convs (causal and anti-causal), two CLS tokens per clip
    pytest.param("fo_bi", "middle", marks=pytest.mark.slow), pytest.param("fo_fo", "none", marks=pytest.mark.slow)])
def test_packed_clip_equals_clip_alone(bidirectional, cls_position):
  model, params = make(bidirectional, cls_position)
  spectrograms = clip_spectrograms()
  packed = run(model, params, spectrograms, [[0, 1, 2]], ROW_TOKENS)
  alone = run(model, params, spectrograms, [[0], [1], [2]], ROW_TOKENS)  # each clip alone in a row, then padding
  np.testing.assert_allclose(packed[0, :3], alone[:, 0], rtol=1e-5, atol=1e-5)
  changed = [spectrograms[0], np.random.default_rng(5).normal(size=spectrograms[1].shape).astype(np.float32),
             spectrograms[2]]
  other = run(model, params, changed, [[0, 1, 2]], ROW_TOKENS)
  np.testing.assert_allclose(other[0, [0, 2]], packed[0, [0, 2]], rtol=1e-5, atol=1e-5)
  assert not np.allclose(other[0, 1], packed[0, 1], atol=1e-3)


def test_a_clip_filling_the_table_is_the_whole_clip_model():
  """Same parameters: the packed model on a clip of `max_time_patches` equals the conv-patch whole-clip AuM, and
  whole-clip rows given to the packed model run as one clip per row."""
  model, params = make()
  clip = clip_spectrograms()[1]  # 4 x 5 patches: the whole table
  whole_model = AuM(num_classes=5, width=16, depth=1, scan="recompute", scan_chunk=4)
  whole, _ = jax.jit(whole_model.apply)({"params": params}, clip[None])
  packed = run(model, params, clip_spectrograms(), [[1]], 20)
  rows, _ = jax.jit(model.apply)({"params": params}, clip[None])
  np.testing.assert_allclose(packed[0, 0], np.asarray(whole)[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rows)[0], np.asarray(whole)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="positional table has 5"):
    model.apply({"params": params}, np.zeros((1, 96, 64), np.float32))


def test_packed_gradients_reach_each_clip_only_from_its_own_loss():
  """The loss of clip 0 has no gradient on clip 1's spectrogram (state, conv and CLS stay inside each clip)."""
  model, params = make("bi_bi")
  slots, layout = packed_input(clip_spectrograms(), [[0, 1, 2]], ROW_TOKENS)
  grads = jax.jit(jax.grad(lambda s: model.apply({"params": params}, s, layout)[0][0, 0].sum()))(jnp.asarray(slots))
  grads = np.abs(np.asarray(grads))
  assert grads[0, 0].max() > 0 and grads[0, 1:].max() == 0


def test_packed_aum_configs_are_checked():
  from ast_jax.models import family_of
  from ast_jax.train.config_checks import ConfigError, validate_config
  from configs import common, fsdd

  config = fsdd.get_config("aum_packed_smoke")
  assert family_of(config).trains_packed(config) and not family_of(fsdd.get_config("aum_smoke")).trains_packed(
      fsdd.get_config("aum_smoke"))
  validate_config(config)
  config.model.tstride = 8
  config.eval_sweep.lengths = (64, 400)
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  assert "non-overlapping patches" in str(error.value) and "cannot index 25 time patches" in str(error.value)
  ast_config = common.packed_rows(fsdd.get_config("smoke"))
  with pytest.raises(ConfigError, match=r"packing section needs a model family that trains on packed rows \(elastic, "
                     r"aum\); model.name='ast'"):
    validate_config(ast_config)


@pytest.mark.slow  # 40 s: the shared trainer, packed input pipeline and length/resolution sweep on FSDD
def test_packed_aum_trains_and_sweeps(tmp_path):
  import json
  import subprocess
  import sys

  workdir = tmp_path / "aum_packed"
  result = subprocess.run([sys.executable, "-m", "ast_jax.main", "--config=configs/fsdd.py:aum_packed_smoke",
                           f"--workdir={workdir}"], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["num_examples"] == 300 and np.isfinite(summary["loss"]) and summary["packing_efficiency"] > 0.9
  sweep = (workdir / "sweep.csv").read_text()
  assert "240" in sweep and "2.5" in sweep
