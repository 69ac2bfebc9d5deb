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
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.heads import ProjectionMLP
from sjmae_jax.models.vit import VisionTransformer, patchify, vit_kwargs, xavier_uniform
from sjmae_jax.objectives import contrastive
from sjmae_jax.objectives.mae import (build_decoder, patch_targets, reconstruction_picture,
                                      removed_patch_mse)
from sjmae_jax.objectives.masking import random_masking

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


class CAN(nn.Module):
  encoder_kwargs: dict
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config.can
    if cfg.noise_head not in NOISE_HEADS:
      raise ValueError(f"config can.noise_head: {cfg.noise_head!r} is not one of {NOISE_HEADS}")
    if not 0.0 <= cfg.w_noise <= 1.0:
      raise ValueError(f"config can.w_noise: {cfg.w_noise} must be in [0, 1]")
    if cfg.noise_std < 0:
      raise ValueError(f"config can.noise_std: {cfg.noise_std} must be >= 0")
    self.use_mae = cfg.w_mae > 0 and cfg.w_noise < 1
    self.use_noise = cfg.w_mae > 0 and cfg.w_noise > 0
    self.use_contrastive = cfg.w_simclr > 0
    if not (self.use_mae or self.use_noise or self.use_contrastive):
      raise ValueError("config can: all loss weights are 0; nothing to train")
    self.encoder = VisionTransformer(**self.encoder_kwargs, dtype=self.dtype, name="encoder")
    if self.use_mae or self.use_noise:
      self.decoder = build_decoder(self.config, self.encoder_kwargs, self.dtype)
    if self.use_noise:
      self.noise_level_embedding = NoiseLevelEmbedding(
          self.encoder_kwargs["embed_dim"], cfg.sigma_embed_dim, dtype=self.dtype)
      if cfg.noise_head == "separate":
        p, c = self.encoder_kwargs["patch_size"], self.encoder_kwargs["in_chans"]
        self.noise_pred = nn.Dense(p * p * c, dtype=self.dtype, kernel_init=xavier_uniform)
    if self.use_contrastive:
      self.projector = ProjectionMLP(cfg.projection_dim, dtype=self.dtype)

  def _terms(self, images, train):
    """(losses, metrics, details) for a (B, V, H, W, C) batch; V = 2 views (1: the view twice)."""
    cfg = self.config.can
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    n = view1.shape[0]
    x = jnp.concatenate([view1, view2]).astype(jnp.float32)
    masking = random_masking(self.make_rng("masking"), 2 * n, self.encoder.num_patches,
                             cfg.mask_ratio)
    details = {"masking": masking}
    if self.use_noise:
      sigma_rng, noise_rng = jax.random.split(self.make_rng("masking"))
      sigma = cfg.noise_std * jax.random.uniform(sigma_rng, (2 * n,))
      noise = sigma[:, None, None, None] * jax.random.normal(noise_rng, x.shape)
      x = x + noise
      details.update(sigma=sigma, noise=noise)
    details["inputs"] = x
    tokens = self.encoder(x, keep_ids=masking.keep_ids, train=train)

    losses, metrics = {}, {}
    if self.use_contrastive:
      z = self.projector(tokens.mean(axis=1))
      losses["contrastive"], metrics["contrastive/top1"] = contrastive.nt_xent(
          z[:n], z[n:], cfg.temperature)
    if self.use_mae or self.use_noise:
      p = self.encoder.patch_size
      extra = self.noise_level_embedding(sigma)[:, None, :] if self.use_noise else None
      pred, hidden = self.decoder(tokens, masking.ids_restore, extra=extra, train=train,
                                  return_hidden=True)
      details["pred"] = pred
      if self.use_mae:
        target = patch_targets(x, p, cfg.norm_pix_loss)
        losses["mae"] = removed_patch_mse(pred, target, masking.mask)
      if self.use_noise:
        noise_pred = pred if cfg.noise_head == "shared" else self.noise_pred(hidden[:, 1:])
        details["noise_pred"] = noise_pred
        visible = 1.0 - masking.mask
        losses["noise"] = removed_patch_mse(noise_pred, patchify(noise, p), visible)
    return losses, metrics, details

  def __call__(self, batch, *, train: bool = True):
    cfg = self.config.can
    losses, metrics, _ = self._terms(batch["images"], train)
    reconstruction = 0.0
    if self.use_mae:
      reconstruction += (1.0 - cfg.w_noise) * losses["mae"]
    if self.use_noise:
      reconstruction += cfg.w_noise * losses["noise"]
    total = cfg.w_mae * reconstruction
    if self.use_contrastive:
      total += cfg.w_simclr * losses["contrastive"]
    metrics.update({f"loss/{t}": v for t, v in losses.items()})
    return total, metrics

  def encode(self, images):
    return self.encoder(images, train=False)

  def pictures(self, batch):
    if not self.use_mae:
      return {}
    _, _, details = self._terms(batch["images"], train=False)
    n = batch["images"].shape[0]
    return {"reconstruction": reconstruction_picture(
        details["inputs"][:n], details["pred"][:n], details["masking"].mask[:n],
        self.encoder.patch_size, self.config.can.norm_pix_loss)}


@objectives.register("can")
def build(config, dtype=jnp.float32) -> CAN:
  return CAN(vit_kwargs(config.model), config, dtype=dtype)
