"""MAE decoder (facebookresearch/mae MaskedAutoencoderViT's decoder half).

Names follow the reference so that export is a renaming: decoder_embed, mask_token,
decoder_pos_embed, decoder_blocks_{i}, decoder_norm, decoder_pred.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sjmae_jax.models.vit import (Block, gather_tokens, layer_norm, sincos_init, token_init,
                                  xavier_uniform)

MASK_TOKEN_MODES = ("shared", "per_slot")


class MAEDecoder(nn.Module):
  """Encoded visible tokens (cls first) + ids_restore -> per-patch predictions (B, L, out_dim).

  mask_token_mode:
    'shared'   one learnable token for every removed slot (MAE);
    'per_slot' one learnable token per removed slot, shape (1, L - K, D): the official SJ-MAE
               code's form, tied to the mask ratio (reproduced as an option).
  """
  num_patches: int
  out_dim: int
  embed_dim: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  mask_token_mode: str = "shared"
  dtype: Any = jnp.float32
  attention_impl: Any = None
  # Fast-path levers, as VisionTransformer's (gather_impl: the unshuffle's gather).
  norm_impl: str = "flax"
  gelu_impl: str = "flax"
  gelu_approximate: bool = False
  gather_impl: str = "take"
  qkv_impl: str = "fused"

  @nn.compact
  def __call__(self, tokens, ids_restore, *, extra=None, train: bool = False,
               return_hidden: bool = False):
    """`extra` (B, 1+K, D_enc), when given, is added to the encoder tokens before decoder_embed.

    return_hidden=True returns (predictions, hidden): hidden (B, 1+L, D_dec) is the decoder_norm
    output, cls first (FGCR's decoder cls, CAN's separate noise head).
    """
    if extra is not None:
      tokens = tokens + extra
    x = nn.Dense(self.embed_dim, dtype=self.dtype, kernel_init=xavier_uniform,
                 name="decoder_embed")(tokens)
    b, k1, d = x.shape
    num_removed = self.num_patches - (k1 - 1)
    if self.mask_token_mode == "shared":
      mask_token = self.param("mask_token", token_init, (1, 1, d))
      fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, num_removed, d))
    elif self.mask_token_mode == "per_slot":
      mask_token = self.param("mask_token", token_init, (1, num_removed, d))
      fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, num_removed, d))
    else:
      raise ValueError(f"config decoder.mask_token_mode: {self.mask_token_mode!r} is not one of "
                       f"{MASK_TOKEN_MODES}")
    patches = jnp.concatenate([x[:, 1:], fill], axis=1)
    patches = gather_tokens(patches, ids_restore, self.gather_impl)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    grid = int(round(self.num_patches ** 0.5))
    pos = self.param("decoder_pos_embed", sincos_init(grid), (1, 1 + self.num_patches, d))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = Block(d, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                gelu_impl=self.gelu_impl, gelu_approximate=self.gelu_approximate,
                qkv_impl=self.qkv_impl, name=f"decoder_blocks_{i}")(x, train=train)
    hidden = layer_norm(self.norm_impl, self.dtype, name="decoder_norm")(x)
    pred = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=xavier_uniform,
                    name="decoder_pred")(hidden[:, 1:])
    return (pred, hidden) if return_hidden else pred
