"""Host-side part of the augmentations (NumPy, PIL): random numbers, crop boxes, per-image crops.

Each view of each example consumes one row of `NUM_UNIFORMS` uniforms in [0, 1) (layout below),
drawn by the pipeline from a stateless generator keyed by the run seed and the batch's position in
the run, so an augmented batch is a pure function of (seed, step). Semantics follow torchvision /
PIL, which the reference PyTorch code uses: RandomResizedCrop box sampling, antialiased resampling,
Resize + CenterCrop for eval.

Crops are expressed per axis as a `CropSpec` row (start, length, total, offset): output pixel i
samples the input span [start, start + length) resized to `total` pixels, at output position
i + offset. A RandomResizedCrop is (top, height, size, 0); eval's resize-shorter-side + center
crop is (0, H, resized_H, center_offset); a pad-and-crop is (top - pad, size, size, 0), whose
pixels outside the image are black (the padding). The batched JAX resampler (augment_jax) reads these;
`crop_one` does the same crop on one image of any size with PIL (torchvision's resized_crop), or
with OpenCV (data.resize='opencv': faster, slightly different pixels).

Images are channels-last RGB uint8.
"""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from sjmae_jax.data.errors import DataError

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
# Fine-tuning recipes (randaugment.py, random_erasing.py) read a second block.
RA_MAX_LAYERS = 4
U_RA_OP = NUM_BASE_UNIFORMS  # RandAugment: RA_MAX_LAYERS columns each, one per layer
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

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def generator(*key):
  """A NumPy generator that is a pure function of the integers `key` (no global state)."""
  return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in key]))


def draw_uniforms(key, shape):
  """float32 uniforms of shape (*shape, NUM_UNIFORMS) drawn from `generator(*key)`.

  Row-major over `shape`, so a block of rows is the same whatever else is drawn with it.
  """
  return generator(*key).random((*shape, NUM_UNIFORMS), dtype=np.float32)


DECODERS = ("auto", "simplejpeg", "pil")


def resolve_decoder(name):
  """data.decoder -> 'simplejpeg' or 'pil'. 'auto': simplejpeg when it is installed.

  Both decode JPEGs with libjpeg-turbo's default (islow DCT, fancy upsampling): the pixels are the
  same (tests/test_data.py compares them); simplejpeg skips PIL's image object and its copies.
  """
  if name not in DECODERS:
    raise DataError(f"data.decoder={name!r} (expected one of {', '.join(DECODERS)})")
  if name == "pil":
    return name
  try:
    import simplejpeg  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    if name == "auto":
      return "pil"
    raise DataError("data.decoder='simplejpeg' needs the simplejpeg package (pip install "
                    "simplejpeg), or set data.decoder='pil'") from None
  return "simplejpeg"


def _decode_jpeg_simplejpeg(data):
  """uint8 [H, W, 3], or None where PIL must decode: not a JPEG, CMYK / YCCK (PIL inverts Adobe
  CMYK, libjpeg-turbo does not), or damaged (PIL then raises its own error)."""
  import simplejpeg  # pylint: disable=import-outside-toplevel
  if bytes(data[:3]) != b"\xff\xd8\xff":
    return None
  try:
    if simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray", "RGB"):
      return None
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
  except ValueError:
    return None


def decode_image(data, decoder="pil"):
  """Encoded JPEG / PNG / BMP / GIF bytes -> uint8 [H, W, 3] (gray replicated, alpha dropped).

  `decoder`: 'pil', or 'simplejpeg' for JPEGs (a resolve_decoder result; the same pixels).
  """
  if decoder == "simplejpeg":
    image = _decode_jpeg_simplejpeg(data)
    if image is not None:
      return image
  try:
    opened = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:  # PIL's message names the BytesIO object, not the file
    raise UnidentifiedImageError("cannot identify the image format (not a JPEG / PNG / BMP / "
                                 "GIF file)") from None
  with opened as image:
    return np.asarray(image.convert("RGB"))


