"""Tests of the input pipeline (sjmae_jax.data): ops against independent NumPy / PIL / stdlib /
torchvision expectations, sources, order (shards, determinism, resume) and bad input. Nothing is
downloaded: the digits dataset is prepared from scikit-learn, folders and small TFDS datasets are
generated here with PIL. No test here needs TensorFlow except the TFRecord ones, which say so."""

import colorsys
import copy
import functools
import importlib.util
import json
import logging
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image, ImageEnhance

from sjmae_jax import data
from sjmae_jax.data import augment_host, augment_jax
from sjmae_jax.data.digits import digits_arrays
from sjmae_jax.data.sources import ArraySplit, FileSplit, RecordSplit, TfdsStreamSplit
from tests.helpers import assert_batches_equal, take

HAS_TENSORFLOW = importlib.util.find_spec("tensorflow") is not None

MEAN = np.asarray(data.IMAGENET_MEAN, np.float32)
crop_resize = jax.jit(augment_jax.crop_resize, static_argnums=(2, 3))
STD = np.asarray(data.IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def digits_config(data_dir, **overrides):
  cfg = data.default_config()
  cfg.data_dir = data_dir
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def write_folder(root, splits, size=(8, 8), fmt="png", color_of=None):
  """ROOT/<split>/<class>/<i>.<fmt>; `splits` = {split: {class: count}}.

  Each image is one constant colour encoding a global id (R = id % 256, G = id // 256), so any
  crop of it still tells which file it came from.
  """
  ids = {}
  next_id = 0
  for split, classes in splits.items():
    for class_name, count in classes.items():
      class_dir = os.path.join(root, split, class_name)
      os.makedirs(class_dir, exist_ok=True)
      for i in range(count):
        color = color_of(next_id) if color_of else (next_id % 256, next_id // 256, 77)
        image = np.empty((size[0], size[1], 3), np.uint8)
        image[...] = color
        path = os.path.join(class_dir, f"{i:03d}.{fmt}")
        Image.fromarray(image).save(path)
        ids[path] = next_id
        next_id += 1
  return ids


def example_ids(images_unnormalized):
  """Constant-colour views (B, K, H, W, 3) in [0, 1] -> the id encoded in each example."""
  pixels = np.round(images_unnormalized[:, 0, 0, 0] * 255).astype(np.int64)
  return pixels[:, 0] + 256 * pixels[:, 1]


# ---------------------------------------------------------------------------------------------
# Config and the digits dataset.


@pytest.mark.no_tf
def test_data_modules_import_each_other_without_cycles():
  # Imports inside functions count too: a cycle through one is still a cycle in the design.
  import ast
  package = os.path.dirname(data.__file__)
  modules = {name[:-3] for name in os.listdir(package) if name.endswith(".py")}
  graph = {}
  for module in modules:
    with open(os.path.join(package, f"{module}.py")) as f:
      tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == "sjmae_jax.data":
        imported.update(alias.name for alias in node.names if alias.name in modules)
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sjmae_jax.data."):
        imported.add(node.module.split(".")[2])
      elif isinstance(node, ast.Import):
        imported.update(alias.name.split(".")[2] for alias in node.names
                        if alias.name.startswith("sjmae_jax.data."))
    graph[module] = imported - {module}

  def cycle_from(module, path):
    if module in path:
      return path[path.index(module):] + [module]
    for other in sorted(graph.get(module, ())):
      if other != "__init__":
        found = cycle_from(other, path + [module])
        if found:
          return found
    return None
  for module in sorted(graph):
    cycle = cycle_from(module, [])
    assert cycle is None, " -> ".join(cycle)


def test_default_config_has_every_key():
  cfg = data.default_config()
  for key in ("source", "train_split", "eval_split", "data_dir", "img_size", "views", "recipes",
              "normalize", "eval_crop_fraction", "cache", "shuffle_buffer", "skip_corrupt",
              "prefetch", "augment_on_device"):
    assert key in cfg, key
  assert cfg.source == "digits" and list(cfg.views) == ["mae"]
  simclr = cfg.recipes.simclr
  assert tuple(simclr.rrc_scale) == (0.2, 1.0)
  assert (simclr.brightness, simclr.contrast, simclr.saturation, simclr.hue) == (0.4, 0.4, 0.4,
                                                                                 0.1)
  assert (simclr.jitter_prob, simclr.grayscale_prob, simclr.blur_prob) == (0.8, 0.2, 0.5)
  assert tuple(simclr.blur_sigma) == (0.1, 2.0)
  assert cfg.recipes.mae.jitter_prob == 0 and cfg.recipes.mae.flip_prob == 0.5


def test_digits_fixed_split_is_prepared_once_and_served_in_order(data_dir):
  info = data.dataset_info(digits_config(data_dir))
  assert info.num_classes == 10 and info.class_names == [str(d) for d in range(10)]
  assert info.num_examples("train") + info.num_examples("test") == 1797
  assert info.num_examples("train") == 1438
  assert info.num_examples("train[:80%]") + info.num_examples("train[80%:]") == 1438
  prepared = os.path.join(data_dir, "sjmae_digits_v1.npz")
  stamp = os.path.getmtime(prepared)
  data.sources._array_cache.clear()  # a new process would read the file again
  data.dataset_info(digits_config(data_dir))  # reused, not prepared again
  assert os.path.getmtime(prepared) == stamp

  # The eval pipeline at native size with crop fraction 1 is the identity crop, so its output
  # is exactly the normalised stored pixels in the fixed split order: checks the data, the
  # labels, the order and the normalisation.
  cfg = digits_config(data_dir, img_size=8, eval_crop_fraction=1.0)
  images, labels = digits_arrays()
  batches = list(data.build_eval_pipeline(cfg, split="test", global_batch_size=128,
                                          process_index=0, process_count=1))
  got = np.concatenate([b["images"] for b in batches])[:359, 0]
  got_labels = np.concatenate([b["label"] for b in batches])[:359]
  expected = (images[1438:].astype(np.float32) / 255.0 - MEAN) / STD
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_array_equal(got_labels, labels[1438:])
  assert set(np.unique(images)) <= set(np.round(np.arange(17) * 255 / 16).astype(np.uint8))
  assert (images[..., 0] == images[..., 2]).all()


# ---------------------------------------------------------------------------------------------
# Ops against independent expectations.


def pil_float_crop_resize(image, box, out, resample):
  """Reference: PIL crop then resize, per channel in 32-bit float mode (no uint8 rounding)."""
  top, left, height, width = box
  channels = []
  for c in range(3):
    channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
    channel = channel.crop((left, top, left + width, top + height)).resize((out, out), resample)
    channels.append(np.asarray(channel))
  return np.clip(np.stack(channels, -1) / 255.0, 0.0, 1.0)


def torchvision_functional():
  """torchvision.transforms.functional when installed (the main venv), else None."""
  if importlib.util.find_spec("torchvision") is None:
    return None
  from torchvision.transforms import functional  # pylint: disable=import-outside-toplevel
  return functional


@pytest.mark.parametrize("box,out,interpolation", [
    ((3, 5, 20, 30), 16, "bicubic"),  # downsampling (antialiased)
    ((10, 2, 6, 9), 24, "bicubic"),  # upsampling
    ((0, 0, 37, 53), 32, "bilinear"),
])
def test_crop_box_semantics_match_pil(box, out, interpolation):
  image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
  expected = pil_float_crop_resize(image, box, out, resample)
  top, left, height, width = box
  spec = np.asarray([[top, height, out, 0, left, width, out, 0]], np.float32)
  batched = crop_resize(jnp.asarray(image[None]), jnp.asarray(spec), out, interpolation)
  np.testing.assert_allclose(np.asarray(batched)[0], expected, atol=1e-5)
  single = augment_host.crop_one(image, spec[0], out, interpolation)
  # The per-image host path resamples in uint8 as torchvision's PIL path does: fixed-point
  # weights and rounding keep it within one level of the exact float result, except where PIL
  # clips a bicubic overshoot between its two passes (noise upsampled: a few pixels).
  assert single.dtype == np.uint8 and single.shape == (out, out, 3)
  levels = np.abs(single - expected * 255.0)
  assert levels.mean() < 0.5 and np.mean(levels <= 1.0) > 0.95
  if interpolation == "bilinear":  # no overshoot
    assert levels.max() <= 1.0
  functional = torchvision_functional()
  if functional is not None:  # and is torchvision's RandomResizedCrop output, bit for bit
    mode = {"bicubic": functional.InterpolationMode.BICUBIC,
            "bilinear": functional.InterpolationMode.BILINEAR}[interpolation]
    reference = functional.resized_crop(Image.fromarray(image), top, left, height, width,
                                        [out, out], mode)
    np.testing.assert_array_equal(single, np.asarray(reference))


def test_eval_crop_is_resize_shorter_side_then_center_crop():
  image = np.random.default_rng(1).integers(0, 256, (30, 45, 3), dtype=np.uint8)
  size, fraction = 16, 0.875
  resize_to = int(size / fraction)  # 18: shorter side (height) -> 18, width -> int(18 * 45 / 30)
  new_w = int(resize_to * 45 / 30)
  channels = []
  for c in range(3):
    channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
    channels.append(np.asarray(channel.resize((new_w, resize_to), Image.BICUBIC)))
  resized = np.clip(np.stack(channels, -1) / 255.0, 0, 1)
  top, left = int(round((resize_to - size) / 2)), int(round((new_w - size) / 2))
  expected = resized[top:top + size, left:left + size]

  recipe = data.default_config().recipes.eval
  spec = augment_host.crop_specs(np.zeros([1, augment_host.NUM_UNIFORMS]), 30, 45, recipe, size,
                                 fraction)
  batched = crop_resize(jnp.asarray(image[None]), jnp.asarray(spec), size, "bicubic")
  np.testing.assert_allclose(np.asarray(batched)[0], expected, atol=1e-5)
  single = augment_host.crop_one(image, spec[0], size, "bicubic")
  levels = np.abs(single - expected * 255.0)
  assert levels.mean() < 0.5 and np.mean(levels <= 1.0) > 0.95
  functional = torchvision_functional()
  if functional is not None:  # torchvision's Resize(18) + CenterCrop(16), bit for bit
    mode = functional.InterpolationMode.BICUBIC
    reference = functional.center_crop(functional.resize(Image.fromarray(image), resize_to, mode),
                                       [size, size])
    np.testing.assert_array_equal(single, np.asarray(reference))


def torchvision_rrc_params(rng, height, width, scale, ratio):
  """NumPy transcription of torchvision RandomResizedCrop.get_params (the reference)."""
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target_area * aspect)))
    h = int(round(np.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_boxes_follow_scale_ratio_and_torchvision_statistics():
  scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
  count = 4000
  u = augment_host.draw_uniforms((1, 2), (count,))
  rng = np.random.default_rng(0)
  for height, width in ((32, 32), (60, 100)):
    top, left, crop_h, crop_w = augment_host.rrc_boxes(u, height, width, scale, ratio)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + crop_h <= height).all() and (left + crop_w <= width).all()
    area = crop_h * crop_w / (height * width)
    # Rounding each side to whole pixels moves the area by < (h + w + 1) / (H W).
    slack = (crop_h + crop_w + 1) / (height * width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    aspect = crop_w / crop_h
    assert (aspect >= ratio[0] * (1 - 1.0 / crop_h) - 1e-6).all()
    assert (aspect <= ratio[1] * (1 + 1.0 / crop_h) + 1e-6).all()
    assert top.min() == 0 and (top + crop_h).max() == height  # positions cover the image
    # Same distribution as torchvision's sampler (means within a few standard errors).
    reference = np.asarray([torchvision_rrc_params(rng, height, width, scale, ratio)
                            for _ in range(count)])
    reference_area = reference[:, 2] * reference[:, 3] / (height * width)
    assert abs(area.mean() - reference_area.mean()) < 0.015
    assert abs(area.std() - reference_area.std()) < 0.015
    assert abs(np.mean(top / np.maximum(height - crop_h, 1)) -
               np.mean(reference[:, 0] / np.maximum(height - reference[:, 2], 1))) < 0.03
  # No attempt can fit -> torchvision's fallback: the whole image (aspect within the ratio).
  boxes = augment_host.rrc_boxes(u[:5], 32, 32, (2.0, 3.0), ratio)
  np.testing.assert_array_equal(np.stack(boxes, 1), [[0, 0, 32, 32]] * 5)
  boxes = augment_host.rrc_boxes(u[:1], 20, 60, (2.0, 3.0), ratio)  # too wide: 20 x round(20 4/3)
  assert [int(b[0]) for b in boxes] == list(torchvision_rrc_params(
      np.random.default_rng(0), 20, 60, (2.0, 3.0), ratio))


def test_flip_grayscale_solarize_normalize_match_numpy_pil():
  rng = np.random.default_rng(2)
  images_u8 = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
  images = images_u8.astype(np.float32) / 255.0
  flip = np.array([True, False, True, False])
  got = np.asarray(augment_jax.flip_left_right(jnp.asarray(images), jnp.asarray(flip)))
  np.testing.assert_array_equal(got[flip], images[flip][:, :, ::-1])
  np.testing.assert_array_equal(got[~flip], images[~flip])

  gray = np.asarray(augment_jax.grayscale(jnp.asarray(images)))
  pil_gray = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images_u8])
  np.testing.assert_allclose(gray[..., 0], pil_gray / 255.0, atol=1.0 / 255)
  assert (gray[..., 0] == gray[..., 2]).all()

  solarized = np.asarray(augment_jax.solarize(jnp.asarray(images), 0.5))
  np.testing.assert_array_equal(solarized, np.where(images < 0.5, images, 1.0 - images))

  normalized = np.asarray(augment_jax.normalize(jnp.asarray(images), MEAN, STD))
  np.testing.assert_allclose(normalized, (images - MEAN) / STD, rtol=1e-6, atol=1e-6)


