"""SSAT (dominickrei/Limited-data-vits) and its FGCR extension (JAMESKirkQI/FGCR).

Supervised classification with an MAE auxiliary task on the same encoder, two passes per step:
  the full image -> encoder -> cls (after the final norm) -> head -> cross-entropy with label
    smoothing;
  the masked image -> the same encoder (visible tokens only) -> small MAE decoder (128 x 2,
    16 heads) -> MSE on removed patches;
  L = lambda * CE + (1 - lambda) * L_mae   (lambda 0.1).
FGCR (views K > 1, beta > 0): one shuffle per image split into K DISJOINT visible sets
(consecutive chunks of the shuffle, each of the MAE kept count); each view is decoded with
everything outside it removed; reconstruction is averaged over views; plus a Barlow-Twins-like
consistency term between each view's batch-standardised decoder cls and the stop-gradient mean
over views, weighted (1 - lambda) * beta. Unlike the original (which assumes K * kept == L), any
K with K * kept <= L works.
lambda = 1 builds no decoder and computes no masked pass: pure supervised training.
Params: {'encoder', 'head'} (a timm-style cls-token classifier, see models/classifier.py) and
'decoder' (MAEDecoder names).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.vit import VisionTransformer, xavier_uniform
from sjmae_jax.objectives import base
from sjmae_jax.objectives.losses import softmax_cross_entropy
from sjmae_jax.objectives.masking import Masking, num_kept
from sjmae_jax.objectives.reconstruction import read_with_decoder
from sjmae_jax.objectives.reconstruction import (DecoderConfig, build_decoder, patch_targets,
                                                 reconstruction_picture, removed_patch_mse)


@dataclasses.dataclass(frozen=True)
class SSATConfig:
  """config.ssat, with the encoder (config.model) and, when lam < 1, the decoder block.
  num_classes 0 = the dataset's (read when the objective is built, not by `check`)."""
  encoder: dict
  decoder: DecoderConfig | None
  num_classes: int
  lam: float
  label_smoothing: float
  mask_ratio: float
  norm_pix_loss: bool
  offdiag_target: float
  views: int
  beta: float

  def __post_init__(self):
    base.check_range("ssat.num_classes", self.num_classes, low=0)
    base.check_range("ssat.lam", self.lam, low=0.0, high=1.0)
    base.check_range("ssat.label_smoothing", self.label_smoothing, low=0.0, high=1.0)
    base.check_mask_ratio("ssat.mask_ratio", self.mask_ratio, self.encoder)
    base.check_range("ssat.views", self.views, low=1)
    base.check_range("ssat.beta", self.beta, low=0.0)
    if self.use_mae:
      check_views_fit(base.num_patches(self.encoder), self.mask_ratio, self.views)

  @property
  def use_mae(self) -> bool:
    """lam = 1 is pure supervised training: no decoder, no masked pass."""
    return self.lam < 1.0

  @property
  def use_consistency(self) -> bool:
    return self.use_mae and self.beta > 0

  @classmethod
  def from_config(cls, config) -> "SSATConfig":
    return read_with_decoder(config, "ssat", cls, lambda settings: settings.use_mae)


def check_views_fit(num_patches: int, mask_ratio: float, num_views: int) -> None:
  """Disjoint views of the MAE kept count each must fit in the patches."""
  len_keep = num_kept(num_patches, mask_ratio)
  if num_views * len_keep > num_patches:
    raise ValueError(f"config ssat.views: {num_views} views of {len_keep} visible patches need "
                     f"{num_views * len_keep} > {num_patches} patches (lower views or raise "
                     f"ssat.mask_ratio)")


def disjoint_view_maskings(rng, batch_size: int, num_patches: int, mask_ratio: float,
                           num_views: int) -> list:
  """K Maskings from ONE shuffle per image: view i keeps ids_shuffle[:, i*k:(i+1)*k], k the MAE
  kept count, and removes everything else. Each view's shuffle is the common one rolled by i*k,
  so its kept ids come first and its ids_restore puts them back in place."""
  check_views_fit(num_patches, mask_ratio, num_views)
  len_keep = num_kept(num_patches, mask_ratio)
  ids_shuffle = jnp.argsort(jax.random.uniform(rng, (batch_size, num_patches)), axis=1)
  removed_in_order = (jnp.arange(num_patches) >= len_keep).astype(jnp.float32)
  maskings = []
  for view in range(num_views):
    view_shuffle = jnp.roll(ids_shuffle, -view * len_keep, axis=1)
    ids_restore = jnp.argsort(view_shuffle, axis=1)
    mask = jnp.take_along_axis(jnp.broadcast_to(removed_in_order, view_shuffle.shape),
                               ids_restore, axis=1)
    maskings.append(Masking(view_shuffle[:, :len_keep], mask, ids_restore))
  return maskings


def stack_maskings(maskings) -> Masking:
  """K Maskings of B images -> one Masking of K*B rows, view-major (view i = rows iB..iB+B-1)."""
  return Masking(*(jnp.concatenate(parts) for parts in zip(*maskings)))


