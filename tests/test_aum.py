"""Audio Mamba: the mixer's directions against explicit flip -> scan -> flip, CLS placement as upstream, upstream
parameter counts, weights through upstream's state-dict layout and the plain-PyTorch module, training."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.convert.aum import from_upstream, to_upstream
from ast_jax.models import init_params
from ast_jax.models.aum import CLS_POSITIONS, AuM, cls_positions, prefix_order, sequence_order
from ast_jax.models.mamba import MambaMixer
from ast_jax.models.ssm import selective_scan


def nn_unbox(tree):
  import flax.linen as nn

  return nn.meta.unbox(tree)


def _perturbed(params, scale=0.05, seed=3):
  """Parameters moved off their initial values (A_log = log n, D = 1, ... would hide a swapped tensor)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: (np.asarray(leaf) + scale * rng.normal(size=leaf.shape)).astype(np.float32), params)


def _causal_conv(x, kernel, bias):
  """x [batch, length, channels], kernel [width, channels]: out_l = sum_k kernel[k] x[l - width + 1 + k] + bias."""
  width = kernel.shape[0]
  padded = np.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
  return sum(padded[:, k:k + x.shape[1]] * kernel[k] for k in range(width)) + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def _softplus(x):
  return np.log1p(np.exp(x))


def _direction(x, gate, p, A_log, D, suffix=""):
  """One causal direction on x as given (upstream's mamba_inner_fn_no_out_proj, NumPy + the sequential scan)."""
  u = _silu(_causal_conv(x, p[f"conv1d{suffix}"]["kernel"], p[f"conv1d{suffix}"]["bias"]))
  projected = u @ p[f"x_proj{suffix}"]["kernel"]
  rank = p[f"dt_proj{suffix}"]["kernel"].shape[0]
  dt_low, B, C = projected[..., :rank], projected[..., rank:rank + 16], projected[..., rank + 16:]
  delta = _softplus(dt_low @ p[f"dt_proj{suffix}"]["kernel"] + p[f"dt_proj{suffix}"]["bias"])
  y = selective_scan(u, delta, -np.exp(A_log), B, C, D, method="sequential")
  return np.asarray(y) * _silu(gate)


@pytest.mark.parametrize("bidirectional", ["fo_bi", "bi_bi", "fo_fo"])
def test_mixer_directions_equal_explicit_flip_scan_flip(bidirectional):
  """The backward direction (reverse scan, anti-causal conv) equals upstream's flip -> forward branch -> flip."""
  hidden = np.random.default_rng(0).normal(size=(2, 13, 32)).astype(np.float32)
  mixer = MambaMixer(bidirectional=bidirectional, depth=2, scan="chunked", scan_chunk=4)
  p = _perturbed(jax.tree.map(np.asarray, nn_unbox(mixer.init(jax.random.key(0), hidden)["params"])))
  actual = np.asarray(mixer.apply({"params": p}, hidden))

  x, gate = np.split(hidden @ p["in_proj"]["kernel"], 2, axis=-1)
  flip = lambda a: a[:, ::-1]  # noqa: E731
  forward = _direction(x, gate, p, p["A_log"], p["D"])
  if bidirectional == "fo_bi":  # the forward conv output, delta, B, C, D and gate, scanned from the end with A_b
    u = _silu(_causal_conv(x, p["conv1d"]["kernel"], p["conv1d"]["bias"]))
    projected = u @ p["x_proj"]["kernel"]
    rank = p["dt_proj"]["kernel"].shape[0]
    delta = _softplus(projected[..., :rank] @ p["dt_proj"]["kernel"] + p["dt_proj"]["bias"])
    B, C = projected[..., rank:rank + 16], projected[..., rank + 16:]
    backward = flip(np.asarray(selective_scan(flip(u), flip(delta), -np.exp(p["A_b_log"]), flip(B), flip(C), p["D"],
                                              method="sequential"))) * _silu(gate)
    mixed = forward + backward
  elif bidirectional == "bi_bi":
    mixed = (forward + flip(_direction(flip(x), flip(gate), p, p["A_b_log"], p["D_b"], "_b"))) / 2
  else:
    mixed = (forward + _direction(x, gate, p, p["A_b_log"], p["D_b"], "_b")) / 2
  expected = mixed @ p["out_proj"]["kernel"]
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _insert_to_prefix(x, positions):
  """Upstream FlexiPosEmbed.insert_to_prefix, transcribed to NumPy."""
  for i, position in enumerate(positions):
    x = np.concatenate([x[:, :i], x[:, position:position + 1], x[:, i:position], x[:, position + 1:]], axis=1)
  return x


