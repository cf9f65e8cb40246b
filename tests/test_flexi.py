"""FlexiAST PI-resize: resize matrices against torch, token equivalence under resize, positional-grid resizing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.audio.patches import patch_grid
from ast_jax.models.flexi import pi_resize_matrix, resize_matrix, resize_patch_kernel
from ast_jax.models.tokens import PatchEmbed
from tests.references import flexi_patch_embed
from ast_jax.models.positions import resize_table

torch = pytest.importorskip("torch")
F = torch.nn.functional

BASE = (16, 16)
UP = [(16, 16), (20, 20), (24, 24), (32, 32), (48, 48), (16, 24), (16, 32), (24, 40)]  # (freq, time)
DOWN = [(8, 8), (10, 10), (12, 12)]
WIDTH = 8


def torch_resize_matrix(old, new):
  """B built by torch: each one-hot basis image resized in float64, as a column."""
  basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
  resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False, antialias=False)
  return resized.reshape(old[0] * old[1], new[0] * new[1]).T.numpy()


def random_kernel(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(*BASE, 1, WIDTH)).astype(np.float32), rng.normal(size=(WIDTH,)).astype(np.float32)


@pytest.mark.parametrize("new", UP + DOWN + [(5, 21)])
def test_resize_matrix_matches_torch_and_jax(new):
  matrix = resize_matrix(BASE, new)
  assert matrix.dtype == np.float64 and matrix.shape == (new[0] * new[1], 256)
  np.testing.assert_allclose(matrix, torch_resize_matrix(BASE, new), rtol=0, atol=1e-12)
  if new[0] * new[1] >= 256:  # upsampling is checked against jax.image.resize by the token tests
    return
  images = np.random.default_rng(1).normal(size=(3, *BASE)).astype(np.float32)
  resized = jax.image.resize(images, (3, *new), "bilinear", antialias=False)
  np.testing.assert_allclose(np.asarray(resized).reshape(3, -1), images.reshape(3, -1) @ matrix.T, atol=1e-5)


def test_matrices_cached_and_read_only():
  assert resize_matrix(BASE, (24, 40)) is resize_matrix([16, 16], [24, 40])
  assert pi_resize_matrix(BASE, 24) is pi_resize_matrix(BASE, (24, 24))
  with pytest.raises(ValueError):
    pi_resize_matrix(BASE, (24, 40))[0, 0] = 1.0


@pytest.mark.parametrize("new", UP + DOWN)
def test_pi_resize_matrix_is_pinv(new):
  """Against the full-rank closed forms on torch's B: B (B^T B)^-1 (upsampling), (B B^T)^-1 B (downsampling)."""
  b_matrix = torch_resize_matrix(BASE, new)
  if new[0] * new[1] >= 256:
    expected = b_matrix @ np.linalg.inv(b_matrix.T @ b_matrix)
  else:
    expected = np.linalg.solve(b_matrix @ b_matrix.T, b_matrix)
  np.testing.assert_allclose(pi_resize_matrix(BASE, new), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("new", [(10, 10), (16, 24)])
def test_pi_resize_matrix_matches_torch_pinv(new):
  expected = torch.linalg.pinv(torch.from_numpy(torch_resize_matrix(BASE, new)).T).numpy()
  np.testing.assert_allclose(pi_resize_matrix(BASE, new), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("new", UP)
def test_pi_resize_exact_when_upsampling(new):
  identity = resize_matrix(BASE, new).T @ pi_resize_matrix(BASE, new)
  np.testing.assert_allclose(identity, np.eye(256), rtol=0, atol=1e-10)


@pytest.mark.parametrize("new", DOWN)
def test_downsampled_kernel_is_least_squares(new):
  kernel, _ = random_kernel()
  b_matrix = torch_resize_matrix(BASE, new)
  expected, *_ = np.linalg.lstsq(b_matrix.T, kernel.reshape(256, WIDTH).astype(np.float64), rcond=None)
  resized = resize_patch_kernel(kernel.astype(np.float64), new)
  assert resized.shape == (*new, 1, WIDTH) and np.isfinite(resized).all()
  np.testing.assert_allclose(resized.reshape(-1, WIDTH), expected, rtol=0, atol=1e-10)
  # Normal equations: the residual W_old - B^T W_new is orthogonal to the range of B^T.
  residual = kernel.reshape(256, WIDTH) - b_matrix.T @ resized.reshape(-1, WIDTH)
  assert np.abs(residual).max() > 1e-3  # downsampling cannot be exact
  np.testing.assert_allclose(b_matrix @ residual, 0, atol=1e-10)
  resized_f32 = np.asarray(resize_patch_kernel(jnp.asarray(kernel), new))
  assert resized_f32.dtype == np.float32
  np.testing.assert_allclose(resized_f32.reshape(-1, WIDTH), expected, atol=1e-4 * np.abs(expected).max())


def spectrogram_from_patches(patches, extra_mel=0, extra_frames=0):
  """patches `[freq, time, ph, pw]` -> `[1, frames, mel_bins]`, plus trailing bins/frames outside whole patches."""
  freq, time, patch_h, patch_w = patches.shape
  image = patches.transpose(0, 2, 1, 3).reshape(freq * patch_h, time * patch_w)
  image = np.pad(image, ((0, extra_mel), (0, extra_frames)), constant_values=100.0)
  return image.T[None].astype(np.float32)


@pytest.mark.parametrize("new", UP)
def test_tokens_of_resized_patches_unchanged(new):
  """<resize(x), W_new> + b == <x, W_old> + b, patch by patch and for a spectrogram tiled with the patches."""
  kernel, bias = random_kernel()
  patches = np.random.default_rng(2).normal(size=(3, 4, *BASE)).astype(np.float32)  # [freq, time, 16, 16]
  resized = np.asarray(jax.image.resize(patches, (3, 4, *new), "bilinear", antialias=False))
  new_kernel = np.asarray(jax.jit(resize_patch_kernel, static_argnums=1)(jnp.asarray(kernel), new))
  assert new_kernel.shape == (*new, 1, WIDTH) and new_kernel.dtype == np.float32
  expected = np.einsum("fthw,hwd->ftd", patches.astype(np.float64), kernel[:, :, 0].astype(np.float64)) + bias
  tokens = np.einsum("fthw,hwd->ftd", resized.astype(np.float64), new_kernel[:, :, 0].astype(np.float64)) + bias
  scale = np.abs(expected).max()
  np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-4 * scale)

  embed = jax.jit(flexi_patch_embed, static_argnames="patch")
  reference = embed(spectrogram_from_patches(patches), kernel, bias, patch=BASE)
  np.testing.assert_allclose(reference[0], expected.reshape(12, WIDTH), rtol=0, atol=1e-4 * scale)
  spectrogram = spectrogram_from_patches(resized, extra_mel=new[0] - 1, extra_frames=new[1] - 1)
  assert patch_grid(spectrogram.shape[2], spectrogram.shape[1], new) == (3, 4)
  tokens = embed(spectrogram, kernel, bias, patch=new)
  assert tokens.shape == (1, 12, WIDTH)
  np.testing.assert_allclose(tokens, reference, rtol=0, atol=1e-4 * scale)


def test_patch_embed_at_base_matches_ast_layout():
  kernel, bias = random_kernel()
  spectrogram = np.random.default_rng(4).normal(size=(2, 70, 50)).astype(np.float32)  # grid 3 x 4, remainders
  tokens = flexi_patch_embed(spectrogram, kernel, bias, 16)
  ast_tokens = PatchEmbed(WIDTH, (16, 16), (16, 16)).apply({"params": {"proj": {"kernel": kernel, "bias": bias}}}, spectrogram)
  assert tokens.shape == (2, 12, WIDTH)
  np.testing.assert_allclose(tokens, ast_tokens, atol=1e-5)
  # Frequency-major: token f * time + t is the patch at mel bins 16f.. and frames 16t.. .
  patch = spectrogram[1, 16 * 2:16 * 3, 16 * 1:16 * 2].T  # frequency index 1, time index 2
  expected = np.einsum("hw,hwd->d", patch, kernel[:, :, 0]) + bias
  np.testing.assert_allclose(tokens[1, 1 * 4 + 2], expected, atol=1e-4)


def torch_resize_grid(grid, new, antialias):
  image = torch.from_numpy(np.asarray(grid, np.float32)).permute(2, 0, 1)[None]
  resized = F.interpolate(image, size=new, mode="bilinear", align_corners=False, antialias=antialias)
  return resized[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("new", [(5, 21), (16, 128)])
def test_antialias_table_matches_torch_antialias(new):
  pos_embed = np.random.default_rng(5).normal(size=(1, 2 + 8 * 64, 6)).astype(np.float32)
  resize = jax.jit(functools.partial(resize_table, rule="antialias"), static_argnums=(1, 2))
  resized = resize(jnp.asarray(pos_embed), (8, 64), new)
  assert resized.shape == (1, 2 + new[0] * new[1], 6) and resized.dtype == jnp.float32
  np.testing.assert_array_equal(resized[:, :2], pos_embed[:, :2])
  grid = pos_embed[0, 2:].reshape(8, 64, 6)
  expected = torch_resize_grid(grid, new, antialias=True)
  np.testing.assert_allclose(np.asarray(resized[0, 2:]).reshape(*new, 6), expected, rtol=0, atol=1e-5)
  if new == (5, 21):  # the antialias filter changes the downsampled result
    assert np.abs(expected - torch_resize_grid(grid, new, antialias=False)).max() > 0.1


def test_antialias_table_dtype_and_identity():
  pos_embed = jnp.asarray(np.random.default_rng(6).normal(size=(1, 2 + 4 * 8, 4)), jnp.bfloat16)
  resized = resize_table(pos_embed, (4, 8), (2, 5), rule="antialias")
  assert resized.dtype == jnp.bfloat16 and resized.shape == (1, 2 + 10, 4)
  np.testing.assert_array_equal(np.asarray(resized[:, :2], np.float32), np.asarray(pos_embed[:, :2], np.float32))
  assert resize_table(pos_embed, (4, 8), (4, 8), rule="antialias") is pos_embed
  with pytest.raises(ValueError, match="does not match"):
    resize_table(pos_embed, (4, 9), (2, 5), rule="antialias")


def test_kernel_identity_dtype_and_jit_paths():
  kernel, bias = random_kernel()
  assert resize_patch_kernel(kernel, BASE) is kernel
  kernel_bf16 = jnp.asarray(kernel, jnp.bfloat16)
  assert resize_patch_kernel(kernel_bf16, (24, 40)).dtype == jnp.bfloat16
  numpy_resized = resize_patch_kernel(kernel, (24, 40))
  assert isinstance(numpy_resized, np.ndarray) and numpy_resized.dtype == np.float32
  jitted = jax.jit(functools.partial(resize_patch_kernel, new_shape=(24, 40)))(jnp.asarray(kernel))
  np.testing.assert_allclose(jitted, numpy_resized, atol=1e-5)
  spectrogram = np.random.default_rng(7).normal(size=(2, 100, 64)).astype(np.float32)
  eager = flexi_patch_embed(spectrogram, kernel, bias, (8, 12))
  jitted = jax.jit(flexi_patch_embed, static_argnames="patch")(spectrogram, jnp.asarray(kernel), bias, patch=(8, 12))
  assert eager.shape == (2, 8 * 8, WIDTH)
  np.testing.assert_allclose(jitted, eager, atol=1e-4)


def test_non_overlapping_patch_grid():
  assert patch_grid(128, 1024, (16, 16)) == (8, 64)
  assert patch_grid(128, 1000, (24, 40)) == (5, 25)
  assert patch_grid(128, 1024, 48) == (2, 21)
  with pytest.raises(ValueError, match="smaller than one"):
    patch_grid(128, 30, (16, 32))
  with pytest.raises(ValueError, match="smaller than one"):
    patch_grid(10, 1024, 12)
