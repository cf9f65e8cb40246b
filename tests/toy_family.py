"""A model family defined outside ast_jax, as a user adds one: mean-pooled patch embeddings and a linear head.

`--config.model.name=tests.toy_family` selects it; nothing in ast_jax names it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ast_jax.audio.patches import patch_grid, patch_of, strides_of
from ast_jax.models import flops
from ast_jax.models.family import Family
from ast_jax.models.tokens import PatchEmbed, TokenLayout, whole_clip_rows


class Toy(nn.Module):
  num_classes: int
  width: int = 16
  patch: tuple[int, int] = (16, 16)
  strides: tuple[int, int] = (16, 16)

  @nn.compact
  def __call__(self, spectrogram: jax.Array, layout: TokenLayout | None = None, *, train: bool = False,
               patch: tuple[int, int] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    tokens = PatchEmbed(self.width, self.patch, self.strides, name="patch_embed")(
        whole_clip_rows(spectrogram, layout, "toy"))
    pooled = jnp.mean(tokens, axis=1)
    return nn.Dense(self.num_classes, name="head")(pooled), {"embedding": pooled}


def toy_flops(config: Any) -> dict[str, float]:
  patch = patch_of(config.model)
  freq, time = patch_grid(config.audio.num_mel_bins, config.audio.target_length, patch, strides_of(config.model))
  shape = dict(width=16, depth=0, num_tokens=freq * time, num_patches=freq * time, patch_size=patch)
  forward = freq * time * patch[0] * patch[1] * 16 * 2 + 2 * 16 * config.num_classes
  return flops.summary(shape, freq=freq, time=time, batch=config.data.batch_size, forward=forward)


FAMILY = Family(
    name="toy",
    model=Toy,
    kwargs=lambda config: dict(patch=patch_of(config.model), strides=strides_of(config.model)),
    flops=toy_flops,
)
