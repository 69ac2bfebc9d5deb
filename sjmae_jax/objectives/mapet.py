"""MaPeT (Baraldi et al. 2023): masked and permuted pretraining with two-stream attention.

Per sample, a random permutation of the patches (cls always first); the first `num_context`
tokens of the permutation (cls included) are context, the rest are predicted one after another in
permutation order, XLNet/MPNet style. Two streams share every block weight:
  content stream h: cls + the L patch tokens (natural order, + pos embed), followed by M
    positional tokens (learned `mask_pos_token` + pos embed of a predicted position, in prediction
    order) so that every position is present at every prediction step;
  query stream g: starts as the same M positional tokens; it takes queries from g and keys/values
    from h, and predicts the target of its position from the normed output.
The content stream is the ViT encoder itself (params under 'encoder', unchanged names); MaPeT adds
only 'mask_pos_token' and 'head' (and, for token targets, the frozen 'teacher').

Both streams run as ONE sequence [h | g] through the encoder's own blocks with one attention mask
whose g columns are all False (g is never a key). That is exactly the two-stream computation
(queries of g over keys/values of h under mask_q, h over h under mask_h) and shares each block's
per-sample drop-path draw between the streams, as the original does. The README (MaPeT section)
draws the layout. The permutations come from the 'permutation' rng stream.

Targets: 'pixels' (norm-pix MSE of the predicted patches, default) or 'tokens' (cross-entropy
over the ids a k-means tokenizer gives the teacher's patch features; see sjmae_jax/tokenizers).
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax import objectives
from sjmae_jax.models.vit import VisionTransformer, patchify, timm_trunc_normal, unpatchify
from sjmae_jax.objectives import base
from sjmae_jax.objectives.losses import softmax_cross_entropy
from sjmae_jax.objectives.pictures import picture_grid
from sjmae_jax.objectives.reconstruction import patch_targets, reconstruction_picture
from sjmae_jax import optim
from sjmae_jax.tokenizers.kmeans import nearest_centroid
from sjmae_jax.data.config import data_normalization
from sjmae_jax.tokenizers.tokenizer import Tokenizer, read_tokenizer, teacher_features

TARGETS = ("pixels", "tokens")
head_init = timm_trunc_normal(0.02)  # timm's Linear init, as the original


def default_num_context(num_patches: int) -> int:
  """The original's 50 context tokens of 197 (cls + 196 patches), scaled to 1 + num_patches."""
  return min(max(1, round(50 / 197 * (num_patches + 1))), num_patches)


