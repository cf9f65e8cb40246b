"""The batch contract: what every input pipeline yields and every step takes, whatever the backbone.

A batch is a dict of numpy arrays (global arrays once on the devices) of `rows` rows, each holding clip slots:

| key | shape | dtype | meaning |
|---|---|---|---|
| `waveform` | `[rows, clips, samples]` | float32 | each slot's mean-removed waveform, zero past its end |
| `num_samples` | `[rows, clips]` | int32 | samples of the slot's clip (0 for an empty slot) |
| `label` | `[rows, clips, classes]` | float32 | multi-hot (or mixed) targets |
| `clip_mask` | `[rows, clips]` | float32 | 1 for a real clip, 0 for an empty slot or evaluation padding |
| `index` | `[rows, clips]` | int32 | the clip's example index in its split (-1 for padding) |

**Whole-clip rows** (fixed-length input: AST, AuM) have one slot per row (`clips` = 1), every clip cut or padded
to the recipe's `audio.target_length`; nothing else is needed, and the step takes the fast path (the front end
at the recipe's frame shift, conv patches, no attention mask).

**Packed rows** (ElasticAST) hold up to `packing.max_clips` whole clips of any length per row and add the token
layout that the packer planned and the slot framing:

| key | shape | dtype | meaning |
|---|---|---|---|
| `segment_ids` | `[rows, row_tokens]` | int32 | token's clip slot + 1 (0 = padding) |
| `freq_positions`, `time_positions` | `[rows, row_tokens]` | int32 | the token's patch position inside its clip |
| `time_patches` | `[rows, clips]` | int32 | each clip's time extent in patches |
| `window_shift` | `[rows, clips]` | int32 | the slot's frame shift in samples (10 q ms) |
| `resolution` | `[rows, clips]` | float32 | the slot's q |

Unpacked data is packed data with one segment per row: the same train and eval steps (`train/steps.py`) serve
both, and `models/tokens.py:TokenLayout.from_batch` tells them apart by `segment_ids`.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

CLIP_KEYS = ("waveform", "num_samples", "label", "clip_mask", "index")
LAYOUT_KEYS = ("segment_ids", "freq_positions", "time_positions", "time_patches", "window_shift", "resolution")


def is_packed(batch: Mapping[str, np.ndarray]) -> bool:
  """Packed rows carry a token layout; whole-clip rows do not."""
  return "segment_ids" in batch


def clip_count(batch: Mapping[str, np.ndarray]) -> int:
  """Real clips in the batch."""
  return int(np.asarray(batch["clip_mask"]).sum())
