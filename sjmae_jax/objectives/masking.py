"""Per-sample random masking as in facebookresearch/mae (models_mae.py random_masking)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  keep_ids: jax.Array     # (B, K) patch indices kept, in shuffled order
  mask: jax.Array         # (B, L) float, 1 = removed, in original patch order
  ids_restore: jax.Array  # (B, L) inverse permutation of the shuffle


KEEP_RULES = ("floor", "round")


def num_kept(num_patches: int, mask_ratio: float, keep_rule: str = "floor") -> int:
  """Patches kept: 'floor' int(L*(1-ratio)) as MAE (and CAN, SSAT); 'round' int(round(L*(1-ratio)))
  as SJ-MAE's code (the same at 0.75 on square grids; e.g. L=64, ratio 0.6: 25 vs 26)."""
  if keep_rule == "floor":
    return int(num_patches * (1 - mask_ratio))
  if keep_rule == "round":
    return int(round(num_patches * (1 - mask_ratio)))
  raise ValueError(f"masking keep_rule: {keep_rule!r} is not one of {KEEP_RULES}")


def random_masking(rng, batch_size: int, num_patches: int, mask_ratio: float,
                   keep_rule: str = "floor") -> Masking:
  """noise ~ U[0,1); ids_shuffle = argsort(noise); keep the first num_kept(...) of them."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  len_keep = num_kept(num_patches, mask_ratio, keep_rule)
  shuffled_mask = (jnp.arange(num_patches) >= len_keep).astype(jnp.float32)
  mask = jnp.take_along_axis(jnp.broadcast_to(shuffled_mask, (batch_size, num_patches)),
                             ids_restore, axis=1)
  return Masking(ids_shuffle[:, :len_keep], mask, ids_restore)
