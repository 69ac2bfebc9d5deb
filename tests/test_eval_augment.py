"""Fine-tuning augmentations against timm: RandAugment ops (timm's op functions on PIL images),
random erasing (timm's RandomErasing statistics), mixup / cutmix label mixing, the recipe
options in the pipeline and their bad values."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing

from sjmae_jax import data
from sjmae_jax.data import augment_host, randaugment, random_erasing
from sjmae_jax.evaluation import mixup

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


def _images():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
  rows, cols = np.meshgrid(np.arange(20), np.arange(24), indexing="ij")  # smooth gradients too
  images[2] = np.stack([(cols * 10) % 256, (rows * 12) % 256, ((cols + rows) * 5) % 256], -1)
  return images


@pytest.mark.parametrize("ops", [randaugment.OPS_INCREASING, randaugment.OPS])
def test_every_randaugment_op_matches_timm(ops, monkeypatch):
  images = _images()
  n, height, width = images.shape[:3]
  apply = jax.jit(randaugment.apply_op, static_argnums=(4, 6))
  checked = 0
  for name in ops:
    for magnitude in (3.0, 9.0):
      for negate in (False, True):
        monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, negate=negate: -v if negate else v)
        level_fn = timm_aa.LEVEL_TO_ARG[name]
        args = level_fn(magnitude, {"translate_pct": 0.45}) if level_fn else ()
        expected = np.stack([np.asarray(timm_aa.NAME_TO_OP[name](
            Image.fromarray(image), *args, fillcolor=FILL, resample=Image.BICUBIC))
            for image in images])
        got = apply(jnp.asarray(images, jnp.float32), jnp.full((n,), ops.index(name)),
                    jnp.full((n,), magnitude), jnp.full((n,), negate), ops,
                    jnp.asarray(FILL, jnp.float32), "bicubic")
        diff = np.abs(np.asarray(got) - expected.astype(np.float32))
        # float32 vs PIL's double arithmetic: a truncation may land one level apart, rarely.
        assert diff.max() <= 1.0 and (diff > 0).mean() < 0.05, (name, magnitude, negate)
        checked += 1
  assert checked == 4 * len(ops)


def test_randaugment_string_follows_timm():
  config = randaugment.parse("rand-m9-mstd0.5-inc1")
  assert (config.num_layers, config.magnitude, config.magnitude_std, config.prob,
          config.magnitude_max) == (2, 9.0, 0.5, 0.5, 10.0)
  assert config.ops == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
  assert randaugment.parse("rand-m7-n3-p1.0").ops == tuple(timm_aa._RAND_TRANSFORMS)
  timm_transform = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {})
  assert [op.name for op in timm_transform.ops] == list(config.ops)
  assert timm_transform.num_layers == config.num_layers
  assert {op.prob for op in timm_transform.ops} == {config.prob}
  for bad in ("rand-x9", "augmix-m9", "rand-n9", "rand-p2"):
    with pytest.raises(data.DataError, match="randaugment"):
      randaugment.parse(bad)


def test_randaugment_draws_ops_gates_and_magnitudes_from_the_uniforms():
  config = randaugment.parse("rand-m9-mstd0.5-inc1")
  u = np.random.default_rng(1).random((20000, augment_host.NUM_UNIFORMS)).astype(np.float32)
  magnitude = np.asarray(randaugment.sample_magnitude(jnp.asarray(u[:, augment_host.U_RA_MAGNITUDE]),
                                                      config))
  assert abs(magnitude.mean() - 9.0) < 0.02 and abs(magnitude.std() - 0.49) < 0.02
  assert magnitude.max() <= 10.0  # clipped like timm's upper bound

  images = jnp.asarray(_images()[:1].repeat(4, axis=0), jnp.float32) / 255.0
  u4 = np.full((4, augment_host.NUM_UNIFORMS), 0.3, np.float32)
  u4[:, augment_host.U_RA_GATE:augment_host.U_RA_GATE + 2] = 0.9  # both layers skipped
  u4[1, augment_host.U_RA_GATE] = 0.1  # image 1: layer 0 applied, op 'Invert'
  u4[1, augment_host.U_RA_OP] = (config.ops.index("Invert") + 0.5) / len(config.ops)
  out = np.asarray(randaugment.rand_augment(images, jnp.asarray(u4), config, (0.5, 0.5, 0.5)))
  quantized = np.round(np.asarray(images) * 255.0) / 255.0
  np.testing.assert_allclose(out[0], quantized[0], atol=1e-6)
  np.testing.assert_allclose(out[1], 1.0 - quantized[1], atol=1e-6)


def test_random_erasing_statistics_match_timm():
  count, size = 4000, 16
  torch.manual_seed(0)
  import random
  random.seed(0)
  eraser = RandomErasing(probability=0.25, mode="pixel", device="cpu")
  timm_masks = []
  for _ in range(count):
    image = torch.zeros(3, size, size)
    timm_masks.append((eraser(image) != 0).any(0).numpy())
  timm_masks = np.stack(timm_masks)

  u = np.random.default_rng(2).random((count, augment_host.NUM_UNIFORMS)).astype(np.float32)
  ours = np.asarray(jax.jit(random_erasing.random_erase, static_argnums=2)(
      jnp.zeros((count, size, size, 3)), jnp.asarray(u), 0.25))
  our_masks = (ours != 0).any(-1)
  for name, masks in (("timm", timm_masks), ("ours", our_masks)):
    erased = masks.any(axis=(1, 2))
    assert abs(erased.mean() - 0.25) < 0.025, name
  timm_area = timm_masks.sum(axis=(1, 2))[timm_masks.any(axis=(1, 2))] / size ** 2
  our_area = our_masks.sum(axis=(1, 2))[our_masks.any(axis=(1, 2))] / size ** 2
  assert abs(timm_area.mean() - our_area.mean()) < 0.015
  assert abs(np.median(timm_area) - np.median(our_area)) < 0.03
  # Boxes are rectangles filled with N(0, 1) noise.
  for mask in our_masks[our_masks.any(axis=(1, 2))][:50]:
    rows, cols = np.nonzero(mask)
    assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  noise = ours[our_masks]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02


def test_finetune_recipe_in_the_train_pipeline(tmp_path):
  cfg = data.default_config()
  cfg.data_dir = str(tmp_path)
  recipe = cfg.recipes.finetune
  assert recipe.randaugment == "rand-m9-mstd0.5-inc1" and recipe.random_erase_prob == 0.25
  assert tuple(recipe.rrc_scale) == (0.08, 1.0) and recipe.interpolation == "bicubic"
  assert recipe.flip_prob == 0.5 and recipe.jitter_prob == 0.0
  cfg.views = ["finetune", "mae"]
  batch = next(data.build_train_pipeline(cfg, global_batch_size=64, seed=0))
  images = batch["images"]
  assert images.shape == (64, 2, 16, 16, 3) and np.isfinite(images).all()
  mean, std = np.asarray(data.IMAGENET_MEAN), np.asarray(data.IMAGENET_STD)
  plain = (images[:, 1] * std + mean)
  assert plain.min() >= -1e-5 and plain.max() <= 1 + 1e-5  # the 'mae' view: no erasing
  unnormalized = images[:, 0] * std + mean
  erased = ((unnormalized < -1e-3) | (unnormalized > 1 + 1e-3)).any(axis=(1, 2, 3))
  assert 0 < erased.mean() < 0.5  # some views carry out-of-range erasing noise

  cfg.recipes.finetune.randaugment = "rand-m9-bogus"
  with pytest.raises(data.DataError, match=r"randaugment='rand-m9-bogus'"):
    data.build_train_pipeline(cfg, global_batch_size=64, seed=0)
  cfg.recipes.finetune.randaugment = ""
  cfg.recipes.finetune.random_erase_prob = 1.5
  with pytest.raises(data.DataError, match="random_erase_prob=1.5"):
    data.build_train_pipeline(cfg, global_batch_size=64, seed=0)


def test_mixup_cutmix_targets_are_convex_label_mixtures():
  num_classes, batch = 10, 16
  labels = jnp.arange(batch) % num_classes
  images = jnp.arange(batch, dtype=jnp.float32)[:, None, None, None] * jnp.ones((batch, 8, 8, 3))
  mix = jax.jit(mixup.mix, static_argnums=3, static_argnames=(
      "mixup_alpha", "cutmix_alpha", "switch_prob", "prob", "label_smoothing"))
  partner = batch - 1 - np.arange(batch)  # timm mixes image i with image B-1-i
  modes = set()
  for seed in range(12):
    mixed, targets, lam = mix(jax.random.key(seed), images, labels, num_classes,
                              mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
                              label_smoothing=0.1)
    mixed, targets, lam = np.asarray(mixed), np.asarray(targets), float(lam)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert (targets >= 0).all() and 0.0 <= lam <= 1.0
    # Each image's mean content tells the lam its target must carry (cutmix: the pasted area).
    content = mixed.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(content, lam * np.arange(batch) + (1 - lam) * partner, atol=1e-4)
    off = 0.1 / num_classes
    expected = np.full((batch, num_classes), off)
    expected[np.arange(batch), labels] += lam * (1 - 0.1)
    expected[np.arange(batch), np.asarray(labels)[partner]] += (1 - lam) * (1 - 0.1)
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    pasted = np.all((mixed == np.arange(batch)[:, None, None, None])
                    | (mixed == partner[:, None, None, None]))
    modes.add("cutmix" if pasted else "mixup")
  assert modes == {"cutmix", "mixup"}
