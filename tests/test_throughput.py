"""Throughput switches: each changes speed or memory, never the numbers (or, for bf16, only within bf16 error)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ast_jax.convert import torch_layout
from ast_jax.models import init_params
from ast_jax.models.ast import AST
from ast_jax.models.vit import vit_kwargs
from ast_jax.models.layers import scan_layers, unscan_layers
from ast_jax.train.trainer import Throughput

SMALL = dict(num_classes=5, width=32, depth=3, num_heads=2, fstride=16, tstride=16)


def spectrogram(batch=2, frames=64, mel_bins=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, frames, mel_bins))


def loss_and_grads(model, params, x):
  labels = jax.nn.one_hot(jnp.arange(x.shape[0]) % 5, 5)

  def loss_fn(params):
    logits, _ = model.apply({"params": params}, x, train=True)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.max(np.abs(x - y)) <= rtol * (np.max(np.abs(x)) + 1e-12)


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow),
                                    pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_policies_give_the_same_gradients(policy):
  x = spectrogram()
  params = init_params(AST(**SMALL), jax.random.key(0), x)
  loss, grads = loss_and_grads(AST(**SMALL), params, x)
  remat_loss, remat_grads = loss_and_grads(AST(**SMALL, remat=policy), params, x)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_trees_close(remat_grads, grads, 1e-5)


@pytest.mark.slow  # 14 s on 2 cores; the default suite keeps the default-suite margin under 10 minutes
def test_scanned_layers_match_unscanned_and_convert_both_ways():
  x = spectrogram()
  params = jax.device_get(init_params(AST(**SMALL), jax.random.key(0), x))
  scanned = scan_layers(params)
  assert scanned["encoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 128)
  assert "blocks_0" not in scanned["encoder"]
  assert_trees_close(unscan_layers(scanned), params, 0.0)
  # The scanned model's own initialisation has the stacked layout.
  fresh = init_params(AST(**SMALL, scan_layers=True), jax.random.key(0), x)
  assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, scanned)
  for remat in ("none", "full"):
    model = AST(**SMALL, scan_layers=True, remat=remat)
    logits, _ = model.apply({"params": scanned}, x)
    np.testing.assert_allclose(logits, AST(**SMALL).apply({"params": params}, x)[0], atol=1e-5)
    loss, grads = loss_and_grads(model, scanned, x)
    assert_trees_close(unscan_layers(jax.device_get(grads)), loss_and_grads(AST(**SMALL), params, x)[1], 1e-5)
  # Export formats see the unscanned layout whatever the training layout.
  timm_scanned, timm_plain = torch_layout.params_to_timm(scanned), torch_layout.params_to_timm(params)
  assert timm_scanned.keys() == timm_plain.keys()
  for name in timm_plain:
    np.testing.assert_array_equal(timm_scanned[name], timm_plain[name])


@pytest.mark.slow  # 16 s; test_model.py keeps a bfloat16 forward check in the default suite
def test_bfloat16_compute_keeps_float32_master_weights():
  x = spectrogram()
  params = init_params(AST(**SMALL, dtype=jnp.bfloat16), jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  model = AST(**SMALL, dtype=jnp.bfloat16)
  logits, intermediates = model.apply({"params": params}, x)
  assert logits.dtype == jnp.float32 and intermediates["tokens"].dtype == jnp.bfloat16
  loss, grads = loss_and_grads(model, params, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  floats = [leaf for leaf in jax.tree.leaves((optax.apply_updates(params, updates), opt_state))
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)  # master weights and Adam moments
  fp32_loss, fp32_grads = loss_and_grads(AST(**SMALL), params, x)
  np.testing.assert_allclose(loss, fp32_loss, rtol=2e-2)
  cosine = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(fp32_grads)))
  cosine /= float(optax.global_norm(grads) * optax.global_norm(fp32_grads))
  assert cosine > 0.99


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN attention kernel needs a GPU")
def test_cudnn_attention_matches_xla():
  x = spectrogram(frames=256, mel_bins=128)
  kwargs = dict(SMALL, width=128, num_heads=2, dtype=jnp.bfloat16)
  params = init_params(AST(**kwargs), jax.random.key(0), x)
  xla, _ = AST(**kwargs).apply({"params": params}, x)
  cudnn, _ = AST(**kwargs, attention="cudnn").apply({"params": params}, x)
  np.testing.assert_allclose(cudnn, xla, atol=2e-2)


def test_switches_are_validated():
  with pytest.raises(ValueError, match="config.model.attention"):
    vit_kwargs({"variant": "tiny", "attention": "flash"}, AST)
  with pytest.raises(ValueError, match="config.model.remat"):
    vit_kwargs({"variant": "tiny", "remat": "some"}, AST)
  assert vit_kwargs({"variant": "tiny", "remat": True}, AST)["remat"] == "full"  # older model directories


def test_throughput_counts_tokens_and_mfu():
  meter = Throughput(examples=8, tokens=800, train_flops=8e9, peak=1e12, num_devices=2)
  stats = meter.summary(steps=10, seconds=2.0)
  assert stats["examples_per_sec"] == 40 and stats["tokens_per_sec"] == 4000
  assert stats["mfu"] == pytest.approx(40 * 1e9 / 2e12)
  assert "mfu" not in Throughput(8, 800, 8e9, None, 1).summary(10, 2.0)


def test_batch_must_split_into_micro_batches():
  from ast_jax.parallel import make_mesh
  from ast_jax.train.config_checks import ConfigError
  from ast_jax.train.config_checks import check_batch_divides
  from configs import demo

  config = demo.get_config()
  config.data.batch_size, config.train.grad_accum_steps = 8, 3
  with pytest.raises(ConfigError, match="grad_accum_steps=3"):
    check_batch_divides(config, make_mesh())


def test_attention_dropout_only_in_training():
  x = spectrogram()
  model = AST(**SMALL, attention_dropout=0.5)
  params = init_params(model, jax.random.key(0), x)
  plain, _ = AST(**SMALL).apply({"params": params}, x)
  evaluated, _ = model.apply({"params": params}, x)
  np.testing.assert_allclose(evaluated, plain, atol=1e-6)
  trained = [model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(seed)})[0]
             for seed in (1, 2)]
  assert np.all(np.isfinite(trained[0])) and not np.allclose(trained[0], trained[1])
