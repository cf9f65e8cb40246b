"""Benchmarks: the analytic FLOP count against hand counts, the peak table, and the sweep command line."""

import csv
import os
import subprocess
import sys
import types

import jax
import pytest

from ast_jax.models import config_flops
from ast_jax.models import flops
from ast_jax.train import throughput
from ast_jax.bench.cases import COLUMNS, Case, expand_cases, run_sweep
from configs.common import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A one-block, 64-wide model keeps compilation to a second or two on a CPU.
SMALL = ["--variants=tiny", "--width=64", "--depth=1", "--num_heads=2", "--frames=128", "--batch=1", "--repeats=1",
         "--warmup=1"]


def test_forward_flops_hand_count():
  # 4 patches + 2 prefix tokens, D=8, M=32, one block, 3 classes.
  patch = 4 * 16 * 16 * 8 * 2
  block = 2 * 6 * 8 * 24 + 2 * 6 * 6 * 8 + 2 * 6 * 6 * 8 + 2 * 6 * 8 * 8 + 2 * 2 * 6 * 8 * 32
  head = 2 * 8 * 3
  shape = dict(width=8, depth=1, mlp_dim=32, num_tokens=6, patch_size=16, num_patches=4, num_classes=3)
  assert flops.forward_flops(**shape) == patch + block + head == 26800
  assert flops.train_flops_per_example(**shape) == 3 * 26800


def test_attention_flops_grow_faster_than_tokens():
  shape = dict(width=192, depth=12, mlp_dim=768, patch_size=16, num_classes=527)
  short = flops.forward_flops_breakdown(num_tokens=302, num_patches=300, **shape)
  long = flops.forward_flops_breakdown(num_tokens=604, num_patches=600, **shape)
  assert long["attention"] == pytest.approx(4 * short["attention"])
  assert long["mlp"] == pytest.approx(2 * short["mlp"])
  assert sum(long.values()) > 2 * sum(short.values())


def test_config_flops_ast_base_audioset():
  counts = config_flops(base_config())
  tokens, width = 1214, 768  # docs/BACKGROUND.md section 1.2: 12 x 101 patches + cls + dist
  expected = 1212 * 256 * width * 2 + 12 * (24 * tokens * width**2 + 4 * tokens**2 * width) + 2 * width * 527
  assert (counts["freq"], counts["time"], counts["tokens"]) == (12, 101, tokens)
  assert counts["forward_flops"] == expected
  assert counts["train_flops"] == 3 * expected


def test_config_flops_flexiast_is_the_mean_over_the_drawn_sizes():
  def config_at(size, **flexi):
    config = base_config()
    config.audio.update(num_mel_bins=64, target_length=100)
    config.model.update(width=64, depth=2, num_heads=2, patch_size=size, fstride=size, tstride=size, **flexi)
    return config

  per_size = {size: config_flops(config_at(size)) for size in (8, 16, 32)}
  for base_weight, weights in ((0.0, ()), (0.5, ()), (0.0, (2, 1, 1))):
    flexi = config_flops(config_at(16, flexi_patch_sizes=(8, 16, 32), flexi_base_weight=base_weight,
                                         flexi_patch_weights=weights))
    probs = {8: 0.5, 16: 0.25, 32: 0.25} if weights else {size: 1 / 3 for size in per_size}
    extra = (probs[8] + probs[32]) * per_size[16]["train_flops"] if base_weight else 0.0  # stored size at 8, 32
    mean = sum(probs[size] * counts["train_flops"] for size, counts in per_size.items()) + extra
    assert flexi["train_flops"] == pytest.approx(mean, rel=1e-6)
    assert flexi["train_flops_per_step"] == pytest.approx(mean * base_config().data.batch_size, rel=1e-6)


def test_peak_flops_lookup():
  assert throughput.peak_flops_per_device(jax.devices("cpu")[0], "float32") is None
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  assert throughput.peak_flops_per_device(h100, "bfloat16") == 989e12
  assert throughput.peak_flops_per_device(h100, jax.numpy.float32) == 494e12  # TF32 at the default precision
  with jax.default_matmul_precision("highest"):
    assert throughput.peak_flops_per_device(h100, "float32") == 67e12
  assert throughput.peak_flops_per_device("TPU v5 lite", "bfloat16") == 197e12
  assert throughput.peak_flops_per_device(jax.devices("cpu")[0], "float32", override=1e12) == 1e12
  assert throughput.mfu(1e12, 1.0, 2, 1e12) == 0.5
  assert throughput.mfu(1e12, 1.0, 1, None) is None


def test_aum_flops_hand_count():
  # Width 16 (d_inner 32, dt rank 1, state 16, conv 4), 4 patches + 1 CLS token, one layer, 3 classes.
  tokens = 5
  in_proj, out_proj = 2 * tokens * 16 * 64, 2 * tokens * 32 * 16
  branch = 2 * tokens * 32 * (4 + 1 + 32 + 1)  # conv, x_proj (rank + B + C), dt_proj
  scan = 2 * 4 * tokens * 32 * 16  # two directions x (state update + readout)
  shape = dict(width=16, depth=1, num_tokens=tokens, patch_size=16, num_patches=4, num_classes=3)
  parts = flops.aum_forward_flops_breakdown(**shape)
  assert sum(parts.values()) == 4 * 256 * 16 * 2 + in_proj + branch + scan + out_proj + 2 * 16 * 3
  two_branches = flops.aum_forward_flops_breakdown(bidirectional="bi_bi", **shape)
  assert two_branches["branch"] == 2 * parts["branch"] and two_branches["scan"] == parts["scan"]
  # The recipe's count: AuM-base at 1024 frames holds 8 x 64 patches + the CLS token.
  from configs.common import aum

  counts = config_flops(aum(base_config(), "base"))
  assert (counts["freq"], counts["time"], counts["tokens"], counts["mlp_dim"]) == (8, 64, 513, 0)