def random_permutations(rng, batch_size: int, num_patches: int):
  """(B, 1 + L) token order: 0 (cls) first, then a random permutation of the tokens 1..L."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  patches = jnp.argsort(noise, axis=1) + 1
  return jnp.concatenate([jnp.zeros((batch_size, 1), patches.dtype), patches], axis=1)


def two_stream_masks(order, num_context: int):
  """Boolean attention masks (True = may attend) of both streams for token orders (B, T).

  order[b, r] is the token (0 = cls, 1..L = patches) at step r of sample b's permutation, and
  order[b, :num_context] are its context tokens. With C = num_context and M = T - C, keys are
  the T content tokens (natural order) then the M positional tokens, the m-th standing for
  position order[b, C + m]; `rank` is a token's step in the permutation, C + m for the m-th
  positional token.
  mask_h (B, T + M, T + M), rows = content queries (natural order) then positional tokens:
    content token of rank r: content of context tokens and of tokens of rank <= r; positional
      tokens of rank > r (positions not revealed yet; its own position is in its content);
    positional token: content of context tokens; every positional token.
  mask_q (B, M, T + M), query m (rank C + m): content of tokens of rank < C + m; positional
    tokens of rank >= C + m (not revealed yet, its own included).
  """
  batch, num_tokens = order.shape
  num_predicted = num_tokens - num_context
  rank = jnp.argsort(order, axis=1)  # the inverse permutation: rank[b, token]
  positional_rank = num_context + jnp.arange(num_predicted)
  key_rank = jnp.concatenate(
      [rank, jnp.broadcast_to(positional_rank, (batch, num_predicted))], axis=1)[:, None, :]
  key_is_positional = jnp.arange(num_tokens + num_predicted) >= num_tokens
  key_is_context = ~key_is_positional & (key_rank < num_context)

  query_rank = rank[:, :, None]
  content_rows = jnp.where(key_is_positional, key_rank > query_rank,
                           key_is_context | (key_rank <= query_rank))
  positional_rows = jnp.broadcast_to(key_is_context | key_is_positional,
                                     (batch, num_predicted, num_tokens + num_predicted))
  mask_h = jnp.concatenate([content_rows, positional_rows], axis=1)

  query_rank = positional_rank[None, :, None]
  mask_q = jnp.where(key_is_positional, key_rank >= query_rank, key_rank < query_rank)
  return mask_h, mask_q


def joint_mask(mask_h, mask_q):
  """(B, 1, T + 2M, T + 2M) mask of the sequence [h | g]: h rows under mask_h, g rows under
  mask_q, no row attends to g."""
  rows = jnp.concatenate([mask_h, mask_q], axis=1)
  no_g_keys = jnp.zeros((*rows.shape[:2], mask_q.shape[1]), bool)
  return jnp.concatenate([rows, no_g_keys], axis=2)[:, None]


@dataclasses.dataclass(frozen=True)
class MaPeTConfig:
  """config.mapet, with the encoder (config.model) and the normalization of the data (for the
  teacher of token targets). Token targets: the tokenizer's JSON is read to check it fits."""
  encoder: dict
  data_norm: tuple  # (mean, std) the input pipeline applies to [0, 1] images
  target: str
  norm_pix_loss: bool
  num_context: int
  tokenizer: str
  codebook_size: int

  def __post_init__(self):
    base.check_choice("mapet.target", self.target, TARGETS)
    if not self.encoder.get("final_norm", True):
      raise ValueError("MaPeT needs an encoder with its final norm (both streams end with it)")
    num_patches = base.num_patches(self.encoder)
    context = self.num_context or default_num_context(num_patches)
    if not 1 <= context <= num_patches:
      raise ValueError(f"config mapet.num_context: {context} must be in [1, {num_patches}] (cls "
                       "+ context patches, with at least one patch left to predict)")
    base.check_range("mapet.codebook_size", self.codebook_size, low=1)
    if self.target == "tokens":
      if not self.tokenizer:
        raise ValueError("config mapet.tokenizer: mapet.target='tokens' needs a tokenizer "
                         "codebook (.npy written by python -m sjmae_jax.tokenizers.fit_kmeans)")
      teacher = read_tokenizer(self.tokenizer).teacher_kwargs
      grid = self.encoder["img_size"] // self.encoder["patch_size"]
      if teacher["img_size"] != grid * teacher["patch_size"]:
        fitted_grid = teacher["img_size"] // teacher["patch_size"]
        raise ValueError(f"config mapet.tokenizer: {self.tokenizer} was fitted for a "
                         f"{fitted_grid}^2 patch grid, the model has {grid}^2; fit one for this "
                         "model")

  @classmethod
  def from_config(cls, config) -> "MaPeTConfig":
    settings = base.read_block(config, "mapet", cls, encoder=base.encoder_kwargs(config),
                               data_norm=data_normalization(config.data))
    if settings.target == "tokens":
      check_teacher_frozen(config)
    return settings


def check_teacher_frozen(config) -> None:
  """The teacher must be frozen by the optimizer (lr multiplier 0): a zero gradient alone does
  not stop AdamW's decoupled weight decay from shrinking it."""
  rules = tuple(tuple(rule) for rule in config.optim.lr_mults)
  paths = ("teacher/codebook", "teacher/encoder/blocks_0/attn/qkv/kernel")
  if any(optim.first_match(rules, path) != 0 for path in paths):
    raise ValueError(f"config optim.lr_mults: {rules} must freeze 'teacher/.*' (multiplier 0) for "
                     "mapet.target='tokens'")


