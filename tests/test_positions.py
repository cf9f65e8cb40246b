"""Positional tables (ast_jax/models/positions.py): each named resize rule on small tables, and fractional rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ast_jax.models.positions import RULES, bilinear_resize, fractional_rows, resize_table


def ramp_table(grid: tuple[int, int], prefix: int = 2, width: int = 3) -> np.ndarray:
  """`[1, prefix + F * T, width]` float32 whose row r holds r + 0.25 * channel: every row tells where it came from."""
  rows = prefix + grid[0] * grid[1]
  return (np.arange(rows, dtype=np.float32)[None, :, None] + 0.25 * np.arange(width, dtype=np.float32)).astype(
      np.float32)


def sine_table() -> np.ndarray:
  """`[1, 2 + 2 * 3, 2]` float32: sin(0.7 r) and -2 sin(0.7 r) for row r."""
  return (np.sin(np.arange(8, dtype=np.float32) * 0.7)[None, :, None] * np.float32([1, -2])).astype(np.float32)


@pytest.mark.parametrize("rule", RULES)
def test_same_grid_is_identity(rule):
  table = ramp_table((3, 4))
  table = jnp.asarray(table) if rule == "antialias" else table
  same = resize_table(table, (3, 4), (3, 4), rule=rule)
  np.testing.assert_array_equal(same, table)
  # The NumPy rules hand back a new array, the jit-able one the table itself.
  assert (same is table) == (rule == "antialias")


@pytest.mark.parametrize("old, new", [((6, 10), (4, 6)), ((5, 9), (2, 4)), ((4, 7), (4, 3)), ((3, 3), (1, 1))])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_upstream_cut_is_the_centre_slice(old, new, prefix):
  table = ramp_table(old, prefix)
  cut = resize_table(table, old, new, rule="upstream", prefix=prefix)
  # Upstream's start: int(old / 2) - int(new / 2) per axis.
  f0, t0 = int(old[0] / 2) - int(new[0] / 2), int(old[1] / 2) - int(new[1] / 2)
  grid = table[0, prefix:].reshape(*old, -1)[f0:f0 + new[0], t0:t0 + new[1]]
  np.testing.assert_array_equal(cut[0, prefix:], grid.reshape(new[0] * new[1], -1))
  np.testing.assert_array_equal(cut[:, :prefix], table[:, :prefix])


# Upstream's rule on `sine_table`, channel 0: values pinned from the rule's NumPy implementation before it moved here.
UPSTREAM_PINNED = {
    (3, 5): [0.98544973, 0.9365536, 0.8632094, 0.5462766, 0.3349882, 0.31733325, 0.1887267, -0.0041831136,
             -0.1959126, -0.3237322, -0.35078323, -0.5591002, -0.87157565, -0.9381018, -0.9824526],
    (1, 5): [-0.35078323, -0.5591002, -0.87157565, -0.9381018, -0.9824526],  # frequency cut, time interpolated
    (4, 2): [0.98544973, 0.8632094, 0.6513915, 0.42951316, -0.016724989, -0.43787938, -0.35078323, -0.87157565],
}


@pytest.mark.parametrize("new", list(UPSTREAM_PINNED))
def test_upstream_interpolation_is_pinned(new):
  table = sine_table()
  moved = resize_table(table, (2, 3), new, rule="upstream")
  assert moved.shape == (1, 2 + new[0] * new[1], 2) and moved.dtype == np.float32
  np.testing.assert_array_equal(moved[0, 2:, 0], np.float32(UPSTREAM_PINNED[new]))
  np.testing.assert_array_equal(moved[0, 2:, 1], np.float32(UPSTREAM_PINNED[new]) * np.float32(-2))
  np.testing.assert_array_equal(moved[:, :2], table[:, :2])


def test_bilinear_rule_interpolates_both_axes_without_cutting():
  table = sine_table()
  moved = resize_table(table, (2, 3), (1, 2), rule="bilinear")
  # Pinned as the phase switch computed it before it moved here: an interpolation, where upstream cuts.
  np.testing.assert_array_equal(moved[0, 2:], np.float32([[0.23695415, -0.4739083], [-0.24384491, 0.48768982]]))
  np.testing.assert_array_equal(moved[:, :2], table[:, :2])
  grown = resize_table(table, (2, 3), (3, 5), rule="bilinear")
  np.testing.assert_array_equal(grown[0, 2:], bilinear_resize(table[0, 2:].reshape(2, 3, 2), 3, 5).reshape(15, 2))
  np.testing.assert_array_equal(grown[0, 2:, 0], np.float32(UPSTREAM_PINNED[(3, 5)]))  # growing: upstream's too


@pytest.mark.parametrize("old, new, prefix", [((4, 6), (3, 9), 2), ((4, 6), (7, 11), 2), ((2, 4), (2, 3), 1),
                                              ((2, 8), (2, 4), 0)])
def test_antialias_rule_is_jax_image_resize_with_antialias(old, new, prefix):
  table = np.random.default_rng(0).normal(size=(1, prefix + old[0] * old[1], 5)).astype(np.float32)
  resize = jax.jit(functools.partial(resize_table, rule="antialias", prefix=prefix), static_argnums=(1, 2))
  moved = resize(jnp.asarray(table), old, new)
  expected = jax.image.resize(jnp.asarray(table[0, prefix:].reshape(*old, 5)), (*new, 5), "bilinear", antialias=True)
  assert moved.shape == (1, prefix + new[0] * new[1], 5) and moved.dtype == jnp.float32
  np.testing.assert_array_equal(moved[0, prefix:], np.asarray(expected).reshape(-1, 5))
  np.testing.assert_array_equal(moved[:, :prefix], table[:, :prefix])  # AST's cls, dist; AuM's CLS rows


def test_antialias_rule_keeps_the_dtype():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2 + 4 * 8, 4)), jnp.bfloat16)
  moved = resize_table(table, (4, 8), (2, 5), rule="antialias")
  assert moved.dtype == jnp.bfloat16 and moved.shape == (1, 2 + 10, 4)


def test_bad_rule_grid_or_table_raises():
  table = ramp_table((3, 4))
  with pytest.raises(ValueError, match="rule must be one of"):
    resize_table(table, (3, 4), (2, 2), rule="nearest")
  with pytest.raises(ValueError, match="grids must be positive"):
    resize_table(table, (3, 4), (0, 2), rule="upstream")
  for rule in RULES:
    with pytest.raises(ValueError, match="does not match"):
      resize_table(table, (3, 4), (2, 2), rule=rule, prefix=1)


def test_fractional_rows_at_integer_coordinates_are_table_rows():
  table = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
  # Clips of 9, 3, 1 and 2 patches on a 9-row table, read in one call: coordinate (p + 0.5) * 9 / extent - 0.5.
  positions = np.concatenate([np.arange(9), np.arange(3), [0], np.arange(2)]).astype(np.int32)
  extents = np.repeat(np.int32([9, 3, 1, 2]), [9, 3, 1, 2])
  rows = np.asarray(jax.jit(fractional_rows)(table, positions, extents))
  np.testing.assert_allclose(rows[:9], table, rtol=0, atol=1e-6)  # as long as the table: its rows
  np.testing.assert_allclose(rows[9:12], table[[1, 4, 7]], rtol=0, atol=1e-6)  # centres aligned
  np.testing.assert_allclose(rows[12], table[4], rtol=0, atol=1e-6)  # one patch: the centre row
  # Two patches read between rows (coordinates 1.75 and 6.25).
  np.testing.assert_allclose(rows[13:], [0.25 * table[1] + 0.75 * table[2], 0.75 * table[6] + 0.25 * table[7]],
                             rtol=0, atol=1e-6)
