"""Position-embedding resizing, numerically matching timm's `resample_abs_pos_embed`.

timm resizes the patch rows with torch's bicubic interpolation with antialias=True. That path
uses Keys' cubic kernel with a = -0.5 (PIL's, not the a = -0.75 of plain torch bicubic), widens
the kernel by the scale factor when shrinking, and renormalises the weights over the taps that
fall inside the image at the borders. Written out here in numpy so that no torch is needed.
"""
import math

import numpy as np


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_antialias_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix W so that resized = W @ signal (half-pixel centres)."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)  # the kernel covers more input pixels when shrinking
  centers = (np.arange(out_size) + 0.5) * scale
  taps = np.arange(in_size) + 0.5
  weights = _keys_cubic((taps[None, :] - centers[:, None]) / stretch)
  return weights / weights.sum(axis=1, keepdims=True)


def resample_pos_embed(pos_embed, new_grid: int, *, num_prefix_tokens: int = 1) -> np.ndarray:
  """(1, prefix + g*g, D) -> (1, prefix + new_grid**2, D); the prefix (cls) rows are kept."""
  pos_embed = np.asarray(pos_embed, dtype=np.float32)
  prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[0, num_prefix_tokens:]
  old_grid = math.isqrt(patches.shape[0])
  if old_grid * old_grid != patches.shape[0]:
    raise ValueError(f"pos_embed has {patches.shape[0]} patch rows, which is not a square grid")
  if old_grid == new_grid:
    return pos_embed
  dim = patches.shape[-1]
  weights = bicubic_antialias_weights(old_grid, new_grid)
  grid = patches.reshape(old_grid, old_grid, dim).astype(np.float64)
  resized = np.einsum("ih,hwd,jw->ijd", weights, grid, weights)
  resized = resized.reshape(1, new_grid * new_grid, dim).astype(np.float32)
  return np.concatenate([prefix, resized], axis=1)
