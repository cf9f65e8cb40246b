"""Sequence packing (ElasticAST): every clip's tokens once, whole, in one row; budgets and caps respected;
the layout a packed row's attention mask and positions are built from."""

import glob
import os

import numpy as np
import pytest
import soundfile as sf

from ast_jax.audio.patches import patch_grid
from ast_jax.data.packer import (keep_tokens, kept_tokens, lay_out, pack, padded_efficiency,
                                  plan_batches, plan_rows)

FSDD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared", "data", "fsdd",
                    "recordings")


def random_grids(count, seed=0):
  rng = np.random.default_rng(seed)
  return [(int(rng.integers(1, 9)), int(rng.integers(1, 16))) for _ in range(count)]  # at most 120 tokens


def check_layout(packed, grids, row_tokens, max_clips, drop_rate=0.0):
  assert packed.segment_ids.shape[1] == row_tokens
  seen = set()
  for row in range(packed.segment_ids.shape[0]):
    segments = packed.segment_ids[row]
    slots = [clip for clip in packed.clips[row] if clip >= 0]
    assert len(slots) <= max_clips
    assert np.all(packed.clips[row, len(slots):] == -1)  # filled slots first
    # Clips sit in contiguous runs in slot order, then padding.
    runs = segments[segments > 0]
    assert np.all(np.diff(runs) >= 0) and np.all(segments[len(runs):] == 0)
    assert sorted(set(runs.tolist())) == list(range(1, len(slots) + 1))
    for slot, clip in enumerate(slots, start=1):
      freq, time = grids[clip]
      tokens = packed.token_index[row][segments == slot]
      assert len(tokens) == (kept_tokens(freq * time, drop_rate) if drop_rate else freq * time)
      assert len(set(tokens.tolist())) == len(tokens) and tokens.min() >= 0 and tokens.max() < freq * time
      np.testing.assert_array_equal(packed.freq_positions[row][segments == slot], tokens // time)
      np.testing.assert_array_equal(packed.time_positions[row][segments == slot], tokens % time)
      assert clip not in seen
      seen.add(clip)
    assert np.all(packed.token_index[row][segments == 0] == -1)
  assert seen == set(range(len(grids)))


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_every_clip_packed_once_and_whole(method):
  grids = random_grids(60)
  packed = pack(grids, row_tokens=256, max_clips=8, method=method)
  check_layout(packed, grids, 256, 8)
  assert packed.efficiency == pytest.approx(sum(f * t for f, t in grids) / packed.segment_ids.size)


def test_first_fit_and_best_fit_differ_as_defined():
  assert plan_rows([5, 6, 4], row_tokens=10, max_clips=4, method="first_fit") == [[0, 2], [1]]
  assert plan_rows([5, 6, 4], row_tokens=10, max_clips=4, method="best_fit") == [[0], [1, 2]]
  assert plan_rows([1, 1, 1], row_tokens=10, max_clips=2) == [[0, 1], [2]]  # the clip cap opens a new row


def test_token_dropout_is_counted_when_packing_and_seeded():
  grids = random_grids(30, seed=1)
  packed = pack(grids, row_tokens=200, max_clips=16, drop_rate=0.1, seed=3)
  check_layout(packed, grids, 200, 16, drop_rate=0.1)
  again = pack(grids, row_tokens=200, max_clips=16, drop_rate=0.1, seed=3)
  other = pack(grids, row_tokens=200, max_clips=16, drop_rate=0.1, seed=4)
  np.testing.assert_array_equal(packed.token_index, again.token_index)
  assert not np.array_equal(packed.token_index, other.token_index)
  assert kept_tokens(100, 0.1) == 90 and kept_tokens(1, 0.5) == 1


def test_fixed_row_count_pads_and_overflow_is_an_error():
  grids = [(2, 3), (2, 2)]
  packed = pack(grids, row_tokens=16, max_clips=4, num_rows=3)
  assert packed.segment_ids.shape == (3, 16) and np.all(packed.segment_ids[1:] == 0)
  assert np.all(packed.clips[1:] == -1)
  with pytest.raises(ValueError, match="only 1 allowed"):
    pack([(4, 4), (4, 4)], row_tokens=16, max_clips=4, num_rows=1)
  with pytest.raises(ValueError, match="more than a row's 16"):
    pack([(4, 5)], row_tokens=16, max_clips=4)
  with pytest.raises(ValueError, match="not one of"):
    plan_rows([1], 4, 1, method="worst_fit")


def test_short_clips_get_one_time_patch():
  assert patch_grid(128, 9, 16, at_least_one=True) == (8, 1)
  assert patch_grid(64, 100, 16, at_least_one=True) == (4, 6)
  with pytest.raises(ValueError, match="too few mel bins"):
    patch_grid(8, 100, 16, at_least_one=True)


def test_batches_have_fixed_rows_and_take_every_clip_once():
  grids = random_grids(200, seed=2)
  counts = [f * t for f, t in grids]
  batches = plan_batches(counts, rows=3, row_tokens=256, max_clips=8, lookahead=4)
  assert all(len(batch) == 3 for batch in batches)
  assert sorted(clip for batch in batches for row in batch for clip in row) == list(range(200))
  for batch in batches:
    check_layout_rows = lay_out(grids, keep_tokens(grids), batch, 256, 8)
    assert np.all((check_layout_rows.segment_ids > 0).sum(1) == [sum(counts[c] for c in row) for row in batch])
  # Clips come in stream order, give or take the clips set aside for the next batch.
  first_seen = {clip: index for index, batch in enumerate(batches) for row in batch for clip in row}
  assert all(first_seen[clip] <= first_seen[later] + 1 for clip, later in zip(range(199), range(1, 200)))


def test_fsdd_natural_lengths_pack_at_least_95_percent():
  files = sorted(glob.glob(os.path.join(FSDD, "*.wav")))
  if not files:
    pytest.skip("FSDD is not beside the repository")
  # 128 mel bins, 16x16 patches, 10 ms frames: the clip's native length in frames (25 ms window).
  frames = [1 + max(0, int(sf.info(path).duration * 1000 - 25) // 10) for path in files]
  grids = [patch_grid(128, count, 16, at_least_one=True) for count in frames]
  order = np.random.default_rng(0).permutation(len(grids))
  counts = [grids[i][0] * grids[i][1] for i in order]
  batches = plan_batches(counts, rows=4, row_tokens=512, max_clips=32)
  used = [sum(counts[clip] for row in batch for clip in row) for batch in batches[:-1]]  # the last is partial
  efficiency = sum(used) / (len(used) * 4 * 512)
  padded = padded_efficiency(grids)
  assert efficiency >= 0.95, efficiency
  assert padded < 0.5  # padding every clip to the longest wastes most of the batch
