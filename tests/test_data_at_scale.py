"""The input pipeline at ImageNet scale: JPEG decoders, Grain worker processes (same batches as
threads, exact resume, one-line failures) and ArrayRecord shards made by `data.prepare`.
Small generated JPEG folders; nothing is downloaded; no TensorFlow."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sjmae_jax import data
from sjmae_jax.data import augment_host

pytestmark = pytest.mark.no_tf
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_like(rng, height, width):
  """Smooth colour gradients plus noise: compresses like a photo, differs per seed."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  channels = [np.sin(rng.uniform(1, 9) * x + rng.uniform(1, 9) * y + rng.uniform(0, 6))
              for _ in range(3)]
  image = (np.stack(channels, -1) + 1) * 100 + rng.normal(0, 12, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def write_jpeg_folder(root, per_class=6, classes=("a", "b"), sizes=((30, 40), (41, 27))):
  """ROOT/train/<class>/<i>.jpg of mixed sizes (so they are decoded at every read)."""
  rng = np.random.default_rng(0)
  for class_name in classes:
    os.makedirs(os.path.join(root, "train", class_name))
    for i in range(per_class):
      height, width = sizes[i % len(sizes)]
      Image.fromarray(photo_like(rng, height, width)).save(
          os.path.join(root, "train", class_name, f"{i:03d}.jpg"), quality=90)
  return root


def folder_config(root, cache_dir, **overrides):
  cfg = data.default_config()
  cfg.source = f"folder:{root}"
  cfg.data_dir = str(cache_dir)
  cfg.img_size = 16
  cfg.cache = False
  cfg.augment_on_device = True  # pre-batches: uint8 crops, compared bit for bit
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def take(pipeline, count):
  return [next(pipeline) for _ in range(count)]


def assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def one_line_error(function, *args, **kwargs):
  with pytest.raises(data.DataError) as error:
    function(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  return message


# ---------------------------------------------------------------------------------------------
# Decoders.


def encoded(image, fmt="JPEG", **options):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


def test_simplejpeg_decodes_the_same_pixels_as_pil_and_leaves_the_rest_to_pil():
  pytest.importorskip("simplejpeg")
  rgb = Image.fromarray(photo_like(np.random.default_rng(1), 37, 53))
  cases = {
      "4:2:0": encoded(rgb, quality=90),
      "4:4:4": encoded(rgb, quality=95, subsampling=0),
      "4:2:2": encoded(rgb, quality=80, subsampling=1),
      "progressive": encoded(rgb, quality=90, progressive=True),
      "gray": encoded(rgb.convert("L"), quality=90),
      "cmyk": encoded(rgb.convert("CMYK"), quality=90),  # libjpeg-turbo alone gets it wrong
      "png": encoded(rgb.convert("RGBA"), "PNG"),
  }
  for name, blob in cases.items():
    reference = augment_host.decode_image(blob, "pil")
    assert reference.shape == (37, 53, 3) and reference.dtype == np.uint8, name
    np.testing.assert_array_equal(augment_host.decode_image(blob, "simplejpeg"), reference,
                                  err_msg=name)
  assert augment_host.resolve_decoder("auto") == "simplejpeg"


def test_decoders_give_identical_batches_and_bad_names_fail_in_one_line(tmp_path, monkeypatch):
  pytest.importorskip("simplejpeg")
  root = write_jpeg_folder(str(tmp_path / "jpegs"))
  batches = {}
  for decoder in ("pil", "simplejpeg"):
    cfg = folder_config(root, tmp_path / "cache", decoder=decoder, views=["simclr", "mae"])
    batches[decoder] = take(data.build_train_pipeline(cfg, global_batch_size=4, seed=0,
                                                      process_index=0, process_count=1), 3)
  assert_batches_equal(batches["pil"], batches["simplejpeg"])

  cfg = folder_config(root, tmp_path / "cache", decoder="turbo")
  assert "data.decoder='turbo'" in one_line_error(data.dataset_info, cfg)
  monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if not installed
  cfg.decoder = "simplejpeg"
  assert "pip install simplejpeg" in one_line_error(data.dataset_info, cfg)
  assert augment_host.resolve_decoder("auto") == "pil"
