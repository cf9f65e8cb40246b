"""ElasticAST on packed rows: a clip's output does not depend on what it is packed with, or on padding."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from ast_jax.data.packing import gather_patches, keep_tokens, lay_out
from ast_jax.models.elastic import ElasticAST

GRIDS = [(4, 3), (4, 5), (4, 1)]  # 12 + 20 + 4 tokens
ROW_TOKENS, MAX_CLIPS = 40, 4


def clip_patches(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(f * t, 256)).astype(np.float32) for f, t in GRIDS]


def run(model, params, patches, plan, row_tokens):
  layout = lay_out(GRIDS, keep_tokens(GRIDS), plan, row_tokens, MAX_CLIPS)
  inputs = (gather_patches(patches, layout), layout.segment_ids, layout.freq_positions, layout.time_positions)
  logits, _ = jax.jit(model.apply)({"params": params}, *inputs)
  return np.asarray(logits), layout


def make(pooling, attention):
  model = ElasticAST(num_classes=5, width=32, depth=2, num_heads=2, max_freq_patches=4, max_time_patches=8,
                     max_clips=MAX_CLIPS, pooling=pooling, attention=attention)
  layout = lay_out(GRIDS, keep_tokens(GRIDS), [[0, 1, 2]], ROW_TOKENS, MAX_CLIPS)
  variables = model.init(jax.random.key(0), gather_patches(clip_patches(), layout), layout.segment_ids,
                         layout.freq_positions, layout.time_positions)
  return model, nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("pooling, attention", [("attention", "blockwise"), ("mean", "blockwise"), ("mean", "xla"),
                                                pytest.param("attention", "xla", marks=pytest.mark.slow)])
def test_packed_clip_equals_clip_alone(pooling, attention):
  model, params = make(pooling, attention)
  patches = clip_patches()
  packed, _ = run(model, params, patches, [[0, 1, 2]], ROW_TOKENS)
  for slot, clip in enumerate([0, 1, 2]):
    tokens = GRIDS[clip][0] * GRIDS[clip][1]
    alone, _ = run(model, params, patches, [[clip]], tokens)  # its own row, no padding
    np.testing.assert_allclose(packed[0, slot], alone[0, 0], atol=1e-5)


def test_other_clips_and_padding_never_change_a_clip():
  model, params = make("attention", "auto")
  patches = clip_patches()
  base, layout = run(model, params, patches, [[0, 1, 2]], ROW_TOKENS)
  changed = [patches[0], np.random.default_rng(5).normal(size=patches[1].shape).astype(np.float32), patches[2]]
  other, _ = run(model, params, changed, [[0, 1, 2]], ROW_TOKENS)
  np.testing.assert_allclose(other[0, [0, 2]], base[0, [0, 2]], atol=1e-6)
  assert not np.allclose(other[0, 1], base[0, 1])
  # Garbage in the padding tokens' patches, positions and the empty slot changes nothing for the real clips.
  inputs = [gather_patches(patches, layout), layout.segment_ids, layout.freq_positions, layout.time_positions]
  inputs[0][0, layout.segment_ids[0] == 0] = 1e3
  inputs[3] = inputs[3].copy()
  inputs[3][0, layout.segment_ids[0] == 0] = 7
  noisy, _ = jax.jit(model.apply)({"params": params}, *inputs)
  np.testing.assert_allclose(np.asarray(noisy)[0, :3], base[0, :3], atol=1e-6)


def test_device_gather_matches_host_layout_and_patchify_is_frequency_major():
  from ast_jax.models.elastic import gather_packed, patchify

  rng = np.random.default_rng(1)
  lengths = [80, 32, 80]  # frames of content; every slot is padded to 80 frames
  spectrograms = rng.normal(size=(3, 80, 64)).astype(np.float32)  # [clips, frames, mel]
  for clip, frames in enumerate(lengths):
    spectrograms[clip, frames:] = 0
  patches = np.asarray(patchify(spectrograms, 16))
  assert patches.shape == (3, 4 * 5, 256)
  # patch (f, t) is the [mel f*16 : f*16+16, frames t*16 : t*16+16] block, as the conv's kernel sees it
  np.testing.assert_array_equal(patches[2, 1 * 5 + 3].reshape(16, 16), spectrograms[2, 48:64, 16:32].T)
  grids = [(4, frames // 16) for frames in lengths]
  per_clip = [np.asarray(patchify(spectrograms[c, :frames], 16)) for c, frames in enumerate(lengths)]
  layout = lay_out(grids, keep_tokens(grids, 0.25, seed=1), [[0, 1], [2]], 48, 2)
  slots = np.zeros((2, 2, 4, 5, 256), np.float32)
  for row, members in enumerate([[0, 1], [2]]):
    for slot, clip in enumerate(members):
      slots[row, slot] = patches[clip].reshape(4, 5, 256)
  device = gather_packed(slots, layout.segment_ids, layout.freq_positions, layout.time_positions)
  np.testing.assert_array_equal(device, gather_patches(per_clip, layout))


def test_rectangular_patches_and_their_grid():
  from ast_jax.data.packed import PackingSpec
  from ast_jax.models.elastic import patchify

  spectrogram = np.random.default_rng(2).normal(size=(70, 64)).astype(np.float32)  # [frames, mel]
  patches = np.asarray(patchify(spectrogram, (8, 16)))  # 8 mel bins x 16 frames
  assert patches.shape == (8 * 4, 128)  # 64 // 8 x 70 // 16, frequency-major
  np.testing.assert_array_equal(patches[5 * 4 + 2].reshape(8, 16), spectrogram[32:48, 40:48].T)
  spec = PackingSpec(mel_bins=64, patch=8, patch_time=16, max_frames=240)
  assert spec.patch_shape == (8, 16) and spec.max_time_patches == 15
  assert spec.grid(16000) == (8, 6)  # 1 s at 16 kHz: 98 frames -> 6 time patches
  assert spec.grid(16000, 2.0) == (8, 3)  # framed at 20 ms: 49 frames


def test_fractional_positions_map_any_length_onto_the_table():
  from ast_jax.models.elastic import fractional_rows

  table = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
  positions = np.arange(8)
  # a clip exactly as long as the table reads the table's rows
  np.testing.assert_allclose(fractional_rows(table, positions, np.full(8, 8)), table, atol=1e-6)
  # a clip of 4 patches: centres at 1.5, 3.5, 5.5, 7.5 - 1 ... i.e. halfway between rows 2p and 2p + 1
  expected = (table[0::2] + table[1::2]) / 2
  np.testing.assert_allclose(fractional_rows(table, positions[:4], np.full(4, 4)), expected, atol=1e-6)
  # a clip of 32 patches (4x the table) stays inside the table, first and last rows at the ends
  rows = np.asarray(fractional_rows(table, np.arange(32), np.full(32, 32)))
  np.testing.assert_allclose(rows[[0, -1]], table[[0, -1]], atol=1e-6)
  assert np.all(np.diff(rows[:, 0]) >= 0)


def test_fractional_model_runs_clips_longer_than_the_table():
  model = ElasticAST(num_classes=5, width=32, depth=1, num_heads=2, max_freq_patches=4, max_time_patches=2,
                     max_clips=MAX_CLIPS, positions="fractional")
  grids = [(4, 6), (4, 1)]
  layout = lay_out(grids, keep_tokens(grids), [[0, 1]], 32, MAX_CLIPS)
  patches = gather_patches([np.ones((f * t, 256), np.float32) for f, t in grids], layout)
  time_patches = np.array([[6, 1, 1, 1]], np.int32)
  inputs = (patches, layout.segment_ids, layout.freq_positions, layout.time_positions, time_patches)
  variables = model.init(jax.random.key(0), *inputs)
  logits, _ = model.apply(variables, *inputs)
  assert np.all(np.isfinite(np.asarray(logits)))
  with pytest.raises(ValueError, match="time_patches"):
    model.apply(variables, *inputs[:4])
