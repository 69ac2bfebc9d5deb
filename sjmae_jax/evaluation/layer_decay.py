"""Layer-wise learning-rate decay and weight-decay mask of MAE fine-tuning (util/lr_decay.py).

Layer ids over a ViT of depth L: patch_embed, cls_token, pos_embed -> 0; blocks_i -> i + 1;
everything else (fc_norm, norm, head) -> L + 1. A parameter's lr is scaled by
decay ** (L + 1 - layer_id). No weight decay on 1-D parameters nor on pos_embed / cls_token
(MAE's no_weight_decay_list {pos_embed, cls_token, dist_token}).
"""
import re

import jax
import optax

from sjmae_jax.sharding import path_str

NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "dist_token")
_BLOCK = re.compile(r"blocks_(\d+)/")


def layer_id(path: str, depth: int) -> int:
  """Layer id of a '/'-joined parameter path of a ViTClassifier ('encoder/blocks_3/...')."""
  name = path.split("/", 1)[1] if path.startswith("encoder/") else path
  if name in ("cls_token", "pos_embed", "dist_token") or name.startswith("patch_embed/"):
    return 0
  block = _BLOCK.match(name)
  if block:
    return int(block.group(1)) + 1
  return depth + 1


def lr_scales(params, depth: int, decay: float):
  """Tree of per-parameter lr multipliers decay ** (depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (depth + 1 - layer_id(path_str(path), depth)), params)


def weight_decay_mask(params):
  """True where weight decay applies: >1-D parameters other than pos_embed / cls_token."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and path_str(path).split("/")[-1] not in NO_WEIGHT_DECAY, params)


def scale_by_layer(params, depth: int, decay: float) -> optax.GradientTransformation:
  """Multiply each update by its layer's lr scale (chain after the optimizer's lr scaling)."""
  scales = lr_scales(params, depth, decay)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
