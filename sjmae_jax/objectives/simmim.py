"""Mask tokens before the encoder: SimMIM (Xie et al. 2022) and an MAE-style variant.

A learnable mask token replaces the patch embedding of every masked patch BEFORE the position
embedding; the full-length encoder runs over all patches; a light decoder predicts the pixels of
every patch; the loss counts masked pixels only.
  SimMIM (microsoft/SimMIM):  mask units of 32 px, ratio 0.6; linear head (a 1x1 conv + pixel
      shuffle, i.e. one Linear(D, p*p*C) per patch token); L1 on the normalised pixels:
      sum |x - x^| m / (sum m + 1e-5) / C, m the pixel-level mask.
  mae_style: random patches, ratio 0.75; a transformer decoder without position embedding or
      mask tokens (Linear-blocks-LayerNorm-Linear); MSE on the masked pixels.
Params: {'encoder': VisionTransformer with `mask_token`, 'decoder'}.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.vit import Block, VisionTransformer, torch_default_bias_init, xavier_uniform
from sjmae_jax.objectives import base
from sjmae_jax.objectives.reconstruction import read_with_decoder
from sjmae_jax.objectives.reconstruction import (DecoderConfig, patch_targets,
                                                 reconstruction_picture)

DECODERS = ("linear", "transformer")
LOSSES = ("l1", "mse")
MASKINGS = ("units", "patches")
MIN_UNITS_PER_SIDE = 4


def mask_unit_patches(img_size: int, patch_size: int, masking: str, mask_unit: int) -> int:
  """Side of a mask unit in patches. 'patches': 1. 'units': mask_unit px (SimMIM: 32), or one
  patch when the image is less than MIN_UNITS_PER_SIDE units wide (CIFAR, digits)."""
  if masking not in MASKINGS:
    raise ValueError(f"config simmim.masking: {masking!r} is not one of {MASKINGS}")
  if masking == "patches" or img_size < MIN_UNITS_PER_SIDE * mask_unit:
    return 1
  if mask_unit % patch_size or img_size % mask_unit:
    raise ValueError(f"config simmim.mask_unit: {mask_unit} px must be a multiple of the patch "
                     f"size {patch_size} and divide the image size {img_size}")
  return mask_unit // patch_size


def unit_masking(rng, batch_size: int, grid_size: int, unit: int, mask_ratio: float):
  """(B, grid*grid) bool, True = masked: ceil(ratio * units) random units of unit x unit patches
  per image (SimMIM's MaskGenerator), upsampled to the patch grid."""
  side = grid_size // unit
  num_units = side * side
  num_masked = int(math.ceil(num_units * mask_ratio))
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch_size, num_units)), axis=1), axis=1)
  masked = (ranks < num_masked).reshape(batch_size, side, side)
  masked = jnp.repeat(jnp.repeat(masked, unit, axis=1), unit, axis=2)
  return masked.reshape(batch_size, grid_size * grid_size)


def masked_pixel_loss(pred, target, mask, channels: int, kind: str = "l1"):
  """SimMIM's reduction over patchified (B, L, p*p*C) arrays with a (B, L) patch mask (1 =
  masked): sum of |d| (l1) or d^2 (mse) over masked pixels / (masked pixel count + 1e-5) / C."""
  diff = pred.astype(jnp.float32) - target
  error = jnp.abs(diff) if kind == "l1" else diff ** 2
  mask = mask.astype(jnp.float32)
  pixels_per_patch = target.shape[-1] // channels
  masked_pixels = jnp.sum(mask) * pixels_per_patch
  return jnp.sum(error * mask[..., None]) / (masked_pixels + 1e-5) / channels


class LinearPixelDecoder(nn.Module):
  """SimMIM's decoder: Conv2d(D, p*p*C, 1) + PixelShuffle(p) == Linear(D, p*p*C) per patch token,
  with PyTorch's default conv init (uniform +-1/sqrt(D)), as the original leaves it."""
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    del train
    fan_in = tokens.shape[-1]
    return nn.Dense(self.out_dim, dtype=self.dtype,
                    kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                    bias_init=torch_default_bias_init(fan_in), name="decoder_pred")(tokens[:, 1:])


