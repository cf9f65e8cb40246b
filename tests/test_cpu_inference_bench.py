"""The CPU inference benchmark (ast_jax/bench/cpu_inference.py): its command on AST-tiny-sized shapes writes one
CSV row per backend and dtype; bad flags are one message."""

from __future__ import annotations

import csv

import jax
import pytest
from absl import app, flags

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ast_jax.bench import cpu_inference  # noqa: E402

TINY = ["--variant=tiny", "--width=64", "--depth=2", "--num_heads=2", "--frames=128", "--batch=1", "--repeats=1",
        "--warmup=0"]


def parsed(argv: list[str]) -> dict[str, flags.FlagHolder]:
  """The command's flags, defined on a set of their own and parsed from `argv`."""
  values = flags.FlagValues()
  holders = cpu_inference.define_flags(values)
  values(["cpu_inference", *argv])
  return holders


def test_command_writes_a_row_per_backend_and_dtype(tmp_path):
  cpu_inference.run_flags(parsed([*TINY, f"--out={tmp_path}"]))
  with open(tmp_path / "cpu_inference.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert list(rows[0]) == list(cpu_inference.COLUMNS)
  cases = [(row["backend"], row["dtype"]) for row in rows]
  assert cases == [("ast_jax_predict", "float32"), ("ast_jax_predict", "bfloat16"), ("ast_jax_model", "float32"),
                   ("ast_jax_model", "bfloat16"), ("torch_hf", "float32"), ("torch_hf", "bfloat16"),
                   ("hf_feature_extractor", "float32")]
  for row in rows:
    assert (row["batch"], row["frames"], row["width"], row["depth"], row["tokens"]) == ("1", "128", "64", "2", "146")
    assert float(row["ms_per_batch"]) > 0 and int(row["threads"]) >= 1 and row["cpu_model"]
    assert float(row["clips_per_sec"]) == pytest.approx(1e3 / float(row["ms_per_batch"]), rel=1e-4)
    assert row["jax_version"] == jax.__version__ and row["torch_version"] and row["date"].startswith("20")
  assert rows[-1]["note"] in ("numpy fbank", "torchaudio fbank")


@pytest.mark.parametrize("flag,message", [("--batch=0", "--batch=0: give positive integers"),
                                          ("--backends=onnx", "--backends=onnx: choose from ast_jax_predict"),
                                          ("--frames=8", "--frames=8: spectrogram 128 mel bins x 8 frames is "
                                                         "smaller than one 16x16 patch")])
def test_bad_flags_are_one_message(tmp_path, flag, message):
  with pytest.raises(app.UsageError, match=message):
    cpu_inference.run_flags(parsed([*TINY, flag, f"--out={tmp_path}"]))
  assert not (tmp_path / "cpu_inference.csv").exists()


@pytest.mark.slow  # 8 s: a subprocess and two model compiles
def test_serving_precision_reports_each_backend_against_ast_jax(tmp_path):
  """bench/serving_precision.py on a small random AST over the demo's evaluation clips: PyTorch float32 agrees
  with ast_jax to float rounding; bfloat16 autocast differs, by a measured amount."""
  import json
  import os
  import subprocess
  import sys

  import numpy as np

  from ast_jax.models import build_model, example_inputs, init_params
  from ast_jax.train.trainer import export_model
  from configs import demo

  config = demo.get_config("smoke")
  params = jax.tree.map(np.asarray, init_params(build_model(config), jax.random.key(0), *example_inputs(config)))
  export_model(str(tmp_path / "model"), params, config, [str(i) for i in range(config.num_classes)])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-m", "ast_jax.bench.serving_precision", f"--checkpoint={tmp_path / 'model'}",
                           "--config=configs/demo.py:smoke", "--config.data.num_eval_examples=16"],
                          capture_output=True, text=True, cwd=root, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [line["backend"] for line in lines] == ["ast_jax float32", "pytorch float32", "pytorch bfloat16 autocast"]
  assert all(line["clips"] == 16 for line in lines)
  assert lines[1]["max_abs_logit_difference"] < 1e-4 < lines[2]["max_abs_logit_difference"]