def test_brightness_contrast_saturation_match_pil_enhance():
  rng = np.random.default_rng(3)
  images_u8 = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  images = jnp.asarray(images_u8.astype(np.float32) / 255.0)
  factors = np.array([0.6, 1.0, 1.4], np.float32)
  for op, enhancer in ((augment_jax.adjust_brightness, ImageEnhance.Brightness),
                       (augment_jax.adjust_contrast, ImageEnhance.Contrast),
                       (augment_jax.adjust_saturation, ImageEnhance.Color)):
    got = np.asarray(op(images, jnp.asarray(factors)))
    for i, factor in enumerate(factors):
      expected = np.asarray(enhancer(Image.fromarray(images_u8[i])).enhance(float(factor)))
      # PIL works in uint8 (rounded gray / mean): within 2 levels.
      np.testing.assert_allclose(got[i], expected / 255.0, atol=2.0 / 255, err_msg=op.__name__)


def test_hue_matches_colorsys():
  rng = np.random.default_rng(4)
  images = rng.random((2, 5, 5, 3)).astype(np.float32)
  images[0, 0, 0] = (0.3, 0.3, 0.3)  # gray: hue undefined, must stay gray
  deltas = np.array([0.1, -0.37], np.float32)
  got = np.asarray(jax.jit(augment_jax.adjust_hue)(jnp.asarray(images), jnp.asarray(deltas)))
  for n in range(2):
    for y in range(5):
      for x in range(5):
        h, s, v = colorsys.rgb_to_hsv(*images[n, y, x])
        expected = colorsys.hsv_to_rgb((h + deltas[n]) % 1.0, s, v)
        np.testing.assert_allclose(got[n, y, x], expected, atol=1e-5)


