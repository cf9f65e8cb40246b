"""The embedded default: a small AST on the built-in procedural sound set (8 classes, no files needed).

Finishes in about a minute on 2 CPU cores (61-69 s measured) at 93-95 % accuracy against 12.5 % chance
(docs/RESULTS.md, Demo); the first README command.
The recipe is AST's (Kaldi front end, overlapping-capable patches, cls + dist tokens, SpecAugment, mixup), shrunk.
`:elastic` is ElasticAST on the same clips at their own lengths (0.3-1.5 s), packed into rows of 128 tokens.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base_config()
  config.num_classes = 8
  config.data.update(source="demo", num_train_examples=1600, num_eval_examples=400, batch_size=32,
                     eval_batch_size=100, num_workers=0)
  # mean/std: this front end's log-mel statistics over the demo training set (every fourth clip).
  config.audio.update(num_mel_bins=64, target_length=128, mean=-3.5162, std=3.8126)
  config.augment.update(mixup=0.0, freq_mask=8, time_mask=16)
  config.model.update(variant="", width=96, depth=3, num_heads=3, fstride=16, tstride=16)
  config.optim.update(lr=1e-3, schedule="cosine", warmup_steps=50, weight_decay=0.05, weight_decay_mode="decoupled",
                      b1=0.9)
  config.train.update(epochs=12, loss="ce", main_metric="accuracy", log_every_steps=10)
  if arg in ("elastic", "elastic_smoke"):
    common.elastic(config, rows=4, row_tokens=128, max_clips=16, max_frames=150, drop_rate=0.1)
  elif arg not in (None, "", "smoke"):
    raise ValueError(f"configs/demo.py takes no argument, 'smoke', 'elastic' or 'elastic_smoke', not {arg!r}")
  if arg in ("smoke", "elastic_smoke"):
    common.shrink_for_smoke_test(config)
  return config
