"""Block stacking shared by every backbone: `depth` copies of one block, rematerialised per policy, either unrolled
(`blocks_0 ... blocks_{depth-1}`) or one `nn.scan` (`blocks`, parameters stacked on a leading 'layers' axis).

A block is written in scan form, `block(carry, *broadcast) -> (carry, None)`: the carry flows from block to block
and the broadcast arguments (masks, flags) reach every block unchanged. `ast_jax.models.layers` converts parameters
between the two layouts.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the elementwise work
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def stack_blocks(block_cls: type[nn.Module], block_fields: dict[str, Any], carry: Any, *broadcast: Any, depth: int,
                 scan_layers: bool = False, remat: str = "none", static_argnums: Sequence[int] = ()) -> Any:
  """Runs `depth` blocks `block_cls(**block_fields)` on `carry` inside the calling module's compact method and
  returns the last carry. `static_argnums` are the block's static arguments as `nn.remat` counts them (`self` is 0,
  the carry 1, the broadcast arguments from 2)."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  if remat != "none":
    # Rematerialisation trades compute for activation memory. prevent_cse keeps XLA from merging the recomputation
    # back into the forward pass; a scan's loop already does, where the guard would only cost speed.
    block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[remat], static_argnums=tuple(static_argnums),
                         prevent_cse=not scan_layers)
  if scan_layers:
    scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(broadcast), length=depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    carry, _ = scanned(**block_fields, name="blocks")(carry, *broadcast)
    return carry
  for index in range(depth):
    carry, _ = block_cls(**block_fields, name=f"blocks_{index}")(carry, *broadcast)
  return carry