def test_color_jitter_applies_the_four_ops_in_the_drawn_order():
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.random((2, 6, 6, 3)).astype(np.float32))
  u = np.zeros((2, augment_host.NUM_UNIFORMS), np.float32)
  u[:, augment_host.U_JITTER_FACTORS] = [[0.9, 0.1, 0.8, 0.95], [0.2, 0.7, 0.1, 0.05]]
  u[0, augment_host.U_JITTER_ORDER] = [0.4, 0.1, 0.3, 0.2]  # order: contrast, hue, saturation, bri.
  u[1, augment_host.U_JITTER_ORDER] = [0.1, 0.2, 0.3, 0.4]  # order: brightness, contrast, sat., hue
  jitter = jax.jit(augment_jax.color_jitter, static_argnums=(2, 3, 4, 5))
  got = np.asarray(jitter(images, jnp.asarray(u), 0.4, 0.4, 0.4, 0.1))
  b, c, s, h = augment_jax.jitter_factors(jnp.asarray(u), 0.4, 0.4, 0.4, 0.1)
  ops = {"b": lambda x, i: jax.jit(augment_jax.adjust_brightness)(x, b[i:i + 1]),
         "c": lambda x, i: jax.jit(augment_jax.adjust_contrast)(x, c[i:i + 1]),
         "s": lambda x, i: jax.jit(augment_jax.adjust_saturation)(x, s[i:i + 1]),
         "h": lambda x, i: jax.jit(augment_jax.adjust_hue)(x, h[i:i + 1])}
  for i, order in enumerate(("chsb", "bcsh")):
    expected = images[i:i + 1]
    for name in order:
      expected = ops[name](expected, i)
    np.testing.assert_allclose(got[i], np.asarray(expected)[0], atol=1e-6)
  # Factors follow torchvision: brightness in [0.6, 1.4], hue in [-0.1, 0.1].
  np.testing.assert_allclose(np.asarray(b), [0.6 + 0.8 * 0.9, 0.6 + 0.8 * 0.2], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(h), [-0.1 + 0.2 * 0.95, -0.1 + 0.2 * 0.05], rtol=1e-5)


