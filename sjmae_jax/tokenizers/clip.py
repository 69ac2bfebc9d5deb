"""CLIP image towers in timm's layout (`vit_*_clip_*`), as tokenizer teachers (k-CLIP).

They differ from our ViT in four ways, all reproduced here: a LayerNorm before the blocks
(`norm_pre`, CLIP's ln_pre), no patch-embedding bias, LayerNorm eps 1e-5, and QuickGELU
(x * sigmoid(1.702 x)) for OpenAI's weights (timm's `*_clip_quickgelu_*` models; LAION weights
use exact GELU). Parameter names follow the timm keys through interop.convert, e.g.
blocks.0.attn.qkv.weight <-> blocks_0/attn/qkv/kernel, norm_pre.weight <-> norm_pre/scale.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax.models.vit import Attention

CLIP_NORM_EPS = 1e-5
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipMlp(nn.Module):
  hidden_dim: int
  quick_gelu: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    x = x * jax.nn.sigmoid(1.702 * x) if self.quick_gelu else nn.gelu(x, approximate=False)
    return nn.Dense(dim, dtype=self.dtype, name="fc2")(x)


class ClipBlock(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: float
  quick_gelu: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=CLIP_NORM_EPS, dtype=self.dtype, name=name)
    x = x + Attention(self.num_heads, dtype=self.dtype, name="attn")(norm("norm1")(x))
    hidden = int(self.dim * self.mlp_ratio)
    return x + ClipMlp(hidden, self.quick_gelu, dtype=self.dtype, name="mlp")(norm("norm2")(x))


class ClipViT(nn.Module):
  """CLIP visual transformer without its projection head. Returns all tokens (cls first) after
  the final LayerNorm (CLIP's ln_post), like VisionTransformer."""
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  quick_gelu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # no dropout or drop path in a teacher
    p, d = self.patch_size, self.embed_dim
    grid = self.img_size // p
    x = PatchProjection(p, d, dtype=self.dtype, name="patch_embed")(images)
    cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + grid * grid, d))
    cls = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, d))
    x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(x.dtype)
    x = nn.LayerNorm(epsilon=CLIP_NORM_EPS, dtype=self.dtype, name="norm_pre")(x)
    for i in range(self.depth):
      x = ClipBlock(d, self.num_heads, self.mlp_ratio, self.quick_gelu, dtype=self.dtype,
                    name=f"blocks_{i}")(x)
    return nn.LayerNorm(epsilon=CLIP_NORM_EPS, dtype=self.dtype, name="norm")(x)


class PatchProjection(nn.Module):
  """timm's PatchEmbed without bias: patch_embed/proj/kernel (p, p, C, D)."""
  patch_size: int
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="proj")(images)
    return x.reshape(x.shape[0], -1, self.embed_dim)
