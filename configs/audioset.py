"""AST on full AudioSet (2M clips): docs/BACKGROUND.md section 1.5, column 'AudioSet full'. Paper: 0.459 mAP
single model.

Data: AST datafile JSONs for the training and evaluation sets (`--config.data.train_datafile=...`,
`--config.data.eval_datafile=...`). `get_config('smoke')` is the same recipe with a tiny model, for tests.
`get_config('elastic')` is ElasticAST (docs/BACKGROUND.md section 2) on the same data: clips at their own length up
to 1024 frames, each at a resolution q from {1.0, 1.2, ..., 4.0}, packed into rows of 2048 tokens with 10 % token
dropout; waveform mixup is off (clips of their own length are not mixed).
`get_config('aum')` is Audio Mamba base, Fo-Bi, from scratch (docs/BACKGROUND.md section 5.8; upstream's
exps/audioset/aum-base_scratch-audioset.sh): this recipe with AuM-base on non-overlapping 16x16 patches (512 patches
+ a middle CLS token). Upstream reports 32.74 mAP.

On a pod the paper's batch of 12 does not split over the chips; there the recipes train on a batch per chip
(`batch_scaling.per_device`, chosen to fit a 16-GiB TPU v5e chip in float32, measured with `python -m
ast_jax.compile`: 4 clips for AST, 2 rows of 2048 tokens for ElasticAST, 4 clips for AuM) with the learning rate scaled by the square root of the batch ratio
(ast_jax/train/batch_scaling.py). Where 12 splits (one to four devices, six, twelve) the paper's batch is kept.
Check a pod before renting it: `python -m ast_jax.compile --config=configs/audioset.py --topology=v5e:16x16`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.num_classes = 527
  config.data.update(source="datafile", train_datafile="data/audioset/train_full.json",
                     eval_datafile="data/audioset/eval.json", label_csv=common.AUDIOSET_LABELS,
                     batch_size=12, balanced_sampling=True, num_workers=8, scan="header",
                     sample_rates=(16000,))
  config.audio.update(target_length=1024, mean=common.AUDIOSET_STATS[0], std=common.AUDIOSET_STATS[1])
  config.augment.update(mixup=0.5, freq_mask=48, time_mask=192)
  # Blocks scanned: one compiled block. A pod recompiles at every start and resume, and an unrolled AST-base train
  # step takes minutes to compile for TPU (tens for AuM's 24 blocks); the numbers are the same either way.
  config.model.update(variant="base", fstride=10, tstride=10, scan_layers=True)
  config.optim.update(lr=1e-5, schedule="step", warmup_steps=1000, decay_start_epoch=2, decay_every=1,
                      decay_factor=0.5)
  config.train.update(epochs=5, loss="bce", main_metric="mAP", average_weights=(1, 5))
  config.batch_scaling.per_device = 4
  if arg in ("elastic", "elastic_smoke"):
    common.elastic(config, rows=4, row_tokens=2048, max_clips=16, max_frames=1024, drop_rate=0.1,
                   resolutions=tuple(round(1.0 + 0.2 * i, 1) for i in range(16)))
    config.eval_sweep.update(lengths=(256, 512, 1024), resolutions=(1.0, 2.0, 3.0, 4.0))
    config.batch_scaling.per_device = 2
  elif arg in ("aum", "aum_smoke"):
    common.aum(config, "base", bidirectional="fo_bi", cls_position="middle")
    config.batch_scaling.per_device = 4
  elif arg not in (None, "", "smoke"):
    raise ValueError(f"configs/audioset.py takes no argument, 'smoke', 'elastic', 'elastic_smoke', 'aum' or "
                     f"'aum_smoke', not {arg!r}")
  if arg in ("smoke", "elastic_smoke", "aum_smoke"):
    common.shrink_for_smoke_test(config)
  return config
