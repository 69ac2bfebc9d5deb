"""Renaming between our Flax parameter trees and PyTorch (timm / facebookresearch-mae) state dicts.

The models use the reference names already, so conversion is mechanical:
  path  blocks_3/attn/qkv/kernel  <->  key  blocks.3.attn.qkv.weight
  Dense kernel (in, out)          <->  Linear weight (out, in)          (transpose)
  Conv kernel (p, p, C, D)        <->  Conv2d weight (D, C, p, p)       (transpose 3,2,0,1)
  LayerNorm scale / bias          <->  LayerNorm weight / bias
  everything else (tokens, pos_embed, LayerScale gamma) unchanged.
State-dict values may be numpy arrays or torch tensors; every floating value comes out float32.
"""
import re
from collections.abc import Mapping

import numpy as np

_NUMBERED = re.compile(r"^(blocks|decoder_blocks)_(\d+)$")
_NUMBERED_PARENTS = ("blocks", "decoder_blocks")


def to_numpy(value) -> np.ndarray:
  """numpy / jax array or torch tensor -> numpy; floating types become float32."""
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
    value = value.astype(np.float32)
  return value


def flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  """Nested mapping -> {path tuple: leaf}."""
  flat = {}
  for name, value in tree.items():
    path = prefix + (name,)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def torch_key(path: tuple) -> str:
  """('blocks_3', 'attn', 'qkv', 'kernel') -> 'blocks.3.attn.qkv.weight'."""
  parents = [_NUMBERED.sub(r"\1.\2", name) for name in path[:-1]]
  leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
  return ".".join(parents + [leaf])


def our_path(key: str, ndim: int) -> tuple:
  """'blocks.3.attn.qkv.weight' -> ('blocks_3', 'attn', 'qkv', 'kernel').

  A 2-D or 4-D 'weight' is a Linear / Conv kernel, a 1-D one a LayerNorm scale.
  """
  names = key.split(".")
  parents = []
  i = 0
  while i < len(names) - 1:
    if names[i] in _NUMBERED_PARENTS and i + 1 < len(names) - 1 and names[i + 1].isdigit():
      parents.append(f"{names[i]}_{names[i + 1]}")
      i += 2
    else:
      parents.append(names[i])
      i += 1
  leaf = names[-1]
  if leaf == "weight":
    leaf = "kernel" if ndim in (2, 4) else "scale"
  return tuple(parents) + (leaf,)


# Conv kernel axes (p, p, C, D) -> Conv2d weight (D, C, p, p), and back.
TO_TORCH_CONV, FROM_TORCH_CONV = (3, 2, 0, 1), (2, 3, 1, 0)


def _relayout(leaf_name: str, value: np.ndarray, conv_axes: tuple) -> np.ndarray:
  """Kernels transposed between Flax's and torch's layouts (Dense: .T, Conv: conv_axes)."""
  if leaf_name == "kernel" and value.ndim == 2:
    return value.T
  if leaf_name == "kernel" and value.ndim == 4:
    return value.transpose(conv_axes)
  return value


def params_to_state_dict(tree: Mapping, key_prefix: str = "") -> dict:
  """Flax params -> {torch key: float32 numpy array in torch layout}."""
  state_dict = {}
  for path, value in flatten(tree).items():
    value = _relayout(path[-1], to_numpy(value), TO_TORCH_CONV)
    state_dict[key_prefix + torch_key(path)] = np.ascontiguousarray(value)
  return state_dict


def state_dict_to_params(state_dict: Mapping) -> dict:
  """{torch key: array} -> Flax params (float32 numpy arrays)."""
  flat = {}
  for key, value in state_dict.items():
    value = to_numpy(value)
    path = our_path(key, value.ndim)
    flat[path] = np.ascontiguousarray(_relayout(path[-1], value, FROM_TORCH_CONV))
  return unflatten(flat)


def list_names(names, limit: int = 10) -> str:
  """"'a', 'b', 'c' and 7 more": sorted, quoted, at most `limit` shown."""
  names = sorted(names)
  shown = ", ".join(repr(name) for name in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_state_dict(state_dict: Mapping, expected_shapes: Mapping, *, what: str) -> None:
  """Raise ValueError naming the missing and unexpected keys, else the keys whose shapes differ."""
  found = {key: tuple(value.shape) for key, value in state_dict.items()}
  check_names(what, found, {key: tuple(shape) for key, shape in expected_shapes.items()},
              missing_says="missing key(s)", unexpected_says="unexpected key(s)",
              expected_word="expected")


def check_names(what: str, found: Mapping, expected: Mapping, *, missing_says: str,
                unexpected_says: str, expected_word: str) -> None:
  """{name: shape} found vs expected: one ValueError naming the missing and unexpected names,
  else the names whose shapes differ."""
  missing, unexpected = set(expected) - set(found), set(found) - set(expected)
  problems = []
  if missing:
    problems.append(f"{missing_says} {list_names(missing)}")
  if unexpected:
    problems.append(f"{unexpected_says} {list_names(unexpected)}")
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))
  mismatched = {name: (found[name], shape) for name, shape in expected.items()
                if found[name] != shape}
  if mismatched:
    raise ValueError(f"{what}: {describe_shape_mismatches(mismatched, expected_word)}")


def describe_shape_mismatches(mismatched: Mapping, expected_word: str, limit: int = 10) -> str:
  """{name: (found, expected)} -> "shape mismatch for 'k': checkpoint has (..), expected (..)"."""
  names = sorted(mismatched)
  parts = [f"{name!r}: checkpoint has {mismatched[name][0]}, {expected_word} {mismatched[name][1]}"
           for name in names[:limit]]
  more = f"; and {len(names) - limit} more" if len(names) > limit else ""
  return "shape mismatch for " + "; ".join(parts) + more
