"""Reading and writing PyTorch state dicts.

safetensors files are read and written with safetensors' numpy API (no torch). .pth / .bin files
are pickles and need torch, imported only when such a file is read.
"""
import argparse
import contextlib
import json
import os
from collections.abc import Mapping

import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' so safetensors can read bf16 tensors)
import numpy as np
from safetensors.numpy import load_file, save_file

from sjmae_jax.interop.convert import to_numpy

# Where a checkpoint keeps its weights: facebookresearch/mae saves {'model': ..., 'optimizer': ...,
# 'epoch': ..., 'args': ...}; other trainers use 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict")


def sidecar_path(weights_path) -> str:
  """FILE.safetensors -> FILE.json (where the model name and kwargs are written)."""
  root, _ = os.path.splitext(os.fspath(weights_path))
  return root + ".json"


def save_state_dict(state_dict: Mapping, path, *, info: Mapping | None = None) -> None:
  """Write a safetensors file; `info` also goes to the JSON sidecar and the file's metadata."""
  tensors = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
  metadata = {"format": "pt"}  # what Hugging Face / timm loaders look for
  if info is not None:
    metadata["sjmae_jax"] = json.dumps(info, sort_keys=True)
  save_file(tensors, os.fspath(path), metadata=metadata)
  if info is not None:
    with open(sidecar_path(path), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
      f.write("\n")


def _torch_load(path: str):
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); .safetensors files "
                      "can be read without it") from None
  # weights_only refuses arbitrary pickles; MAE's training checkpoints also hold an
  # argparse.Namespace under 'args', which is harmless data and is allowed explicitly.
  safe_globals = getattr(torch.serialization, "safe_globals", None)
  allow = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
  with allow:
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_array(value) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(checkpoint: Mapping, *, source: str = "checkpoint") -> dict:
  """The {key: tensor} dict inside a checkpoint: its 'model' / 'state_dict' entry or itself.

  A 'module.' prefix on every key (DistributedDataParallel) is removed.
  """
  for wrapper in _WRAPPER_KEYS:
    if isinstance(checkpoint.get(wrapper), Mapping):
      checkpoint = checkpoint[wrapper]
      break
  not_arrays = [key for key, value in checkpoint.items() if not _is_array(value)]
  if not_arrays:
    raise ValueError(f"{source}: no state dict found: entries {not_arrays[:5]} are not tensors "
                     f"(top-level keys: {sorted(checkpoint)[:10]})")
  if checkpoint and all(key.startswith("module.") for key in checkpoint):
    checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
  return dict(checkpoint)


def read_state_dict(path) -> dict:
  """{key: float32 numpy array} from a .safetensors, .pth, .pt, .bin or .ckpt file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    checkpoint = load_file(path)
  elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping):
      raise ValueError(f"{path}: expected a dict of tensors, found a {type(checkpoint).__name__}")
  else:
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, .pth, .pt, .bin "
                     "or .ckpt")
  return {key: to_numpy(value) for key, value in unwrap_state_dict(checkpoint, source=path).items()}
