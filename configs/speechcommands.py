"""AST on Speech Commands V2 (35 words): docs/BACKGROUND.md section 1.5, column 'Speech Commands V2-35'.
Paper: 98.11 % test.

Data root: `--config.data.path=` the speech_commands_v0.02 folder (one folder per word, validation_list.txt,
testing_list.txt). Evaluates on the test list (`--config.data.eval_split=validation` for the validation list).
`:smoke` is the same recipe with a tiny model, for tests.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.num_classes = 35
  config.data.update(source="speechcommands", path="data/speech_commands_v0.02",
                     label_csv=common.SPEECHCOMMANDS_LABELS, eval_split="test", batch_size=128, num_workers=8,
                     scan="header", sample_rates=(16000,))
  config.audio.update(target_length=128, mean=common.SPEECHCOMMANDS_STATS[0], std=common.SPEECHCOMMANDS_STATS[1])
  config.augment.update(mixup=0.6, freq_mask=48, time_mask=48, noise=True, roll=10)
  config.model.update(variant="base", fstride=10, tstride=10)
  config.optim.update(lr=2.5e-4, schedule="step", warmup_steps=0, decay_start_epoch=5, decay_every=1,
                      decay_factor=0.85)
  config.train.update(epochs=30, loss="bce", main_metric="accuracy")
  if arg == "smoke":
    common.shrink_for_smoke_test(config)
  return config
