"""SJ-MAE: masked reconstruction + jigsaw + contrastive alignment on one ViT encoder.

Faithful to the official code (JulesCollenne/SJ-MAE, see METHODS.md):
  pass 1: view 1 WITH position embedding, MAE masking, MAE decoder, MSE on removed patches;
  pass 2: view 2 (view 1 again with one view) WITHOUT position embedding, independent masking
          keeping (1 - mask_ratio_jigsaw); jigsaw head on each kept patch token, CE against its
          original position;
  contrastive: both passes' CLS (after the final norm) through one shared predictor, InfoNCE.
  L = w_mae * L_rec + w_jigsaw * L_jig + w_con * L_con.
A term with weight 0 is not built or computed (all extra weights 0 == MAE, at MAE's cost).
Options beyond the original (documented in the README): symmetric InfoNCE, SimSiam, and learned
uncertainty weighting (Kendall et al. 2018): L = sum_i exp(-s_i) L_i + s_i over active terms,
with one learned log-variance s_i per term (`loss_log_vars`, init 0), replacing the fixed weights.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.heads import JigsawHead, Predictor
from sjmae_jax.models.vit import VisionTransformer
from sjmae_jax.objectives import base, contrastive
from sjmae_jax.objectives.jigsaw import jigsaw_picture
from sjmae_jax.objectives.losses import softmax_cross_entropy
from sjmae_jax.objectives.masking import random_masking
from sjmae_jax.objectives.reconstruction import read_with_decoder
from sjmae_jax.objectives.reconstruction import (DecoderConfig, build_decoder,
                                                 reconstruction_from_tokens,
                                                 reconstruction_picture)

CONTRASTIVE_LOSSES = ("infonce", "infonce_symmetric", "simsiam")
WEIGHTINGS = ("fixed", "uncertainty")
TERMS = ("mae", "jigsaw", "contrastive")


@dataclasses.dataclass(frozen=True)
class SJMAEConfig:
  """config.sjmae, with the encoder (config.model) and, when w_mae > 0, the decoder block."""
  encoder: dict
  decoder: DecoderConfig | None
  mask_ratio: float
  mask_ratio_jigsaw: float
  norm_pix_loss: bool
  w_mae: float
  w_jigsaw: float
  w_con: float
  contrastive_loss: str
  temperature: float
  predictor_hidden_dim: int
  weighting: str
  batch_passes: bool

  def __post_init__(self):
    # SJ-MAE's code keeps int(round(L * (1 - ratio))) patches in both passes (MAE: int(...)).
    base.check_mask_ratio("sjmae.mask_ratio", self.mask_ratio, self.encoder, "round")
    base.check_mask_ratio("sjmae.mask_ratio_jigsaw", self.mask_ratio_jigsaw, self.encoder, "round")
    base.check_choice("sjmae.contrastive_loss", self.contrastive_loss, CONTRASTIVE_LOSSES)
    base.check_choice("sjmae.weighting", self.weighting, WEIGHTINGS)
    for key in ("w_mae", "w_jigsaw", "w_con"):
      base.check_range(f"sjmae.{key}", getattr(self, key), low=0.0)
    if not self.active:
      raise ValueError("config sjmae: all loss weights are 0; nothing to train")
    if self.temperature <= 0:
      raise ValueError(f"config sjmae.temperature: {self.temperature} must be > 0")
    base.check_range("sjmae.predictor_hidden_dim", self.predictor_hidden_dim, low=1)

  @property
  def weights(self) -> dict:
    return {"mae": self.w_mae, "jigsaw": self.w_jigsaw, "contrastive": self.w_con}

  @property
  def active(self) -> tuple:
    """The terms with a weight above 0; only these are built and computed."""
    return tuple(t for t in TERMS if self.weights[t] > 0)

  @classmethod
  def from_config(cls, config) -> "SJMAEConfig":
    return read_with_decoder(config, "sjmae", cls, lambda settings: "mae" in settings.active)


@objectives.register("sjmae")
class SJMAE(base.Objective):
  config: SJMAEConfig
  config_class = SJMAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = VisionTransformer(**cfg.encoder, dtype=self.dtype, name="encoder")
    if "mae" in cfg.active:
      self.decoder = build_decoder(cfg.decoder, cfg.encoder, self.dtype)
    if "jigsaw" in cfg.active:
      self.jigsaw_head = JigsawHead(self.encoder.num_patches, dtype=self.dtype)
    if "contrastive" in cfg.active:
      self.predictor = Predictor(cfg.predictor_hidden_dim, dtype=self.dtype)
    if cfg.weighting == "uncertainty":
      self.loss_log_vars = self.param("loss_log_vars", nn.initializers.zeros, (len(cfg.active),))

  def _encode_both(self, view1, view2, train):
    """Pass-1 tokens (pos embed, MAE mask) and pass-2 tokens (no pos embed, jigsaw mask)."""
    cfg = self.config
    n, num_patches = view1.shape[0], self.encoder.num_patches
    recon = random_masking(self.make_rng("masking"), n, num_patches, cfg.mask_ratio, "round")
    need_pass1 = "mae" in cfg.active or "contrastive" in cfg.active
    need_pass2 = "jigsaw" in cfg.active or "contrastive" in cfg.active
    jig = (random_masking(self.make_rng("masking"), n, num_patches, cfg.mask_ratio_jigsaw, "round")
           if need_pass2 else None)
    if need_pass1 and need_pass2 and cfg.batch_passes and recon.keep_ids.shape == jig.keep_ids.shape:
      tokens = self.encoder(jnp.concatenate([view1, view2]),
                            keep_ids=jnp.concatenate([recon.keep_ids, jig.keep_ids]),
                            use_pos_embed=jnp.concatenate([jnp.ones(n), jnp.zeros(n)]), train=train)
      return recon, tokens[:n], jig, tokens[n:]
    tokens1 = self.encoder(view1, keep_ids=recon.keep_ids, train=train) if need_pass1 else None
    tokens2 = (self.encoder(view2, keep_ids=jig.keep_ids, use_pos_embed=False, train=train)
               if need_pass2 else None)
    return recon, tokens1, jig, tokens2

  def __call__(self, batch, *, train: bool = True):
    cfg = self.config
    images = batch["images"]
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    recon, tokens1, jig, tokens2 = self._encode_both(view1, view2, train)
    losses, metrics = {}, {}
    if "mae" in cfg.active:
      losses["mae"], _ = reconstruction_from_tokens(
          self.decoder, tokens1, view1, recon, patch_size=self.encoder.patch_size,
          norm_pix_loss=cfg.norm_pix_loss, train=train)
    if "jigsaw" in cfg.active:
      logits = self.jigsaw_head(tokens2[:, 1:])
      losses["jigsaw"], metrics["jigsaw/top1"] = softmax_cross_entropy(logits, jig.keep_ids)
      metrics["jigsaw/chance"] = jnp.float32(1.0 / logits.shape[-1])  # 1 / positions
    if "contrastive" in cfg.active:
      cls1, cls2 = tokens1[:, 0], tokens2[:, 0]
      p1, p2 = self.predictor(cls1, train=train), self.predictor(cls2, train=train)
      if cfg.contrastive_loss == "infonce":
        loss, acc = contrastive.infonce(p1, p2, cfg.temperature)
      elif cfg.contrastive_loss == "infonce_symmetric":
        loss, acc = contrastive.symmetric_infonce(p1, p2, cfg.temperature)
      else:
        loss, acc = contrastive.simsiam(p1, p2, cls1, cls2)
      losses["contrastive"], metrics["contrastive/top1"] = loss, acc
      # Retrieval among the (micro-)batch: top-1 at chance is 1 / batch, the loss ln(batch).
      metrics["contrastive/chance"] = jnp.float32(1.0 / p1.shape[0])
    if cfg.weighting == "uncertainty":
      log_vars = self.loss_log_vars
      total = sum(jnp.exp(-log_vars[i]) * losses[t] + log_vars[i] for i, t in enumerate(cfg.active))
      metrics.update({f"weight/{t}": jnp.exp(-log_vars[i]) for i, t in enumerate(cfg.active)})
    else:
      total = sum(cfg.weights[t] * losses[t] for t in cfg.active)
    metrics.update({f"loss/{t}": v for t, v in losses.items()})
    return total, metrics

  def pictures(self, batch):
    cfg = self.config
    images = batch["images"]
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    recon, tokens1, jig, tokens2 = self._encode_both(view1, view2, train=False)
    p = self.encoder.patch_size
    out = {}
    if "mae" in cfg.active:
      _, pred = reconstruction_from_tokens(self.decoder, tokens1, view1, recon, patch_size=p,
                                           norm_pix_loss=cfg.norm_pix_loss, train=False)
      out["reconstruction"] = reconstruction_picture(view1, pred, recon.mask, p, cfg.norm_pix_loss)
    if "jigsaw" in cfg.active:
      predicted = jnp.argmax(self.jigsaw_head(tokens2[:, 1:]), axis=-1)
      out["jigsaw"] = jigsaw_picture(view2, jig.keep_ids, predicted, p)
    return out