@objectives.register("mapet")
class MaPeT(base.Objective):
  config: MaPeTConfig
  tokenizer: Optional[Tokenizer] = None  # read from config.mapet.tokenizer for target='tokens'
  config_class = MaPeTConfig
  rng_streams = ("permutation", "dropout")  # `encode` (the base one): the content stream alone

  @classmethod
  def from_config(cls, config, dtype=jnp.float32) -> "MaPeT":
    settings = MaPeTConfig.from_config(config)
    tokenizer = read_tokenizer(settings.tokenizer) if settings.target == "tokens" else None
    return cls(settings, tokenizer=tokenizer, dtype=dtype)

  @property
  def num_context(self) -> int:
    return self.config.num_context or default_num_context(self.encoder.num_patches)

  def setup(self):
    cfg = self.config
    self.encoder = VisionTransformer(**cfg.encoder, dtype=self.dtype, name="encoder")
    dim = cfg.encoder["embed_dim"]
    self.mask_pos_token = self.param("mask_pos_token", nn.initializers.normal(0.02), (1, 1, dim))
    if cfg.target == "pixels":
      p, c = cfg.encoder["patch_size"], cfg.encoder["in_chans"]
      out_dim = p * p * c
    else:
      out_dim = self.tokenizer.codebook_size
      # the frozen teacher and codebook live in params so that they are sharded, checkpointed
      # and restored like everything else; the callback reads the files when the params are
      # materialised (not under eval_shape), and keeps them out of the compiled program.
      self.teacher = self.param(
          "teacher", lambda rng: jax.pure_callback(self.tokenizer.load_arrays,
                                                   self.tokenizer.param_shapes()))
    self.head = nn.Dense(out_dim, dtype=self.dtype, kernel_init=head_init, name="head")

  def two_streams(self, images, order, train: bool):
    """Normed outputs (content (B, T, D) in natural token order, query (B, M, D) in prediction
    order) of both streams for token orders (B, T)."""
    enc = self.encoder
    c, t = self.num_context, order.shape[1]
    pos = enc.pos_embed.astype(self.dtype)
    patches = enc.embed_patches(images) + pos[:, 1:]
    cls = jnp.broadcast_to(enc.cls_token.astype(patches.dtype) + pos[:, :1],
                           (patches.shape[0], 1, patches.shape[2]))
    content = jnp.concatenate([cls, patches], axis=1)
    positional = self.mask_pos_token.astype(patches.dtype) + jnp.take(pos[0], order[:, c:], axis=0)
    x = jnp.concatenate([content, positional, positional], axis=1)  # [h: content, positional | g]
    mask = joint_mask(*two_stream_masks(order, c))
    for block in enc.blocks:  # a rematerialised block takes `train` positionally (static)
      x = block(x, train, mask=mask) if enc.remat else block(x, train=train, mask=mask)
    x = enc.norm(x)
    return x[:, :t], x[:, t + (t - c):]

  def _predict(self, images, train: bool):
    order = random_permutations(self.make_rng("permutation"), images.shape[0],
                                self.encoder.num_patches)
    _, query = self.two_streams(images, order, train)
    predicted_patches = order[:, self.num_context:] - 1  # (B, M) patch indices, prediction order
    return self.head(query), predicted_patches

  def token_ids(self, images):
    """(B, L) k-means ids of the frozen teacher's patch features."""
    teacher = jax.lax.stop_gradient(self.teacher)
    features = teacher_features(self.tokenizer.teacher_kwargs, teacher["encoder"], images,
                                data_norm=self.config.data_norm,
                                teacher_norm=self.tokenizer.teacher_norm, dtype=self.dtype)
    ids, _ = nearest_centroid(jax.lax.stop_gradient(features), teacher["codebook"])
    return ids

  def targets(self, images):
    """Per-patch targets in natural order: pixels (B, L, p*p*C) or token ids (B, L)."""
    cfg = self.config
    if cfg.target == "pixels":
      return patch_targets(images, self.encoder.patch_size, cfg.norm_pix_loss)
    return self.token_ids(images)

  def __call__(self, batch, *, train: bool = True):
    images = batch["images"][:, 0]
    outputs, predicted_patches = self._predict(images, train)
    targets = self.targets(images)
    index = predicted_patches if targets.ndim == 2 else predicted_patches[..., None]
    targets = jnp.take_along_axis(targets, index, axis=1)
    if self.config.target == "pixels":
      loss = jnp.mean((outputs.astype(jnp.float32) - targets) ** 2)
      return loss, {"loss/mapet": loss}
    loss, accuracy = softmax_cross_entropy(outputs, targets)
    return loss, {"loss/mapet": loss, "mapet/top1": accuracy}

  def pictures(self, batch):
    images = batch["images"][:, 0]
    outputs, predicted_patches = self._predict(images, train=False)
    b, num_patches, p = images.shape[0], self.encoder.num_patches, self.encoder.patch_size
    rows = jnp.arange(b)[:, None]
    predicted = jnp.zeros((b, num_patches)).at[rows, predicted_patches].set(1.0)
    if self.config.target == "pixels":
      pred = jnp.zeros((b, num_patches, outputs.shape[-1])).at[rows, predicted_patches].set(
          outputs.astype(jnp.float32))
      return {"reconstruction": reconstruction_picture(images, pred, predicted, p,
                                                       self.config.norm_pix_loss)}
    target_ids = self.token_ids(images)
    predicted_ids = target_ids.at[rows, predicted_patches].set(jnp.argmax(outputs, axis=-1))
    return {"tokens": token_picture(images, target_ids, predicted_ids, predicted, p,
                                    self.tokenizer.codebook_size)}


def token_picture(images, target_ids, predicted_ids, predicted, patch_size: int, codebook_size: int,
                  max_images: int = 8):
  """Rows of (image | context patches only | target token map | predicted token map), each token
  id drawn as a fixed random color; context patches keep their target color in the last map. In
  the input's space, as every picture (pictures.for_display shows them): the palette spans
  [-2, 2], about what normalized pixels span, so its colors stay apart once shown."""
  images = images[:max_images].astype(jnp.float32)
  channels = images.shape[-1]
  palette = jax.random.uniform(jax.random.PRNGKey(0), (codebook_size, channels), minval=-2.0,
                               maxval=2.0)
  cells = patch_size * patch_size

  def color_map(ids):  # patch vectors are (p, q, c) with c fastest: tile the color p*p times
    return unpatchify(jnp.tile(palette[ids[:max_images]], (1, 1, cells)), patch_size, channels)

  context_only = unpatchify(patchify(images, patch_size) * (1 - predicted[:max_images, :, None]),
                            patch_size, channels)
  return picture_grid([images, context_only, color_map(target_ids), color_map(predicted_ids)])