def cross_view_consistency(cls_views, offdiag_target: float = -1.0):
  """FGCR's term on decoder cls outputs (K, B, D), averaged over views:
  c = standardize(z_k)^T standardize(sg(mean_k z_k)) / B (standardised over the batch, unbiased
  std); sum_i (c_ii - 1)^2 + 0.005 * sum_{i != j} (c_ij - offdiag_target)^2.
  The original code uses offdiag_target -1 ((c_ij + 1)^2); Barlow Twins uses 0."""
  cls_views = cls_views.astype(jnp.float32)
  k, n, d = cls_views.shape

  def standardize(z):
    return (z - z.mean(axis=-2, keepdims=True)) / z.std(axis=-2, ddof=1, keepdims=True)

  anchor = standardize(jax.lax.stop_gradient(cls_views.mean(axis=0)))
  c = jnp.einsum("knd,ne->kde", standardize(cls_views), anchor) / n
  eye = jnp.eye(d)
  on_diag = jnp.sum(((c - 1.0) ** 2) * eye, axis=(1, 2))
  off_diag = jnp.sum(((c - offdiag_target) ** 2) * (1.0 - eye), axis=(1, 2))
  return jnp.mean(on_diag + 0.005 * off_diag)


@objectives.register("ssat")
class SSAT(base.Objective):
  config: SSATConfig
  config_class = SSATConfig
  has_classifier = True

  @classmethod
  def from_config(cls, config, dtype=jnp.float32) -> "SSAT":
    settings = SSATConfig.from_config(config)
    if not settings.num_classes:  # 0 = read it from the dataset
      from sjmae_jax import data
      num_classes = data.dataset_info(config.data).num_classes
      if not num_classes:
        raise ValueError(f"config ssat.num_classes: 0 and data.source {config.data.source!r} "
                         "names no classes; set it")
      settings = dataclasses.replace(settings, num_classes=num_classes)
    return cls(settings, dtype=dtype)

  def setup(self):
    cfg = self.config
    self.encoder = VisionTransformer(**cfg.encoder, dtype=self.dtype, name="encoder")
    self.head = nn.Dense(cfg.num_classes, dtype=self.dtype, kernel_init=xavier_uniform)
    if cfg.use_mae:
      self.decoder = build_decoder(cfg.decoder, cfg.encoder, self.dtype)

  def classify(self, images, *, train: bool = False):
    """Logits (B, num_classes) from the cls token of the full image after the final norm."""
    return self.head(self.encoder(images, train=train)[:, 0]).astype(jnp.float32)

  def _masked_pass(self, images, train):
    """(reconstruction loss averaged over views, decoder cls (K, B, D_dec), stacked Masking,
    predictions (K*B, L, p*p*C))."""
    cfg = self.config
    n, k = images.shape[0], cfg.views
    maskings = disjoint_view_maskings(self.make_rng("masking"), n, self.encoder.num_patches,
                                      cfg.mask_ratio, k)
    masking = stack_maskings(maskings)
    tiled = jnp.concatenate([images] * k) if k > 1 else images
    tokens = self.encoder(tiled, keep_ids=masking.keep_ids, train=train)
    pred, hidden = self.decoder(tokens, masking.ids_restore, train=train, return_hidden=True)
    target = patch_targets(images, self.encoder.patch_size, cfg.norm_pix_loss)
    per_view = [removed_patch_mse(pred[i * n:(i + 1) * n], target, maskings[i].mask)
                for i in range(k)]
    cls_views = hidden[:, 0].reshape(k, n, -1)
    return sum(per_view) / k, cls_views, masking, pred

  def __call__(self, batch, *, train: bool = True):
    cfg = self.config
    images, labels = batch["images"][:, 0], batch["label"]
    logits = self.classify(images, train=train)
    losses, metrics = {}, {}
    losses["ce"], metrics["train/top1"] = softmax_cross_entropy(
        logits, labels, label_smoothing=cfg.label_smoothing)
    total = cfg.lam * losses["ce"]
    if cfg.use_mae:
      losses["mae"], cls_views, _, _ = self._masked_pass(images, train)
      total += (1.0 - cfg.lam) * losses["mae"]
      if cfg.use_consistency:
        losses["consistency"] = cross_view_consistency(cls_views, cfg.offdiag_target)
        total += (1.0 - cfg.lam) * cfg.beta * losses["consistency"]
    metrics.update({f"loss/{t}": v for t, v in losses.items()})
    return total, metrics

  def pictures(self, batch):
    if not self.config.use_mae:
      return {}
    images = batch["images"][:, 0]
    _, _, masking, pred = self._masked_pass(images, train=False)
    n = images.shape[0]  # the first view
    return {"reconstruction": reconstruction_picture(images, pred[:n], masking.mask[:n],
                                                     self.encoder.patch_size,
                                                     self.config.norm_pix_loss)}
