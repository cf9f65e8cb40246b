"""Learning on real audio: FSDD recordings through the whole path (files -> Grain -> front end -> AST -> metrics).

The default suite trains on a two-digit subset for a minute; the slow test is the full recipe of configs/fsdd.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ast_jax.train.trainer import train_and_evaluate
from configs import fsdd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDINGS = os.path.join(ROOT, os.pardir, "shared", "data", "fsdd", "recordings")
needs_fsdd = pytest.mark.skipif(not os.path.isdir(RECORDINGS), reason=f"FSDD not found at {RECORDINGS}")


@needs_fsdd
def test_two_digits_learned_from_real_recordings(tmp_path):
  """'zero' vs 'one' from every speaker (540 training clips, 60 test clips): far above chance (50 %) after 12 short epochs."""
  subset = tmp_path / "recordings"
  subset.mkdir()
  for name in os.listdir(RECORDINGS):
    if name.split("_")[0] in ("0", "1"):
      os.symlink(os.path.join(RECORDINGS, name), subset / name)
  config = fsdd.get_config()
  config.num_classes = 2
  config.data.update(path=str(subset), scan="header", batch_size=16)
  config.model.update(width=96, depth=3, num_heads=3)
  config.optim.update(lr=1e-3, warmup_steps=20)
  config.train.update(epochs=12, progress_bar=False, tensorboard=False)
  record = train_and_evaluate(config, str(tmp_path / "work"))
  assert record["num_examples"] == 60
  assert record["accuracy"] >= 0.85, record


@pytest.mark.slow
@needs_fsdd
def test_fsdd_recipe_reaches_95_percent(tmp_path):
  """The acceptance run: `python -m ast_jax.main --config=configs/fsdd.py` from scratch, upstream split."""
  workdir = tmp_path / "fsdd"
  subprocess.run([sys.executable, "-m", "ast_jax.main", "--config=configs/fsdd.py", f"--workdir={workdir}",
                  "--config.train.progress_bar=False"], cwd=ROOT, check=True, timeout=45 * 60)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["epoch"] == 30 and records[-1]["num_examples"] == 300
  assert records[-1]["accuracy"] >= 0.95, records[-1]
