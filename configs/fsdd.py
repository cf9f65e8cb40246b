"""AST from scratch on the Free Spoken Digit Dataset (3,000 real recordings, 10 digits, 6 speakers).

`--config=configs/fsdd.py` uses the upstream split (takes 0-4 of every speaker and digit are the test set);
`--config=configs/fsdd.py:speaker` holds out one speaker (`--config.data.held_out=`, default theo).
`--config=configs/fsdd.py:elastic` trains ElasticAST on the clips' native lengths instead (see below).
`--config=configs/fsdd.py:flexi` trains FlexiAST: non-overlapping patches of a size drawn per step from
{8, 10, 12, 16, 20, 24, 32}; `:patch8` and `:patch16` are fixed-patch ASTs with the same patches at one size.
`--config=configs/fsdd.py:coarse_to_fine` trains the AST recipe in two phases: 20 epochs on spectrograms
max-pooled 2x along time (37 tokens instead of 79), then 10 at full resolution (train/phases.py).
`--config=configs/fsdd.py:aum_tiny` and `:ast_tiny` compare Audio Mamba with the AST at the same width and budget
(below). The data folder defaults to ../shared/data/fsdd beside the repository (`--config.data.path=` to change it).

Recipe for learning a transformer from scratch on 2,700 short clips on a 2-core CPU:
- FSDD is recorded at 8 kHz, so the mel filterbank spans 20 Hz-4 kHz (the band with content) with 64 bins;
- 100 frames (1.0 s) hold 99.3 % of the clips whole (median 0.42 s);
- 16x16 patches overlapping by half in both axes (stride 8): 7 x 11 = 77 tokens;
- a narrow, shallow AST (width 192, 6 blocks) with AdamW and a cosine schedule; SpecAugment and time roll.
The mean/std are this front end's statistics over the FSDD recordings.

ElasticAST (`:elastic`): the same backbone and optimiser on every clip at its own length (up to 2.4 s: all of
FSDD) and its own time resolution: each clip framed at q x 10 ms, q from {1.0, 1.2, ..., 2.6} drawn per epoch.
Non-overlapping patches of 8 mel bins x 16 frames (a token spans 160 ms at q = 1, as the AST's 16-frame patches
do; 8 x frames/16 tokens), packed into 2 rows of 160 tokens (about 34 clips per step, as the AST's batch of 32);
10 % token dropout; fractional time positions (a clip spans the time table whatever its length or q); 90 epochs,
which cost less training compute than the AST's 30 (packed clips have ~9 real tokens each at mixed q).
Both recipes sweep length caps and resolutions after training (`eval_sweep`).

FlexiAST (`:flexi`), from scratch in the AST's 30 epochs: the stored 16x16 kernel PI-resized to the size drawn per
step, 8 drawn 8 times as often as each other size (8 is the hardest size to share: 96 tokens of a 2x finer view),
and every step at a size other than 16 also takes the loss at 16 (`flexi_base_weight=0.5`: without it, sizes drawn
uniformly from scratch reached 19 % in ten epochs, the 16x16 AST alone 76 %). Expected training compute 1.57 GFLOP per example
(models/flops.py), against 1.70 for `:patch8` and 0.43 for `:patch16`. Every model is swept over the seven sizes.

AuM against AST (`:aum_tiny`, `:ast_tiny`): AuM-tiny (24 Mamba layers, width 192, 6.4 M parameters with 527
classes) and AST-tiny (DeiT-tiny: 12 blocks, width 192, 3 heads) on upstream AuM's non-overlapping 16x16 patches
(4 x 6 = 24 tokens), each with this recipe's data, augmentation and optimiser for 10 epochs. The shorter budget
and the coarser patches keep AuM's run to about half an hour on a 2-core CPU, where its selective scans, not its
projections, take most of a step (docs/RESULTS.md).
"""

import os

import ml_collections

from configs import common

