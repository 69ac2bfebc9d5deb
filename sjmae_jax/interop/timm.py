"""Our ViT encoder / classifier params <-> timm VisionTransformer state dicts.

No torch or timm is imported here: state dicts are {key: numpy array} (torch tensors are also
accepted as input). The weights alone fix every shape; the number of attention heads is not in
them, so `timm_model_args` needs it to tell timm how to build the model.
"""
import math
from collections.abc import Mapping

import numpy as np

from sjmae_jax.interop.convert import (check_state_dict, params_to_state_dict,
                                       state_dict_to_params, to_numpy)
from sjmae_jax.interop.resample import resample_pos_embed
from sjmae_jax.models.sizes import SIZES

# (size, patch_size, img_size) of the plain-ViT names timm registers (vit_{size}_patch{p}_{img});
# the sizes are models/sizes.py's.
TIMM_VIT_NAMES = {
    ("tiny", 16, 224), ("tiny", 16, 384),
    ("small", 8, 224), ("small", 16, 224), ("small", 16, 384), ("small", 32, 224),
    ("small", 32, 384),
    ("base", 8, 224), ("base", 16, 224), ("base", 16, 384), ("base", 32, 224), ("base", 32, 384),
    ("large", 14, 224), ("large", 16, 224), ("large", 16, 384), ("large", 32, 224),
    ("large", 32, 384),
    ("huge", 14, 224),
}
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")


def _layer_norm_shapes(prefix: str, dim: int) -> dict:
  return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _linear_shapes(prefix: str, dim_in: int, dim_out: int) -> dict:
  return {f"{prefix}.weight": (dim_out, dim_in), f"{prefix}.bias": (dim_out,)}


def block_shapes(prefix: str, dim: int, hidden: int, layer_scale: bool) -> dict:
  """State-dict shapes of one timm Block (pre-norm, fused qkv with bias, optional LayerScale)."""
  shapes = {
      **_layer_norm_shapes(f"{prefix}.norm1", dim),
      **_linear_shapes(f"{prefix}.attn.qkv", dim, 3 * dim),
      **_linear_shapes(f"{prefix}.attn.proj", dim, dim),
      **_layer_norm_shapes(f"{prefix}.norm2", dim),
      **_linear_shapes(f"{prefix}.mlp.fc1", dim, hidden),
      **_linear_shapes(f"{prefix}.mlp.fc2", hidden, dim),
  }
  if layer_scale:
    shapes[f"{prefix}.ls1.gamma"] = (dim,)
    shapes[f"{prefix}.ls2.gamma"] = (dim,)
  return shapes


def count_blocks(state_dict: Mapping, prefix: str) -> int:
  """1 + the largest i of the keys '{prefix}.{i}.*' (0 when there are none)."""
  indices = [int(key.split(".")[1]) for key in state_dict
             if key.startswith(prefix + ".") and key.split(".")[1].isdigit()]
  return max(indices) + 1 if indices else 0


def grid_of(pos_embed_shape, key: str = "pos_embed") -> int:
  """Side of the square patch grid of a (1, 1 + g*g, D) position embedding."""
  rows = pos_embed_shape[1] - 1
  grid = math.isqrt(max(rows, 0))
  if len(pos_embed_shape) != 3 or grid * grid != rows:
    raise ValueError(f"{key} has shape {tuple(pos_embed_shape)}; expected (1, 1 + g*g, D) for a "
                     "square g x g patch grid plus the cls row")
  return grid


def _require(state_dict: Mapping, key: str, what: str):
  if key not in state_dict:
    raise ValueError(f"{what}: missing key {key!r}")
  return state_dict[key]


def encoder_geometry(state_dict: Mapping, what: str = "timm encoder") -> dict:
  """Architecture read from an encoder state dict's shapes."""
  patch_weight = _require(state_dict, "patch_embed.proj.weight", what)
  if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
    raise ValueError(f"{what}: 'patch_embed.proj.weight' has shape {tuple(patch_weight.shape)}; "
                     "expected (embed_dim, in_chans, p, p)")
  embed_dim, in_chans, patch_size, _ = patch_weight.shape
  grid = grid_of(_require(state_dict, "pos_embed", what).shape)
  depth = count_blocks(state_dict, "blocks")
  if depth == 0:
    raise ValueError(f"{what}: no transformer blocks (keys 'blocks.0.*')")
  fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
  return dict(
      embed_dim=int(embed_dim), in_chans=int(in_chans), patch_size=int(patch_size), grid=grid,
      img_size=grid * int(patch_size), depth=depth,
      hidden=int(fc1.shape[0]) if fc1 is not None else 4 * int(embed_dim),
      layer_scale=any(key.endswith(".ls1.gamma") for key in state_dict),
      final_norm="norm.weight" in state_dict or "norm.bias" in state_dict)


