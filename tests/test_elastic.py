"""ElasticAST on packed rows: a clip's output does not depend on what it is packed with, or on padding."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from ast_jax.data.packer import gather_patches, keep_tokens, lay_out
from ast_jax.models.elastic import ElasticAST
from ast_jax.models.tokens import TokenLayout

GRIDS = [(4, 3), (4, 5), (4, 1)]  # 12 + 20 + 4 tokens of 16x16 patches on 64 mel bins
ROW_TOKENS, MAX_CLIPS, SLOT_FRAMES = 40, 4, 80


def clip_spectrograms(seed=0):
  """Each clip's normalised spectrogram `[frames, mel_bins]`, whole patches only."""
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(t * 16, f * 16)).astype(np.float32) for f, t in GRIDS]


def packed_input(spectrograms, plan, row_tokens, fill=0.0):
  """Slots `[rows, MAX_CLIPS, SLOT_FRAMES, 64]` (frames past a clip and empty slots hold `fill`) and the layout."""
  layout = lay_out(GRIDS, keep_tokens(GRIDS), plan, row_tokens, MAX_CLIPS)
  slots = np.full((len(plan), MAX_CLIPS, SLOT_FRAMES, 64), fill, np.float32)
  time_patches = np.ones((len(plan), MAX_CLIPS), np.int32)
  for row, members in enumerate(plan):
    for slot, clip in enumerate(members):
      slots[row, slot, :len(spectrograms[clip])] = spectrograms[clip]
      time_patches[row, slot] = GRIDS[clip][1]
  return slots, TokenLayout(layout.segment_ids, layout.freq_positions, layout.time_positions, time_patches)


def run(model, params, spectrograms, plan, row_tokens, fill=0.0):
  slots, layout = packed_input(spectrograms, plan, row_tokens, fill)
  logits, _ = jax.jit(model.apply)({"params": params}, slots, layout)
  return np.asarray(logits), layout


def make(pooling, attention, positions="integer", max_time_patches=8):
  model = ElasticAST(num_classes=5, width=32, depth=2, num_heads=2, max_freq_patches=4,
                     max_time_patches=max_time_patches, pooling=pooling, attention=attention, positions=positions)
  variables = model.init(jax.random.key(0), *packed_input(clip_spectrograms(), [[0, 1, 2]], ROW_TOKENS))
  return model, nn.meta.unbox(variables["params"])


@pytest.mark.parametrize("pooling, attention", [("attention", "blockwise"), ("mean", "blockwise"), ("mean", "xla"),
                                                pytest.param("attention", "xla", marks=pytest.mark.slow)])
def test_packed_clip_equals_clip_alone(pooling, attention):
  model, params = make(pooling, attention)
  spectrograms = clip_spectrograms()
  packed, _ = run(model, params, spectrograms, [[0, 1, 2]], ROW_TOKENS)
  for slot, clip in enumerate([0, 1, 2]):
    tokens = GRIDS[clip][0] * GRIDS[clip][1]
    alone, _ = run(model, params, spectrograms, [[clip]], tokens)  # its own row, no padding
    np.testing.assert_allclose(packed[0, slot], alone[0, 0], atol=1e-5)


def test_whole_clip_rows_equal_one_clip_packed_alone():
  """The fixed-length contract (one clip per row, no layout) runs through the same tokeniser: same logits."""
  model, params = make("attention", "auto")
  spectrograms = clip_spectrograms()
  whole, _ = jax.jit(model.apply)({"params": params}, spectrograms[1][None])
  alone, _ = run(model, params, spectrograms, [[1]], GRIDS[1][0] * GRIDS[1][1])
  assert whole.shape == (1, 5)
  np.testing.assert_allclose(np.asarray(whole)[0], alone[0, 0], atol=1e-5)


def test_other_clips_and_padding_never_change_a_clip():
  model, params = make("attention", "auto")
  spectrograms = clip_spectrograms()
  base, layout = run(model, params, spectrograms, [[0, 1, 2]], ROW_TOKENS)
  changed = [spectrograms[0], np.random.default_rng(5).normal(size=spectrograms[1].shape).astype(np.float32),
             spectrograms[2]]
  other, _ = run(model, params, changed, [[0, 1, 2]], ROW_TOKENS)
  np.testing.assert_allclose(other[0, [0, 2]], base[0, [0, 2]], atol=1e-6)
  assert not np.allclose(other[0, 1], base[0, 1])
  # Garbage past each clip's frames, in the empty slot and in the padding tokens' positions changes nothing.
  slots, layout = packed_input(spectrograms, [[0, 1, 2]], ROW_TOKENS, fill=1e3)
  time_positions = np.where(layout.segment_ids == 0, 7, layout.time_positions)
  noisy, _ = jax.jit(model.apply)({"params": params}, slots, layout.replace(time_positions=time_positions))
  np.testing.assert_allclose(np.asarray(noisy)[0, :3], base[0, :3], atol=1e-6)


def test_device_gather_matches_host_layout_and_patchify_is_frequency_major():
  from ast_jax.models.tokens import gather_packed, patchify

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
  token_layout = TokenLayout(layout.segment_ids, layout.freq_positions, layout.time_positions,
                             np.ones((2, 2), np.int32))
  device = gather_packed(slots, token_layout)
  np.testing.assert_array_equal(device, gather_patches(per_clip, layout))


def test_rectangular_patches_and_their_grid():
  from ast_jax.data.packed_batches import PackingSpec
  from ast_jax.models.tokens import patchify

  spectrogram = np.random.default_rng(2).normal(size=(70, 64)).astype(np.float32)  # [frames, mel]
  patches = np.asarray(patchify(spectrogram, (8, 16)))  # 8 mel bins x 16 frames
  assert patches.shape == (8 * 4, 128)  # 64 // 8 x 70 // 16, frequency-major
  np.testing.assert_array_equal(patches[5 * 4 + 2].reshape(8, 16), spectrogram[32:48, 40:48].T)
  spec = PackingSpec(mel_bins=64, patch=8, patch_time=16, max_frames=240)
  assert spec.patch_shape == (8, 16) and spec.max_time_patches == 15
  assert spec.grid(16000) == (8, 6)  # 1 s at 16 kHz: 98 frames -> 6 time patches
  assert spec.grid(16000, 2.0) == (8, 3)  # framed at 20 ms: 49 frames


def test_fractional_positions_map_any_length_onto_the_table():
  from ast_jax.models.positions import fractional_rows

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
  model, params = make("attention", "auto", positions="fractional", max_time_patches=2)
  logits, _ = run(model, params, clip_spectrograms(), [[0, 1, 2]], ROW_TOKENS)  # up to 5 time patches
  assert np.all(np.isfinite(logits))
