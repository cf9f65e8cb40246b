"""Trainer parts against their references: metrics vs scikit-learn, the upstream schedule, torch-style Adam, losses,
config validation."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ast_jax.train.config_checks import validate_config
from ast_jax.train.losses import classification_loss
from ast_jax.train.metrics import classification_metrics, d_prime
from ast_jax.train.optim import make_optimizer, upstream_step_schedule
from configs import demo


def test_metrics_match_scikit_learn_with_ties():
  rng = np.random.default_rng(0)
  targets = (rng.random((300, 6)) < 0.2).astype(np.float32)
  targets[:, 5] = 0  # a class without positives is left out of the means, not NaN
  scores = np.round(rng.random((300, 6)) + 0.3 * targets, 1)  # rounding creates ties
  metrics = classification_metrics(scores, targets)
  expected_ap = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(5)])
  expected_auc = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in range(5)])
  assert metrics["mAP"] == pytest.approx(expected_ap, abs=1e-12)
  assert metrics["mAUC"] == pytest.approx(expected_auc, abs=1e-12)
  assert metrics["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == targets.argmax(1)))


def test_d_prime_of_the_paper():
  assert d_prime(0.9786) == pytest.approx(2.864, abs=2e-3)  # docs/BACKGROUND.md section 1.6: AUC 0.9786 <-> d' 2.864


def test_metrics_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="examples, classes"):
    classification_metrics(np.zeros((3, 2)), np.zeros((3, 4)))


def test_upstream_schedule_warmup_and_step_decay():
  schedule = upstream_step_schedule(1e-4, 1000, warmup_steps=1000, warmup_every=50, decay_start_epoch=2,
                                    decay_every=1, decay_factor=0.5)
  # Warm-up is set every 50 steps (step 0..49 run at 0), then epochs 1-2 at full lr, halving from epoch 3.
  expected = {0: 0.0, 49: 0.0, 50: 5e-6, 999: 9.5e-5, 1000: 1e-4, 1999: 1e-4, 2000: 5e-5, 3000: 2.5e-5}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step
  esc50 = upstream_step_schedule(1e-5, 10, warmup_steps=0, warmup_every=50, decay_start_epoch=5, decay_every=1,
                                 decay_factor=0.85)
  assert [float(esc50(10 * e)) / 1e-5 for e in range(7)] == pytest.approx([1, 1, 1, 1, 1, 0.85, 0.85**2])


def test_l2_adam_equals_torch_adam_semantics():
  """torch.optim.Adam(weight_decay=w): g += w * p; Adam moments; p -= lr * m_hat / (sqrt(v_hat) + eps)."""
  optim = dict(lr=1e-2, b1=0.95, b2=0.999, eps=1e-8, weight_decay=0.1, weight_decay_mode="l2", grad_clip_norm=0.0)
  tx = make_optimizer(optim, lambda step: optim["lr"])
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = [{"w": jnp.array([0.5, 0.1, -0.25])}, {"w": jnp.array([-0.2, 0.4, 0.1])}]
  state = tx.init(params)
  p, m, v = np.array([1.0, -2.0, 3.0]), np.zeros(3), np.zeros(3)
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    g_l2 = np.asarray(g["w"]) + 0.1 * p
    m = 0.95 * m + 0.05 * g_l2
    v = 0.999 * v + 0.001 * g_l2**2
    p = p - 1e-2 * (m / (1 - 0.95**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
  np.testing.assert_allclose(params["w"], p, rtol=1e-5, atol=1e-6)


def test_losses_mask_padding_and_match_formulas():
  logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [9.0, 9.0, 9.0]])
  labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.3, 0.7], [1.0, 1.0, 1.0]])
  mask = jnp.array([1.0, 1.0, 0.0])
  bce = classification_loss(logits, labels, mask, "bce")
  x, y = np.asarray(logits[:2]), np.asarray(labels[:2])
  expected_bce = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
  assert float(bce) == pytest.approx(expected_bce, rel=1e-6)
  ce = classification_loss(logits, labels, mask, "ce")
  log_softmax = x - np.log(np.exp(x).sum(1, keepdims=True))
  assert float(ce) == pytest.approx(np.mean(-(y * log_softmax).sum(1)), rel=1e-6)
  with pytest.raises(ValueError, match="unknown loss"):
    classification_loss(logits, labels, mask, "hinge")


def test_bad_config_lists_every_problem():
  config = demo.get_config()
  config.data.batch_size = 0
  config.train.loss = "mse"
  config.audio.target_length = 8
  config.train.average_weights = (3, 2)
  with pytest.raises(ValueError) as error:
    validate_config(config)
  message = str(error.value)
  for fragment in ("data.batch_size=0", "train.loss='mse'", "smaller than one 16x16 patch", "average_weights"):
    assert fragment in message


def test_bad_parallelism_and_speed_settings_are_named():
  config = demo.get_config()
  config.mesh.update(data=-1, fsdp=-1)
  config.sharding_rules = (("batch", ("data", "pipeline")), ("embed", "fsdp"))
  config.model.attention = "flash"
  config.model.remat = "sometimes"
  config.train.grad_accum_steps = 0
  with pytest.raises(ValueError) as error:
    validate_config(config)
  message = str(error.value)
  for fragment in ("at most one -1", "('batch', ('data', 'pipeline'))", "model.attention='flash'",
                   "model.remat='sometimes'", "train.grad_accum_steps=0"):
    assert fragment in message, fragment


def test_tensor_parallelism_needs_heads_that_divide():
  config = demo.get_config()
  config.model.update(variant="tiny")  # 3 heads
  config.mesh.update(data=-1, tensor=2)
  with pytest.raises(ValueError, match="tensor=2 does not divide the model's 3 attention heads"):
    validate_config(config)
  config.mesh.update(tensor=3)
  validate_config(config)


def test_recipes_carry_the_paper_hyperparameters():
  from configs import audioset, audioset_balanced, esc50, speechcommands

  full, balanced, esc, sc = (audioset.get_config(), audioset_balanced.get_config(), esc50.get_config("2"),
                             speechcommands.get_config())
  assert (full.optim.lr, full.train.epochs, full.data.batch_size, full.data.balanced_sampling) == (1e-5, 5, 12, True)
  assert (full.optim.decay_start_epoch, full.optim.decay_every, full.optim.decay_factor) == (2, 1, 0.5)
  assert tuple(full.train.average_weights) == (1, 5) and full.augment.mixup == 0.5
  assert (balanced.optim.lr, balanced.train.epochs, balanced.data.balanced_sampling) == (5e-5, 25, False)
  assert (balanced.optim.decay_start_epoch, balanced.optim.decay_every) == (10, 5)
  assert tuple(balanced.train.average_weights) == (6, 25)
  assert (esc.data.fold, esc.audio.target_length, esc.train.loss, esc.optim.warmup_steps) == (2, 512, "ce", 0)
  assert (esc.augment.freq_mask, esc.augment.time_mask, esc.optim.decay_factor) == (24, 96, 0.85)
  assert (sc.optim.lr, sc.data.batch_size, sc.train.epochs, sc.audio.target_length) == (2.5e-4, 128, 30, 128)
  assert (sc.augment.mixup, sc.augment.noise, sc.augment.time_mask) == (0.6, True, 48)
  for config in (full, balanced, esc, sc):
    validate_config(config)
    assert (config.model.fstride, config.model.tstride, config.audio.num_mel_bins) == (10, 10, 128)
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay) == (0.95, 0.999, 5e-7)