def test_gaussian_blur_matches_scipy_reflect():
  rng = np.random.default_rng(6)
  images = rng.random((2, 16, 16, 3)).astype(np.float32)
  sigmas = np.array([0.7, 1.9], np.float32)
  blur = jax.jit(augment_jax.gaussian_blur, static_argnums=2)
  got = np.asarray(blur(jnp.asarray(images), jnp.asarray(sigmas), 2.0))
  radius = augment_jax.blur_radius(2.0, 16)
  for n, sigma in enumerate(sigmas):
    # scipy's 'mirror' is reflection without repeating the edge pixel (torch / tf 'reflect').
    expected = scipy.ndimage.gaussian_filter(images[n], sigma=(sigma, sigma, 0), mode="mirror",
                                             truncate=radius / sigma)
    np.testing.assert_allclose(got[n], expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Pipelines: shapes, views, determinism, resume, shards.


def test_train_batches_carry_one_view_per_recipe(data_dir):
  # View 0 uses the eval recipe at native size (the identity crop), view 1 the mae recipe.
  cfg = digits_config(data_dir, views=["eval", "mae"], img_size=8, eval_crop_fraction=1.0,
                      normalize="none")
  train = data.build_train_pipeline(cfg, global_batch_size=32, seed=0, process_index=0,
                                    process_count=1)
  assert (train.steps_per_epoch, train.num_views) == (1438 // 32, 2)
  batch = next(train)
  assert batch["images"].shape == (32, 2, 8, 8, 3) and batch["images"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  images, labels = digits_arrays()
  stored = {(image.tobytes(), int(label)) for image, label in zip(images[:1438], labels[:1438])}
  identity_views = np.round(batch["images"][:, 0] * 255).astype(np.uint8)
  assert all((view.tobytes(), int(label)) in stored
             for view, label in zip(identity_views, batch["label"]))
  random_views = np.round(batch["images"][:, 1] * 255).astype(np.uint8)
  assert sum(view.tobytes() not in {v.tobytes() for v in identity_views}
             for view in random_views) > 24  # cropped / flipped: mostly not the stored image


def test_same_seed_same_batches_and_resume_across_epoch_boundary(data_dir):
  cfg = digits_config(data_dir, views=["simclr"])
  build = lambda seed, start: data.build_train_pipeline(
      cfg, global_batch_size=256, seed=seed, start_step=start, process_index=0, process_count=1)
  steps = build(0, 0).steps_per_epoch  # 5
  uninterrupted = take(build(0, 0), steps + 3)
  assert_batches_equal(take(build(0, 0), 2), uninterrupted[:2])
  resumed = build(0, steps - 1)
  assert_batches_equal(take(resumed, 4), uninterrupted[steps - 1:steps + 3])
  assert resumed.step == steps + 3
  other_seed = next(build(1, 0))
  assert not np.array_equal(other_seed["label"], uninterrupted[0]["label"])
  # Each epoch visits distinct examples, in a new order: epoch 1 differs from epoch 0.
  assert not np.array_equal(uninterrupted[steps]["images"], uninterrupted[0]["images"])


@pytest.mark.parametrize("cache", [True, False])  # one pre-batch per step / one element per image
def test_process_shards_are_disjoint_complete_and_assemble_the_global_batch(tmp_path, cache):
  root = tmp_path / "ids"
  write_folder(str(root), {"train": {"a": 20, "b": 20}})
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8,
                      normalize="none", cache=cache)
  global_batch = 8

  def local_batches(index, count):
    train = data.build_train_pipeline(cfg, global_batch_size=global_batch, seed=3,
                                      process_index=index, process_count=count)
    return take(train, train.steps_per_epoch)

  single = local_batches(0, 1)
  single_ids = [example_ids(b["images"]) for b in single]
  assert sorted(np.concatenate(single_ids)) == list(range(40))  # one epoch, every example once
  for count in (2, 4):
    per_process = [local_batches(index, count) for index in range(count)]
    ids = [np.concatenate([example_ids(b["images"]) for b in batches])
           for batches in per_process]
    assert all(len(part) == 40 // count for part in ids)  # equal size
    assert sorted(np.concatenate(ids)) == list(range(40))  # disjoint and complete
    for step in range(len(single)):  # local batches in process order == the global batch
      assembled = np.concatenate([batches[step]["images"] for batches in per_process])
      np.testing.assert_array_equal(assembled, single[step]["images"])


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
  root = tmp_path / "ids"
  write_folder(str(root), {"train": {"a": 20, "b": 20}})
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8,
                      normalize="none")

  def epoch_ids(seed, epoch):
    train = data.build_train_pipeline(cfg, global_batch_size=8, seed=seed, start_step=5 * epoch,
                                      process_index=0, process_count=1)
    return np.concatenate([example_ids(batch["images"]) for batch in take(train, 5)])
  epochs = [epoch_ids(3, epoch) for epoch in range(3)]
  for ids in epochs:
    assert sorted(ids) == list(range(40))  # each epoch visits every example once
  assert len({ids.tobytes() for ids in epochs}) == 3  # in a new order each epoch
  np.testing.assert_array_equal(epoch_ids(3, 2), epochs[2])  # a pure function of (seed, epoch)
  assert not np.array_equal(epoch_ids(4, 0), epochs[0])
  uninterrupted = data.build_train_pipeline(cfg, global_batch_size=8, seed=3, process_index=0,
                                            process_count=1)
  np.testing.assert_array_equal(
      np.concatenate([example_ids(batch["images"]) for batch in take(uninterrupted, 15)]),
      np.concatenate(epochs))


def test_checkpoint_state_resumes_the_run_and_flags_changed_settings(data_dir, caplog):
  cfg = digits_config(data_dir, views=["simclr"])
  build = lambda batch_size=64, start=0: data.build_train_pipeline(
      cfg, global_batch_size=batch_size, seed=1, start_step=start, process_index=0,
      process_count=1)
  uninterrupted = take(build(), 24)  # 22 steps per epoch: crosses into epoch 1
  saved = json.loads(json.dumps(build().checkpoint_state(21)))  # as stored in the checkpoint
  assert saved["step"] == 21 and saved["num_examples"] == 1438
  resumed = build()
  resumed.restore(saved)
  assert resumed.step == 21
  assert_batches_equal(take(resumed, 3), uninterrupted[21:])
  with caplog.at_level(logging.WARNING):
    build(batch_size=32).restore(saved)
  assert "global_batch_size 64 -> 32" in caplog.text
  started = build()
  next(started)
  with pytest.raises(RuntimeError):
    started.restore(saved)


def test_augment_on_device_is_auto_on_accelerators_and_explicit_otherwise():
  assert data.default_config().augment_on_device == "auto"
  assert data.pipeline.resolve_augment_on_device("auto") == (jax.default_backend() != "cpu")
  assert data.pipeline.resolve_augment_on_device(True) is True
  assert data.pipeline.resolve_augment_on_device(False) is False
  assert data.pipeline.resolve_augment_on_device("False") is False  # from a resolved config
  cfg = data.default_config()
  cfg.augment_on_device = True  # a bool where the default is a string: accepted
  cfg = copy.deepcopy(cfg)
  cfg.augment_on_device = "auto"  # and back, on a copy
  assert "yes" in one_line_error(data.pipeline.resolve_augment_on_device, "yes")


def test_views_do_not_depend_on_process_count(data_dir):
  # Pre-batches (uint8 images, crop specs, uniforms) fully determine the views.
  cfg = digits_config(data_dir, views=["simclr", "simclr"], augment_on_device=True)
  whole = next(data.build_train_pipeline(cfg, global_batch_size=64, seed=5, process_index=0,
                                         process_count=1))
  halves = [next(data.build_train_pipeline(cfg, global_batch_size=64, seed=5, process_index=i,
                                           process_count=2)) for i in range(2)]
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_device_augmentation_equals_host_augmentation(data_dir):
  cfg = digits_config(data_dir, views=["simclr", "simclr"])
  host = next(data.build_train_pipeline(cfg, global_batch_size=64, seed=7, process_index=0,
                                        process_count=1))
  cfg.augment_on_device = True
  train = data.build_train_pipeline(cfg, global_batch_size=64, seed=7, process_index=0,
                                    process_count=1)
  pre_batch = next(train)
  assert pre_batch["raw"].dtype == np.uint8 and "images" not in pre_batch
  assert all(value.shape[0] == 64 for value in pre_batch.values())
  device = jax.jit(train.finish_batch)(pre_batch)
  np.testing.assert_allclose(np.asarray(device["images"]), host["images"], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(device["label"]), host["label"])
  assert not np.allclose(host["images"][:, 0], host["images"][:, 1])  # two different views


def test_eval_pipeline_is_one_padded_pass_split_over_processes(data_dir, tfds_dirs):
  _, labels = digits_arrays()
  sources = [  # in memory (one pre-batch per step), TFDS records (one element per image)
      (digits_config(data_dir), 359, np.bincount(labels[1438:], minlength=10), 64),
      (tfds_config(tfds_dirs["array_record"], cache=False), 10, np.bincount(np.arange(40, 50) % 3,
                                                                            minlength=10), 4)]
  for cfg, count, histogram, batch_size in sources:
    per_process = [list(data.build_eval_pipeline(cfg, split="test", global_batch_size=batch_size,
                                                 process_index=index, process_count=2))
                   for index in range(2)]
    assert len(per_process[0]) == len(per_process[1])  # every process runs the same steps
    valid_labels = []
    for batches in per_process:
      for batch in batches:
        assert batch["images"].shape[:2] == (batch_size // 2, 1)
        assert batch["valid"].dtype == bool
        valid_labels.append(batch["label"][batch["valid"]])
    valid_labels = np.concatenate(valid_labels)
    assert len(valid_labels) == count
    np.testing.assert_array_equal(np.bincount(valid_labels, minlength=10), histogram)
    again = list(data.build_eval_pipeline(cfg, split="test", global_batch_size=batch_size,
                                          process_index=0, process_count=2))
    assert_batches_equal(again, per_process[0])


# ---------------------------------------------------------------------------------------------
# TFDS datasets, made here: read by index (ArrayRecord) without TensorFlow; TFRecord with it.


@functools.cache
def tiny_tfds_builders():
  """TFDS builders: 'sjmae_test_images' (40 train / 10 test PNGs of 8x8, each one colour
  encoding its id as write_folder does; class = id % 3), 'sjmae_test_arrays' (the same given as
  arrays: TFDS needs TensorFlow to encode those) and 'sjmae_test_corrupt' (image 3 is not an
  image)."""
  import tensorflow_datasets as tfds

  def generate(first, count, kind):
    for image_id in range(first, first + count):
      pixels = np.empty((8, 8, 3), np.uint8)
      pixels[...] = (image_id % 256, image_id // 256, 77)
      image = {"array": pixels, "pil": Image.fromarray(pixels)}.get(kind, Image.fromarray(pixels))
      if kind == "corrupt" and image_id == 3:
        image = b"\x89PNG\r\n\x1a\n this is not an image"
      yield image_id, {"image": image, "label": image_id % 3}

  class SjmaeTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    kind = "pil"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 10)}

    def _generate_examples(self, first, count):
      return generate(first, count, self.kind)

  class SjmaeTestArrays(SjmaeTestImages):
    kind = "array"

  class SjmaeTestCorrupt(SjmaeTestImages):
    kind = "corrupt"

  return SjmaeTestImages, SjmaeTestArrays, SjmaeTestCorrupt


@pytest.fixture(scope="module")
def tfds_dirs(tmp_path_factory):
  """data_dirs holding 'sjmae_test_images' prepared as ArrayRecord, and as TFRecord (None
  without TensorFlow, which TFDS needs to write TFRecord)."""
  images_builder = tiny_tfds_builders()[0]
  dirs = {"array_record": str(tmp_path_factory.mktemp("array_record")), "tfrecord": None}
  if HAS_TENSORFLOW:
    dirs["tfrecord"] = str(tmp_path_factory.mktemp("tfrecord"))
  for file_format, data_dir in dirs.items():
    if data_dir:
      images_builder(data_dir=data_dir, file_format=file_format).download_and_prepare()
  return dirs


def tfds_config(data_dir, **overrides):
  return digits_config(data_dir, **{"source": "tfds:sjmae_test_images", "img_size": 8,
                                    "normalize": "none", "eval_crop_fraction": 1.0, **overrides})


@pytest.mark.no_tf
def test_tfds_array_record_is_read_by_index_like_any_indexed_source(tfds_dirs):
  cfg = tfds_config(tfds_dirs["array_record"], cache=False)
  info = data.dataset_info(cfg)
  assert (info.num_classes, info.class_names) == (3, ["a", "b", "c"])
  assert (info.num_examples("train"), info.num_examples("test[:50%]")) == (40, 5)
  build = lambda start=0, index=0, count=1: data.build_train_pipeline(
      cfg, global_batch_size=8, seed=2, start_step=start, process_index=index, process_count=count)
  train = build()
  assert isinstance(train.split_data, RecordSplit)
  uninterrupted = take(train, 7)
  ids = [example_ids(batch["images"]) for batch in uninterrupted]
  assert sorted(np.concatenate(ids[:5])) == list(range(40))  # one epoch: every example once
  for batch, batch_ids in zip(uninterrupted, ids):
    np.testing.assert_array_equal(batch["label"], batch_ids % 3)
  assert_batches_equal(take(build(start=4), 3), uninterrupted[4:])  # resume across the epoch
  halves = [take(build(index=index, count=2), 7) for index in range(2)]  # as the folder shards
  for step in range(7):
    np.testing.assert_array_equal(
        np.concatenate([half[step]["images"] for half in halves]), uninterrupted[step]["images"])

  # In memory (cache=True): the same records, decoded once, in the same order.
  cached = data.build_train_pipeline(tfds_config(tfds_dirs["array_record"]), global_batch_size=8,
                                     seed=2, process_index=0, process_count=1)
  assert isinstance(cached.split_data, ArraySplit)
  for index in range(40):
    image, label = train.split_data.read(index)
    np.testing.assert_array_equal(cached.split_data.images[index], image)
    assert cached.split_data.labels[index] == label
  for batch, batch_ids in zip(take(cached, 2), ids):  # the same order (cropped in the JAX step)
    np.testing.assert_array_equal(example_ids(batch["images"]), batch_ids)


@pytest.mark.no_tf
def test_prepare_makes_array_record_shards_of_a_tfds_dataset_with_its_order(tfds_dirs, tmp_path):
  from sjmae_jax.data import prepare
  index = prepare.prepare("tfds:sjmae_test_images", tmp_path / "shards",
                          data_dir=tfds_dirs["array_record"], examples_per_shard=16,
                          log=lambda line: None)
  assert index["class_names"] == ["a", "b", "c"]
  assert {split: entry["counts"] for split, entry in index["splits"].items()} == {
      "train": [16, 16, 8], "test": [10]}
  batches = {}
  for source in ("tfds:sjmae_test_images", f"arrayrecord:{tmp_path / 'shards'}"):
    cfg = tfds_config(tfds_dirs["array_record"], source=source, cache=False, num_workers=0)
    batches[source] = take(data.build_train_pipeline(cfg, global_batch_size=8, seed=0,
                                                     process_index=0, process_count=1), 6)
  assert_batches_equal(*batches.values())


@pytest.mark.no_tf
def test_tfds_splits_over_the_cache_limit_are_read_by_index(tfds_dirs):
  build = lambda cache_max_gb: data.build_train_pipeline(
      tfds_config(tfds_dirs["array_record"], cache_max_gb=cache_max_gb), global_batch_size=8,
      seed=0, process_index=0, process_count=1)
  assert isinstance(build(16.0).split_data, ArraySplit)
  assert isinstance(build(1e-9).split_data, RecordSplit)


@pytest.mark.tf
@pytest.mark.skipif(not HAS_TENSORFLOW, reason="TFRecord needs the TensorFlow extra")
def test_tfrecord_split_is_streamed_deterministic_and_resumable_with_tensorflow(tfds_dirs):
  cfg = tfds_config(tfds_dirs["tfrecord"], cache=False, shuffle_buffer=16)
  build = lambda start, index=0, count=1: data.build_train_pipeline(
      cfg, global_batch_size=8, seed=0, start_step=start, process_index=index,
      process_count=count)
  train = build(0)
  assert isinstance(train.split_data, TfdsStreamSplit)
  steps = train.steps_per_epoch  # 5
  uninterrupted = take(train, steps + 2)
  assert uninterrupted[0]["images"].shape == (8, 1, 8, 8, 3)
  assert sorted(np.concatenate([example_ids(b["images"]) for b in uninterrupted[:steps]])) == (
      list(range(40)))
  assert_batches_equal(take(build(steps - 1), 3), uninterrupted[steps - 1:])
  # Per-process parts of the split are disjoint and together the whole split.
  seen = [np.concatenate([example_ids(batch["images"]) for batch in take(build(0, index, 2), 5)])
          for index in range(2)]
  assert sorted(np.concatenate(seen)) == list(range(40))
  # Eval: one padded pass in stored order per process.
  batches = list(data.build_eval_pipeline(cfg, split="test", global_batch_size=4,
                                          process_index=0, process_count=1))
  ids = np.concatenate([example_ids(b["images"])[b["valid"]] for b in batches])
  assert sorted(ids) == list(range(40, 50)) and len(batches) == 3


@pytest.mark.tf
def test_tfrecord_dataset_without_tensorflow_names_the_extra(tfds_dirs, monkeypatch, tmp_path):
  if HAS_TENSORFLOW:  # a real TFRecord dataset; TensorFlow made unimportable
    data_dir = tfds_dirs["tfrecord"]
    monkeypatch.setitem(sys.modules, "tensorflow", None)
  else:  # TFDS cannot write TFRecord without TensorFlow: an ArrayRecord copy labelled TFRecord
    data_dir = tmp_path / "tfrecord"
    shutil.copytree(tfds_dirs["array_record"], data_dir)
    info_path, = data_dir.glob("sjmae_test_images/1.0.0/dataset_info.json")
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
  message = one_line_error(data.build_train_pipeline, tfds_config(str(data_dir), cache=False),
                           global_batch_size=8, seed=0, process_index=0, process_count=1)
  assert "needs TensorFlow" in message and "requirements-tf.txt" in message
  assert "--file_format=array_record" in message


@pytest.mark.no_tf
@pytest.mark.skipif(HAS_TENSORFLOW, reason="only without TensorFlow (TFDS caches its import)")
def test_preparing_a_dataset_that_needs_tensorflow_names_the_extra(tmp_path):
  tiny_tfds_builders()  # registers 'sjmae_test_arrays'
  cfg = digits_config(str(tmp_path), source="tfds:sjmae_test_arrays", download=True)
  message = one_line_error(data.dataset_info, cfg)
  assert "preparing TFDS dataset 'sjmae_test_arrays' needs TensorFlow" in message
  assert "requirements-tf.txt" in message and "--file_format=array_record" in message


# ---------------------------------------------------------------------------------------------
# Folders.


def test_folder_labels_from_sorted_class_names_same_in_every_split(tmp_path):
  root = tmp_path / "images"
  write_folder(str(root), {"train": {"zebra": 3, "ant": 2, "moth": 2},
                          "val": {"zebra": 2, "moth": 1}}, fmt="jpg")
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8,
                      eval_split="val", normalize="none", eval_crop_fraction=1.0)
  info = data.dataset_info(cfg)
  assert info.class_names == ["ant", "moth", "zebra"] and info.num_classes == 3
  assert (info.num_examples("train"), info.num_examples("val")) == (7, 3)
  batch = next(iter(data.build_eval_pipeline(cfg, split="val", global_batch_size=4,
                                             process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["label"][:3], [1, 2, 2])  # moth, zebra, zebra
  np.testing.assert_array_equal(batch["valid"], [True, True, True, False])  # + padding
  train = data.build_train_pipeline(cfg, global_batch_size=7, seed=0, process_index=0,
                                    process_count=1)
  assert sorted(next(train)["label"]) == [0, 0, 1, 1, 2, 2, 2]
  info = data.dataset_info(digits_config(str(tmp_path / "cache"), source=f"folder:{root}",
                                         train_split="train[:50%]", eval_split="train[50%:]"))
  assert (info.num_examples("train[:50%]"), info.num_examples("train[50%:]")) == (4, 3)


def test_folder_is_prepared_once_and_reprepared_when_files_change(tmp_path):
  root = tmp_path / "images"
  write_folder(str(root), {"train": {"a": 4, "b": 4}})
  cache_root = tmp_path / "cache"
  cfg = digits_config(str(cache_root), source=f"folder:{root}", img_size=8)
  data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  caches = list((cache_root / "sjmae_folder_cache").iterdir())
  assert len(caches) == 1 and (caches[0] / "images.npy").exists()
  stamp = os.path.getmtime(caches[0] / "meta.json")
  data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
  assert os.path.getmtime(caches[0] / "meta.json") == stamp
  write_folder(str(tmp_path / "more"), {"train": {"b": 1}})
  os.replace(tmp_path / "more" / "train" / "b" / "000.png", root / "train" / "b" / "new.png")
  train = data.build_train_pipeline(cfg, global_batch_size=9, seed=0, process_index=0,
                                    process_count=1)
  assert train.num_examples == 9
  assert len(list((cache_root / "sjmae_folder_cache").iterdir())) == 2


def test_folder_of_mixed_sizes_and_uncached_files_decode_every_step(tmp_path):
  root = tmp_path / "mixed"
  write_folder(str(root), {"train": {"a": 3}}, size=(10, 14))
  write_folder(str(tmp_path / "other"), {"train": {"b": 3}}, size=(20, 12))
  os.replace(tmp_path / "other" / "train" / "b", root / "train" / "b")
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8,
                      views=["simclr", "mae"])
  train = data.build_train_pipeline(cfg, global_batch_size=6, seed=0, process_index=0,
                                    process_count=1)
  assert isinstance(train.split_data, FileSplit)  # not one size: decoded every step
  batches = take(train, 3)
  assert batches[0]["images"].shape == (6, 2, 8, 8, 3)
  resumed = data.build_train_pipeline(cfg, global_batch_size=6, seed=0, start_step=2,
                                      process_index=0, process_count=1)
  assert_batches_equal([next(resumed)], batches[2:])


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line each, raised when the pipeline is built.


def one_line_error(function, *args, **kwargs):
  with pytest.raises(data.DataError) as error:
    function(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, caplog):
  root = tmp_path / "images"
  write_folder(str(root), {"train": {"a": 4, "b": 4}})
  bad = root / "train" / "b" / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8)
  message = one_line_error(data.build_train_pipeline, cfg, global_batch_size=4, seed=0,
                           process_index=0, process_count=1)
  assert str(bad) in message and "skip_corrupt" in message
  assert "BytesIO" not in message and " at 0x" not in message  # the file, not PIL's buffer
  cfg.skip_corrupt = True
  with caplog.at_level(logging.WARNING):
    train = data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                      process_count=1)
  assert train.num_examples == 8
  assert "skipped 1 undecodable" in caplog.text and str(bad) in caplog.text
  assert next(train)["images"].shape == (4, 1, 8, 8, 3)


