"""AST on full AudioSet (2M clips): REFERENCE.md 1.5, column 'AudioSet full'. Paper: 0.459 mAP single model.

Data: AST datafile JSONs for the training and evaluation sets (`--config.data.train_datafile=...`,
`--config.data.eval_datafile=...`). `get_config('smoke')` is the same recipe with a tiny model, for tests.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.num_classes = 527
  config.data.update(source="datafile", train_datafile="data/audioset/train_full.json",
                     eval_datafile="data/audioset/eval.json", label_csv=common.AUDIOSET_LABELS,
                     batch_size=12, balanced_sampling=True, num_workers=8, scan="header")
  config.audio.update(target_length=1024, mean=common.AUDIOSET_STATS[0], std=common.AUDIOSET_STATS[1])
  config.augment.update(mixup=0.5, freq_mask=48, time_mask=192)
  config.model.update(variant="base", fstride=10, tstride=10)
  config.optim.update(lr=1e-5, schedule="step", warmup_steps=1000, decay_start_epoch=2, decay_every=1,
                      decay_factor=0.5)
  config.train.update(epochs=5, loss="bce", main_metric="mAP", average_weights=(1, 5))
  if arg == "smoke":
    common.shrink_for_smoke_test(config)
  return config