FSDD_STATS = (-6.6572566, 3.9257102)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.num_classes = 10
  config.data.update(source="folder", path=os.path.normpath(os.path.join(common.SHARED_DATA, "fsdd")),
                     split="takes", batch_size=32, eval_batch_size=100, cache_audio=True, scan="decode",
                     sample_rates=(8000,))
  if arg == "speaker":
    config.data.update(split="speaker", held_out="theo")
  elif arg not in (None, "", "smoke", "elastic", "elastic_smoke", "flexi", "patch8", "patch16", "coarse_to_fine",
                   "aum_tiny", "ast_tiny", "aum_smoke", "aum_packed", "aum_packed_smoke"):
    raise ValueError(f"configs/fsdd.py takes no argument, 'speaker', 'elastic', 'flexi', 'patch8', 'patch16', "
                     f"'coarse_to_fine', 'aum_tiny', 'ast_tiny', 'aum_packed' or 'smoke', not {arg!r}")
  config.audio.update(num_mel_bins=64, low_freq=20.0, high_freq=4000.0, target_length=100,
                      mean=FSDD_STATS[0], std=FSDD_STATS[1])
  config.augment.update(mixup=0.0, freq_mask=12, time_mask=20, roll=10)
  config.model.update(variant="", width=192, depth=6, num_heads=3, patch_size=16, fstride=8, tstride=8)
  config.optim.update(lr=5e-4, b1=0.9, b2=0.999, weight_decay=0.05, weight_decay_mode="decoupled",
                      schedule="cosine", warmup_steps=168)
  config.train.update(epochs=30, loss="ce", main_metric="accuracy", log_every_steps=20)
  config.eval_sweep.update(lengths=(64, 100, 150, 200, 240), resolutions=(1.0, 1.5, 2.0, 2.5))
  if arg in ("elastic", "elastic_smoke"):
    config.model.update(patch_size=8, patch_time=16)
    common.elastic(config, rows=2, row_tokens=160, max_clips=32, max_frames=240, drop_rate=0.1,
                   resolutions=tuple(round(1.0 + 0.2 * i, 1) for i in range(9)))
    config.model.positions = "fractional"  # measured better than integer positions at every length and q
    # 90 epochs of ~9 real tokens per clip: 43 TFLOP of training, 39 % of the AST recipe's 110 (models/flops.py).
    config.train.update(epochs=90)
  if arg in ("flexi", "patch8", "patch16"):
    # Non-overlapping patches, the 16x16 kernel stored (PI-resized to other sizes); every model swept over sizes.
    size = {"flexi": 16, "patch8": 8, "patch16": 16}[arg]
    config.model.update(patch_size=size, fstride=size, tstride=size)
    if arg == "flexi":
      config.model.update(flexi_patch_sizes=(8, 10, 12, 16, 20, 24, 32), flexi_patch_weights=(8, 1, 1, 1, 1, 1, 1),
                          flexi_base_weight=0.5)
    config.eval_sweep.update(lengths=(), resolutions=())
    config.eval_patch_sizes = (8, 10, 12, 16, 20, 24, 32)
  if arg == "coarse_to_fine":
    # Measured against the 30 full-resolution epochs: 36 % fewer training FLOPs, 35 % less training time, 98.00
    # against 97.67 % (docs/RESULTS.md, "Coarse-to-fine training on FSDD"). Each phase restarts the schedule.
    config.train.phases = "max_pool:2:20, full:1:10"
  if arg in ("aum_tiny", "ast_tiny", "aum_smoke"):
    config.model.update(variant="tiny", width=0, depth=0, num_heads=0, patch_size=16, fstride=16, tstride=16)
    if arg != "ast_tiny":
      common.aum(config, "tiny")
    config.train.epochs = 10
    config.eval_sweep.update(lengths=(), resolutions=())
  if arg in ("aum_packed", "aum_packed_smoke"):
    # AuM-tiny on ElasticAST's packed rows: every clip at its own length and resolution, a CLS token and a fresh
    # scan state per clip; 16x16 patches as :aum_tiny (4 x frames/16 tokens per clip). One row of 160 tokens holds
    # about 29 clips, so the steps per epoch and the warm-up match :aum_tiny's batch of 32.
    common.aum(config, "tiny")
    common.packed_rows(config, rows=1, row_tokens=160, max_clips=32, max_frames=240, drop_rate=0.0,
                       resolutions=tuple(round(1.0 + 0.2 * i, 1) for i in range(9)))
    config.train.epochs = 10
  if arg in ("smoke", "elastic_smoke", "aum_smoke", "aum_packed_smoke"):
    common.shrink_for_smoke_test(config)
  return config
