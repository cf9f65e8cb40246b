"""ImageNet (timm DeiT/ViT) initialisation: pos-embed adaptation against upstream's torch code, key mapping, formats."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ast_jax.convert import imagenet_init, read_state_dict, sum_rgb_kernel
from ast_jax.models import init_params
from ast_jax.models.ast import AST
from ast_jax.models.positions import bilinear_resize, resize_table

WIDTH, DEPTH, HEADS = 48, 2, 3


def upstream_pos_embed(pos_embed: np.ndarray, old_grid, new_grid, num_prefix=2) -> np.ndarray:
  """upstream ASTModel.__init__'s ImageNet pos-embed code in torch, (old_f, old_t) in place of its 24 x 24."""
  old_f, old_t = old_grid
  f_dim, t_dim = new_grid
  pos = torch.from_numpy(pos_embed)
  dim = pos.shape[2]
  new_pos_embed = pos[:, num_prefix:, :].reshape(1, old_f * old_t, dim).transpose(1, 2).reshape(1, dim, old_f, old_t)
  if t_dim <= old_t:
    new_pos_embed = new_pos_embed[:, :, :, int(old_t / 2) - int(t_dim / 2): int(old_t / 2) - int(t_dim / 2) + t_dim]
  else:
    new_pos_embed = F.interpolate(new_pos_embed, size=(old_f, t_dim), mode="bilinear", align_corners=False)
  if f_dim <= old_f:
    new_pos_embed = new_pos_embed[:, :, int(old_f / 2) - int(f_dim / 2): int(old_f / 2) - int(f_dim / 2) + f_dim, :]
  else:
    new_pos_embed = F.interpolate(new_pos_embed, size=(f_dim, t_dim), mode="bilinear", align_corners=False)
  new_pos_embed = new_pos_embed.reshape(1, dim, f_dim * t_dim).transpose(1, 2)
  return torch.cat([pos[:, :num_prefix, :], new_pos_embed], dim=1).numpy()


def upstream_audioset_pos_embed(pos_embed: np.ndarray, t_dim: int) -> np.ndarray:
  """upstream's AudioSet-pretrained branch verbatim (12 x 101 grid, time only, strict `t_dim < 101` cut)."""
  pos = torch.from_numpy(pos_embed)
  dim = pos.shape[2]
  new_pos_embed = pos[:, 2:, :].reshape(1, 1212, dim).transpose(1, 2).reshape(1, dim, 12, 101)
  if t_dim < 101:
    new_pos_embed = new_pos_embed[:, :, :, 50 - int(t_dim / 2): 50 - int(t_dim / 2) + t_dim]
  else:
    new_pos_embed = F.interpolate(new_pos_embed, size=(12, t_dim), mode="bilinear", align_corners=False)
  new_pos_embed = new_pos_embed.reshape(1, dim, 12 * t_dim).transpose(1, 2)
  return torch.cat([pos[:, :2, :], new_pos_embed], dim=1).numpy()


TARGETS = [(12, 101), (12, 50), (12, 12), (8, 64)]


@pytest.mark.parametrize("old_grid", [(24, 24), (12, 101)])
@pytest.mark.parametrize("new_grid", TARGETS)
def test_upstream_rule_matches_upstream(old_grid, new_grid):
  rng = np.random.default_rng(0)
  pos_embed = rng.standard_normal((1, 2 + old_grid[0] * old_grid[1], 16)).astype(np.float32)
  adapted = resize_table(pos_embed, old_grid, new_grid, rule="upstream")
  assert adapted.shape == (1, 2 + new_grid[0] * new_grid[1], 16)
  np.testing.assert_allclose(adapted, upstream_pos_embed(pos_embed, old_grid, new_grid), rtol=1e-5, atol=1e-6)
  if old_grid == (12, 101) and new_grid[0] == 12:
    np.testing.assert_allclose(adapted, upstream_audioset_pos_embed(pos_embed, new_grid[1]), rtol=1e-5, atol=1e-6)


def test_upstream_rule_centre_cut_rows_and_identity():
  pos_embed = np.arange(2 + 12 * 101, dtype=np.float32)[None, :, None]  # row value = row index
  cut = resize_table(pos_embed, (12, 101), (8, 64), rule="upstream")[0, :, 0]
  np.testing.assert_array_equal(cut[:2], [0, 1])
  # frequency rows 6 - 4 = 2.., time columns 50 - 32 = 18..
  assert cut[2] == 2 + 2 * 101 + 18 and cut[2 + 64] == 2 + 3 * 101 + 18
  same = resize_table(pos_embed, (12, 101), (12, 101), rule="upstream")
  np.testing.assert_array_equal(same, pos_embed)
  assert same is not pos_embed
  with pytest.raises(ValueError, match="does not match"):
    resize_table(pos_embed, (24, 24), (12, 12), rule="upstream")


