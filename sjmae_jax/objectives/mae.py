"""MAE (He et al. 2021): encode the visible 25%, decode all patches, MSE on the removed ones.

`masked_reconstruction` is the reusable term (SJ-MAE, CAN and SSAT call it); `MAE` is the
objective module: {'encoder': VisionTransformer, 'decoder': MAEDecoder}.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.decoder import MAEDecoder
from sjmae_jax.models.vit import (LEVER_KEYS, VisionTransformer, patchify, unpatchify,
                                  vit_kwargs)
from sjmae_jax.objectives.masking import Masking, random_masking


def patch_targets(images, patch_size: int, norm_pix_loss: bool):
  """Patchified targets; with norm_pix_loss each patch is standardised with the UNBIASED variance."""
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def removed_patch_mse(pred, target, mask):
  """Per-patch MSE averaged over removed patches only (mask: 1 = removed)."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def reconstruction_from_tokens(decoder: MAEDecoder, tokens, images, masking: Masking, *,
                               patch_size: int, norm_pix_loss: bool, train: bool, extra=None):
  """Decode encoded visible tokens and score them. Returns (loss, predictions (B, L, p*p*C))."""
  pred = decoder(tokens, masking.ids_restore, extra=extra, train=train)
  target = patch_targets(images, patch_size, norm_pix_loss)
  return removed_patch_mse(pred, target, masking.mask), pred


def masked_reconstruction(encoder: VisionTransformer, decoder: MAEDecoder, images, masking: Masking,
                          *, norm_pix_loss: bool, train: bool):
  """One MAE pass. Returns (loss, encoded tokens (B, 1+K, D), predictions (B, L, p*p*C))."""
  tokens = encoder(images, keep_ids=masking.keep_ids, train=train)
  loss, pred = reconstruction_from_tokens(decoder, tokens, images, masking,
                                          patch_size=encoder.patch_size,
                                          norm_pix_loss=norm_pix_loss, train=train)
  return loss, tokens, pred


def reconstruction_picture(images, pred, mask, patch_size: int, norm_pix_loss: bool, max_images=8):
  """Rows of (original | masked | reconstruction with visible patches pasted), scaled to [0, 1]."""
  images = images[:max_images].astype(jnp.float32)
  pred, mask = pred[:max_images].astype(jnp.float32), mask[:max_images]
  channels = images.shape[-1]
  target = patchify(images, patch_size)
  if norm_pix_loss:  # undo the per-patch standardisation with the true patch statistics
    mean = target.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  m = mask[..., None]
  masked = unpatchify(target * (1 - m), patch_size, channels)
  pasted = unpatchify(target * (1 - m) + pred * m, patch_size, channels)
  lo, hi = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
  scale = lambda x: jnp.clip((x - lo) / (hi - lo + 1e-6), 0, 1)
  rows = jnp.concatenate([scale(images), scale(masked), scale(pasted)], axis=2)
  return rows.reshape(-1, *rows.shape[2:])[None]


def build_decoder(config, encoder_kwargs: dict, dtype) -> MAEDecoder:
  dec = config.decoder
  p, c = encoder_kwargs["patch_size"], encoder_kwargs["in_chans"]
  return MAEDecoder(num_patches=(encoder_kwargs["img_size"] // p) ** 2, out_dim=p * p * c,
                    embed_dim=dec.embed_dim, depth=dec.depth, num_heads=dec.num_heads,
                    mask_token_mode=dec.get("mask_token_mode", "shared"), dtype=dtype,
                    attention_impl=encoder_kwargs["attention_impl"],
                    **{key: encoder_kwargs.get(key, default)
                       for key, (_, default) in LEVER_KEYS.items()}, name="decoder")


class MAE(nn.Module):
  encoder_kwargs: dict
  config: Any  # the full run config (decoder block, mae block)
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = VisionTransformer(**self.encoder_kwargs, dtype=self.dtype, name="encoder")
    self.decoder = build_decoder(self.config, self.encoder_kwargs, self.dtype)

  def _pass(self, images, train):
    masking = random_masking(self.make_rng("masking"), images.shape[0],
                             self.encoder.num_patches, self.config.mae.mask_ratio)
    loss, _, pred = masked_reconstruction(self.encoder, self.decoder, images, masking,
                                          norm_pix_loss=self.config.mae.norm_pix_loss, train=train)
    return loss, pred, masking

  def __call__(self, batch, *, train: bool = True):
    loss, _, _ = self._pass(batch["images"][:, 0], train)
    return loss, {"loss/mae": loss}

  def pictures(self, batch):
    images = batch["images"][:, 0]
    _, pred, masking = self._pass(images, train=False)
    return {"reconstruction": reconstruction_picture(
        images, pred, masking.mask, self.encoder.patch_size, self.config.mae.norm_pix_loss)}

  def encode(self, images):
    """Full-image features for monitors and probes: all tokens after the final norm."""
    return self.encoder(images, train=False)


@objectives.register("mae")
def build(config, dtype=jnp.float32) -> MAE:
  return MAE(vit_kwargs(config.model), config, dtype=dtype)
