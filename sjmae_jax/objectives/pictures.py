"""Shared pieces of the pictures objectives show in TensorBoard."""
import jax.numpy as jnp


def to_unit_range(images, reference=None):
  """Images (B, H, W, C) scaled per image to [0, 1] by the min and max of `reference` (default:
  the images themselves), clipped; so pictures derived from an image share its scale."""
  reference = images if reference is None else reference
  lo = reference.min(axis=(1, 2, 3), keepdims=True)
  hi = reference.max(axis=(1, 2, 3), keepdims=True)
  return jnp.clip((images - lo) / (hi - lo + 1e-6), 0, 1)


def picture_grid(columns):
  """Columns of images (each (B, H, W, C)) -> one picture (1, B*H, n*W, C): a row per image."""
  grid = jnp.concatenate(columns, axis=2)
  return grid.reshape(-1, *grid.shape[2:])[None]
