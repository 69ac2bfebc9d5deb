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
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.heads import JigsawHead, Predictor
from sjmae_jax.models.vit import VisionTransformer, patchify, unpatchify, vit_kwargs
from sjmae_jax.objectives import contrastive
from sjmae_jax.objectives.jigsaw import position_cross_entropy
from sjmae_jax.objectives.mae import build_decoder, reconstruction_from_tokens, reconstruction_picture
from sjmae_jax.objectives.masking import random_masking

CONTRASTIVE_LOSSES = ("infonce", "infonce_symmetric", "simsiam")
TERMS = ("mae", "jigsaw", "contrastive")


class SJMAE(nn.Module):
  encoder_kwargs: dict
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config.sjmae
    if cfg.contrastive_loss not in CONTRASTIVE_LOSSES:
      raise ValueError(f"config sjmae.contrastive_loss: {cfg.contrastive_loss!r} is not one of "
                       f"{CONTRASTIVE_LOSSES}")
    if cfg.weighting not in ("fixed", "uncertainty"):
      raise ValueError(f"config sjmae.weighting: {cfg.weighting!r} is not 'fixed' or 'uncertainty'")
    self.weights = {"mae": cfg.w_mae, "jigsaw": cfg.w_jigsaw, "contrastive": cfg.w_con}
    self.active = tuple(t for t in TERMS if self.weights[t] > 0)
    if not self.active:
      raise ValueError("config sjmae: all loss weights are 0; nothing to train")
    self.encoder = VisionTransformer(**self.encoder_kwargs, dtype=self.dtype, name="encoder")
    if "mae" in self.active:
      self.decoder = build_decoder(self.config, self.encoder_kwargs, self.dtype)
    if "jigsaw" in self.active:
      self.jigsaw_head = JigsawHead(self.encoder.num_patches, dtype=self.dtype)
    if "contrastive" in self.active:
      self.predictor = Predictor(cfg.predictor_hidden_dim, dtype=self.dtype)
    if cfg.weighting == "uncertainty":
      self.loss_log_vars = self.param("loss_log_vars", nn.initializers.zeros, (len(self.active),))

  def _encode_both(self, view1, view2, train):
    """Pass-1 tokens (pos embed, MAE mask) and pass-2 tokens (no pos embed, jigsaw mask)."""
    cfg = self.config.sjmae
    n, num_patches = view1.shape[0], self.encoder.num_patches
    # SJ-MAE's code keeps int(round(L * (1 - ratio))) patches in both passes (MAE: int(...)).
    recon = random_masking(self.make_rng("masking"), n, num_patches, cfg.mask_ratio, "round")
    need_pass1 = "mae" in self.active or "contrastive" in self.active
    need_pass2 = "jigsaw" in self.active or "contrastive" in self.active
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
    cfg = self.config.sjmae
    images = batch["images"]
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    recon, tokens1, jig, tokens2 = self._encode_both(view1, view2, train)
    losses, metrics = {}, {}
    if "mae" in self.active:
      losses["mae"], _ = reconstruction_from_tokens(
          self.decoder, tokens1, view1, recon, patch_size=self.encoder.patch_size,
          norm_pix_loss=cfg.norm_pix_loss, train=train)
    if "jigsaw" in self.active:
      logits = self.jigsaw_head(tokens2[:, 1:])
      losses["jigsaw"], metrics["jigsaw/top1"] = position_cross_entropy(logits, jig.keep_ids)
    if "contrastive" in self.active:
      cls1, cls2 = tokens1[:, 0], tokens2[:, 0]
      p1, p2 = self.predictor(cls1, train=train), self.predictor(cls2, train=train)
      if cfg.contrastive_loss == "infonce":
        loss, acc = contrastive.infonce(p1, p2, cfg.temperature)
      elif cfg.contrastive_loss == "infonce_symmetric":
        loss, acc = contrastive.symmetric_infonce(p1, p2, cfg.temperature)
      else:
        loss, acc = contrastive.simsiam(p1, p2, cls1, cls2)
      losses["contrastive"], metrics["contrastive/top1"] = loss, acc
    if cfg.weighting == "uncertainty":
      log_vars = self.loss_log_vars
      total = sum(jnp.exp(-log_vars[i]) * losses[t] + log_vars[i] for i, t in enumerate(self.active))
      metrics.update({f"weight/{t}": jnp.exp(-log_vars[i]) for i, t in enumerate(self.active)})
    else:
      total = sum(self.weights[t] * losses[t] for t in self.active)
    metrics.update({f"loss/{t}": v for t, v in losses.items()})
    return total, metrics

  def encode(self, images):
    return self.encoder(images, train=False)

  def pictures(self, batch):
    cfg = self.config.sjmae
    images = batch["images"]
    view1 = images[:, 0]
    view2 = images[:, 1] if images.shape[1] > 1 else view1
    recon, tokens1, jig, tokens2 = self._encode_both(view1, view2, train=False)
    p = self.encoder.patch_size
    out = {}
    if "mae" in self.active:
      _, pred = reconstruction_from_tokens(self.decoder, tokens1, view1, recon, patch_size=p,
                                           norm_pix_loss=cfg.norm_pix_loss, train=False)
      out["reconstruction"] = reconstruction_picture(view1, pred, recon.mask, p, cfg.norm_pix_loss)
    if "jigsaw" in self.active:
      predicted = jnp.argmax(self.jigsaw_head(tokens2[:, 1:]), axis=-1)
      out["jigsaw"] = jigsaw_picture(view2, jig.keep_ids, predicted, p)
    return out


def jigsaw_picture(images, keep_ids, predicted_positions, patch_size: int, max_images: int = 8):
  """Rows of (kept patches in the shuffled order the encoder saw | placed where the head predicts
  | placed at their true positions), each on a black canvas, scaled to [0, 1]."""
  images = images[:max_images].astype(jnp.float32)
  keep_ids, predicted_positions = keep_ids[:max_images], predicted_positions[:max_images]
  lo, hi = images.min(axis=(1, 2, 3), keepdims=True), images.max(axis=(1, 2, 3), keepdims=True)
  images = (images - lo) / (hi - lo + 1e-6)
  b, channels = images.shape[0], images.shape[-1]
  patches = patchify(images, patch_size)
  kept = jnp.take_along_axis(patches, keep_ids[..., None], axis=1)
  rows = jnp.arange(b)[:, None]

  def canvas(positions):
    return unpatchify(jnp.zeros_like(patches).at[rows, positions].set(kept), patch_size, channels)

  shuffled = canvas(jnp.broadcast_to(jnp.arange(kept.shape[1]), keep_ids.shape))
  grid = jnp.concatenate([shuffled, canvas(predicted_positions), canvas(keep_ids)], axis=2)
  return grid.reshape(-1, *grid.shape[2:])[None]


@objectives.register("sjmae")
def build(config, dtype=jnp.float32) -> SJMAE:
  return SJMAE(vit_kwargs(config.model), config, dtype=dtype)
