"""CIFAR-10's recipes (config_lib.cifar10_recipes, configs/finetune.py, configs/linprobe.py) are
what they claim: pad-and-crop geometry, the whole image at evaluation, mixup off for the end of
the schedule; and ImageNet-size data keeps main's recipes bit for bit (tests/fixtures)."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sjmae_jax.data import augment_host, augment_jax
from sjmae_jax.evaluation import finetune
from sjmae_jax.models.classifier import ViTClassifier
from sjmae_jax.models.vit import vit_kwargs
from tests.fixtures import make_imagenet_pins as pins
from tests.helpers import load_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Keys added since the pins, each at the value that leaves behaviour as it was.
NEW_KEYS_NEUTRAL = {"pad": 0, "off_fraction": 0.0, "train_minutes": 0.0,
                    "budget_warmup_fraction": 0.05, "budget_calibration_steps": 10,
                    "qkv_impl": "fused", "flatten": False, "num_workers": "auto"}
NEW_PATHS_NEUTRAL = {"data.decoder": "auto",  # the same pixels as PIL (tests/test_data_at_scale.py)
                     "data.resize": "pil"}


# Keys whose default changed without changing a batch (how many threads prepare them).
SPEED_ONLY_PATHS = {"data.num_threads"}


def without_new_keys(tree, path=""):
  if isinstance(tree, dict):
    kept = {}
    for key, value in tree.items():
      if f"{path}{key}" in SPEED_ONLY_PATHS:
        continue
      if key in NEW_KEYS_NEUTRAL or f"{path}{key}" in NEW_PATHS_NEUTRAL:
        neutral = NEW_PATHS_NEUTRAL.get(f"{path}{key}", NEW_KEYS_NEUTRAL.get(key))
        assert value == neutral, f"{path}{key}: {value!r}"
        continue
      if f"{path}{key}" == "data.data_dir":  # ~/tensorflow_datasets: differs per machine
        continue
      kept[key] = without_new_keys(value, f"{path}{key}.")
    return kept
  return tree


def test_imagenet_configs_are_mains():
  expected = json.loads((FIXTURES / "imagenet_pins.json").read_text())
  current = pins.resolved_configs()
  assert sorted(current) == sorted(expected)
  for name in expected:
    assert without_new_keys(current[name]) == without_new_keys(expected[name]), name


def test_imagenet_views_are_mains_for_fixed_seeds():
  """Host crop specs, PIL crops and the batched JAX views (as on the device) of every default
  recipe: the same numbers as main made (the pad-crop guard in resample_matrix changes none)."""
  expected = np.load(FIXTURES / "imagenet_pins.npz")
  current = pins.recipe_views()
  assert sorted(current) == sorted(expected.files)
  for key in expected.files:
    if key.endswith("/views"):  # float32 from XLA: equal here; 1e-6 leaves room for versions
      np.testing.assert_allclose(current[key], expected[key], rtol=0, atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(current[key], expected[key], err_msg=key)


def ramp_image(size=32):
  """Distinct pixel values, so any shift or resampling shows."""
  values = np.arange(size * size * 3).reshape(size, size, 3)
  return (values * 7 % 251 + 1).astype(np.uint8)  # 1..251: padding (0) is not an image value


def test_pad_crop_is_a_window_of_the_zero_padded_image():
  recipe = load_config("finetune", "data=cifar10").data.recipes.finetune
  assert recipe.crop == "pad_crop" and recipe.pad == 4 and recipe.random_erase_prob == 0.0
  image = ramp_image()
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  u = augment_host.draw_uniforms((3,), (400,))
  specs = augment_host.crop_specs(u, 32, 32, recipe, 32, 1.0)
  tops, lefts = specs[:, 0] + 4, specs[:, 4] + 4
  assert set(tops.astype(int)) == set(range(9)) == set(lefts.astype(int))  # torchvision's range
  for interpolation in ("bicubic", "bilinear"):  # both kernels are exact at integer shifts
    plain = ml_collections.ConfigDict(dict(recipe.to_dict(), randaugment="", flip_prob=0.0,
                                           interpolation=interpolation))
    finish = jax.jit(augment_jax.make_finish_fn([plain], 32, None))
    out = finish({"raw": np.repeat(image[None], 6, 0), "crop_spec": specs[:6, None],
                  "uniforms": u[:6, None], "label": np.zeros(6, np.int32)})["images"][:, 0]
    for i in range(6):
      top, left = int(tops[i]), int(lefts[i])
      window = padded[top:top + 32, left:left + 32]
      np.testing.assert_allclose(np.asarray(out[i]) * 255.0, window, atol=1e-3)
      np.testing.assert_array_equal(augment_host.crop_one(image, specs[i], 32, interpolation),
                                    window)


def test_cifar10_evaluates_the_whole_image():
  for name, arg in (("sjmae", "data=cifar10"), ("mae", "data=cifar10"),
                    ("linprobe", "data=cifar10"), ("finetune", "data=cifar10")):
    config = load_config(name, arg)
    assert config.data.eval_crop_fraction == 1.0, name
  cfg = load_config("finetune", "data=cifar10").data
  image = ramp_image()
  u = augment_host.draw_uniforms((0,), (1,))
  spec = augment_host.crop_specs(u, 32, 32, cfg.recipes.eval, 32, cfg.eval_crop_fraction)
  finish = jax.jit(augment_jax.make_finish_fn([cfg.recipes.eval], 32, None))
  out = finish({"raw": image[None], "crop_spec": spec[:, None], "uniforms": u[:, None],
                "label": np.zeros(1, np.int32)})["images"][0, 0]
  np.testing.assert_allclose(np.asarray(out) * 255.0, image, atol=1e-3)
  # ImageNet's eval (the default elsewhere) resizes to 36 px and takes the centre.
  assert load_config("finetune", "data=imagenet2012").data.eval_crop_fraction == 0.875


def test_cifar10_pretraining_views_are_light_and_blur_free():
  sjmae = load_config("sjmae", "data=cifar10").data.recipes
  assert tuple(sjmae.simclr.rrc_scale) == (0.35, 1.0) and sjmae.simclr.blur_prob == 0.0
  assert sjmae.simclr.jitter_prob == 0.8 and sjmae.simclr.grayscale_prob == 0.2
  assert tuple(load_config("mae", "data=cifar10").data.recipes.mae.rrc_scale) == (0.35, 1.0)
  imagenet = load_config("sjmae", "data=imagenet2012").data.recipes.simclr
  assert tuple(imagenet.rrc_scale) == (0.2, 1.0) and imagenet.blur_prob == 0.5


def test_cifar10_finetune_recipe_values():
  config = load_config("finetune", "data=cifar10")
  assert config.optim.layer_decay == 0.85 and config.label_smoothing == 0.1
  assert config.model.drop_path_rate == 0.1
  assert config.mixup.prob == 0.5 and config.mixup.off_fraction == 0.2
  imagenet = load_config("finetune", "data=imagenet2012")
  assert imagenet.mixup.off_fraction == 0.0 and imagenet.optim.layer_decay == 0.75


def test_mixup_is_off_for_the_configured_end_of_the_schedule():
  config = load_config("finetune", "data=cifar10")
  config.unlock()
  config.mixup.prob = 1.0  # every batch mixed while it is on
  assert finetune.mixup_off_step(config, 100) == 80
  config.model.update(embed_dim=32, depth=1, num_heads=2)
  classifier = ViTClassifier(vit_kwargs(config.model), 10, global_pool="avg", head_init_std=1.0)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 1, 32, 32, 3))
  batch = {"images": images, "label": jnp.arange(8) % 10}
  params = classifier.init(jax.random.PRNGKey(1), images[:, 0])["params"]
  loss_fn = jax.jit(finetune.make_loss_fn(classifier, config, 10, total_steps=100))
  rng = jax.random.PRNGKey(2)
  losses = {step: float(loss_fn(params, {}, batch, rng, step)[0]) for step in (0, 79, 80, 99)}
  plain = config.copy_and_resolve_references()
  plain.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0, off_fraction=0.0)
  clean = float(finetune.make_loss_fn(classifier, plain, 10)(params, {}, batch, rng)[0])
  assert losses[80] == pytest.approx(clean, abs=1e-6) and losses[99] == losses[80]
  assert abs(losses[0] - clean) > 1e-4 and abs(losses[79] - clean) > 1e-4
  with pytest.raises(ValueError, match="off_fraction"):
    config.mixup.off_fraction = 1.5
    finetune.mixup_off_step(config, 100)
