"""CAN (Mishra et al. 2022): contrastive + masked autoencoder + denoising on one ViT encoder.

Faithful to shlokk/mae-contrastive (see METHODS.md):
  both SimCLR views go through the encoder as one batch of 2N images, each masked independently;
  contrastive: mean of ALL encoder output tokens (cls included) -> Linear(D,D)-ReLU-Linear(D,128),
    NT-Xent with tau 0.1 over the 2N embeddings (both directions, 2N-2 negatives);
  denoising: per image sigma ~ U(0, noise_std) and image += sigma * N(0, 1) before the encoder (so
    the MAE target is the noisy image); sinusoidal(sigma, 128) -> Linear(128,D)-ReLU-Linear(D,D) is
    added to every encoder output token before the decoder, and the decoder predicts the added
    noise of the VISIBLE patches (MSE);
  L = w_mae * [w_noise * L_noise + (1 - w_noise) * L_mae] + w_simclr * L_nce.
noise_head='shared' is the original: the decoder's one output (decoder_pred) is read as pixels at
removed patches and as noise at visible ones. 'separate' adds a second Linear (`noise_pred`) on the
decoder's normed tokens for the noise. Either way the `decoder` subtree is a plain MAE decoder.
A term with weight 0 is not built or computed; w_noise=0 is CAN without denoising (no noise, no
sigma embedding), which the original code crashes on.
Masks are drawn from the 'masking' rng stream, sigma and the noise from 'noise'.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.heads import ProjectionMLP
from sjmae_jax.models.vit import VisionTransformer, patchify, xavier_uniform
from sjmae_jax.objectives import base, contrastive
from sjmae_jax.objectives.masking import random_masking
from sjmae_jax.objectives.reconstruction import read_with_decoder
from sjmae_jax.objectives.reconstruction import (DecoderConfig, build_decoder, patch_targets,
                                                 reconstruction_picture, removed_patch_mse)

NOISE_HEADS = ("shared", "separate")


def sinusoidal_embedding(values, dim: int = 128):
  """(B,) -> (B, dim): [sin(v * f_i), cos(v * f_i)] with f_i = 10000^(-i / (dim/2 - 1)).

  The diffusion-timestep embedding CAN applies to the noise level sigma.
  """
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  angles = values.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
  """sigma (B,) -> sinusoidal(embed_dim) -> Linear(embed_dim, D)-ReLU-Linear(D, D)."""
  out_dim: int
  embed_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, sigma):
    x = sinusoidal_embedding(sigma, self.embed_dim)
    x = nn.relu(nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc1")(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=xavier_uniform, name="fc2")(x)


@dataclasses.dataclass(frozen=True)
class CANConfig:
  """config.can, with the encoder (config.model) and, when a reconstruction term is on, the
  decoder block."""
  encoder: dict
  decoder: DecoderConfig | None
  mask_ratio: float
  norm_pix_loss: bool
  w_mae: float
  w_noise: float
  w_simclr: float
  temperature: float
  projection_dim: int
  noise_std: float
  sigma_embed_dim: int
  noise_head: str

  def __post_init__(self):
    base.check_mask_ratio("can.mask_ratio", self.mask_ratio, self.encoder)
    base.check_choice("can.noise_head", self.noise_head, NOISE_HEADS)
    base.check_range("can.w_mae", self.w_mae, low=0.0)
    base.check_range("can.w_noise", self.w_noise, low=0.0, high=1.0)
    base.check_range("can.w_simclr", self.w_simclr, low=0.0)
    base.check_range("can.noise_std", self.noise_std, low=0.0)
    if not (self.use_mae or self.use_noise or self.use_contrastive):
      raise ValueError("config can: all loss weights are 0; nothing to train")
    if self.temperature <= 0:
      raise ValueError(f"config can.temperature: {self.temperature} must be > 0")
    base.check_range("can.projection_dim", self.projection_dim, low=1)
    if self.sigma_embed_dim < 4 or self.sigma_embed_dim % 2:
      raise ValueError(f"config can.sigma_embed_dim: {self.sigma_embed_dim} must be even and >= 4")

  @property
  def use_mae(self) -> bool:
    return self.w_mae > 0 and self.w_noise < 1

  @property
  def use_noise(self) -> bool:
    return self.w_mae > 0 and self.w_noise > 0

  @property
  def use_contrastive(self) -> bool:
    return self.w_simclr > 0

  @classmethod
  def from_config(cls, config) -> "CANConfig":
    return read_with_decoder(config, "can", cls,
                             lambda settings: settings.use_mae or settings.use_noise)


@objectives.register("can")
class CAN(base.Objective):
  config: CANConfig
  config_class = CANConfig
  rng_streams = ("masking", "noise", "dropout")  # noise: the per-image sigma and the noise

  def setup(self):
    cfg = self.config
    self.encoder = VisionTransformer(**cfg.encoder, dtype=self.dtype, name="encoder")
    if cfg.use_mae or cfg.use_noise:
      self.decoder = build_decoder(cfg.decoder, cfg.encoder, self.dtype)
    if cfg.use_noise:
      self.noise_level_embedding = NoiseLevelEmbedding(
          cfg.encoder["embed_dim"], cfg.sigma_embed_dim, dtype=self.dtype)
      if cfg.noise_head == "separate":
        p, c = cfg.encoder["patch_size"], cfg.encoder["in_chans"]
        self.noise_pred = nn.Dense(p * p * c, dtype=self.dtype, kernel_init=xavier_uniform)
    if cfg.use_contrastive:
      self.projector = ProjectionMLP(cfg.projection_dim, dtype=self.dtype)

  def _terms(self, images, train):
    """(losses, metrics, details) for a (B, V, H, W, C) batch; V = 2 views (1: the view twice)."""
    cfg = self.config
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    n = view1.shape[0]
    x = jnp.concatenate([view1, view2]).astype(jnp.float32)
    masking = random_masking(self.make_rng("masking"), 2 * n, self.encoder.num_patches,
                             cfg.mask_ratio)
    details = {"masking": masking}
    if cfg.use_noise:
      sigma_rng, noise_rng = jax.random.split(self.make_rng("noise"))
      sigma = cfg.noise_std * jax.random.uniform(sigma_rng, (2 * n,))
      noise = sigma[:, None, None, None] * jax.random.normal(noise_rng, x.shape)
      x = x + noise
      details.update(sigma=sigma, noise=noise)
    details["inputs"] = x
    tokens = self.encoder(x, keep_ids=masking.keep_ids, train=train)

    losses, metrics = {}, {}
    if cfg.use_contrastive:
      z = self.projector(tokens.mean(axis=1))
      losses["contrastive"], metrics["contrastive/top1"] = contrastive.nt_xent(
          z[:n], z[n:], cfg.temperature)
    if cfg.use_mae or cfg.use_noise:
      p = self.encoder.patch_size
      extra = self.noise_level_embedding(sigma)[:, None, :] if cfg.use_noise else None
      pred, hidden = self.decoder(tokens, masking.ids_restore, extra=extra, train=train,
                                  return_hidden=True)
      details["pred"] = pred
      if cfg.use_mae:
        target = patch_targets(x, p, cfg.norm_pix_loss)
        losses["mae"] = removed_patch_mse(pred, target, masking.mask)
      if cfg.use_noise:
        noise_pred = pred if cfg.noise_head == "shared" else self.noise_pred(hidden[:, 1:])
        details["noise_pred"] = noise_pred
        visible = 1.0 - masking.mask
        losses["noise"] = removed_patch_mse(noise_pred, patchify(noise, p), visible)
    return losses, metrics, details

  def __call__(self, batch, *, train: bool = True):
    cfg = self.config
    losses, metrics, _ = self._terms(batch["images"], train)
    reconstruction = 0.0
    if cfg.use_mae:
      reconstruction += (1.0 - cfg.w_noise) * losses["mae"]
    if cfg.use_noise:
      reconstruction += cfg.w_noise * losses["noise"]
    total = cfg.w_mae * reconstruction
    if cfg.use_contrastive:
      total += cfg.w_simclr * losses["contrastive"]
    metrics.update({f"loss/{t}": v for t, v in losses.items()})
    return total, metrics

  def pictures(self, batch):
    if not self.config.use_mae:
      return {}
    _, _, details = self._terms(batch["images"], train=False)
    n = batch["images"].shape[0]
    return {"reconstruction": reconstruction_picture(
        details["inputs"][:n], details["pred"][:n], details["masking"].mask[:n],
        self.encoder.patch_size, self.config.norm_pix_loss)}
