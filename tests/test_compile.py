"""Ahead-of-time compilation for TPU pods (`python -m ast_jax.compile`, train/aot.py, parallel/topology.py).

With libtpu installed (requirements-tpu.txt; CI installs it) the trainer's own steps are compiled for a small TPU
slice (v5e:2x2, four chips) under data, fsdp and tensor meshes, for whole-clip AST, packed ElasticAST rows and AuM,
and the reports are checked: memory by kind, the collectives each kind of parallelism must produce, the TPU choices
made while tracing. Shapes are tiny (the demo recipe): a TPU compile of AST at 1024 frames takes minutes on 2 cores.
The pod-sized compiles of the AudioSet recipes are in the slow suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ast_jax import target
from ast_jax.train.aot import collective_stats, hbm_traffic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu.txt)")

HLO = """HloModule jit_step, is_scheduled=true

%body.1 (carry: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %carry = (s32[], f32[8,128]{1,0}) parameter(0)
  %ag = bf16[4096,768]{1,0} all-gather(bf16[1024,768]{1,0} %p), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %x)
}

%cond.1 (carry: (s32[], f32[8,128])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%body.2 (carry: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %cp = f32[8,128]{1,0} collective-permute(f32[8,128]{1,0} %x), channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %cp)
}

%cond.2 (carry: (s32[], f32[8,128])) -> pred[] {
  %bound = s32[]{:T(128)} constant(24)
  %one = s32[] constant(1)
  ROOT %lt = pred[] compare(%a, %bound), direction=LT
}

