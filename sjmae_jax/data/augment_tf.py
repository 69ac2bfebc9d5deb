"""Host-side (TensorFlow) part of the augmentations: random numbers, crop boxes, per-image crops.

Each view of each example consumes one row of `NUM_UNIFORMS` uniforms in [0, 1) (layout below),
drawn by the pipeline from stateless seeds, so an augmented batch is a pure function of the run
seed and its position in the run. Semantics follow torchvision / PIL, which the reference PyTorch
code uses: RandomResizedCrop box sampling, antialiased resampling, Resize + CenterCrop for eval.

Crops are expressed per axis as a `CropSpec` row (start, length, total, offset): output pixel i
samples the input span [start, start + length) resized to `total` pixels, at output position
i + offset. A RandomResizedCrop is (top, height, size, 0); eval's resize-shorter-side + center
crop is (0, H, resized_H, center_offset). The batched JAX resampler (augment_jax) reads these;
`crop_one` does the same crop on one image of any size with tf.image.resize.

Images are channels-last RGB; uint8 here, float32 in [0, 1] inside the crop.
"""

import math

import tensorflow as tf

# Layout of the uniforms of one view.
U_AREA = slice(0, 10)  # RandomResizedCrop: up to 10 attempts (torchvision)
U_LOG_RATIO = slice(10, 20)
U_TOP, U_LEFT = 20, 21
U_FLIP = 22
U_JITTER_GATE = 23
U_JITTER_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
U_JITTER_ORDER = slice(28, 32)  # their argsort is the random order of the four jitter ops
U_GRAY_GATE = 32
U_BLUR_GATE = 33
U_BLUR_SIGMA = 34
U_SOLARIZE_GATE = 35
NUM_BASE_UNIFORMS = 36
# Fine-tuning recipes (randaugment.py, random_erasing.py) read a second block, drawn from its own
# key so that adding it left the values of the block above unchanged.
RA_MAX_LAYERS = 4
U_RA_OP = 36  # RandAugment: RA_MAX_LAYERS columns each, one per layer
U_RA_GATE = 40
U_RA_MAGNITUDE = 44
U_RA_SIGN = 48
U_ERASE_GATE = 52
U_ERASE_AREA = slice(53, 63)  # up to 10 attempts (timm)
U_ERASE_LOG_RATIO = slice(63, 73)
U_ERASE_TOP, U_ERASE_LEFT = 73, 74
U_ERASE_SEED = 75  # its bits seed the per-pixel noise
NUM_UNIFORMS = 76

# Crop spec columns: rows (y) then columns (x).
CROP_SPEC_SIZE = 8


def draw_uniforms(key, shape):
  """Uniforms of shape (*shape, NUM_UNIFORMS) from a stateless int64 [2] key."""
  base = tf.random.stateless_uniform([*shape, NUM_BASE_UNIFORMS], seed=key, dtype=tf.float32)
  extra_key = tf.random.experimental.stateless_fold_in(key, tf.constant(1, tf.int64))
  extra = tf.random.stateless_uniform([*shape, NUM_UNIFORMS - NUM_BASE_UNIFORMS], seed=extra_key,
                                      dtype=tf.float32)
  return tf.concat([base, extra], axis=-1)