def test_image_missing_at_read_time_fails_with_one_line_naming_it(tmp_path):
  # Files decoded at every read (cache=False) can disappear after the folder was listed: the
  # error comes out of Grain's reading threads as the same one-line DataError.
  root = tmp_path / "images"
  write_folder(str(root), {"train": {"a": 4, "b": 4}})
  cfg = digits_config(str(tmp_path / "cache"), source=f"folder:{root}", img_size=8, cache=False)
  train = data.build_train_pipeline(cfg, global_batch_size=4, seed=0, process_index=0,
                                    process_count=1)
  gone = root / "train" / "b" / "002.png"
  gone.unlink()
  message = one_line_error(take, train, 2)  # one epoch: every file is read
  assert f"cannot decode image {gone}" in message and "FileNotFoundError" in message


def test_bad_folders_fail_with_one_line(tmp_path):
  cache = str(tmp_path / "cache")
  build = lambda root, split="train": data.build_train_pipeline(
      digits_config(cache, source=f"folder:{root}", train_split=split), global_batch_size=2,
      seed=0, process_index=0, process_count=1)
  missing = tmp_path / "nowhere"
  assert str(missing) in one_line_error(build, missing)

  root = tmp_path / "images"
  write_folder(str(root), {"train": {"a": 2}})
  (root / "train" / "empty_class").mkdir()
  (root / "train" / "empty_class" / "notes.txt").write_text("not an image")
  message = one_line_error(build, root)
  assert "empty class folder" in message and "empty_class" in message

  (root / "test").mkdir()  # a split folder without any class folder / image
  assert "no class folders" in one_line_error(build, root, "test")
  assert "does not exist" in one_line_error(build, root, "validation")

  ok_root = tmp_path / "ok"
  write_folder(str(ok_root), {"train": {"a": 2}})
  assert "no images" in one_line_error(build, ok_root, "train[:0]")

  # torchvision's ImageFolder layout, ROOT/<class>/<image>: the missing split level is named.
  flat = tmp_path / "flat"
  write_folder(str(flat), {"cat": {"x": 2}, "dog": {"x": 2}})
  for class_dir in ("cat", "dog"):  # ROOT/<class>/<image>
    for image in (flat / class_dir / "x").iterdir():
      image.rename(flat / class_dir / image.name)
    (flat / class_dir / "x").rmdir()
  message = one_line_error(build, flat)
  assert message == (f"image folder {flat} has images right under cat, dog: the split level is "
                     f"missing (expected ROOT/<split>/<class>/<image>); move the class folders "
                     f"into {flat / 'train'} and a test set's into {flat / 'test'}, or point "
                     f"data.source at a folder that has them")