def encoder_shapes(geometry: Mapping, *, final_norm: bool) -> dict:
  """Every key of a timm VisionTransformer encoder (class token, no head) with its shape."""
  dim, grid, patch = geometry["embed_dim"], geometry["grid"], geometry["patch_size"]
  shapes = {
      "patch_embed.proj.weight": (dim, geometry["in_chans"], patch, patch),
      "patch_embed.proj.bias": (dim,),
      "cls_token": (1, 1, dim),
      "pos_embed": (1, 1 + grid * grid, dim),
  }
  for i in range(geometry["depth"]):
    shapes.update(block_shapes(f"blocks.{i}", dim, geometry["hidden"], geometry["layer_scale"]))
  if final_norm:
    shapes.update(_layer_norm_shapes("norm", dim))
  return shapes


def head_shapes(state_dict: Mapping, embed_dim: int) -> dict:
  """Expected shapes of the classifier keys that `state_dict` has (fc_norm, head)."""
  shapes = {}
  if any(key.startswith("fc_norm.") for key in state_dict):
    shapes.update(_layer_norm_shapes("fc_norm", embed_dim))
  if any(key.startswith("head.") for key in state_dict):
    weight = state_dict.get("head.weight")
    num_classes = int(weight.shape[0]) if weight is not None and weight.ndim == 2 else 0
    shapes.update(_linear_shapes("head", embed_dim, num_classes))
  return shapes


def _add_missing_cls_row(state_dict: dict) -> dict:
  """timm models built with no_embed_class=True (DeiT-III, ...) have no cls row in pos_embed;
  they add it to the patches only, which equals adding a zero row to the cls token."""
  pos_embed = state_dict.get("pos_embed")
  if pos_embed is not None and pos_embed.ndim == 3:
    rows = pos_embed.shape[1]
    if math.isqrt(rows) ** 2 == rows:
      zero_row = np.zeros((1, 1, pos_embed.shape[2]), pos_embed.dtype)
      state_dict = dict(state_dict, pos_embed=np.concatenate([zero_row, pos_embed], axis=1))
  return state_dict


def _encoder_params(state_dict: Mapping, *, target_grid, what: str) -> dict:
  state_dict = _add_missing_cls_row({key: to_numpy(value) for key, value in state_dict.items()})
  geometry = encoder_geometry(state_dict, what)
  check_state_dict(state_dict, encoder_shapes(geometry, final_norm=geometry["final_norm"]),
                   what=what)
  if target_grid is not None:
    state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], target_grid)
  return state_dict_to_params(state_dict)


def timm_to_encoder(state_dict: Mapping, *, target_grid: int | None = None,
                    source: str = "timm encoder") -> dict:
  """timm VisionTransformer encoder keys -> our VisionTransformer params.

  target_grid: patch-grid side of the model the params are for; pos_embed is resized to it
    (bicubic, as timm) when it differs. A final `norm` is loaded when present (final_norm=True).
  Raises ValueError naming any missing or unexpected key, or a key whose shape is wrong; head /
  fc_norm keys are unexpected here (see `timm_to_classifier`, `load_pretrained`). `source` names
  the checkpoint in those errors.
  """
  return _encoder_params(state_dict, target_grid=target_grid, what=source)


def encoder_to_timm(encoder_params: Mapping, *, num_heads: int | None = None) -> dict:
  """Our VisionTransformer params -> timm VisionTransformer keys (float32 numpy, torch layout).

  Our fused qkv already has timm's (3, heads, head_dim) output layout, so the heads are not needed
  for the conversion; `num_heads`, when given, is checked against the width. An encoder-side
  `mask_token` (mask-tokens-before-encoder pretraining) has no place in timm's model and is left
  out.
  """
  encoder_params = {name: value for name, value in encoder_params.items() if name != "mask_token"}
  state_dict = params_to_state_dict(encoder_params)
  geometry = encoder_geometry(state_dict, "encoder params")
  if num_heads is not None and geometry["embed_dim"] % num_heads:
    raise ValueError(f"embed_dim {geometry['embed_dim']} is not divisible by num_heads {num_heads}")
  check_state_dict(state_dict, encoder_shapes(geometry, final_norm=geometry["final_norm"]),
                   what="encoder params")
  return state_dict


def classifier_to_timm(params: Mapping, *, num_heads: int | None = None) -> dict:
  """ViTClassifier params {'encoder', 'fc_norm' (avg pool), 'head'} -> timm keys with the head."""
  unknown = set(params) - {"encoder", "fc_norm", "head"}
  if unknown or "head" not in params:
    raise ValueError(f"classifier params: expected entries 'encoder', 'head' and optionally "
                     f"'fc_norm', got {sorted(params)}")
  state_dict = encoder_to_timm(params["encoder"], num_heads=num_heads)
  state_dict.update(params_to_state_dict({name: params[name] for name in ("fc_norm", "head")
                                          if name in params}))
  _check_classifier(state_dict, what="classifier params")
  return state_dict