def decode_image(data):
  """Encoded JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, 3] (gray replicated, alpha dropped)."""
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def rrc_boxes(u, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop boxes (top, left, crop_height, crop_width), torchvision's algorithm.

  `u`: (..., NUM_UNIFORMS). Up to 10 attempts: area ~ U(scale) * H * W, aspect w/h log-uniform
  in `ratio`; the first attempt that fits is used; if none fits, the largest center crop with
  the aspect clamped to `ratio`. top ~ randint[0, H - h], left ~ randint[0, W - w].
  """
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  h_float = tf.cast(height, tf.float32)
  w_float = tf.cast(width, tf.float32)
  target_area = h_float * w_float * (scale[0] + (scale[1] - scale[0]) * u[..., U_AREA])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_low + (log_high - log_low) * u[..., U_LOG_RATIO])
  crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  any_fits = tf.reduce_any(fits, axis=-1)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=-1, output_type=tf.int32)
  batch_dims = len(fits.shape) - 1
  crop_h = tf.gather(crop_h, first, batch_dims=batch_dims)
  crop_w = tf.gather(crop_w, first, batch_dims=batch_dims)

  in_ratio = w_float / h_float
  fallback_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_float * ratio[1]), tf.int32),
                        width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_float / ratio[0]), tf.int32),
                        height)
  crop_h = tf.where(any_fits, crop_h, fallback_h)
  crop_w = tf.where(any_fits, crop_w, fallback_w)
  top_choices = tf.cast(height - crop_h + 1, tf.float32)
  left_choices = tf.cast(width - crop_w + 1, tf.float32)
  top = tf.minimum(tf.cast(tf.floor(u[..., U_TOP] * top_choices), tf.int32), height - crop_h)
  left = tf.minimum(tf.cast(tf.floor(u[..., U_LEFT] * left_choices), tf.int32), width - crop_w)
  top = tf.where(any_fits, top, (height - crop_h) // 2)
  left = tf.where(any_fits, left, (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def eval_resize_size(height, width, size, crop_fraction):
  """torchvision Resize(int(size / crop_fraction)): the shorter side to that, aspect kept."""
  resize_to = int(size / crop_fraction)
  short = tf.minimum(height, width)
  new_h = tf.where(height <= width, resize_to, (resize_to * height) // short)
  new_w = tf.where(width <= height, resize_to, (resize_to * width) // short)
  return new_h, new_w


def center_offset(resized, size):
  """torchvision CenterCrop offset: int(round((resized - size) / 2)), round half to even."""
  return tf.cast(tf.round(tf.cast(resized - size, tf.float32) / 2.0), tf.int32)


def crop_specs(u, height, width, recipe, size, crop_fraction):
  """CropSpec rows (..., 8) float32 of one recipe; `u` (..., NUM_UNIFORMS), H, W scalars."""
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  batch_shape = tf.shape(u)[:-1]
  if recipe.crop == 'center':
    new_h, new_w = eval_resize_size(height, width, size, crop_fraction)
    columns = [0, height, new_h, center_offset(new_h, size),
               0, width, new_w, center_offset(new_w, size)]
    columns = [tf.fill(batch_shape, tf.cast(column, tf.float32)) for column in columns]
  else:
    top, left, crop_h, crop_w = rrc_boxes(u, height, width, tuple(recipe.rrc_scale),
                                          tuple(recipe.rrc_ratio))
    columns = [top, crop_h, tf.fill(batch_shape, size), tf.zeros_like(top),
               left, crop_w, tf.fill(batch_shape, size), tf.zeros_like(left)]
    columns = [tf.cast(column, tf.float32) for column in columns]
  return tf.stack(columns, axis=-1)


def _resize(image, size_hw, interpolation):
  method = {'bicubic': tf.image.ResizeMethod.BICUBIC,
            'bilinear': tf.image.ResizeMethod.BILINEAR}[interpolation]
  return tf.image.resize(image, size_hw, method=method, antialias=True)


def crop_one(image, spec, size, interpolation):
  """Apply one CropSpec to a uint8 image [H, W, 3] of any size -> uint8 [size, size, 3].

  Crop first, then an antialiased resize (torchvision's resized_crop); the result is rounded to
  uint8 as torchvision's PIL path does, which also keeps host -> device transfers small.
  """
  spec = tf.cast(spec, tf.int32)
  y_start, y_length, y_total, y_offset = spec[0], spec[1], spec[2], spec[3]
  x_start, x_length, x_total, x_offset = spec[4], spec[5], spec[6], spec[7]
  crop = tf.cast(image[y_start:y_start + y_length, x_start:x_start + x_length], tf.float32)
  resized = _resize(crop, tf.stack([y_total, x_total]), interpolation)
  resized = resized[y_offset:y_offset + size, x_offset:x_offset + size]
  resized = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
  return tf.ensure_shape(resized, [size, size, 3])