@pytest.mark.no_tf
def test_bad_tfds_and_config_values_fail_with_one_line(tmp_path, data_dir):
  cfg = digits_config(str(tmp_path), source="tfds:no_such_dataset_xyz")
  assert "unknown TFDS dataset 'no_such_dataset_xyz'" in one_line_error(data.dataset_info, cfg)
  cfg = digits_config(str(tmp_path), source="tfds:cifar10")  # known, but not prepared there
  message = one_line_error(data.build_train_pipeline, cfg, global_batch_size=8, seed=0,
                           process_index=0, process_count=1)
  assert "not prepared" in message and str(tmp_path) in message
  assert not list(tmp_path.glob("downloads"))  # nothing was fetched

  cfg = digits_config(data_dir, train_split="validation")
  assert "'validation'" in one_line_error(data.dataset_info, cfg)
  cfg = digits_config(data_dir, views=["mae", "nope"])
  assert "'nope'" in one_line_error(data.build_train_pipeline, cfg, global_batch_size=8,
                                    seed=0, process_index=0, process_count=1)
  cfg = digits_config(data_dir)
  cfg.recipes.partial = {"crop": "center"}
  cfg.views = ["partial"]
  assert "lacks" in one_line_error(data.build_train_pipeline, cfg, global_batch_size=8, seed=0,
                                   process_index=0, process_count=1)
  cfg = digits_config(data_dir, source="s3://bucket")
  assert "s3://bucket" in one_line_error(data.dataset_info, cfg)
  cfg = digits_config(data_dir)
  assert "process_count" in one_line_error(data.build_train_pipeline, cfg,
                                           global_batch_size=10, seed=0, process_index=0,
                                           process_count=4)
  assert "fewer than global_batch_size" in one_line_error(
      data.build_train_pipeline, cfg, global_batch_size=4096, seed=0, process_index=0,
      process_count=1)
  cfg = digits_config(data_dir, num_threads=-1)
  assert "data.num_threads=-1" in one_line_error(data.build_train_pipeline, cfg,
                                                 global_batch_size=8, seed=0, process_index=0,
                                                 process_count=1)


