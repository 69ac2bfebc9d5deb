"""ViT classifier for fine-tuning (facebookresearch/mae models_vit.py / timm VisionTransformer).

global_pool='avg': mean of patch tokens -> fc_norm -> head (the encoder has no final `norm`).
global_pool='token': final `norm` -> cls token -> head.
Params: {'encoder': <VisionTransformer>, 'fc_norm' (avg only), 'head'}.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sjmae_jax.models.vit import VisionTransformer, timm_trunc_normal


class ViTClassifier(nn.Module):
  encoder_kwargs: dict
  num_classes: int
  global_pool: str = "avg"
  head_init_std: float = 2e-5
  dtype: Any = jnp.float32

  def setup(self):
    if self.global_pool not in ("avg", "token"):
      raise ValueError(f"config global_pool: expected 'avg' or 'token', got {self.global_pool!r}")
    self.encoder = VisionTransformer(**self.encoder_kwargs, dtype=self.dtype,
                                     final_norm=self.global_pool == "token")
    if self.global_pool == "avg":
      self.fc_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.head = nn.Dense(self.num_classes, dtype=self.dtype,
                         kernel_init=timm_trunc_normal(self.head_init_std))

  def features(self, images, *, train: bool = False):
    x = self.encoder(images, train=train)
    if self.global_pool == "avg":
      return self.fc_norm(x[:, 1:].mean(axis=1))
    return x[:, 0]

  def __call__(self, images, *, train: bool = False):
    return self.head(self.features(images, train=train)).astype(jnp.float32)
