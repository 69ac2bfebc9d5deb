"""Shared pieces of the pictures objectives show in TensorBoard.

Objectives draw their pictures in the space of their input (images as the data pipeline hands
them: normalized by the dataset's mean and std); `for_display` maps them back to [0, 1] with that
mean and std, once, for every objective. A per-image min/max stretch would tint gray images (the
three channels are normalized differently) and change contrast from picture to picture.
"""
import math

import jax.numpy as jnp

MIN_TILE_SIDE = 96  # pixels: tiles of small images (8x8 digits, 32 px CIFAR) are enlarged to this


def for_display(picture, mean, std):
  """A picture in the input's normalized space -> [0, 1] (x * std + mean, clipped)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return jnp.clip(picture.astype(jnp.float32) * std + mean, 0.0, 1.0)


def picture_grid(columns):
  """Columns of images (each (B, H, W, C)) -> one picture (1, B*H*k, n*W*k, C): a row per image,
  each tile enlarged k times (nearest neighbour) so that it is at least MIN_TILE_SIDE pixels."""
  grid = jnp.concatenate(columns, axis=2)
  scale = max(1, math.ceil(MIN_TILE_SIDE / grid.shape[1]))
  grid = jnp.repeat(jnp.repeat(grid, scale, axis=1), scale, axis=2)
  return grid.reshape(-1, *grid.shape[2:])[None]
