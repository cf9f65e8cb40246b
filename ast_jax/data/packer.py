"""Sequence packing for ElasticAST: clips of any length packed into rows of a fixed token budget.

A clip of `frames` frames and `mel_bins` bins has a (frequency, time) grid of non-overlapping patches (`patch` x
`patch`, or a (frequency, time) shape); its tokens are packed whole into one row. Each token of a packed row carries
- `segment_ids`: the clip's slot in the row, 1 ... max_clips (0 = padding), so attention can be masked to the clip;
- `freq_positions`, `time_positions`: the patch's integer position inside its own clip (0-based);
- `token_index`: which patch of the clip it is (frequency-major, `f * time + t`), for gathering the tokens from the
  clip's patch grid on the device.
Token dropout (a share of each clip's tokens dropped at random in training) is decided here, when packing, so a
row's budget counts only the tokens that are kept.

The planner is deterministic: the same clips and seed always give the same rows.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

METHODS = ("first_fit", "best_fit")


@dataclasses.dataclass(frozen=True)
class PackedRows:
  """Token layout of packed rows; every array is `[rows, row_tokens]` except where noted."""

  segment_ids: np.ndarray  # int32, 0 = padding, k = the row's k-th clip
  freq_positions: np.ndarray  # int32
  time_positions: np.ndarray  # int32
  token_index: np.ndarray  # int32, the patch's index in its clip's frequency-major grid (-1 on padding)
  clips: np.ndarray  # int32 [rows, max_clips]: the packed clips' indices into the input list (-1: empty slot)

  @property
  def efficiency(self) -> float:
    """Share of non-padding tokens."""
    return float(np.mean(self.segment_ids > 0))


def kept_tokens(num_tokens: int, drop_rate: float) -> int:
  """Tokens a clip keeps under token dropout (at least one)."""
  return max(1, int(round(num_tokens * (1.0 - drop_rate))))


def plan_rows(token_counts: Sequence[int], row_tokens: int, max_clips: int, method: str = "first_fit"
              ) -> list[list[int]]:
  """Assigns each clip (by index, in order) to a row without exceeding `row_tokens` tokens or `max_clips` clips.

  first_fit: the first open row the clip fits in; best_fit: the open row it leaves least room in.
  """
  if method not in METHODS:
    raise ValueError(f"packing method {method!r} is not one of {METHODS}")
  rows: list[list[int]] = []
  room: list[int] = []
  for clip, count in enumerate(token_counts):
    row = _choose_row(clip, count, room, rows, row_tokens, max_clips, method)
    if row is None:
      rows.append([])
      room.append(row_tokens)
      row = len(rows) - 1
    rows[row].append(clip)
    room[row] -= count
  return rows


def plan_batches(token_counts: Sequence[int], rows: int, row_tokens: int, max_clips: int, *,
                 method: str = "best_fit", lookahead: int = 16) -> list[list[list[int]]]:
  """Cuts a stream of clips (in order) into batches of exactly `rows` rows. A clip that fits no row of the batch is
  set aside (it opens the next batch) while later clips still fill the gaps; after `lookahead` + 1 such misses,
  or at the end of the stream, the batch closes. Returns batches of rows of clip indices; every clip appears
  exactly once.

  A whole epoch is planned from its shuffled order and the clips' token counts, so a batch is a function of
  (epoch, batch index): a checkpoint needs only the position.
  """
  if method not in METHODS:
    raise ValueError(f"packing method {method!r} is not one of {METHODS}")
  stream = collections.deque(range(len(token_counts)))
  batches = []
  while stream:
    members: list[list[int]] = [[] for _ in range(rows)]
    room = [row_tokens] * rows
    set_aside: list[int] = []
    while stream and len(set_aside) <= lookahead:
      clip = stream.popleft()
      row = _choose_row(clip, token_counts[clip], room, members, row_tokens, max_clips, method)
      if row is None:
        set_aside.append(clip)
      else:
        members[row].append(clip)
        room[row] -= token_counts[clip]
    stream.extendleft(reversed(set_aside))
    batches.append(members)
  return batches


def _choose_row(clip: int, count: int, room: list[int], members: list[list[int]], row_tokens: int, max_clips: int,
                method: str) -> int | None:
  if count > row_tokens:
    raise ValueError(f"clip {clip} has {count} tokens, more than a row's {row_tokens}; cap its length first")
  fits = [row for row in range(len(room)) if room[row] >= count and len(members[row]) < max_clips]
  if not fits:
    return None
  return fits[0] if method == "first_fit" else min(fits, key=lambda row: room[row] - count)


def keep_tokens(grids: Sequence[tuple[int, int]], drop_rate: float = 0.0, seed: int = 0) -> list[np.ndarray]:
  """Per clip, the patch indices kept under token dropout (random with `seed`, in grid order; all when 0)."""
  rng = np.random.default_rng(seed)
  kept = []
  for freq, time in grids:
    total = freq * time
    count = kept_tokens(total, drop_rate) if drop_rate else total
    kept.append(np.sort(rng.choice(total, size=count, replace=False)) if count < total else np.arange(total))
  return kept


def lay_out(grids: Sequence[tuple[int, int]], kept: Sequence[np.ndarray], plan: Sequence[Sequence[int]],
            row_tokens: int, max_clips: int) -> PackedRows:
  """The token layout of planned rows (`plan[row]` = the clip indices in that row, in slot order)."""
  shape = (len(plan), row_tokens)
  segment_ids, token_index = np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
  freq_positions, time_positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  clips = np.full((len(plan), max_clips), -1, np.int32)
  for row, members in enumerate(plan):
    if len(members) > max_clips or sum(len(kept[clip]) for clip in members) > row_tokens:
      raise ValueError(f"row {row} holds {len(members)} clips of {sum(len(kept[c]) for c in members)} tokens; "
                       f"the limits are {max_clips} clips and {row_tokens} tokens")
    start = 0
    for slot, clip in enumerate(members):
      indices, time = kept[clip], grids[clip][1]
      end = start + len(indices)
      segment_ids[row, start:end] = slot + 1
      token_index[row, start:end] = indices
      freq_positions[row, start:end] = indices // time
      time_positions[row, start:end] = indices % time
      clips[row, slot] = clip
      start = end
  return PackedRows(segment_ids, freq_positions, time_positions, token_index, clips)


def pack(grids: Sequence[tuple[int, int]], row_tokens: int, max_clips: int, *, drop_rate: float = 0.0,
         seed: int = 0, method: str = "first_fit", num_rows: int | None = None) -> PackedRows:
  """Packs clips with the given patch grids into as few rows as `plan_rows` finds (or exactly `num_rows`, padded,
  so that a step compiles once; an error if the clips need more)."""
  kept = keep_tokens(grids, drop_rate, seed)
  plan = plan_rows([len(indices) for indices in kept], row_tokens, max_clips, method)
  rows = num_rows if num_rows is not None else len(plan)
  if len(plan) > rows:
    raise ValueError(f"{len(grids)} clips need {len(plan)} rows of {row_tokens} tokens; only {rows} allowed")
  return lay_out(grids, kept, plan + [[] for _ in range(rows - len(plan))], row_tokens, max_clips)


def padded_efficiency(grids: Sequence[tuple[int, int]]) -> float:
  """The baseline: every clip padded to the longest clip's tokens (share of non-padding tokens)."""
  counts = np.asarray([freq * time for freq, time in grids])
  return float(counts.sum() / (len(counts) * counts.max()))


def gather_patches(clip_patches: Sequence[np.ndarray], layout: PackedRows) -> np.ndarray:
  """Packed rows of patch vectors `[rows, row_tokens, dim]` from each clip's frequency-major patches
  `[freq * time, dim]` (zeros on padding)."""
  dim = clip_patches[0].shape[-1]
  rows, row_tokens = layout.segment_ids.shape
  packed = np.zeros((rows, row_tokens, dim), np.float32)
  for row in range(rows):
    for slot, clip in enumerate(layout.clips[row]):
      if clip < 0:
        continue
      where = layout.segment_ids[row] == slot + 1
      packed[row, where] = clip_patches[clip][layout.token_index[row, where]]
  return packed