def _check_classifier(state_dict: Mapping, *, what: str) -> None:
  geometry = encoder_geometry(state_dict, what)
  dim = geometry["embed_dim"]
  head_weight = _require(state_dict, "head.weight", what)
  # timm's global-pool classifiers move the final norm after the pooling: fc_norm, no norm.
  global_pool = any(key.startswith("fc_norm.") for key in state_dict)
  shapes = encoder_shapes(geometry, final_norm=not global_pool)
  if global_pool:
    shapes.update(_layer_norm_shapes("fc_norm", dim))
  shapes.update(_linear_shapes("head", dim, int(head_weight.shape[0])))
  check_state_dict(state_dict, shapes, what=what)


def timm_to_classifier(state_dict: Mapping, *, target_grid: int | None = None) -> dict:
  """timm classifier state dict -> ViTClassifier params {'encoder', 'fc_norm'?, 'head'}.

  With fc_norm (global_pool='avg') the encoder has no final norm; without it (global_pool='token')
  the encoder keeps `norm`.
  """
  state_dict = _add_missing_cls_row({key: to_numpy(value) for key, value in state_dict.items()})
  _check_classifier(state_dict, what="timm classifier")
  encoder_keys = {key: value for key, value in state_dict.items()
                  if not key.startswith(CLASSIFIER_PREFIXES)}
  params = {"encoder": _encoder_params(encoder_keys, target_grid=target_grid,
                                       what="timm classifier")}
  params.update(state_dict_to_params({key: value for key, value in state_dict.items()
                                      if key.startswith(CLASSIFIER_PREFIXES)}))
  return params


def timm_name_for(embed_dim: int, depth: int, patch_size: int, img_size: int) -> str:
  """The registered timm ViT name nearest to this architecture (kwargs fix the rest).

  The size is the one with this width and depth, else the one nearest in width (a 128-wide model
  is named after ViT-Tiny, never after ViT-Base); the patch size and image size are those of the
  name when timm registers such a name.
  """
  sizes = [name for name, size in SIZES.items() if size[:2] == (embed_dim, depth)]
  size = sizes[0] if sizes else min(
      SIZES, key=lambda name: (abs(SIZES[name].embed_dim - embed_dim), SIZES[name].embed_dim))
  for patch, img in ((patch_size, img_size), (patch_size, 224)):
    if (size, patch, img) in TIMM_VIT_NAMES:
      return f"vit_{size}_patch{patch}_{img}"
  return "vit_huge_patch14_224" if size == "huge" else f"vit_{size}_patch16_224"


def _registered_size(timm_name: str):
  for size, patch, img in TIMM_VIT_NAMES:
    if timm_name == f"vit_{size}_patch{patch}_{img}":
      return SIZES[size][:3]
  return None


def timm_model_args(state_dict: Mapping, *, num_heads: int, timm_name: str | None = None,
                    global_pool: str | None = None) -> tuple[str, dict]:
  """(name, kwargs) so that `timm.create_model(name, pretrained=False, **kwargs)` builds the model
  that `state_dict` (from encoder_to_timm or classifier_to_timm) loads into with strict=True.

  global_pool: for a classifier it follows the weights ('avg' with fc_norm, 'token' without);
    for a bare encoder 'token' (default; forward_features = all tokens after the final norm, as our
    encoder) or 'avg' (timm then pools the normed patch tokens: fc_norm=False).
  """
  geometry = encoder_geometry(state_dict, "state dict")
  dim, depth = geometry["embed_dim"], geometry["depth"]
  if dim % num_heads:
    raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
  has_head = "head.weight" in state_dict
  has_fc_norm = "fc_norm.weight" in state_dict
  kwargs = dict(img_size=geometry["img_size"], patch_size=geometry["patch_size"])

  if has_head or has_fc_norm:
    pool = "avg" if has_fc_norm else "token"
    if global_pool not in (None, pool):
      raise ValueError(f"these classifier weights were trained with global_pool={pool!r} "
                       f"({'with' if has_fc_norm else 'without'} fc_norm); got {global_pool!r}")
    kwargs.update(global_pool=pool, class_token=True,
                  num_classes=int(state_dict["head.weight"].shape[0]) if has_head else 0)
  else:
    pool = global_pool or "token"
    if pool not in ("token", "avg"):
      raise ValueError(f"global_pool must be 'token' or 'avg', got {pool!r}")
    kwargs.update(global_pool=pool, class_token=True, num_classes=0)
    if pool == "avg":
      kwargs["fc_norm"] = False  # keep the final norm on the tokens, as our encoder has it
  if not geometry["final_norm"] and not has_fc_norm:
    kwargs["final_norm"] = False

  name = timm_name or timm_name_for(dim, depth, geometry["patch_size"], geometry["img_size"])
  if _registered_size(name) != (dim, depth, num_heads):
    kwargs.update(embed_dim=dim, depth=depth, num_heads=num_heads)
  if geometry["hidden"] != 4 * dim:
    kwargs["mlp_ratio"] = geometry["hidden"] / dim
  if geometry["in_chans"] != 3:
    kwargs["in_chans"] = geometry["in_chans"]
  if geometry["layer_scale"]:
    kwargs["init_values"] = 1e-5  # any value makes timm create ls1/ls2; the weights overwrite it
  return name, kwargs