class TransformerPixelDecoder(nn.Module):
  """Seed 002's decoder: a transformer over the encoder's output tokens, no position embedding
  and no mask tokens: Linear(D, D_dec) - blocks - LayerNorm - Linear(D_dec, p*p*C); cls dropped."""
  out_dim: int
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: Any = None

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    x = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="decoder_embed")(tokens)
    for i in range(self.depth):
      x = Block(self.embed_dim, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                attention_impl=self.attention_impl, name=f"decoder_blocks_{i}")(x, train=train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="decoder_norm")(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=xavier_uniform,
                    name="decoder_pred")(x[:, 1:])


@dataclasses.dataclass(frozen=True)
class SimMIMConfig:
  """config.simmim, with the encoder (config.model) and, for decoder='transformer', the sizes of
  the decoder block (`transformer`)."""
  encoder: dict
  transformer: DecoderConfig | None
  masking: str
  mask_unit: int
  mask_ratio: float
  decoder: str
  loss: str
  norm_pix_loss: bool

  def __post_init__(self):
    base.check_choice("simmim.decoder", self.decoder, DECODERS)
    base.check_choice("simmim.loss", self.loss, LOSSES)
    base.check_range("simmim.mask_unit", self.mask_unit, low=1)
    mask_unit_patches(self.encoder["img_size"], self.encoder["patch_size"], self.masking,
                      self.mask_unit)  # checks masking and mask_unit
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"config simmim.mask_ratio: {self.mask_ratio} must be in [0, 1)")

  @property
  def unit(self) -> int:
    """Side of a mask unit in patches."""
    kw = self.encoder
    return mask_unit_patches(kw["img_size"], kw["patch_size"], self.masking, self.mask_unit)

  @classmethod
  def from_config(cls, config) -> "SimMIMConfig":
    return read_with_decoder(config, "simmim", cls,
                             lambda settings: settings.decoder == "transformer", field="transformer")


@objectives.register("simmim")
class SimMIM(base.Objective):
  config: SimMIMConfig
  config_class = SimMIMConfig

  def setup(self):
    cfg, kw = self.config, self.config.encoder
    self.encoder = VisionTransformer(**kw, use_mask_token=True, dtype=self.dtype, name="encoder")
    out_dim = kw["patch_size"] ** 2 * kw["in_chans"]
    if cfg.decoder == "linear":
      self.decoder = LinearPixelDecoder(out_dim, dtype=self.dtype)
    else:
      dec = cfg.transformer
      self.decoder = TransformerPixelDecoder(out_dim, dec.embed_dim, dec.depth, dec.num_heads,
                                             dec.mlp_ratio, dtype=self.dtype,
                                             attention_impl=kw["attention_impl"])

  def _pass(self, images, train):
    """(loss, predictions (B, L, p*p*C), patch mask (B, L) bool)."""
    cfg = self.config
    mask = unit_masking(self.make_rng("masking"), images.shape[0], self.encoder.grid_size,
                        cfg.unit, cfg.mask_ratio)
    tokens = self.encoder(images, patch_mask=mask, train=train)
    pred = self.decoder(tokens, train=train)
    target = patch_targets(images, self.encoder.patch_size, cfg.norm_pix_loss)
    loss = masked_pixel_loss(pred, target, mask, self.encoder.in_chans, cfg.loss)
    return loss, pred, mask

  def __call__(self, batch, *, train: bool = True):
    loss, _, _ = self._pass(batch["images"][:, 0], train)
    return loss, {"loss/mim": loss}

  def pictures(self, batch):
    images = batch["images"][:, 0]
    _, pred, mask = self._pass(images, train=False)
    return {"reconstruction": reconstruction_picture(
        images, pred, mask.astype(jnp.float32), self.encoder.patch_size,
        self.config.norm_pix_loss)}
