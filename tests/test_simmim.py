"""Mask tokens before the encoder (SimMIM form, and an MAE-style variant): masking, loss, decoders, a digits run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjmae_jax import trainer
from sjmae_jax.models.vit import VisionTransformer, patchify, unpatchify
from sjmae_jax.objectives.simmim import masked_pixel_loss, mask_unit_patches, unit_masking
from tests.helpers import load_config, tiny_config

RNGS = lambda seed=0: {"params": jax.random.PRNGKey(seed), "masking": jax.random.PRNGKey(seed + 1),
                       "dropout": jax.random.PRNGKey(seed + 2)}


def small_config(**overrides):
  return tiny_config("simmim", **{"model.depth": 1, **overrides})


def test_masked_patches_carry_the_mask_token_and_nothing_of_the_image():
  vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                          use_mask_token=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  mask = unit_masking(jax.random.PRNGKey(1), 2, 4, 1, 0.6)
  assert mask.shape == (2, 16) and np.all(np.asarray(mask).sum(1) == math.ceil(16 * 0.6))
  variables = jax.jit(vit.init)(jax.random.PRNGKey(2), images)
  embedded = vit.apply(variables, images, mask, method=VisionTransformer.embed_patches)
  token = np.asarray(variables["params"]["mask_token"])[0, 0]
  m = np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(embedded)[m], np.broadcast_to(token, (m.sum(), 32)))
  # the gradient of the whole encoder output w.r.t. the pixels of masked patches is exactly 0
  probe = jax.random.normal(jax.random.PRNGKey(3), (2, 17, 32))
  encode = lambda x: jnp.sum(vit.apply(variables, x, patch_mask=mask) * probe)
  grad = np.abs(np.asarray(patchify(jax.jit(jax.grad(encode))(images), 4))).sum(-1)
  assert np.all(grad[m] == 0)
  assert np.all(grad[~m] > 0)
  # changing the masked pixels changes nothing
  noise = unpatchify(jnp.where(mask[..., None], 100.0, 0.0) * jnp.ones((2, 16, 48)), 4, 3)
  out = vit.apply(variables, images, patch_mask=mask)
  np.testing.assert_array_equal(vit.apply(variables, images + noise, patch_mask=mask), out)


def np_simmim_loss(images, pred_images, pixel_mask, kind):
  """SimMIM's forward written on images: (B, H, W, C), mask (B, H, W)."""
  diff = np.abs(images - pred_images) if kind == "l1" else (images - pred_images) ** 2
  channels = images.shape[-1]
  return (diff * pixel_mask[..., None]).sum() / (pixel_mask.sum() + 1e-5) / channels


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_loss_counts_only_masked_pixels(kind):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  pred_images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  patch_mask = rng.random((3, 16)) < 0.5
  pixel_mask = np.repeat(np.repeat(patch_mask.reshape(3, 4, 4), 4, 1), 4, 2).astype(np.float32)
  loss = masked_pixel_loss(patchify(jnp.asarray(pred_images), 4), patchify(jnp.asarray(images), 4),
                           jnp.asarray(patch_mask), channels=3, kind=kind)
  np.testing.assert_allclose(loss, np_simmim_loss(images, pred_images, pixel_mask, kind), rtol=1e-5)
  # predictions of visible pixels do not count
  moved = pred_images + 50.0 * (1 - pixel_mask[..., None])
  same = masked_pixel_loss(patchify(jnp.asarray(moved), 4), patchify(jnp.asarray(images), 4),
                           jnp.asarray(patch_mask), channels=3, kind=kind)
  np.testing.assert_allclose(same, loss, rtol=1e-5)


def test_mask_units_of_32_px_are_upsampled_to_patches():
  assert mask_unit_patches(224, 16, "units", 32) == 2
  assert mask_unit_patches(192, 8, "units", 32) == 4
  assert mask_unit_patches(32, 4, "units", 32) == 1  # CIFAR: one patch per unit
  assert mask_unit_patches(16, 4, "units", 32) == 1  # digits
  assert mask_unit_patches(224, 16, "patches", 32) == 1
  with pytest.raises(ValueError, match="simmim.mask_unit"):
    mask_unit_patches(224, 16, "units", 40)
  with pytest.raises(ValueError, match="simmim.masking"):
    mask_unit_patches(224, 16, "blocks", 32)
  mask = np.asarray(unit_masking(jax.random.PRNGKey(0), 4, 24, 4, 0.6))  # 192 px, patch 8
  grid = mask.reshape(4, 6, 4, 6, 4)  # (B, unit row, patch in unit, unit col, patch in unit)
  per_unit = grid.transpose(0, 1, 3, 2, 4).reshape(4, 36, 16)
  assert np.all(per_unit.all(-1) | ~per_unit.any(-1))  # each unit is all masked or all visible
  assert np.all(per_unit.all(-1).sum(1) == math.ceil(36 * 0.6))  # SimMIM's count per image
  assert len({tuple(row) for row in per_unit.all(-1)}) == 4  # independent per image


