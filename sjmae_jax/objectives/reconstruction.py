"""Masked pixel reconstruction, shared by MAE, SJ-MAE, CAN, SSAT, SimMIM and MaPeT: pixel targets,
the MSE on removed patches, the MAE decoder pass, its picture, and the `decoder` config block.
"""
import dataclasses

import jax.numpy as jnp

from sjmae_jax.models.decoder import MASK_TOKEN_MODES, MAEDecoder
from sjmae_jax.models.vit import LEVER_KEYS, VisionTransformer, patchify, unpatchify
from sjmae_jax.objectives import base
from sjmae_jax.objectives.masking import Masking
from sjmae_jax.objectives.pictures import picture_grid


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The `decoder` block: a transformer decoder's width, depth and heads."""
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  mask_token_mode: str = "shared"  # MAEDecoder only; see models/decoder.py

  def __post_init__(self):
    for key in ("embed_dim", "depth", "num_heads"):
      base.check_range(f"decoder.{key}", getattr(self, key), low=1)
    if self.embed_dim % self.num_heads:
      raise ValueError(f"config decoder.embed_dim: {self.embed_dim} is not divisible by "
                       f"decoder.num_heads {self.num_heads}")
    base.check_range("decoder.mlp_ratio", self.mlp_ratio, low=0.0)
    base.check_choice("decoder.mask_token_mode", self.mask_token_mode, MASK_TOKEN_MODES)

  @classmethod
  def from_config(cls, config) -> "DecoderConfig":
    return base.read_block(config, "decoder", cls)


def read_with_decoder(config, block: str, cls, uses_decoder, field: str = "decoder"):
  """The method block `block` read into `cls` (see base.read_block), with `field` read from the
  `decoder` block when `uses_decoder(settings)`: a method that decodes nothing needs none."""
  settings = base.read_block(config, block, cls, encoder=base.encoder_kwargs(config),
                             **{field: None})
  if uses_decoder(settings):
    settings = dataclasses.replace(settings, **{field: DecoderConfig.from_config(config)})
  return settings


def build_decoder(decoder: DecoderConfig, encoder_kwargs: dict, dtype) -> MAEDecoder:
  """The MAE decoder (submodule name 'decoder') for an encoder of `encoder_kwargs`; it shares the
  encoder's attention implementation and fast-path levers."""
  p, c = encoder_kwargs["patch_size"], encoder_kwargs["in_chans"]
  return MAEDecoder(num_patches=base.num_patches(encoder_kwargs), out_dim=p * p * c,
                    embed_dim=decoder.embed_dim, depth=decoder.depth,
                    num_heads=decoder.num_heads, mlp_ratio=decoder.mlp_ratio,
                    mask_token_mode=decoder.mask_token_mode, dtype=dtype,
                    attention_impl=encoder_kwargs["attention_impl"],
                    **{key: encoder_kwargs.get(key, default)
                       for key, (_, default) in LEVER_KEYS.items()}, name="decoder")


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
  """Rows of (original | masked, the masked patches at 0: the data's mean | reconstruction with
  the visible patches pasted), in the input's space (pictures.for_display shows them)."""
  images = images[:max_images].astype(jnp.float32)
  pred, mask = pred[:max_images].astype(jnp.float32), mask[:max_images]
  channels = images.shape[-1]
  target = patchify(images, patch_size)
  if norm_pix_loss:  # undo the per-patch standardization with the true patch statistics
    mean = target.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    pred = pred * std + mean
  m = mask[..., None]
  masked = unpatchify(target * (1 - m), patch_size, channels)
  pasted = unpatchify(target * (1 - m) + pred * m, patch_size, channels)
  return picture_grid([images, masked, pasted])
