"""Batched part of the augmentations in JAX: crop + resize by resampling matrices, photometric
ops (flip, colour jitter, grayscale, Gaussian blur, solarize) and normalisation.

All ops work on a batch of views with per-image parameters read from the uniforms drawn on the
host (layout in augment_host), so the result does not depend on where this runs: jitted on the
host CPU inside the pipeline (default), or inside the training step on the accelerator
(`data.augment_on_device=True`). Semantics follow torchvision / PIL; images float32 in [0, 1].
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sjmae_jax.data import augment_host as spec
from sjmae_jax.data import randaugment, random_erasing
from sjmae_jax.data.errors import DataError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL / torchvision rgb_to_grayscale
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes for pixel resampling on GPUs


def _kernel(x, interpolation):
  x = jnp.abs(x)
  if interpolation == "bilinear":
    return jnp.maximum(0.0, 1.0 - x)
  a = -0.5  # Keys cubic, as PIL and tf.image.resize
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.where(x <= 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resample_matrix(start, length, total, offset, in_size, out_size, interpolation):
  """(N, out_size, in_size) weights of one axis of a CropSpec (see augment_host).

  PIL's antialiased resampling of the span [start, start + length) to `total` pixels: output
  pixel j is centred at start + (j + 0.5) * length / total in input coordinates, the kernel is
  stretched by max(length / total, 1), restricted to the span and normalised; rows
  offset .. offset + out_size - 1 are kept. Output pixels with no input pixel under the kernel
  (outside the image: a pad-and-crop's padding) get weight 0.
  """
  start, length, total, offset = (v[:, None, None] for v in (start, length, total, offset))
  scale = length / total
  support_scale = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32)[None, :, None] + offset + 0.5) * scale
  inputs = jnp.arange(in_size, dtype=jnp.float32)[None, None, :]
  weights = _kernel((inputs + 0.5 - centers) / support_scale, interpolation)
  weights = jnp.where((inputs >= start) & (inputs < start + length), weights, 0.0)
  total_weight = jnp.sum(weights, axis=-1, keepdims=True)
  # A row with no input pixel (a pad-and-crop's padding) stays 0: black, as torchvision pads.
  return weights / jnp.where(total_weight > 0, total_weight, 1.0)


def crop_resize(images, crop_spec, size, interpolation):
  """uint8 [N, H, W, 3] of one size, CropSpec rows [N, 8] -> float32 [N, size, size, 3]."""
  height, width = images.shape[1], images.shape[2]
  rows = resample_matrix(*(crop_spec[:, i] for i in range(4)), height, size, interpolation)
  cols = resample_matrix(*(crop_spec[:, i] for i in range(4, 8)), width, size, interpolation)
  images = images.astype(jnp.float32) / 255.0
  resized = jnp.einsum("nih,nhwc->niwc", rows, images, precision=_HIGHEST)
  resized = jnp.einsum("njw,niwc->nijc", cols, resized, precision=_HIGHEST)
  return jnp.clip(resized, 0.0, 1.0)  # bicubic overshoots; PIL clips to the uint8 range


def _per_image(values):
  return values[:, None, None, None]


def flip_left_right(images, do_flip):
  return jnp.where(_per_image(do_flip), images[:, :, ::-1], images)


def grayscale(images):
  gray = images @ jnp.asarray(GRAY_WEIGHTS, jnp.float32)
  return jnp.repeat(gray[..., None], 3, axis=-1)


def _blend(images, other, factor):
  return jnp.clip(_per_image(factor) * images + (1.0 - _per_image(factor)) * other, 0.0, 1.0)


def adjust_brightness(images, factor):
  return jnp.clip(images * _per_image(factor), 0.0, 1.0)


def adjust_contrast(images, factor):
  mean_gray = jnp.mean(images @ jnp.asarray(GRAY_WEIGHTS, jnp.float32), axis=(1, 2))
  return _blend(images, _per_image(mean_gray), factor)


def adjust_saturation(images, factor):
  return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images):
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  value = jnp.max(images, axis=-1)
  chroma = value - jnp.min(images, axis=-1)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  hue = jnp.where(value == red, (green - blue) / safe_chroma,
                  jnp.where(value == green, 2.0 + (blue - red) / safe_chroma,
                            4.0 + (red - green) / safe_chroma))
  hue = hue / 6.0  # in [-1/6, 1)
  hue = jnp.where(chroma > 0, jnp.where(hue < 0, hue + 1.0, hue), 0.0)
  return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
  sector = jnp.floor(hue * 6.0)
  fraction = hue * 6.0 - sector
  sector = sector.astype(jnp.int32) % 6
  p = value * (1.0 - saturation)
  q = value * (1.0 - saturation * fraction)
  t = value * (1.0 - saturation * (1.0 - fraction))
  choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
             (value, p, q)]
  channels = []
  for channel in range(3):
    channels.append(jnp.select([sector == k for k in range(6)],
                               [choice[channel] for choice in choices]))
  return jnp.stack(channels, axis=-1)


def adjust_hue(images, delta):
  hue, saturation, value = rgb_to_hsv(images)
  hue = hue + delta[:, None, None]
  hue = hue - jnp.floor(hue)  # wrap to [0, 1); float mod is slow on CPU
  return jnp.clip(hsv_to_rgb(hue, saturation, value), 0.0, 1.0)


def jitter_factors(u, brightness, contrast, saturation, hue):
  """Per-image factors, as torchvision ColorJitter: U[max(0, 1 - s), 1 + s] and U[-h, h]."""
  factors = u[:, spec.U_JITTER_FACTORS]

  def around_one(column, strength):
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * factors[:, column]
  return (around_one(0, brightness), around_one(1, contrast), around_one(2, saturation),
          -hue + 2.0 * hue * factors[:, 3])


def color_jitter(images, u, brightness, contrast, saturation, hue):
  """torchvision ColorJitter: brightness, contrast, saturation, hue in a random order per image."""
  b, c, s, h = jitter_factors(u, brightness, contrast, saturation, hue)
  order = jnp.argsort(u[:, spec.U_JITTER_ORDER], axis=-1)  # (N, 4): op index at each position

  def apply_position(position, images):
    # Every op is computed for every image and the drawn one selected (a per-image branch
    # would do the same under vmap); a loop, not unrolled, keeps the compiled program small.
    op_index = _per_image(order[:, position])
    return jnp.select(
        [op_index == 0, op_index == 1, op_index == 2],
        [adjust_brightness(images, b), adjust_contrast(images, c),
         adjust_saturation(images, s)],
        adjust_hue(images, h))
  return jax.lax.fori_loop(0, 4, apply_position, images)


def blur_radius(max_sigma, size):
  """Kernel radius ceil(3 * max_sigma), capped so that reflect padding stays inside the image."""
  return max(1, min(int(np.ceil(3.0 * max_sigma)), size - 1))


def _reflect_one_hot(size, radius):
  """(size, 2 radius + 1, size): tap k of output i reads input reflect(i + k - radius)."""
  index = np.abs(np.arange(size)[:, None] + np.arange(-radius, radius + 1)[None, :])
  index = np.where(index > size - 1, 2 * (size - 1) - index, index)
  return np.eye(size, dtype=np.float32)[index]


def gaussian_blur(images, sigma, max_sigma):
  """Separable Gaussian blur, reflect padding, per-image sigma, as two batched matmuls."""
  size = images.shape[1]
  radius = blur_radius(max_sigma, size)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * jnp.square(offsets[None, :] / sigma[:, None]))
  kernel = kernel / jnp.sum(kernel, axis=-1, keepdims=True)  # (N, 2 radius + 1)
  matrix = jnp.einsum("nk,ikj->nij", kernel, _reflect_one_hot(size, radius), precision=_HIGHEST)
  blurred = jnp.einsum("nih,nhwc->niwc", matrix, images, precision=_HIGHEST)
  return jnp.einsum("njw,niwc->nijc", matrix, blurred, precision=_HIGHEST)


def solarize(images, threshold):
  return jnp.where(images < threshold, images, 1.0 - images)


def photometric(images, u, recipe):
  """Flip, colour jitter, grayscale, blur, solarize of a batch of views [N, S, S, 3]."""
  if recipe.flip_prob > 0:
    images = flip_left_right(images, u[:, spec.U_FLIP] < recipe.flip_prob)
  if recipe.jitter_prob > 0:
    jittered = color_jitter(images, u, recipe.brightness, recipe.contrast, recipe.saturation,
                            recipe.hue)
    images = jnp.where(_per_image(u[:, spec.U_JITTER_GATE] < recipe.jitter_prob), jittered,
                       images)
  if recipe.grayscale_prob > 0:
    images = jnp.where(_per_image(u[:, spec.U_GRAY_GATE] < recipe.grayscale_prob),
                       grayscale(images), images)
  if recipe.blur_prob > 0:
    low, high = recipe.blur_sigma
    sigma = low + (high - low) * u[:, spec.U_BLUR_SIGMA]
    images = jnp.where(_per_image(u[:, spec.U_BLUR_GATE] < recipe.blur_prob),
                       gaussian_blur(images, sigma, max_sigma=high), images)
  if recipe.solarize_prob > 0:
    images = jnp.where(_per_image(u[:, spec.U_SOLARIZE_GATE] < recipe.solarize_prob),
                       solarize(images, recipe.solarize_threshold), images)
  return images


def normalize(images, mean, std):
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def finish_views(batch, recipes, size, normalization):
  """Host pre-batch -> {'images': float32 (B, K, S, S, 3), 'label', ['valid']}.

  The pre-batch holds either 'raw' uint8 images (B, H, W, 3) of one size with 'crop_spec'
  (B, K, 8) (cached small images: cropped here), or 'crops' uint8 (B, K, S, S, 3) cropped on
  the host (decoded files); plus 'uniforms' (B, K, NUM_UNIFORMS) and 'label'.
  Views that share a recipe are processed as one batch (one copy of the ops to compile).
  """
  groups = {}
  for view, recipe in enumerate(recipes):
    groups.setdefault(repr(recipe.to_dict()), []).append(view)
  views = [None] * len(recipes)
  for members in groups.values():
    recipe = recipes[members[0]]
    members_array = np.asarray(members)
    uniforms = batch["uniforms"][:, members_array]  # (B, M, U)
    batch_size = uniforms.shape[0]
    if "raw" in batch:
      raw = jnp.repeat(batch["raw"][:, None], len(members), axis=1)
      raw = raw.reshape(-1, *batch["raw"].shape[1:])
      crop_spec = batch["crop_spec"][:, members_array].reshape(-1, spec.CROP_SPEC_SIZE)
      images = crop_resize(raw, crop_spec, size, recipe.interpolation)
    else:
      images = batch["crops"][:, members_array].reshape(-1, size, size, 3)
      images = images.astype(jnp.float32) / 255.0
    flat_uniforms = uniforms.reshape(-1, spec.NUM_UNIFORMS)
    images = photometric(images, flat_uniforms, recipe)
    if recipe.get("randaugment"):
      fill = normalization[0] if normalization is not None else (0.5, 0.5, 0.5)
      images = randaugment.rand_augment(images, flat_uniforms,
                                        randaugment.parse(recipe.randaugment), fill,
                                        recipe.interpolation)
    if normalization is not None:
      images = normalize(images, *normalization)
    if recipe.get("random_erase_prob", 0.0) > 0:
      images = random_erasing.random_erase(images, flat_uniforms, recipe.random_erase_prob)
    images = images.reshape(batch_size, len(members), size, size, 3)
    for position, view in enumerate(members):
      views[view] = images[:, position]
  finished = {"images": jnp.stack(views, axis=1), "label": batch["label"]}
  if "valid" in batch:
    finished["valid"] = batch["valid"]
  return finished


def make_finish_fn(recipes, size, normalization):
  """A pure function pre-batch -> batch (jit it; recipes and sizes are baked in)."""
  for recipe in recipes:  # fail on bad fine-tuning options now, not at the first batch
    if recipe.get("randaugment"):
      randaugment.parse(recipe.randaugment)
    if not 0.0 <= recipe.get("random_erase_prob", 0.0) <= 1.0:
      raise DataError(f"data recipe random_erase_prob={recipe.random_erase_prob!r} is not a "
                      "probability")
  return functools.partial(finish_views, recipes=tuple(recipes), size=size,
                           normalization=normalization)