@pytest.mark.no_tf
def test_undecodable_tfds_record_fails_at_its_read_with_one_line(tmp_path):
  # Records are decoded when read (not checked up front as folders are): the error comes out of
  # Grain's reading threads as the same one-line DataError.
  corrupt_builder = tiny_tfds_builders()[2]
  corrupt_builder(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = tfds_config(str(tmp_path), source="tfds:sjmae_test_corrupt", cache=False)
  train = data.build_train_pipeline(cfg, global_batch_size=8, seed=0, process_index=0,
                                    process_count=1)
  with pytest.raises(data.DataError) as error:
    take(train, 5)
  message = str(error.value)  # names the record's index in the split (stored order)
  assert "TFDS dataset 'sjmae_test_corrupt': cannot decode the image of example" in message
  assert "UnidentifiedImageError" in message and "\n" not in message
  assert "BytesIO" not in message and " at 0x" not in message


# ---------------------------------------------------------------------------------------------
# The real CIFAR-10 folder, when present.

CIFAR10_DIR = os.environ.get(
    "SJMAE_CIFAR10_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                 "data", "cifar10"))


@pytest.mark.skipif(not os.path.isdir(CIFAR10_DIR), reason="CIFAR-10 folder not present")
def test_real_cifar10_folder_metadata():
  cfg = data.default_config()
  cfg.source = f"folder:{CIFAR10_DIR}"
  info = data.dataset_info(cfg)
  assert info.num_classes == 10 and info.class_names[0] == "airplane"
  assert (info.num_examples("train"), info.num_examples("test")) == (50_000, 10_000)


def test_concurrent_first_runs_prepare_digits_once_and_all_succeed(tmp_path):
  # Parallel test workers or several jobs on one machine share ~/tensorflow_datasets: one of them
  # prepares the digits file (under a lock, written atomically), the others wait and read it.
  import subprocess
  import sys
  script = ("import sys; from sjmae_jax import data; cfg = data.default_config(); "
            "cfg.data_dir = sys.argv[1]; print(data.dataset_info(cfg).split_sizes, "
            "'tensorflow' in sys.modules)")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=repo)
  runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "tfds")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(3)]
  results = [(run.wait(timeout=900), *run.communicate()) for run in runs]
  for code, out, err in results:
    assert code == 0, err[-2000:]
  sizes = {out.strip().splitlines()[-1] for _, out, _ in results}
  assert sizes == {"{'train': 1438, 'test': 359} False"}, sizes  # and TensorFlow not loaded