@pytest.mark.slow  # 6 s; test_sweep_cli_writes_csv keeps the bench in the default suite
def test_aum_sweep_case_is_timed(tmp_path):
  case = Case("tiny", 64, 1, stride=16, width=32, depth=1, backbone="aum")
  (row,) = run_sweep([case], str(tmp_path), warmup=0, repeats=1, plot=False)
  assert (row["backbone"], row["width"], row["tokens"], row["num_heads"]) == ("aum", 32, 8 * 4 + 1, 0)
  assert row["attention"] == "scan=recompute" and row["ms_per_step"] > 0 and row["peak_memory_mb"] > 0
  with pytest.raises(ValueError, match="AST cases only"):
    run_sweep([case], str(tmp_path), compare="torch", plot=False)


def test_presets_and_overrides():
  assert len(expand_cases("tiny")) == 2 and len(expand_cases("lengths")) == 6 and len(expand_cases("gpu")) == 7
  aum_cases = expand_cases("aum")
  assert {case.backbone for case in aum_cases} == {"ast", "aum"} and len(aum_cases) == 14
  assert [8 * case.frames // 16 for case in aum_cases[:7]] == [256, 512, 1024, 2048, 4096, 8192, 16384]
  assert {case.dtype for case in expand_cases("gpu")} == {"bfloat16"}
  # Every preset case takes the override, and cases that become equal are measured once.
  assert expand_cases("tiny", variants=["tiny"], frames=[128], batch=[1]) == [Case("tiny", 128, 1)]
  cases = expand_cases("gpu", frames=[1024], remat=["none", "full"])
  assert len(cases) == 10 and {case.remat for case in cases} == {"none", "full"}


def read_rows(path):
  with open(path, newline="") as file:
    return list(csv.DictReader(file))


def test_sweep_cli_writes_csv(tmp_path):
  subprocess.run([sys.executable, "-m", "ast_jax.bench", "--sweep=tiny", *SMALL, f"--out={tmp_path}"], cwd=ROOT,
                 check=True, capture_output=True, timeout=300)
  rows = read_rows(tmp_path / "bench.csv")
  assert len(rows) == 1 and set(COLUMNS) <= set(rows[0])
  row = rows[0]
  assert (row["variant"], row["width"], row["depth"], row["frames"], row["tokens"]) == ("tiny", "64", "1", "128",
                                                                                      "146")
  assert (row["dtype"], row["attention"], row["remat"], row["device"]) == ("float32", "blockwise", "none", "cpu")
  for column in ("compile_s", "ms_per_step", "infer_ms_per_step", "examples_per_sec", "tflops_per_sec",
                 "peak_memory_mb"):
    assert float(row[column]) > 0, column
  assert float(row["tokens_per_sec"]) == pytest.approx(146 * float(row["examples_per_sec"]), rel=1e-4)
  assert row["mfu"] == "" and row["memory_source"] == "compiled"  # no peak is known for a CPU
  assert row["torch_ms_per_step"] == "" and row["ratio_to_torch"] == ""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return
  assert (tmp_path / "bench.png").stat().st_size > 0


@pytest.mark.slow  # 8 s; test_sweep_cli_writes_csv keeps the bench command in the default suite
def test_sweep_compares_with_torch(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  case = Case("tiny", 128, 1, width=64, depth=1, num_heads=2)
  rows = run_sweep([case], str(tmp_path), warmup=1, repeats=1, compare="torch", plot=False)
  row = read_rows(tmp_path / "bench.csv")[0]
  assert float(row["torch_ms_per_step"]) > 0 and row["torch_device"] == "cpu"
  assert float(row["ratio_to_torch"]) == pytest.approx(rows[0]["ms_per_step"] / rows[0]["torch_ms_per_step"],
                                                        rel=1e-4)


def test_packing_bench_pads_an_ast_with_the_same_patches_to_the_longest_clip():
  from ast_jax.bench.packed_vs_padded import padded_ast_config
  import jax
  import jax.numpy as jnp

  from ast_jax.models import build_model, init_params
  from ast_jax.train.config_checks import validate_config
  from configs import fsdd

  elastic = fsdd.get_config("elastic")  # 8 x 16 patches
  ast = padded_ast_config(elastic, 226, 32)
  validate_config(ast)
  assert ast.model.name == "ast" and (ast.model.fstride, ast.model.tstride) == (8, 16)
  assert ast.audio.target_length == 240 and ast.data.batch_size == 32  # 226 frames, rounded up to whole patches
  assert elastic.model.name == "elastic"  # the ElasticAST config is left as it was
  model = build_model(ast)
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 240, 64)))
  assert params["patch_embed"]["proj"]["kernel"].shape == (8, 16, 1, 192)  # 8 mel bins x 16 frames
  assert params["pos_embed"].shape == (1, 2 + 8 * 15, 192)