@pytest.mark.parametrize("shape,size", [((5, 7, 3), (11, 4)), ((24, 24, 8), (12, 101)), ((3, 9, 2), (3, 9)),
                                        ((1, 6, 4), (5, 2)), ((8, 64, 5), (13, 200))])
def test_bilinear_resize_matches_torch(shape, size):
  grid = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=size, mode="bilinear",
                           align_corners=False)[0].permute(1, 2, 0).numpy()
  resized = bilinear_resize(grid, *size)
  assert resized.dtype == np.float32
  np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-6)


def test_sum_rgb_kernel():
  weight = np.random.default_rng(2).standard_normal((WIDTH, 3, 16, 16)).astype(np.float32)
  kernel = sum_rgb_kernel(torch.from_numpy(weight))
  assert kernel.shape == (16, 16, 1, WIDTH)
  expected = torch.sum(torch.from_numpy(weight), dim=1).unsqueeze(1).permute(2, 3, 1, 0).numpy()  # upstream's sum
  np.testing.assert_allclose(kernel, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sum_rgb_kernel(weight, mode="mean"), expected / 3, rtol=1e-6, atol=1e-6)


def timm_state_dict(width=WIDTH, depth=DEPTH, grid=24, distilled=True, seed=0) -> dict[str, np.ndarray]:
  """Random tensors in timm's DeiT (or plain ViT) layout."""
  rng = np.random.default_rng(seed)
  prefix = 2 if distilled else 1
  shapes = {"cls_token": (1, 1, width), "pos_embed": (1, prefix + grid * grid, width),
            "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
            "norm.weight": (width,), "norm.bias": (width,), "head.weight": (1000, width), "head.bias": (1000,)}
  if distilled:
    shapes.update({"dist_token": (1, 1, width), "head_dist.weight": (1000, width), "head_dist.bias": (1000,)})
  for i in range(depth):
    shapes.update({f"blocks.{i}.norm1.weight": (width,), f"blocks.{i}.norm1.bias": (width,),
                   f"blocks.{i}.attn.qkv.weight": (3 * width, width), f"blocks.{i}.attn.qkv.bias": (3 * width,),
                   f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
                   f"blocks.{i}.norm2.weight": (width,), f"blocks.{i}.norm2.bias": (width,),
                   f"blocks.{i}.mlp.fc1.weight": (4 * width, width), f"blocks.{i}.mlp.fc1.bias": (4 * width,),
                   f"blocks.{i}.mlp.fc2.weight": (width, 4 * width), f"blocks.{i}.mlp.fc2.bias": (width,)})
  return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def fresh_params():
  """Small AST at 128 mel bins x 1024 frames, stride 10: a 12 x 101 patch grid."""
  model = AST(num_classes=5, width=WIDTH, depth=DEPTH, num_heads=HEADS)
  return init_params(model, jax.random.key(0), jnp.zeros((1, 1024, 128)))


