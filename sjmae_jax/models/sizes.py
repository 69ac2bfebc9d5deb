"""The standard ViT sizes, the one table that model configs, the timm names and the plan use.

`config.model.variant` names a row; timm registers them as vit_{name}_patch{p}_{img}; the papers
write them ViT-{letter}/{p}.
"""
from typing import NamedTuple


class ViTSize(NamedTuple):
  embed_dim: int
  depth: int
  num_heads: int
  letter: str  # ViT-B/16's 'B'


SIZES = {
    "tiny": ViTSize(192, 12, 3, "Ti"),
    "small": ViTSize(384, 12, 6, "S"),
    "base": ViTSize(768, 12, 12, "B"),
    "large": ViTSize(1024, 24, 16, "L"),
    "huge": ViTSize(1280, 32, 16, "H"),
}