ENTRY %main.2 (p0: f32[1024,768], p1: f32[16]) -> f32[1024,768] {
  %ar = f32[1024,768]{1,0} all-reduce(f32[1024,768]{1,0} %p0), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(f32[16]{0} %p1), channel_id=2, replica_groups={{0,1},{2,3}}
  %ard = (f32[16]{0}, f32[16]{0}) all-reduce-done(%ars)
  %rs = f32[256,768]{1,0} reduce-scatter(f32[1024,768]{1,0} %ar), channel_id=4, replica_groups=[1,4]<=[4], dimensions={0}
  %w = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"12"}}
  %w2 = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond.2, body=%body.2, metadata={op_name="scan"}
  %onchip = f32[1024,768]{1,0:T(8,128)S(1)} multiply(%ar, %ar)
  ROOT %out = f32[1024,768]{1,0} add(%ar, %onchip)
}
"""


def test_collective_stats_counts_kinds_bytes_and_loop_trips():
  stats = collective_stats(HLO)
  # a combined async all-reduce of two arrays: both counted, the pair once
  assert stats["all-reduce"] == {"count": 2.0, "bytes": 1024 * 768 * 4 + 2 * 16 * 4}
  assert stats["reduce-scatter"] == {"count": 1.0, "bytes": 1024 * 768 * 4}  # its input: result x group size
  assert stats["all-gather"] == {"count": 12.0, "bytes": 12 * 4096 * 768 * 2}  # inside a 12-trip loop
  assert stats["collective-permute"] == {"count": 24.0, "bytes": 24 * 8 * 128 * 4}  # the bound its condition reads
  assert "all-to-all" not in stats


def test_hbm_traffic_reads_operands_and_writes_results_once_per_run():
  array = 1024 * 768 * 4
  # all-reduce, async start, reduce-scatter, multiply (its result on chip: S(1)), add (reads the on-chip one free)
  entry = array + 2 * 16 * 4 + (256 * 768 * 4 + array) + 2 * array + 2 * array
  loops = 12 * 4096 * 768 * 2 + 24 * 8 * 128 * 4  # the bodies' all-gather and permute, once per trip
  assert hbm_traffic(HLO) == entry + loops  # views, tuples, the -done half, loop conditions: nothing


def test_choices_follow_the_compile_target_not_the_host():
  from ast_jax.models import attention, mamba

  assert target.platform() == "cpu"
  assert attention.resolve("auto", np.float32) == "blockwise" and mamba.resolve_scan("auto") == "recompute"
  with target.compiling_for("tpu"):
    assert attention.resolve("auto", np.float32) == "splash" and mamba.resolve_scan("auto") == "pallas"
  with target.compiling_for("gpu"):
    assert attention.resolve("auto", np.dtype("bfloat16")) == "cudnn" and mamba.resolve_scan("auto") == "chunked"
  assert target.platform() == "cpu"
  with pytest.raises(ValueError, match="unknown platform"):
    with target.compiling_for("npu"):
      pass


def test_topology_names():
  from ast_jax.parallel.topology import parse_topology

  pod = parse_topology("v5e:16x16")
  assert (pod.num_chips, pod.num_hosts, pod.slice_name) == (256, 64, "v5litepod-256")
  assert parse_topology("v5p:4x4x4").slice_name == "v5p-128"  # v5p and v4 slices count TensorCores
  assert parse_topology("v4:4x4x4").num_hosts == 16
  for bad, message in (("v3:2x2", "unknown TPU generation"), ("v5e:2", "expected <generation>"),
                       ("v5e:0x2", "at least one chip")):
    with pytest.raises(ValueError, match=message):
      parse_topology(bad)


@pytest.mark.parametrize("arg", [None, "elastic"])
def test_batch_shapes_match_the_trainers_batches(arg):
  from ast_jax import data as data_lib
  from ast_jax.data.inputs import batch_shapes, build_input
  from ast_jax.models import family_of
  from configs import demo

  config = demo.get_config(arg)
  config.data.update(num_train_examples=64, num_eval_examples=16, batch_size=8, eval_batch_size=8)
  packed = family_of(config).trains_packed(config)
  inputs = build_input(config, data_lib.build_sources(config), packed=packed)
  for train, batch in ((True, next(inputs.train_iterator(0))), (False, next(iter(inputs.eval_batches())))):
    expected = batch_shapes(config, packed=packed, train=train)
    assert {key: (value.shape, value.dtype) for key, value in batch.items()} == expected


def test_batch_scaling_keeps_a_batch_that_splits_and_scales_one_that_does_not():
  from ast_jax.parallel import make_mesh
  from ast_jax.train.batch_scaling import scale_to_mesh
  from configs import audioset

  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})  # one CPU device: 12 splits
  config = audioset.get_config()
  config.batch_scaling.per_device = 32
  assert scale_to_mesh(config, mesh)[0] is config

  class Pod:  # a mesh of 256 data-parallel chips, as data_parallel_size sees it
    shape = {"data": 256, "fsdp": 1, "tensor": 1}

  scaled, note = scale_to_mesh(config, Pod(), process_count=64)
  assert scaled.data.batch_size == 32 * 256 and config.data.batch_size == 12
  assert scaled.optim.lr == pytest.approx(1e-5 * np.sqrt(32 * 256 / 12))
  assert scaled.optim.warmup_steps == 200  # 1000 steps of 12 clips is 2 steps of 8192: the floor holds
  assert "does not split over 256" in note
  config.batch_scaling.lr_rule = "linear"
  assert scale_to_mesh(config, Pod())[0].optim.lr == pytest.approx(1e-5 * 32 * 256 / 12)
  config.batch_scaling.per_device = 0
  assert scale_to_mesh(config, Pod())[0] is config  # no rule: check_batch_divides stops the run


@needs_libtpu
@pytest.mark.parametrize("arg, mesh, expect", [
    (None, {"data": 4, "fsdp": 1, "tensor": 1}, {"all-reduce"}),  # gradients summed over the data axis
    (None, {"data": 1, "fsdp": 4, "tensor": 1}, {"all-gather"}),  # parameters gathered where used (ZeRO-3 style)
    ("elastic", {"data": 2, "fsdp": 1, "tensor": 2}, {"all-reduce"}),  # tensor: row-parallel projections summed
])
def test_tpu_compile_of_the_trainers_steps(arg, mesh, expect, tmp_path):
  from ast_jax.train.aot import Target, compile_config
  from configs import demo

  config = demo.get_config(arg)
  config.mesh.update(mesh)
  config.model.depth = 1  # one block shows every collective; each one more costs compile seconds
  if arg == "elastic":
    config.model.num_heads = 4  # heads divide the tensor axis
    config.model.width = 128
  programs = ("train", "eval") if mesh["data"] == 4 else ("train",)  # the eval step once: compiles cost seconds
  report = compile_config(config, Target("v5e:2x2"), programs, hlo_dir=str(tmp_path))
  assert report["platform"] == "tpu" and report["chips"] == 4 and report["fits"]
  train = report["phases"][0]["programs"][0]
  with open(train["hlo_file"]) as file:  # attention=auto: the splash kernel (Mosaic), per shard
    assert "tpu_custom_call" in file.read()
  for program in report["phases"][0]["programs"]:
    assert program["memory"]["argument"] > 0 and program["memory"]["total"] < 2**30
    assert program["fits"] and program["roofline"]["step_seconds"] > 0 and program["cost"]["xla_flops"] > 0
  assert train["memory"]["temp"] > 0  # activations kept for the backward pass
  assert train["memory"]["alias"] > 0  # the donated state's buffers are reused for the new state
  assert expect <= set(train["collectives"]), train["collectives"]
  if mesh["fsdp"] > 1:  # parameters and moments live sharded: less than a replicated state plus a batch quarter
    from ast_jax.data.inputs import batch_shapes

    batch_bytes = sum(np.prod(shape) * dtype.itemsize for shape, dtype in batch_shapes(config, packed=False).values())
    assert train["memory"]["argument"] < _state_bytes(config) + batch_bytes / 4
  assert report["projected_clips_per_second"] > 0


def _state_bytes(config) -> float:
  """Bytes of parameters and two Adam moments, float32."""
  import jax

  from ast_jax.models import build_model, example_inputs

  params = jax.eval_shape(lambda rng: build_model(config).init(rng, *example_inputs(config)), jax.random.key(0))
  return 3 * 4 * sum(leaf.size for leaf in jax.tree.leaves(params))


@needs_libtpu
@pytest.mark.parametrize("packed", [pytest.param(False, marks=pytest.mark.slow), True])  # packed: the kernel + resets
def test_tpu_compile_of_aum_uses_the_pallas_scan(packed, tmp_path):
  """AuM's `scan=auto` compiles the Mosaic selective-scan kernel for TPU, on whole clips and on packed rows (state
  resets per clip), its forward and backward kernels one custom call each per direction."""
  from ast_jax.train.aot import Target, compile_config
  from configs import demo, common

  config = common.aum(demo.get_config(), "tiny", depth=1)
  config.model.update(fstride=16, tstride=16)
  if packed:
    common.packed_rows(config, rows=4, row_tokens=64, max_clips=4, max_frames=128)
  report = compile_config(config, Target("v5e:2x2"), ("train",), hlo_dir=str(tmp_path))
  program = report["phases"][0]["programs"][0]
  assert report["fits"] and program["memory"]["temp"] > 0
  hlo = open(program["hlo_file"]).read()
  assert hlo.count("custom_call_target=\"tpu_custom_call\"") >= 4, "forward and backward kernels, both directions"


@needs_libtpu
def test_compile_command_fails_with_the_fix_when_the_step_does_not_fit(tmp_path):
  report_path = tmp_path / "report.json"
  result = subprocess.run(
      [sys.executable, "-m", "ast_jax.compile", "--config=configs/demo.py", "--topology=v5e:2x2", "--programs=train",
       "--config.data.batch_size=3", "--config.batch_scaling.per_device=65536", f"--json={report_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "DOES NOT FIT" in result.stdout and "--config.batch_scaling.per_device=32768" in result.stdout
  assert "--config.model.remat=full" in result.stdout and "--config.mesh.fsdp=" in result.stdout
  report = json.loads(report_path.read_text())
  assert report["fits"] is False and report["per_chip_batch"] == 65536
  assert report["phases"][0]["programs"][0]["memory"]["total"] > 16 * 2**30


@needs_libtpu
@pytest.mark.slow
def test_search_mesh_ranks_the_splits_that_fit():
  from ast_jax.train.aot import Target, search_mesh
  from configs import demo

  config = demo.get_config()
  config.model.update(width=128, num_heads=4)
  rows = search_mesh(config, Target("v5e:2x2"))
  splits = [tuple(row["mesh"].values()) for row in rows]
  assert sorted(splits) == sorted([(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)])
  compiled = [row for row in rows if "error" not in row]
  assert len(compiled) == 6 and all(row["fits"] for row in compiled)
  estimates = [(row["step_seconds"], row["collective_bytes"]) for row in compiled]
  assert estimates == sorted(estimates)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology, chips", [("v5e:16x16", 256), ("v5p:4x4x4", 64), ("v4:4x4x4", 64), ("v6e:8x8", 64)])
@pytest.mark.parametrize("arg", [None, "elastic", "aum"])
def test_the_audioset_recipes_fit_the_pods_without_edits(arg, topology, chips):
  """The pod table's compiles (docs/RESULTS.md), train step only: one to six minutes each on 2 cores."""
  from ast_jax.train.aot import Target, compile_config
  from configs import audioset

  report = compile_config(audioset.get_config(arg), Target(topology), ("train",))
  assert report["fits"] and report["chips"] == chips and report["hosts"] == chips // 4
  assert report["per_chip_batch"] == {None: 4, "elastic": 2, "aum": 4}[arg]
  assert f"does not split over {chips}" in report["batch_note"]
  program = report["phases"][0]["programs"][0]
  assert "all-reduce" in program["collectives"] and program["memory"]["total"] <= 16 * 2**30


