"""Jigsaw term (Jigsaw-ViT): predict each kept patch token's original position, no pos embed.

The loss is `losses.softmax_cross_entropy` of the position head's logits (models/heads.py
JigsawHead) against the kept patch ids; this module draws what the head predicts.
"""
import jax.numpy as jnp

from sjmae_jax.models.vit import patchify, unpatchify
from sjmae_jax.objectives.pictures import picture_grid


def jigsaw_picture(images, keep_ids, predicted_positions, patch_size: int, max_images: int = 8):
  """Rows of (kept patches in the shuffled order the encoder saw | placed where the head predicts
  | placed at their true positions), each on a canvas of 0 (the data's mean), in the input's
  space (pictures.for_display shows them)."""
  images = images[:max_images].astype(jnp.float32)
  keep_ids, predicted_positions = keep_ids[:max_images], predicted_positions[:max_images]
  b, channels = images.shape[0], images.shape[-1]
  patches = patchify(images, patch_size)
  kept = jnp.take_along_axis(patches, keep_ids[..., None], axis=1)
  rows = jnp.arange(b)[:, None]

  def canvas(positions):
    return unpatchify(jnp.zeros_like(patches).at[rows, positions].set(kept), patch_size, channels)

  shuffled = canvas(jnp.broadcast_to(jnp.arange(kept.shape[1]), keep_ids.shape))
  return picture_grid([shuffled, canvas(predicted_positions), canvas(keep_ids)])