def rrc_boxes(u, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop boxes (top, left, crop_height, crop_width), torchvision's algorithm.

  `u`: (..., NUM_UNIFORMS). Up to 10 attempts: area ~ U(scale) * H * W, aspect w/h log-uniform
  in `ratio`; the first attempt that fits is used; if none fits, the largest center crop with
  the aspect clamped to `ratio`. top ~ randint[0, H - h], left ~ randint[0, W - w].
  Returns int64 arrays of shape u.shape[:-1].
  """
  u = np.asarray(u, np.float64)
  target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., U_AREA])
  log_low, log_high = np.log(ratio[0]), np.log(ratio[1])
  aspect = np.exp(log_low + (log_high - log_low) * u[..., U_LOG_RATIO])
  crop_w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # half to even, as round()
  crop_h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  any_fits = fits.any(axis=-1)
  first = np.argmax(fits, axis=-1)[..., None]
  crop_h = np.take_along_axis(crop_h, first, axis=-1)[..., 0]
  crop_w = np.take_along_axis(crop_w, first, axis=-1)[..., 0]

  in_ratio = width / height
  fallback_w = round(height * ratio[1]) if in_ratio > ratio[1] else width
  fallback_h = round(width / ratio[0]) if in_ratio < ratio[0] else height
  crop_h = np.where(any_fits, crop_h, fallback_h)
  crop_w = np.where(any_fits, crop_w, fallback_w)
  top = np.minimum(np.floor(u[..., U_TOP] * (height - crop_h + 1)).astype(np.int64),
                   height - crop_h)
  left = np.minimum(np.floor(u[..., U_LEFT] * (width - crop_w + 1)).astype(np.int64),
                    width - crop_w)
  top = np.where(any_fits, top, (height - crop_h) // 2)
  left = np.where(any_fits, left, (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def eval_resize_size(height, width, size, crop_fraction):
  """torchvision Resize(int(size / crop_fraction)): the shorter side to that, aspect kept."""
  resize_to = int(size / crop_fraction)
  short = min(height, width)
  new_h = resize_to if height <= width else (resize_to * height) // short
  new_w = resize_to if width <= height else (resize_to * width) // short
  return new_h, new_w


def center_offset(resized, size):
  """torchvision CenterCrop offset: int(round((resized - size) / 2)), round half to even."""
  return int(round((resized - size) / 2.0))


def pad_crop_offsets(u, height, width, size, pad):
  """torchvision RandomCrop(size, padding=pad): (top, left) of the window in the padded image,
  each ~ randint[0, padded - size], minus `pad` (the image's own coordinates; may be < 0)."""
  u = np.asarray(u, np.float64)
  span_h, span_w = height + 2 * pad - size + 1, width + 2 * pad - size + 1
  if span_h < 1 or span_w < 1:
    raise ValueError(f"pad_crop: a {height}x{width} image padded by {pad} is smaller than {size}")
  top = np.minimum(np.floor(u[..., U_TOP] * span_h).astype(np.int64), span_h - 1) - pad
  left = np.minimum(np.floor(u[..., U_LEFT] * span_w).astype(np.int64), span_w - 1) - pad
  return top, left


def crop_specs(u, height, width, recipe, size, crop_fraction):
  """CropSpec rows (..., 8) float32 of one recipe; `u` (..., NUM_UNIFORMS), H and W ints."""
  batch_shape = np.shape(u)[:-1]
  if recipe.crop == "pad_crop":
    top, left = pad_crop_offsets(u, height, width, size, int(recipe.pad))
    full, zero = np.full(batch_shape, size), np.zeros(batch_shape)
    return np.stack([top, full, full, zero, left, full, full, zero], axis=-1).astype(np.float32)
  if recipe.crop == "center":
    new_h, new_w = eval_resize_size(height, width, size, crop_fraction)
    row = [0, height, new_h, center_offset(new_h, size),
           0, width, new_w, center_offset(new_w, size)]
    return np.broadcast_to(np.asarray(row, np.float32), (*batch_shape, CROP_SPEC_SIZE)).copy()
  top, left, crop_h, crop_w = rrc_boxes(u, height, width, tuple(recipe.rrc_scale),
                                        tuple(recipe.rrc_ratio))
  columns = [top, crop_h, np.full(batch_shape, size), np.zeros(batch_shape),
             left, crop_w, np.full(batch_shape, size), np.zeros(batch_shape)]
  return np.stack(columns, axis=-1).astype(np.float32)


RESIZERS = ("pil", "opencv")


def resolve_resize(name):
  """data.resize -> 'pil' or 'opencv', checking that OpenCV is installed for 'opencv'."""
  if name not in RESIZERS:
    raise DataError(f"data.resize={name!r} (expected one of {', '.join(RESIZERS)})")
  if name == "opencv":
    try:
      _opencv()
    except ImportError:
      raise DataError("data.resize='opencv' needs OpenCV (pip install opencv-python-headless), "
                      "or set data.resize='pil'") from None
  return name


_cv2 = None


def _opencv():
  """The cv2 module, single-threaded: the pipeline's threads and worker processes already use
  every core, and one resize is too small to split."""
  global _cv2  # pylint: disable=global-statement
  if _cv2 is None:
    import cv2  # pylint: disable=import-outside-toplevel
    cv2.setNumThreads(1)
    _cv2 = cv2
  return _cv2


def _resize_opencv(crop, height, width, interpolation):
  """OpenCV's resize of a uint8 crop to (height, width): an area-weighted box filter where both
  sides shrink (INTER_AREA, OpenCV's antialiased reduction), else the recipe's kernel (OpenCV's
  bicubic is Keys a = -0.75, PIL's a = -0.5)."""
  cv2 = _opencv()
  if height <= crop.shape[0] and width <= crop.shape[1]:
    flag = cv2.INTER_AREA
  else:
    flag = cv2.INTER_CUBIC if interpolation == "bicubic" else cv2.INTER_LINEAR
  return cv2.resize(crop, (width, height), interpolation=flag)


def crop_one(image, spec, size, interpolation, resize="pil"):
  """Apply one CropSpec to a uint8 image [H, W, 3] of any size -> uint8 [size, size, 3].

  resize='pil': PIL's antialiased resize of the crop in uint8: torchvision's resized_crop on a
  PIL image, rounding included, bit for bit (tests/test_data.py). A box inside the image is cut
  out as an array view before PIL sees it (no copy of the whole image into PIL, no PIL crop);
  PIL fills a box beyond the image with black, which is a pad-and-crop's zero padding; a
  same-size resize is a copy. resize='opencv': OpenCV's resize of the same crop (_resize_opencv):
  about half the CPU time of PIL's, within about one level of it on average (BENCHMARKS.md).
  """
  y_start, y_length, y_total, y_offset, x_start, x_length, x_total, x_offset = (
      int(value) for value in spec)
  height, width = image.shape[:2]
  if y_start < 0 or x_start < 0 or y_start + y_length > height or x_start + x_length > width:
    crop = np.asarray(Image.fromarray(image).crop(
        (x_start, y_start, x_start + x_length, y_start + y_length)))
  else:
    crop = image[y_start:y_start + y_length, x_start:x_start + x_length]
  if (y_total, x_total) == (y_length, x_length):
    resized = crop
  elif resize == "opencv":
    resized = _resize_opencv(crop, y_total, x_total, interpolation)
  else:
    resized = np.asarray(Image.fromarray(crop).resize((x_total, y_total),
                                                      _RESAMPLE[interpolation]))
  return resized[y_offset:y_offset + size, x_offset:x_offset + size]
