"""Fixed 2-D sin-cos position embeddings, as in facebookresearch/mae (util/pos_embed.py)."""
import numpy as np


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p * omega_i)..., cos(p * omega_i)...] with omega_i = 1 / 10000^(i / (embed_dim/2))."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """(1 [+1], grid_size**2, embed_dim) float32; first half of channels = column, second = row.

  Patch order is row-major (row h, column w), matching patchify / the conv's output flattening.
  The cls row, when asked for, is all zeros.
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb[None].astype(np.float32)
