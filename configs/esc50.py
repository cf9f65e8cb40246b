"""AST on ESC-50, 5-fold cross-validation: docs/BACKGROUND.md section 1.5, column 'ESC-50'. Paper: 95.6 %
(AudioSet init), 88.7 % (ImageNet init only; use lr 1e-4 then).

`--config=configs/esc50.py:3` holds out fold 3 (run folds 1-5 and average). Data root: `--config.data.path=` the
ESC-50 folder holding `meta/esc50.csv` and `audio/`. `:smoke` is the same recipe with a tiny model, for tests.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  smoke = arg == "smoke"
  fold = 1 if smoke or not arg else int(arg)
  config = common.base_config()
  config.num_classes = 50
  config.data.update(source="esc50", path="data/ESC-50-master", fold=fold, batch_size=48, num_workers=8,
                     scan="decode")
  config.audio.update(target_length=512, mean=common.ESC50_STATS[0], std=common.ESC50_STATS[1])
  config.augment.update(mixup=0.0, freq_mask=24, time_mask=96)
  config.model.update(variant="base", fstride=10, tstride=10)
  config.optim.update(lr=1e-5, schedule="step", warmup_steps=0, decay_start_epoch=5, decay_every=1,
                      decay_factor=0.85)
  config.train.update(epochs=25, loss="ce", main_metric="accuracy")
  if smoke:
    common.shrink_for_smoke_test(config)
  return config