def test_imagenet_init_deit(fresh_params):
  state = {f"module.{key}": value for key, value in timm_state_dict().items()}  # DataParallel prefix
  params, report = imagenet_init(state, fresh_params, new_grid=(12, 101))
  plain = {key.removeprefix("module."): value for key, value in state.items()}
  np.testing.assert_allclose(params["patch_embed"]["proj"]["kernel"][..., 0, :],
                             plain["patch_embed.proj.weight"].sum(1).transpose(1, 2, 0), rtol=1e-5, atol=1e-5)
  # timm's qkv rows are q, k, v, each heads-major; ours are split per head: [D, 3, heads, head_dim].
  head_dim = WIDTH // HEADS
  qkv, proj = (params["encoder"]["blocks_1"]["attn"][name] for name in ("qkv", "proj"))
  key_rows = slice(WIDTH + 2 * head_dim, WIDTH + 3 * head_dim)  # k of head 2
  np.testing.assert_array_equal(qkv["kernel"][:, 1, 2], plain["blocks.1.attn.qkv.weight"][key_rows].T)
  np.testing.assert_array_equal(qkv["bias"][1, 2], plain["blocks.1.attn.qkv.bias"][key_rows])
  np.testing.assert_array_equal(proj["kernel"][2], plain["blocks.1.attn.proj.weight"][:, 2 * head_dim:].T)
  np.testing.assert_array_equal(params["encoder"]["blocks_0"]["norm2"]["scale"], plain["blocks.0.norm2.weight"])
  np.testing.assert_array_equal(params["encoder"]["norm"]["bias"], plain["norm.bias"])
  np.testing.assert_array_equal(params["dist_token"], plain["dist_token"])
  np.testing.assert_array_equal(params["pos_embed"],
                                resize_table(plain["pos_embed"], (24, 24), (12, 101), rule="upstream"))
  np.testing.assert_array_equal(params["head"]["dense"]["kernel"], fresh_params["head"]["dense"]["kernel"])
  assert report["fresh"] == ["head/dense/bias", "head/dense/kernel", "head/norm/bias", "head/norm/scale"]
  assert sorted(report["unused"]) == [f"module.{key}" for key in
                                      ("head.bias", "head.weight", "head_dist.bias", "head_dist.weight")]
  assert len(report["loaded"]) + len(report["fresh"]) == len(jax.tree.leaves(fresh_params))
  # The converted tree runs in the model.
  model = AST(num_classes=5, width=WIDTH, depth=DEPTH, num_heads=HEADS)
  logits, _ = model.apply({"params": params}, jnp.zeros((1, 1024, 128)))
  assert logits.shape == (1, 5) and bool(jnp.isfinite(logits).all())


def test_imagenet_init_plain_vit_duplicates_cls(fresh_params):
  state = timm_state_dict(grid=14, distilled=False)
  params, report = imagenet_init({f"model.{key}": value for key, value in state.items()}, fresh_params,
                                 new_grid=(12, 101))
  np.testing.assert_array_equal(params["dist_token"], state["cls_token"])
  np.testing.assert_array_equal(params["cls_token"], state["cls_token"])
  pos = params["pos_embed"]
  np.testing.assert_array_equal(pos[:, 0], state["pos_embed"][:, 0])
  np.testing.assert_array_equal(pos[:, 1], state["pos_embed"][:, 0])
  np.testing.assert_allclose(pos[:, 2:], resize_table(state["pos_embed"], (14, 14), (12, 101), rule="upstream",
                                                      prefix=1)[:, 1:])
  assert sorted(report["unused"]) == ["model.head.bias", "model.head.weight"]


def test_imagenet_init_mismatches_raise(fresh_params):
  with pytest.raises(ValueError, match=r"encoder/blocks_1/attn/qkv/kernel.*blocks\.1\.attn\.qkv\.weight"):
    imagenet_init(timm_state_dict(depth=1), fresh_params, new_grid=(12, 101))
  with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc1\.weight"):
    imagenet_init(timm_state_dict(depth=3), fresh_params, new_grid=(12, 101))
  with pytest.raises(ValueError, match=r"encoder/blocks_0/attn/qkv/kernel <- 'blocks\.0\.attn\.qkv\.weight'"):
    imagenet_init(timm_state_dict(width=64), fresh_params, new_grid=(12, 101))
  with pytest.raises(ValueError, match=r"pos_embed.*new_grid \(12, 50\)"):
    imagenet_init(timm_state_dict(), fresh_params, new_grid=(12, 50))


@pytest.mark.parametrize("suffix", [".pth", ".npz", ".safetensors"])
def test_read_state_dict_round_trip(tmp_path, suffix):
  state = timm_state_dict(depth=1, grid=2)
  path = str(tmp_path / f"weights{suffix}")
  if suffix == ".pth":
    torch.save({"model": {key: torch.from_numpy(value) for key, value in state.items()}, "epoch": 3}, path)
  elif suffix == ".npz":
    np.savez(path, **state)
  else:
    from safetensors.numpy import save_file

    save_file(state, path)
  loaded = read_state_dict(path)
  assert sorted(loaded) == sorted(state)
  for key, value in state.items():
    assert isinstance(loaded[key], np.ndarray) and loaded[key].dtype == np.float32
    np.testing.assert_array_equal(loaded[key], value)
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    read_state_dict(str(tmp_path / "weights.bin"))


def test_a_pth_without_pytorch_names_the_package(tmp_path, monkeypatch):
  """Reading a .pth (and writing one) where torch cannot be imported is one clear error naming what to install."""
  import sys

  path = tmp_path / "weights.pth"
  torch.save({"w": torch.zeros(2)}, path)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ValueError, match=r"reading .*weights.pth needs PyTorch, which is not installed: pip install torch"):
    read_state_dict(str(path))