def test_model_loss_is_simmim_l1_over_masked_pixels_with_a_linear_head():
  config = small_config()
  simmim = config.simmim
  assert (simmim.decoder, simmim.loss, simmim.mask_ratio) == ("linear", "l1", 0.6)
  model = trainer.build_model(config)
  batch = trainer.sample_batch(config, 4)
  batch["images"] = jax.random.normal(jax.random.PRNGKey(0), batch["images"].shape)
  variables = jax.jit(model.init)(RNGS(), batch)
  assert set(variables["params"]) == {"encoder", "decoder"}
  assert "mask_token" in variables["params"]["encoder"]
  assert variables["params"]["decoder"]["decoder_pred"]["kernel"].shape == (32, 48)
  details = jax.jit(lambda v, x: model.apply(v, x, True, rngs=RNGS(5),
                                             method=lambda module, *a: module._pass(*a)))
  loss, pred, mask = details(variables, batch["images"][:, 0])
  (loss_again, metrics) = jax.jit(lambda v, b: model.apply(v, b, rngs=RNGS(5)))(variables, batch)
  np.testing.assert_allclose(loss_again, loss, rtol=1e-6)
  assert metrics["loss/mim"] == loss_again
  # the head is one Linear per final patch token (1x1 conv + pixel shuffle)
  bound = model.bind(variables)
  tokens = bound.encoder(batch["images"][:, 0], patch_mask=mask)
  kernel = np.asarray(variables["params"]["decoder"]["decoder_pred"]["kernel"])
  bias = np.asarray(variables["params"]["decoder"]["decoder_pred"]["bias"])
  np.testing.assert_allclose(pred, np.asarray(tokens)[:, 1:] @ kernel + bias, rtol=1e-4, atol=1e-5)
  images = np.asarray(batch["images"][:, 0])
  pixel_mask = np.repeat(np.repeat(np.asarray(mask, np.float32).reshape(4, 4, 4), 4, 1), 4, 2)
  expected = np_simmim_loss(images, np.asarray(unpatchify(pred, 4, 3)), pixel_mask, "l1")
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_mae_style_variant_is_mse_random_patches_and_a_transformer_decoder():
  config = load_config("simmim", "variant=mae_style")
  assert (config.simmim.masking, config.simmim.mask_ratio, config.simmim.decoder,
          config.simmim.loss) == ("patches", 0.75, "transformer", "mse")
  with pytest.raises(ValueError, match="variant"):
    load_config("simmim", "variant=beit")
  variant = {f"simmim.{k}": config.simmim[k] for k in ("masking", "mask_ratio", "decoder", "loss")}
  config = small_config(**variant)
  model = trainer.build_model(config)
  batch = trainer.sample_batch(config, 2)
  params = jax.eval_shape(model.init, RNGS(), batch)["params"]["decoder"]
  assert set(params) == {"decoder_embed", "decoder_blocks_0", "decoder_norm", "decoder_pred"}
  assert "decoder_pos_embed" not in params and "mask_token" not in params  # none in this variant


@pytest.mark.parametrize("variant", ["simmim", "mae_style"])
@pytest.mark.slow
def test_simmim_trains_on_digits(tmp_path, variant):
  overrides = {"stop_at_step": 3, "log_every_steps": 3, "model.depth": 1}
  if variant == "mae_style":
    overrides.update({"simmim.masking": "patches", "simmim.mask_ratio": 0.75,
                      "simmim.decoder": "transformer", "simmim.loss": "mse"})
  summary = trainer.train_and_evaluate(tiny_config("simmim", **overrides), str(tmp_path))
  assert summary["step"] == 3 and np.isfinite(summary["loss/mim"])
