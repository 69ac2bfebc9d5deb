"""MAE (He et al. 2021): encode the visible 25%, decode all patches, MSE on the removed ones.

Params: {'encoder': VisionTransformer, 'decoder': MAEDecoder}. The reconstruction pieces other
methods share are in reconstruction.py.
"""
import dataclasses

from sjmae_jax import objectives
from sjmae_jax.models.vit import VisionTransformer
from sjmae_jax.objectives import base
from sjmae_jax.objectives.masking import random_masking
from sjmae_jax.objectives.reconstruction import (DecoderConfig, build_decoder,
                                                 masked_reconstruction, reconstruction_picture)


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  """config.mae, with the encoder (config.model) and decoder (config.decoder) it trains."""
  encoder: dict
  decoder: DecoderConfig
  mask_ratio: float
  norm_pix_loss: bool

  def __post_init__(self):
    base.check_mask_ratio("mae.mask_ratio", self.mask_ratio, self.encoder)

  @classmethod
  def from_config(cls, config) -> "MAEConfig":
    return base.read_block(config, "mae", cls, encoder=base.encoder_kwargs(config),
                           decoder=DecoderConfig.from_config(config))


@objectives.register("mae")
class MAE(base.Objective):
  config: MAEConfig
  config_class = MAEConfig

  def setup(self):
    self.encoder = VisionTransformer(**self.config.encoder, dtype=self.dtype, name="encoder")
    self.decoder = build_decoder(self.config.decoder, self.config.encoder, self.dtype)

  def _pass(self, images, train):
    masking = random_masking(self.make_rng("masking"), images.shape[0],
                             self.encoder.num_patches, self.config.mask_ratio)
    loss, _, pred = masked_reconstruction(self.encoder, self.decoder, images, masking,
                                          norm_pix_loss=self.config.norm_pix_loss, train=train)
    return loss, pred, masking

  def __call__(self, batch, *, train: bool = True):
    loss, _, _ = self._pass(batch["images"][:, 0], train)
    return loss, {"loss/mae": loss}

  def pictures(self, batch):
    images = batch["images"][:, 0]
    _, pred, masking = self._pass(images, train=False)
    return {"reconstruction": reconstruction_picture(
        images, pred, masking.mask, self.encoder.patch_size, self.config.norm_pix_loss)}
