"""Loading PyTorch checkpoints as initial params (`init_from`) for fine-tuning or pretraining."""
from collections.abc import Mapping

import numpy as np

from sjmae_jax.interop.convert import (check_names, check_state_dict, flatten,
                                       state_dict_to_params, unflatten)
from sjmae_jax.interop.io import read_state_dict
from sjmae_jax.interop.mae import decoder_to_params, is_decoder_key
from sjmae_jax.interop.timm import CLASSIFIER_PREFIXES, head_shapes, timm_to_encoder


def load_pretrained(path, *, img_size: int, patch_size: int) -> dict:
  """Read a timm ViT or facebookresearch/mae checkpoint into our param layout.

  path: .safetensors (no torch needed) or .pth / .pt / .bin (needs torch); a plain state dict, or
    a checkpoint keeping it under 'model' (official MAE) or 'state_dict'.
  img_size, patch_size: the model the params are for. The checkpoint's patch size must match;
    pos_embed (and decoder_pos_embed) are resized when the patch grid differs.
  Returns {'encoder': ...} plus, where the checkpoint has them, 'decoder' (MAE decoder keys),
  'fc_norm' and 'head' (timm / MAE fine-tuned classifiers). A global-pool classifier's encoder has
  no final 'norm'. Combine with a model's initial params using `merge_params`.
  """
  if img_size % patch_size:
    raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
  state_dict = read_state_dict(path)
  source = str(path)
  encoder = {key: value for key, value in state_dict.items()
             if not is_decoder_key(key) and not key.startswith(CLASSIFIER_PREFIXES)}
  classifier = {key: value for key, value in state_dict.items()
                if key.startswith(CLASSIFIER_PREFIXES)}
  decoder = {key: value for key, value in state_dict.items() if is_decoder_key(key)}

  patch_weight = encoder.get("patch_embed.proj.weight")
  if patch_weight is not None and tuple(patch_weight.shape[2:]) != (patch_size, patch_size):
    raise ValueError(f"{source}: key 'patch_embed.proj.weight' has shape "
                     f"{tuple(patch_weight.shape)}, i.e. patch size {tuple(patch_weight.shape[2:])}"
                     f", but the model has patch_size {patch_size}")
  grid = img_size // patch_size
  params = {"encoder": timm_to_encoder(encoder, target_grid=grid, source=source)}
  if classifier:
    embed_dim = params["encoder"]["cls_token"].shape[-1]
    check_state_dict(classifier, head_shapes(classifier, embed_dim), what=source)
    params.update(state_dict_to_params(classifier))
  if decoder:
    params["decoder"] = decoder_to_params(decoder, target_grid=grid,
                                          source=f"{source} (MAE decoder)")
  return params


def _name(path: tuple) -> str:
  return "/".join(path)


def _matches(path: tuple, patterns) -> bool:
  name = _name(path)
  return any(name == pattern or name.startswith(pattern.rstrip("/") + "/")
             for pattern in patterns)


def merge_params(params: Mapping, loaded: Mapping, *, allow_missing=(),
                 allow_unexpected=()) -> dict:
  """`params` with every leaf that `loaded` also has replaced by the loaded value.

  Paths are '/'-joined ('encoder/blocks_0/attn/qkv/kernel'); a pattern covers a path and
  everything below it. Every leaf of `params` must be in `loaded` unless covered by
  `allow_missing`, and every leaf of `loaded` must be in `params` unless covered by
  `allow_unexpected`; shapes must agree. Loaded leaves come back as host numpy arrays in the
  dtype of `params` (place them with jax.device_put and the run's shardings).

  Fine-tuning a global-pool classifier from an MAE checkpoint, for example:
    merge_params(init_params, {'encoder': loaded['encoder']},
                 allow_missing=['fc_norm', 'head'], allow_unexpected=['encoder/norm'])
  """
  flat_params, flat_loaded = flatten(params), flatten(loaded)
  # the allowed missing / unexpected paths take part on both sides, so they are never reported
  expected = {_name(path): tuple(value.shape) for path, value in flat_params.items()
              if path in flat_loaded or not _matches(path, allow_missing)}
  found = {_name(path): tuple(value.shape) for path, value in flat_loaded.items()
           if path in flat_params or not _matches(path, allow_unexpected)}
  check_names("loading pretrained params", found, expected,
              missing_says="missing from the checkpoint:", unexpected_says="not in the model:",
              expected_word="model has")
  merged = {path: np.asarray(flat_loaded[path]).astype(value.dtype) if path in flat_loaded
            else value for path, value in flat_params.items()}
  return unflatten(merged)
