"""AST on balanced AudioSet (20K clips): docs/BACKGROUND.md section 1.5, column 'AudioSet balanced'.
Paper: 0.347 mAP single.

`get_config('smoke')` is the same recipe with a tiny model, for tests; `get_config('elastic')` is ElasticAST, as in
configs/audioset.py.
"""

import ml_collections

from configs import audioset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = audioset.get_config(arg)
  config.data.update(train_datafile="data/audioset/train_balanced.json", balanced_sampling=False)
  config.optim.update(lr=5e-5, decay_start_epoch=10, decay_every=5, decay_factor=0.5)
  if arg not in ("smoke", "elastic_smoke"):
    config.train.update(epochs=25, average_weights=(6, 25))
  return config