def _insert_from_prefix(x, positions):
  """Upstream FlexiPosEmbed.insert_from_prefix, transcribed to NumPy."""
  prefix, x = x[:, :len(positions)], x[:, len(positions):]
  for i, position in enumerate(positions):
    x = np.concatenate([x[:, :position], prefix[:, i:i + 1], x[:, position:]], axis=1)
  return x


@pytest.mark.parametrize("cls_position", CLS_POSITIONS)
def test_cls_positions_round_trip_the_positional_table_as_upstream(cls_position):
  num_patches = 11
  positions = cls_positions(num_patches, cls_position)
  assert positions == {"middle": (5,), "head": (0,), "tail": (11,), "head_tail": (0, 12), "none": ()}[cls_position]
  table = np.arange(len(positions) + num_patches, dtype=np.float32)[None, :, None]  # row r holds r
  in_sequence = np.asarray(sequence_order(jnp.asarray(table), positions))
  np.testing.assert_array_equal(in_sequence, _insert_from_prefix(table, positions))
  np.testing.assert_array_equal(np.asarray(prefix_order(jnp.asarray(in_sequence), positions)), table)
  np.testing.assert_array_equal(_insert_to_prefix(in_sequence, positions), table)
  # Row 0 (the CLS row) sits where the CLS token sits; the patch rows keep their order around it.
  if positions:
    assert in_sequence[0, positions[0], 0] == 0
  patch_rows = np.delete(in_sequence[0, :, 0], list(positions))
  np.testing.assert_array_equal(patch_rows, np.arange(len(positions), len(positions) + num_patches))