SLICES = """HloModule slices

%inner (p0: f32[12,1024], p1: s32[]) -> f32[1,1024] {
  %p0 = f32[12,1024]{1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%p0, %p1, %zero), dynamic_slice_sizes={1,1024}
}

%outer (q0: f32[12,1024], q1: s32[]) -> f32[1,1024] {
  %q0 = f32[12,1024]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  ROOT %f = f32[1,1024]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%inner
}

%update (u0: f32[12,1024], u1: f32[1,1024], u2: s32[]) -> f32[12,1024] {
  %u0 = f32[12,1024]{1,0} parameter(0)
  %u1 = f32[1,1024]{1,0} parameter(1)
  %u2 = s32[] parameter(2)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[12,1024]{1,0} dynamic-update-slice(%u0, %u1, %u2, %zero.1)
}

ENTRY %main (a: f32[12,1024], i: s32[]) -> f32[12,1024] {
  %a = f32[12,1024]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %read = f32[1,1024]{1,0} fusion(%a, %i), kind=kLoop, calls=%outer
  ROOT %write = f32[12,1024]{1,0} fusion(%a, %read, %i), kind=kLoop, calls=%update
}
"""


def test_hbm_traffic_of_a_layer_read_from_and_written_into_a_stacked_buffer():
  """As a scan over layers reads and stores each layer's slice of [layers, ...] buffers: the slice moves, not the
  buffer, also through a fusion nested in another."""
  row, index = 1024 * 4, 4
  assert hbm_traffic(SLICES) == (row + row + index) + (row + row + index)  # read: slice in, row out; write: in place
