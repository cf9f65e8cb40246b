"""AST model: sizes from the paper, token layout, and a NumPy reference forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from ast_jax.audio.patches import patch_grid
from ast_jax.models import init_params
from ast_jax.models.ast import AST
from ast_jax.models.tokens import PatchEmbed
from ast_jax.models.vit import vit_kwargs


def count(params) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(params))


def abstract_params(model, frames=1024, mel_bins=128):
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, frames, mel_bins))))["params"])


def test_ast_base_audioset_size_and_tokens():
  params = abstract_params(AST(num_classes=527))
  # docs/BACKGROUND.md section 1.2: 88.132 M less 1.538 M DeiT heads
  assert count(params) == pytest.approx(86.59e6, abs=0.005e6)
  assert params["pos_embed"].shape == (1, 1212 + 2, 768)
  assert patch_grid(128, 1024, 16, (10, 10)) == (12, 101)
  stride16 = abstract_params(AST(num_classes=527, fstride=16, tstride=16))
  assert stride16["pos_embed"].shape == (1, 512 + 2, 768)


@pytest.mark.parametrize("frames,grid", [(512, (12, 50)), (128, (12, 12))])
def test_recipe_grids(frames, grid):
  assert patch_grid(128, frames, 16, (10, 10)) == grid


def test_tokens_are_frequency_major():
  model = AST(num_classes=3, width=8, depth=1, num_heads=2, fstride=16, tstride=16)
  spectrogram = jax.random.normal(jax.random.key(1), (1, 64, 48))  # 3 x 4 patches
  variables = {"params": init_params(model, jax.random.key(0), spectrogram)}
  kernel = np.asarray(variables["params"]["patch_embed"]["proj"]["kernel"])[..., 0, :]  # [16 (freq), 16 (time), D]
  embed = PatchEmbed(8, (16, 16), (16, 16))
  tokens = jax.jit(embed.apply)({"params": variables["params"]["patch_embed"]}, spectrogram)
  image = np.asarray(spectrogram[0]).T  # [mel_bins, frames]
  bias = np.asarray(variables["params"]["patch_embed"]["proj"]["bias"])
  for f_index in range(3):
    for t_index in range(4):
      patch = image[16 * f_index:16 * f_index + 16, 16 * t_index:16 * t_index + 16]
      expected = np.einsum("ft,ftd->d", patch, kernel) + bias
      np.testing.assert_allclose(tokens[0, f_index * 4 + t_index], expected, atol=1e-4)


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def reference_forward(params, spectrogram, num_heads, fstride, tstride):
  """An independent NumPy AST forward pass, following docs/BACKGROUND.md section 1.2 line by line."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  image = np.asarray(spectrogram, np.float64)[0].T
  kernel = p["patch_embed"]["proj"]["kernel"][..., 0, :]
  freq, time = patch_grid(image.shape[0], image.shape[1], 16, (fstride, tstride))
  tokens = np.stack([np.einsum("ft,ftd->d", image[f * fstride:f * fstride + 16, t * tstride:t * tstride + 16], kernel)
                     for f in range(freq) for t in range(time)]) + p["patch_embed"]["proj"]["bias"]
  x = np.concatenate([p["cls_token"][0], p["dist_token"][0], tokens]) + p["pos_embed"][0]
  width = x.shape[-1]
  head_dim = width // num_heads
  for index in range(len([k for k in p["encoder"] if k.startswith("blocks_")])):
    block = p["encoder"][f"blocks_{index}"]
    h = _layer_norm(x, block["norm1"]["scale"], block["norm1"]["bias"], 1e-6)
    # Per-head kernels [D, 3, heads, head_dim] and [heads, head_dim, D], flattened C-order as timm's.
    qkv = h @ block["attn"]["qkv"]["kernel"].reshape(width, 3 * width) + block["attn"]["qkv"]["bias"].reshape(-1)
    q, k, v = (qkv[:, i * width:(i + 1) * width].reshape(-1, num_heads, head_dim).transpose(1, 0, 2) for i in range(3))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = (weights @ v).transpose(1, 0, 2).reshape(-1, width)
    x = x + mixed @ block["attn"]["proj"]["kernel"].reshape(width, width) + block["attn"]["proj"]["bias"]
    h = _layer_norm(x, block["norm2"]["scale"], block["norm2"]["bias"], 1e-6)
    h = h @ block["mlp"]["fc1"]["kernel"] + block["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = x + h @ block["mlp"]["fc2"]["kernel"] + block["mlp"]["fc2"]["bias"]
  x = _layer_norm(x, p["encoder"]["norm"]["scale"], p["encoder"]["norm"]["bias"], 1e-6)
  pooled = (x[0] + x[1]) / 2
  head = p["head"]
  return _layer_norm(pooled, head["norm"]["scale"], head["norm"]["bias"], 1e-5) @ head["dense"]["kernel"] + \
      head["dense"]["bias"], pooled


@pytest.mark.parametrize("stride", [10, 16])
def test_forward_matches_numpy_reference(stride):
  model = AST(num_classes=5, width=48, depth=2, num_heads=3, fstride=stride, tstride=stride)
  spectrogram = jax.random.normal(jax.random.key(2), (1, 64, 32))
  params = init_params(model, jax.random.key(0), spectrogram)
  # Non-trivial LayerNorm parameters, so a wrong epsilon or a swapped scale/bias shows.
  noise = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: leaf + 0.1 * noise.standard_normal(leaf.shape).astype(np.float32), params)
  logits, intermediates = jax.jit(model.apply)({"params": params}, spectrogram)
  expected_logits, expected_pooled = reference_forward(params, spectrogram, 3, stride, stride)
  np.testing.assert_allclose(logits[0], expected_logits, atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(intermediates["embedding"][0], expected_pooled, atol=2e-4, rtol=1e-4)


def test_bfloat16_compute_stays_finite_and_close():
  spectrogram = jax.random.normal(jax.random.key(3), (2, 64, 64))
  fp32 = AST(num_classes=4, width=64, depth=2, num_heads=2)
  params = init_params(fp32, jax.random.key(0), spectrogram)
  bf16 = AST(num_classes=4, width=64, depth=2, num_heads=2, dtype=jnp.bfloat16)
  low, _ = jax.jit(bf16.apply)({"params": params}, spectrogram)
  high, _ = jax.jit(fp32.apply)({"params": params}, spectrogram)
  assert low.dtype == jnp.float32 and np.all(np.isfinite(low))
  np.testing.assert_allclose(low, high, atol=0.1)


def test_model_kwargs_errors_name_the_problem():
  with pytest.raises(ValueError, match="unknown ViT variant 'huge'"):
    vit_kwargs({"variant": "huge"}, AST)
  with pytest.raises(ValueError, match="not divisible"):
    vit_kwargs({"variant": "", "width": 100, "depth": 2, "num_heads": 3}, AST)
  with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
    AST(num_classes=2, width=32, depth=1, num_heads=2).init(jax.random.key(0), jnp.zeros((1, 8, 128)))


def test_gelu_is_exact_gelu_with_the_exact_gradient():
  from ast_jax.models.vit import gelu

  x = jnp.linspace(-8.0, 8.0, 2001)
  np.testing.assert_allclose(gelu(x), 0.5 * np.asarray(x) * (1 + erf(np.asarray(x) / np.sqrt(2))), atol=1e-6)
  ours = jax.vmap(jax.grad(gelu))(x)
  reference = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(ours, reference, atol=2e-6)
  x64 = np.asarray(x, np.float64)  # d/dx x Phi(x) = Phi(x) + x phi(x)
  analytic = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64**2 / 2) / np.sqrt(2 * np.pi)
  np.testing.assert_allclose(ours, analytic, atol=2e-6)