def test_model_adds_the_table_as_upstream_moves_the_cls_token():
  """Upstream: CLS inserted at N // 2, moved to the front, table added, moved back. Ours adds the table in
  sequence order; the tokens entering the first block must be the same."""
  model = AuM(num_classes=3, width=16, depth=1, cls_position="middle")
  spectrogram = np.random.default_rng(1).normal(size=(1, 64, 32)).astype(np.float32)
  params = _perturbed(init_params(model, jax.random.key(0), spectrogram))
  from ast_jax.models.tokens import PatchEmbed

  tokens = np.asarray(PatchEmbed(16, (16, 16), (16, 16)).apply({"params": params["patch_embed"]}, spectrogram))
  n = tokens.shape[1]
  upstream = np.concatenate([tokens[:, :n // 2], params["cls_token"], tokens[:, n // 2:]], axis=1)
  upstream = _insert_from_prefix(_insert_to_prefix(upstream, (n // 2,)) + params["pos_embed"], (n // 2,))
  ours = np.asarray(sequence_order(jnp.concatenate([params["cls_token"], tokens], axis=1), (n // 2,))
                    + sequence_order(params["pos_embed"], (n // 2,)))
  np.testing.assert_allclose(ours, upstream, rtol=1e-6)


@pytest.mark.parametrize("width, bidirectional, millions", [(768, "fo_bi", 92.108), (384, "bi_bi", 25.539),
                                                            (192, "fo_bi", 6.438)])
def test_parameter_counts_match_upstream(width, bidirectional, millions):
  """docs/BACKGROUND.md section 5.1: base Fo-Bi 92.108 M, small Bi-Bi 25.539 M, tiny Fo-Bi 6.438 M at 128 x 1024,
  527 classes."""
  model = AuM(num_classes=527, width=width, bidirectional=bidirectional)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1024, 128))))["params"]
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  assert round(count / 1e6, 3) == millions


def test_initialisation_follows_upstream():
  model = AuM(num_classes=5, width=64, depth=4, bidirectional="bi_bi")
  params = init_params(model, jax.random.key(0), jnp.zeros((1, 64, 32)))
  mixer = params["encoder"]["blocks_0"]["mixer"]
  np.testing.assert_allclose(np.exp(mixer["A_log"]), np.broadcast_to(np.arange(1, 17), (128, 16)), rtol=1e-6)
  np.testing.assert_array_equal(mixer["D"], 1.0)
  dt = np.log1p(np.exp(np.asarray(mixer["dt_proj"]["bias"])))  # softplus(bias) = the initial step size
  assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
  assert np.abs(mixer["dt_proj"]["kernel"]).max() <= 4**-0.5  # dt_rank = ceil(64 / 16) = 4
  bound = 1 / math.sqrt(128) / math.sqrt(4)  # PyTorch's Linear bound, then 1/sqrt(depth)
  out_proj = np.asarray(mixer["out_proj"]["kernel"])
  assert np.abs(out_proj).max() <= bound and np.abs(out_proj).max() > 0.9 * bound
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)


@pytest.mark.slow  # 8 s; tests/test_ssm.py checks the recompute gradients against float64 in the default suite
def test_recompute_scan_gives_the_mixer_autodiff_gradients():
  """The mixer's output gradients with the hand-written backward pass (recompute) equal autodiff's (sequential);
  models/ssm.py's tests check every implementation against a float64 loop."""
  hidden = np.random.default_rng(2).normal(size=(2, 19, 16)).astype(np.float32)
  weights = np.random.default_rng(3).normal(size=hidden.shape).astype(np.float32)
  results = {}
  for scan in ("sequential", "recompute"):
    mixer = MambaMixer(bidirectional="bi_bi", depth=2, scan=scan)
    params = _perturbed(nn_unbox(mixer.init(jax.random.key(0), hidden)["params"]))
    loss = lambda p, x, mixer=mixer: jnp.sum(mixer.apply({"params": p}, x) * weights)  # noqa: E731
    results[scan] = jax.grad(loss, argnums=(0, 1))(params, hidden)
  for got, want in zip(jax.tree.leaves(results["recompute"]), jax.tree.leaves(results["sequential"])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max() + 1e-9)


@pytest.mark.slow  # 12 s; the default suite runs scanned layers in the AuM-tiny parity test
def test_scanned_rematerialised_layers_give_the_same_logits_and_gradients():
  from ast_jax.models.layers import scan_layers

  spectrogram = np.random.default_rng(6).normal(size=(2, 32, 32)).astype(np.float32)
  plain = AuM(num_classes=3, width=16, depth=2)
  params = _perturbed(init_params(plain, jax.random.key(0), spectrogram))
  stacked = AuM(num_classes=3, width=16, depth=2, scan_layers=True, remat="full")

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, spectrogram)[0] ** 2)

  want, want_grads = jax.value_and_grad(lambda p: loss(plain, p))(params)
  got, got_grads = jax.value_and_grad(lambda p: loss(stacked, p))(scan_layers(params))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(scan_layers(want_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_upstream_state_dict_round_trip_with_module_prefix_and_another_length():
  model = AuM(num_classes=6, width=32, depth=2, bidirectional="bi_bi")
  spectrogram = jnp.zeros((1, 64, 32))
  params = _perturbed(init_params(model, jax.random.key(0), spectrogram))
  state = {"module." + name: value for name, value in to_upstream(params).items()}
  assert state["module.layers.1.mixer.conv1d_b.weight"].shape == (64, 1, 4)
  assert state["module.pos_embed.pos_embed"].shape == (1, 1 + 2 * 4, 32)
  back, report = from_upstream(state, params)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  assert not report.unused and not report.adapted
  # A longer model (128 frames: 2 x 8 patches) takes the table resized along time.
  longer = AuM(num_classes=6, width=32, depth=2, bidirectional="bi_bi")
  template = init_params(longer, jax.random.key(1), jnp.zeros((1, 128, 32)))
  resized, report = from_upstream(state, template, grid=(2, 8))
  assert resized["pos_embed"].shape == (1, 17, 32) and report.adapted
  np.testing.assert_array_equal(resized["pos_embed"][:, 0], params["pos_embed"][:, 0])  # the CLS row is kept
  with pytest.raises(ValueError, match="conv1d_b"):
    from_upstream({name: value for name, value in state.items() if "conv1d_b" not in name}, params)


# The CLS positions other than the middle in small models (AuM-tiny below has every variant with the middle CLS;
# the head position's table order is checked above); the slow suite runs all 15 pairs.
PAIRS = [("bi_bi", "head_tail"), ("fo_fo", "none"), ("fo_bi", "tail")]
ALL_PAIRS = [(bi, cls) for bi in ("fo_bi", "bi_bi", "fo_fo") for cls in CLS_POSITIONS]


@pytest.mark.parametrize("bidirectional, cls_position", PAIRS + [pytest.param(*pair, marks=pytest.mark.slow)
                                                                 for pair in ALL_PAIRS if pair not in PAIRS])
def test_plain_pytorch_module_runs_exported_weights(bidirectional, cls_position):
  """A small model's exported weights give the same logits in plain PyTorch."""
  torch = pytest.importorskip("torch")
  from ast_jax.convert.aum_torch import AudioMamba

  spectrogram = np.random.default_rng(4).normal(size=(2, 64, 32)).astype(np.float32)
  model = AuM(num_classes=5, width=32, depth=2, bidirectional=bidirectional, cls_position=cls_position)
  params = _perturbed(init_params(model, jax.random.key(0), spectrogram))
  ours = np.asarray(model.apply({"params": params}, spectrogram)[0])
  state = {name: torch.from_numpy(value.copy()) for name, value in to_upstream(params).items()}
  single = cls_position in ("middle", "head", "tail")
  module = AudioMamba.from_state_dict(state, bidirectional=bidirectional, mel_bins=32, frames=64,
                                      cls_position=cls_position if single else None)
  with torch.no_grad():
    theirs = module(torch.from_numpy(spectrogram)).numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


# Every variant's mixer runs in the small pairs below; the tiny-size parity of bi_bi and fo_fo is in the slow set.
@pytest.mark.parametrize("bidirectional", ["fo_bi", pytest.param("bi_bi", marks=pytest.mark.slow),
                                           pytest.param("fo_fo", marks=pytest.mark.slow)])
def test_tiny_export_parity_with_plain_pytorch(bidirectional):
  """AuM-tiny (24 layers, width 192), weights exported and run in plain PyTorch: logits within 1e-4 (CPU, fp32)."""
  torch = pytest.importorskip("torch")
  from ast_jax.convert.aum_torch import AudioMamba
  from ast_jax.models.layers import unscan_layers

  spectrogram = np.random.default_rng(5).normal(size=(2, 256, 128)).astype(np.float32)  # 8 x 16 patches
  model = AuM(num_classes=527, width=192, bidirectional=bidirectional, scan_layers=True)
  params = _perturbed(init_params(model, jax.random.key(0), spectrogram), scale=0.02)
  ours = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, spectrogram))
  state = {name: torch.from_numpy(value.copy()) for name, value in to_upstream(unscan_layers(params)).items()}
  module = AudioMamba.from_state_dict(state, bidirectional=bidirectional, mel_bins=128, frames=256)
  with torch.no_grad():
    theirs = module(torch.from_numpy(spectrogram)).numpy()
  assert np.abs(ours).max() > 0.1
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
  print(f"AuM-tiny {bidirectional}: max |logit difference| {np.abs(theirs - ours).max():.2e}")


def test_aum_trains_and_exports(tmp_path):
  """The FSDD AuM recipe (shrunk) trains through the shared trainer; `convert --to=aum` writes its model directory
  as an upstream .pth that reads back to identical weights; HF export refuses it and names the fix."""
  import os
  import subprocess
  import sys

  from ast_jax.convert import hf, model_dir
  from ast_jax.convert.imagenet import read_state_dict
  from ast_jax.train.trainer import train_and_evaluate
  from configs import fsdd

  config = fsdd.get_config("aum_smoke")
  config.train.max_steps = 2
  workdir = tmp_path / "run"
  record = train_and_evaluate(config, str(workdir))
  assert np.isfinite(record["loss"]) and record["train_flops"] > 0
  bundle = model_dir.load_model_dir(str(workdir / "model"))
  assert bundle.config.model.name == "aum"
  with pytest.raises(ValueError, match="--to=aum"):
    hf.save_hf(str(tmp_path / "hf"), bundle)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-m", "ast_jax.convert", "--from=ast_jax", "--to=aum", str(workdir / "model"),
                  str(tmp_path / "aum.pth")], cwd=root, check=True, capture_output=True, timeout=300)
  back, _ = from_upstream(read_state_dict(str(tmp_path / "aum.pth")), bundle.params)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(bundle.params)):
    np.testing.assert_array_equal(got, want)
  # And back through the command line: the .pth with the recipe's config -> an ast_jax model directory.
  subprocess.run([sys.executable, "-m", "ast_jax.convert", "--from=aum", "--to=ast_jax",
                  "--config=configs/fsdd.py:aum_smoke", str(tmp_path / "aum.pth"), str(tmp_path / "again")],
                 cwd=root, check=True, capture_output=True, timeout=300)
  again = model_dir.load_model_dir(str(tmp_path / "again"))
  assert again.config.model.name == "aum"
  for got, want in zip(jax.tree.leaves(again.params), jax.tree.leaves(bundle.params)):
    np.testing.assert_array_equal(got, want)


def test_bad_aum_config_is_a_clear_error():
  from ast_jax.train.config_checks import ConfigError, validate_config
  from configs import fsdd

  config = fsdd.get_config("aum_smoke")
  config.model.bidirectional = "both"
  config.model.scan = "cuda"
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  assert "model.bidirectional='both'" in str(error.value) and "model.scan='cuda'" in str(error.value)
