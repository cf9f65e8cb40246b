"""Sharding as configuration: one step on 8 simulated devices under several meshes equals one device; a checkpoint
moves between meshes; the mesh and batch checks fail with clear messages."""

import json
import os
import subprocess
import sys

import pytest

from ast_jax.parallel.mesh import mesh_shape

PROGRAM = os.path.join(os.path.dirname(__file__), "programs", "mesh_step.py")


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mesh")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, PROGRAM, str(workdir)], capture_output=True, text=True, timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["2x2x2", "fsdp8", "2x2x2_scan", "2x2x2_accum"])
def test_step_under_a_mesh_equals_one_device(mesh_results, layout):
  assert mesh_results["devices"] == 8
  result = mesh_results[layout]
  assert result["loss_rel"] <= 1e-5 and result["grad_norm_rel"] <= 1e-5
  assert result["params_rel"] <= 1e-5, result


def test_rules_table_places_parameters(mesh_results):
  specs = mesh_results["specs"]
  assert specs["encoder/blocks_0/mlp/fc1/kernel"] == "P('fsdp', 'tensor')"  # column-parallel
  assert specs["encoder/blocks_0/mlp/fc2/kernel"] == "P('tensor', 'fsdp')"  # row-parallel
  assert specs["encoder/blocks_0/attn/qkv/kernel"] == "P('fsdp', 'tensor')"
  assert specs["encoder/blocks_0/attn/proj/kernel"] == "P('tensor', 'fsdp')"
  assert specs["pos_embed"] == "P(None, None, 'fsdp')"


def test_checkpoint_restores_under_another_mesh(mesh_results):
  restored = mesh_results["restore"]
  assert restored["mesh"] == "2x2x2" and restored["step"] == 2
  assert restored["params_rel"] == 0.0
  assert restored["fc1_mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert restored["fc1_spec"] == "P('fsdp', 'tensor')"


def test_mesh_shape_resolves_and_rejects():
  assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="needs 8 devices; there are 4"):
    mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 4)
  with pytest.raises(ValueError, match="at most one -1"):
    mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="do not divide by 3"):
    mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="exactly the axes"):
    mesh_shape({"data": -1, "model": 1}, 8)
