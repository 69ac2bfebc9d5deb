"""RandAugment with timm's semantics (timm.data.auto_augment.rand_augment_transform), batched in JAX.

Recipe key `randaugment` holds a timm config string, '' = off. 'rand-m9-mstd0.5-inc1' (MAE's
fine-tune recipe) means: per image, 2 ops (n2) drawn uniformly with replacement from the 15-op
'increasing' set (inc1); each op is applied with probability 0.5 (p0.5) at a magnitude drawn
N(9, 0.5) (m9, mstd0.5) and clipped to [0, 10] (mmax), with a random sign for the signed ops.

As in timm the ops run on uint8 pixel values after RandomResizedCrop + flip and before
normalisation: the views are rounded to the 0..255 grid first and every op returns values on that
grid, following PIL's integer arithmetic (truncating blends, integer gray, LUTs). Geometric ops
use PIL's affine sampling (pixel centres, out-of-image samples take the fill colour, which is
the normalisation mean as timm's `img_mean`), with the recipe's interpolation (timm passes the
train interpolation, bicubic for MAE).

Randomness comes from the view's uniforms (augment_host U_RA_* columns): op index, apply gate,
magnitude (through the normal quantile function) and sign, one of each per layer. Every op is
computed for every image and the drawn one selected: the batch stays one array program.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from sjmae_jax.data import augment_host as spec
from sjmae_jax.data.errors import DataError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is the full op strength

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
TRANSLATE_PCT = 0.45  # timm's default translate_pct for the *Rel ops


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  num_layers: int = 2
  magnitude: float = 10.0
  magnitude_std: float = 0.0  # inf: magnitude ~ U(0, magnitude)
  magnitude_max: float = LEVEL_DENOM
  prob: float = 0.5
  increasing: bool = False

  @property
  def ops(self):
    return OPS_INCREASING if self.increasing else OPS


def parse(config_str: str) -> RandAugmentConfig:
  """timm's RandAugment string ('rand-m9-n2-mstd0.5-mmax10-p0.5-inc1') -> RandAugmentConfig."""
  def fail(why):
    raise DataError(f"data recipe randaugment={config_str!r}: {why} (expected timm's format, "
                    "e.g. 'rand-m9-mstd0.5-inc1', or '' for off)")

  sections = config_str.split("-")
  if sections[0] != "rand":
    fail("must start with 'rand'")
  values = {}
  for section in sections[1:]:
    match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", section)
    if not match:
      fail(f"unknown section {section!r} (known: m, n, p, mstd, mmax, inc)")
    values[match.group(1)] = float(match.group(2))
  mstd = values.get("mstd", 0.0)
  config = RandAugmentConfig(
      num_layers=int(values.get("n", 2)), magnitude=values.get("m", LEVEL_DENOM),
      magnitude_std=math.inf if mstd > 100 else mstd,
      magnitude_max=values.get("mmax", LEVEL_DENOM), prob=values.get("p", 0.5),
      increasing=bool(int(values.get("inc", 0))))
  if not 1 <= config.num_layers <= spec.RA_MAX_LAYERS:
    fail(f"n={config.num_layers} layers; 1 to {spec.RA_MAX_LAYERS} supported")
  if not 0.0 <= config.prob <= 1.0:
    fail(f"p={config.prob} is not a probability")
  return config


# ---------------------------------------------------------------------------------------------
# Ops on uint8-valued float32 images (N, H, W, 3) with per-image arguments of shape (N,).

def _per_image(values):
  return values[:, None, None, None]


def _truncate_to_uint8(values):
  """PIL's CLIP8 of blends: clip to [0, 255] and truncate toward zero."""
  return jnp.floor(jnp.clip(values, 0.0, 255.0))


