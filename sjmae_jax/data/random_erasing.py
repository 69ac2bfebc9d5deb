"""Random erasing with timm's semantics (timm.data.random_erasing.RandomErasing, mode 'pixel').

Recipe key `random_erase_prob` (0 = off; MAE fine-tuning uses 0.25). Applied after
normalisation, one box per image: with probability p, up to 10 attempts of area
U(0.02, 1/3) x H x W and aspect exp(U(log 0.3, log 1/0.3)); h = round(sqrt(area x aspect)),
w = round(sqrt(area / aspect)); the first attempt with h < H and w < W is used, at
top ~ randint[0, H - h], left ~ randint[0, W - w]; the box is filled with per-pixel N(0, 1) noise
(in normalised units). No attempt fits -> the image is unchanged, as in timm.
"""

import math

import jax
import jax.numpy as jnp

from sjmae_jax.data import augment_host as spec

MIN_AREA, MAX_AREA = 0.02, 1.0 / 3.0
LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))


def erase_boxes(u, height, width):
  """(top, left, box_height, box_width, found) per image, from uniforms (N, NUM_UNIFORMS)."""
  area = height * width
  target_area = (MIN_AREA + (MAX_AREA - MIN_AREA) * u[:, spec.U_ERASE_AREA]) * area  # (N, 10)
  aspect = jnp.exp(LOG_ASPECT[0] + (LOG_ASPECT[1] - LOG_ASPECT[0]) * u[:, spec.U_ERASE_LOG_RATIO])
  box_h = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)  # round half to even, as
  box_w = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)  # Python's round()
  fits = (box_w < width) & (box_h < height)
  found = jnp.any(fits, axis=-1)
  first = jnp.argmax(fits, axis=-1)
  box_h = jnp.take_along_axis(box_h, first[:, None], axis=-1)[:, 0]
  box_w = jnp.take_along_axis(box_w, first[:, None], axis=-1)[:, 0]
  top = jnp.floor(u[:, spec.U_ERASE_TOP] * (height - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, spec.U_ERASE_LEFT] * (width - box_w + 1)).astype(jnp.int32)
  return top, left, box_h, box_w, found


def random_erase(images, u, prob):
  """Normalised views (N, H, W, C), uniforms (N, NUM_UNIFORMS) -> views with erased boxes."""
  n, height, width, channels = images.shape
  top, left, box_h, box_w, found = erase_boxes(u, height, width)
  erase = found & (u[:, spec.U_ERASE_GATE] <= prob)  # timm skips when random() > prob
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  in_box = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  in_box = in_box & erase[:, None, None]
  # Per-image noise from a key derived from the image's uniforms: deterministic like the rest.
  seeds = jax.lax.bitcast_convert_type(u[:, spec.U_ERASE_SEED], jnp.uint32)
  base = jax.random.key(0)
  noise = jax.vmap(lambda seed: jax.random.normal(
      jax.random.fold_in(base, seed), (height, width, channels), images.dtype))(seeds)
  return jnp.where(in_box[..., None], noise, images)
