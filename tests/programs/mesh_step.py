"""One training step under several meshes of 8 simulated CPU devices, compared with one device; the compiled step
under tensor parallelism read for q/k/v resharding; and a checkpoint saved under one mesh restored under another.
Run by tests/test_sharding.py in its own process (the device count must be set before JAX starts); prints one JSON
line of results."""

import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import json  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
import numpy as np  # noqa: E402

from ast_jax.convert import model_dir  # noqa: E402
from ast_jax.models import build_model, init_params  # noqa: E402
from ast_jax.models.layers import unscan_layers  # noqa: E402
from ast_jax.parallel import batch_sharding, global_batch, logical_rules, make_mesh, replicated, sharded_jit  # noqa
from ast_jax.parallel.sharding import describe, to_host  # noqa: E402
from ast_jax.train.checkpoint import Checkpointer  # noqa: E402
from ast_jax.train.optim import make_schedule  # noqa: E402
from ast_jax.train.steps import make_train_step  # noqa: E402
from ast_jax.train.trainer import initial_state  # noqa: E402
from configs import demo  # noqa: E402


def make_config(mesh, init_from="", **model):
  config = demo.get_config()
  config.model.update(width=64, depth=2, num_heads=2, **model)
  config.data.batch_size = 8
  config.mesh.update(mesh)
  config.init_from = init_from
  return config


def save_initial_params(workdir):
  """The one-device initialisation as a model directory, so every layout starts from the same weights."""
  config = make_config(dict(data=1, fsdp=1, tensor=1))
  params = init_params(build_model(config), jax.random.key(0), np.zeros((1, 128, 64), np.float32))
  bundle = model_dir.bundle_config(config.model, config.audio, config.num_classes, config.train.loss)
  path = os.path.join(workdir, "initial")
  model_dir.save_model_dir(path, model_dir.ModelBundle(jax.device_get(params), bundle, [str(i) for i in range(8)]))
  return "ast_jax:" + path


def one_step(config, devices, compiled_text=None):
  """(metrics, updated params on the host, the state, its shardings, mesh) after two steps; the compiled step's
  HLO text is appended to `compiled_text` when given."""
  mesh, rules = make_mesh(config.mesh, devices), logical_rules(config.sharding_rules)
  model = build_model(config)
  schedule = make_schedule(config.optim, 10, 100)
  # Plain SGD with a large step: updated parameters are then a linear function of the gradients (Adam's first
  # steps are nearly sign(gradient) and would hide gradient differences; its state is sharded the same way).
  tx = optax.sgd(1.0)
  init_rng, train_rng = jax.random.split(jax.random.key(0))
  state, shardings = initial_state(config, model, tx, mesh, rules, init_rng)
  step = sharded_jit(make_train_step(model, tx, schedule, config, train_rng), mesh, rules,
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated(mesh)))
  rng = np.random.default_rng(0)
  samples = 16000 * 128 // 100 + 240
  batch = {"waveform": rng.normal(size=(8, 1, samples)).astype(np.float32) * 0.1,  # whole-clip rows (data/batch.py)
           "num_samples": rng.integers(samples // 2, samples, (8, 1)).astype(np.int32),
           "label": np.eye(8, dtype=np.float32)[rng.integers(0, 8, (8, 1))], "clip_mask": np.ones((8, 1), np.float32)}
  for _ in range(2):  # the second Adam step depends on the gradients' values, not only their signs
    state, metrics = step(state, global_batch(mesh, batch, rules))
  if compiled_text is not None:  # the step is compiled already: this reads it from the cache
    compiled_text.append(step.lower(state, global_batch(mesh, batch, rules)).compile().as_text())
  metrics = {name: float(value) for name, value in metrics.items()}
  return metrics, unscan_layers(to_host(state.params)), state, shardings, mesh


def qkv_resharding(hlo, width, heads):
  """Collectives in a compiled step that move q/k/v activations between devices: results with the fused
  [3 * width] axis, or [3, heads, head_dim] with every head (gathered over the tensor axis)."""
  found = []
  for dims, op in re.findall(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all|collective-permute|all-reduce|"
                             r"reduce-scatter)\(", hlo):
    shape = tuple(int(size) for size in dims.split(",") if size)
    if shape[-1:] == (3 * width,) or shape[-3:] == (3, heads, width // heads):
      found.append(f"{op} {shape}")
  return found


def max_relative(a, b):
  return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(workdir):
  devices = jax.devices()
  results = {"devices": len(devices)}
  init_from = save_initial_params(workdir)
  base_metrics, base_params, *_ = one_step(make_config(dict(data=1, fsdp=1, tensor=1), init_from), devices[:1])
  for name, mesh, model in [("2x2x2", dict(data=2, fsdp=2, tensor=2), {}),
                            ("fsdp8", dict(data=1, fsdp=-1, tensor=1), {}),
                            ("2x2x2_scan", dict(data=2, fsdp=2, tensor=2), dict(scan_layers=True)),
                            ("2x2x2_accum", dict(data=2, fsdp=2, tensor=2), {})]:
    config = make_config(mesh, init_from, **model)
    if name.endswith("accum"):
      config.train.grad_accum_steps = 2
    compiled_text = [] if name == "2x2x2" else None
    metrics, params, state, shardings, mesh_obj = one_step(config, devices, compiled_text)
    results[name] = {"params_rel": max_relative(base_params, params),
                     **{f"{key}_rel": abs(metrics[key] - base_metrics[key]) / abs(base_metrics[key])
                        for key in ("loss", "grad_norm")}}
    if name == "2x2x2":
      results["specs"] = describe(shardings.params)
      results["qkv_resharding"] = qkv_resharding(compiled_text[0], config.model.width, config.model.num_heads)
      saver = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
      saver.save(1, state, None, {"mesh": name})
      saver.close()
      saved_params = to_host(state.params)
  # Restore the 2x2x2 checkpoint under a pure-FSDP mesh of 4 devices x 2 tensor.
  config = make_config(dict(data=1, fsdp=4, tensor=2), init_from)
  _, _, template, shardings, mesh_obj = one_step(config, devices)
  restored, meta = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1).restore(template, None)
  leaf = restored.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  results["restore"] = {"params_rel": max_relative(saved_params, to_host(restored.params)),
                        "step": int(restored.step), "mesh": meta["mesh"], "fc1_spec": str(leaf.sharding.spec),
                        "fc1_mesh": dict(leaf.sharding.mesh.shape)}
  print(json.dumps(results))


if __name__ == "__main__":
  main(sys.argv[1])