def pil_gray(x):
  """PIL's convert('L'): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16, as floats."""
  xi = x.astype(jnp.int32)
  gray = (xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16
  return gray.astype(jnp.float32)


def blend(degenerate, x, factor):
  """PIL Image.blend(degenerate, x, factor) on uint8 values (ImageEnhance's enhance)."""
  return _truncate_to_uint8(degenerate + _per_image(factor) * (x - degenerate))


def brightness(x, factor):
  return blend(jnp.zeros_like(x), x, factor)


def color(x, factor):
  return blend(pil_gray(x)[..., None], x, factor)


def contrast(x, factor):
  mean = jnp.floor(jnp.mean(pil_gray(x), axis=(1, 2)) + 0.5)  # int(mean + 0.5)
  return blend(_per_image(mean), x, factor)


def smooth(x):
  """PIL ImageFilter.SMOOTH (3x3, 1 1 1 / 1 5 1 / 1 1 1, / 13), border pixels unchanged."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1], x.shape[2]
  total = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
  filtered = jnp.floor(jnp.clip((total + 4.0 * x) / 13.0 + 0.5, 0.0, 255.0))
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  interior = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
  return jnp.where(interior[None, :, :, None], filtered, x)


def sharpness(x, factor):
  return blend(smooth(x), x, factor)


def invert(x):
  return 255.0 - x


def posterize(x, bits):
  """ImageOps.posterize: keep the top `bits` bits (0 bits -> black)."""
  step = _per_image(jnp.exp2(8.0 - bits))
  return jnp.floor(x / step) * step


def solarize(x, threshold):
  return jnp.where(x < _per_image(threshold), x, 255.0 - x)


def solarize_add(x, add, threshold=128.0):
  return jnp.where(x < threshold, jnp.minimum(255.0, x + _per_image(add)), x)


def auto_contrast(x):
  """ImageOps.autocontrast (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
  low = jnp.min(x, axis=(1, 2), keepdims=True)
  high = jnp.max(x, axis=(1, 2), keepdims=True)
  spread = jnp.where(high > low, high - low, 1.0)
  stretched = jnp.clip(jnp.floor((x - low) * 255.0 / spread), 0.0, 255.0)
  return jnp.where(high > low, stretched, x)


def _channel_histograms(x):
  """(N, H, W, C) uint8 values -> (N, C, 256) pixel counts."""
  n, h, w, c = x.shape
  values = x.astype(jnp.int32).transpose(0, 3, 1, 2).reshape(n * c, h * w)
  counts = jax.vmap(lambda v: jnp.zeros(256, jnp.int32).at[v].add(1))(values)
  return counts.reshape(n, c, 256)


def equalize(x):
  """ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step, where
  step = (#pixels - #pixels at the highest level present) // 255; identity when step is 0."""
  n, h, w, c = x.shape
  counts = _channel_histograms(x)
  levels = jnp.arange(256)
  highest = jnp.max(jnp.where(counts > 0, levels, -1), axis=-1)  # (N, C)
  at_highest = jnp.take_along_axis(counts, highest[..., None], axis=-1)[..., 0]
  step = (h * w - at_highest) // 255
  below = jnp.cumsum(counts, axis=-1) - counts
  safe_step = jnp.maximum(step, 1)[..., None]
  lut = jnp.minimum((safe_step // 2 + below) // safe_step, 255)
  lut = jnp.where((step > 0)[..., None], lut, levels).astype(jnp.float32)  # (N, C, 256)
  flat = x.astype(jnp.int32).transpose(0, 3, 1, 2).reshape(n, c, h * w)
  mapped = jnp.take_along_axis(lut, flat, axis=-1)
  return mapped.reshape(n, c, h, w).transpose(0, 2, 3, 1)


def _interpolate(taps, d):
  """PIL's 1-D interpolation of the last axis of `taps` at fraction d (Geometry.c, in its
  difference form, which is exact on flat regions): bicubic (4 taps) is the a = -1 cubic
  (PIL's resize uses a = -0.5), bilinear 2 taps."""
  if taps.shape[-1] == 2:
    return taps[..., 0] + (taps[..., 1] - taps[..., 0]) * d
  v1, v2, v3, v4 = (taps[..., i] for i in range(4))
  p2 = v3 - v1
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = v2 - v1 + v4 - v3
  return v2 + d * (p2 + d * (p3 + d * p4))


def affine(x, matrix, fill, interpolation):
  """PIL Image.transform(size, AFFINE, matrix, resample, fillcolor) of each image.

  matrix (N, 6) = (a, b, c, d, e, f): output pixel (col, row) samples the input at
  (a X + b Y + c, d X + e Y + f) with X = col + 0.5, Y = row + 0.5 (pixel centres). Samples
  outside the image take `fill` (3 values); neighbours of edge samples are clamped (PIL's
  XCLIP / YCLIP); the result is truncated to uint8 as PIL does.
  """
  n, h, w, _ = x.shape
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                            jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
  a, b, c, d, e, f = (matrix[:, i, None, None] for i in range(6))
  x_in = a * cols + b * rows + c
  y_in = d * cols + e * rows + f
  inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
  offsets = jnp.arange(-1, 3) if interpolation == "bicubic" else jnp.arange(0, 2)
  x_index = jnp.clip(x0[..., None].astype(jnp.int32) + offsets, 0, w - 1)  # (N, H, W, T)
  y_index = jnp.clip(y0[..., None].astype(jnp.int32) + offsets, 0, h - 1)
  flat_index = (y_index[..., :, None] * w + x_index[..., None, :]).reshape(n, -1)  # (N, HWTT)
  gathered = jnp.take_along_axis(x.reshape(n, h * w, 3), flat_index[..., None], axis=1)
  taps = len(offsets)
  gathered = gathered.reshape(n, h, w, taps, taps, 3).transpose(0, 1, 2, 5, 3, 4)
  along_x = _interpolate(gathered, (x_in - x0)[..., None, None])  # (N, H, W, 3, T)
  sampled = _truncate_to_uint8(_interpolate(along_x, (y_in - y0)[..., None]))
  return jnp.where(inside[..., None], sampled, jnp.asarray(fill, jnp.float32))


def rotate_matrix(degrees, height, width):
  """PIL Image.rotate(degrees) (counter-clockwise about the centre) as an affine matrix."""
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  return jnp.stack([cos, sin, cos * -cx + sin * -cy + cx,
                    -sin, cos, -sin * -cx + cos * -cy + cy], axis=-1)


# ---------------------------------------------------------------------------------------------
# RandAugment on a batch.

def level_arguments(magnitude, negate, size):
  """timm's *_level_to_arg for every op at per-image magnitudes; `negate` is timm's
  _randomly_negate draw. Returns {op name: (N,) argument}."""
  level = magnitude / LEVEL_DENOM
  sign = jnp.where(negate, -1.0, 1.0)
  height, width = size
  enhance = level * 1.8 + 0.1
  enhance_increasing = jnp.maximum(0.1, 1.0 + sign * level * 0.9)
  solarize_level = jnp.minimum(256.0, jnp.floor(level * 256.0))
  return {
      "Rotate": sign * level * 30.0,
      "Posterize": jnp.floor(level * 4.0),
      "PosterizeIncreasing": 4.0 - jnp.floor(level * 4.0),
      "Solarize": solarize_level,
      "SolarizeIncreasing": 256.0 - solarize_level,
      "SolarizeAdd": jnp.minimum(128.0, jnp.floor(level * 110.0)),
      "Color": enhance, "Contrast": enhance, "Brightness": enhance, "Sharpness": enhance,
      "ColorIncreasing": enhance_increasing, "ContrastIncreasing": enhance_increasing,
      "BrightnessIncreasing": enhance_increasing, "SharpnessIncreasing": enhance_increasing,
      "ShearX": sign * level * 0.3, "ShearY": sign * level * 0.3,
      "TranslateXRel": sign * level * TRANSLATE_PCT * width,  # in pixels
      "TranslateYRel": sign * level * TRANSLATE_PCT * height,
  }


def _geometric_matrix(op_index, ops, args, size):
  """(N, 6) affine matrix of each image's geometric op (identity for the other ops)."""
  ones, zeros = jnp.ones_like(op_index, jnp.float32), jnp.zeros_like(op_index, jnp.float32)
  matrices = {
      "Rotate": rotate_matrix(args["Rotate"], *size),
      "ShearX": jnp.stack([ones, args["ShearX"], zeros, zeros, ones, zeros], -1),
      "ShearY": jnp.stack([ones, zeros, zeros, args["ShearY"], ones, zeros], -1),
      "TranslateXRel": jnp.stack([ones, zeros, args["TranslateXRel"], zeros, ones, zeros], -1),
      "TranslateYRel": jnp.stack([ones, zeros, zeros, zeros, ones, args["TranslateYRel"]], -1),
  }
  identity = jnp.stack([ones, zeros, zeros, zeros, ones, zeros], -1)
  return jnp.select([(op_index == ops.index(name))[:, None] for name in GEOMETRIC_OPS],
                    [matrices[name] for name in GEOMETRIC_OPS], identity)


def apply_op(x, op_index, magnitude, negate, ops, fill, interpolation):
  """Each image's op `ops[op_index]` at `magnitude` on uint8-valued x (N, H, W, 3)."""
  size = x.shape[1:3]
  args = level_arguments(magnitude, negate, size)
  warped = affine(x, _geometric_matrix(op_index, ops, args, size), fill, interpolation)
  # timm's ops by name; an "...Increasing" op is its base op at a level that rises with magnitude
  without_level = {"AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert}
  with_level = {"Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add,
                "Color": color, "Contrast": contrast, "Brightness": brightness,
                "Sharpness": sharpness}

  def output(name):
    if name in GEOMETRIC_OPS:
      return warped
    if name in without_level:
      return without_level[name](x)
    return with_level[name.removesuffix("Increasing")](x, args[name])

  outputs = [output(name) for name in ops]
  return jnp.select([_per_image(op_index == i) for i in range(len(ops))], outputs, x)


def sample_magnitude(u, config):
  """timm AugmentOp: gauss(m, mstd) (or U(0, m) for mstd inf), clipped to [0, mmax]."""
  if config.magnitude_std == math.inf:
    magnitude = u * config.magnitude
  elif config.magnitude_std > 0:
    normal = jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
    magnitude = config.magnitude + config.magnitude_std * normal
  else:
    magnitude = jnp.full_like(u, config.magnitude)
  return jnp.clip(magnitude, 0.0, config.magnitude_max)


def rand_augment(images, u, config: RandAugmentConfig, fill, interpolation="bicubic"):
  """float32 views (N, H, W, 3) in [0, 1], uniforms (N, NUM_UNIFORMS) -> augmented views.

  `fill`: RGB in [0, 1] for pixels that geometric ops bring in from outside the image.
  """
  ops = config.ops
  x = jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0)
  fill = np.round(np.asarray(fill, np.float32) * 255.0)
  for layer in range(config.num_layers):
    op_index = jnp.minimum(jnp.floor(u[:, spec.U_RA_OP + layer] * len(ops)),
                           len(ops) - 1).astype(jnp.int32)
    applied = u[:, spec.U_RA_GATE + layer] <= config.prob  # timm skips when random() > prob
    magnitude = sample_magnitude(u[:, spec.U_RA_MAGNITUDE + layer], config)
    negate = u[:, spec.U_RA_SIGN + layer] > 0.5  # timm's _randomly_negate
    augmented = apply_op(x, op_index, magnitude, negate, ops, fill, interpolation)
    x = jnp.where(_per_image(applied), augmented, x)
  return x / 255.0
