"""Sharding as configuration: one step on 8 simulated devices under several meshes equals one device; tensor
parallelism splits attention by heads, never between q, k and v; a checkpoint moves between meshes; batches and
activations are placed by the config's rules; the mesh and batch checks fail with clear messages."""

import json
import os
import subprocess
import sys
import types

import jax
import pytest
from jax.sharding import PartitionSpec

from ast_jax.parallel import batch_sharding, data_parallel_size, logical_rules, make_mesh
from ast_jax.parallel.mesh import mesh_shape
from configs import common

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
  # Attention kernels per head ([embed, 3, heads, head_dim], [heads, head_dim, embed]): the tensor axis splits heads.
  assert specs["encoder/blocks_0/attn/qkv/kernel"] == "P('fsdp', None, 'tensor', None)"
  assert specs["encoder/blocks_0/attn/qkv/bias"] == "P(None, 'tensor', None)"
  assert specs["encoder/blocks_0/attn/proj/kernel"] == "P('tensor', None, 'fsdp')"
  assert specs["pos_embed"] == "P(None, None, 'fsdp')"


def test_tensor_parallel_step_never_moves_qkv_across_devices(mesh_results):
  # Under the fused [embed, 3 * embed] kernel the tensor split fell between q, k and v, and every block gathered
  # its qkv activations ([batch, length, 3 * embed], then [..., 3, heads, head_dim]) across the tensor axis.
  assert mesh_results["qkv_resharding"] == []


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


def test_batches_and_activations_are_placed_by_the_config_rules():
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = logical_rules(common.base_config().sharding_rules)
  assert batch_sharding(mesh, rules).spec == batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
  assert dict(rules)["act_heads"] == dict(rules)["act_mlp"] == "tensor" and dict(rules)["act_embed"] is None
  assert "qkv" not in dict(rules) and "kv" not in dict(rules)
  assert batch_sharding(mesh, (("batch", "data"),)).spec == PartitionSpec("data")
  assert batch_sharding(mesh, (("embed", "fsdp"),)).spec == PartitionSpec()  # no batch rule: replicated
  assert logical_rules([("act_mlp", None)]) == (("act_mlp", None),)  # no rules but the config's
  fake_mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 2})
  assert data_parallel_size(fake_mesh) == data_parallel_size(fake_mesh, rules) == 8
  assert data_parallel_size(fake_mesh, (("batch", "data"),)) == 4
