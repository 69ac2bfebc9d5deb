"""Reading and writing PyTorch state dicts.

safetensors files are read and written with safetensors' numpy API (no torch). .pth / .bin files
are pickles and need torch, imported only when such a file is read. Paths go through etils.epath:
local or gs:// alike (files are read and written whole, as bytes).
"""
import argparse
import contextlib
import io
import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from sjmae_jax.interop.convert import to_numpy

# safetensors dtype names -> numpy; safetensors.numpy.load has no bfloat16, hence this table.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}

# Where a checkpoint keeps its weights: facebookresearch/mae saves {'model': ..., 'optimizer': ...,
# 'epoch': ..., 'args': ...}; other trainers use 'state_dict'.
_WRAPPER_KEYS = ("model", "state_dict")


def sidecar_path(weights_path) -> str:
  """FILE.safetensors -> FILE.json (where the model name and kwargs are written)."""
  return os.fspath(epath.Path(weights_path).with_suffix(".json"))


def save_state_dict(state_dict: Mapping, path, *, info: Mapping | None = None) -> None:
  """Write a safetensors file; `info` also goes to the JSON sidecar and the file's metadata."""
  tensors = {key: np.ascontiguousarray(value) for key, value in state_dict.items()}
  metadata = {"format": "pt"}  # what Hugging Face / timm loaders look for
  if info is not None:
    metadata["sjmae_jax"] = json.dumps(info, sort_keys=True)
  epath.Path(path).write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
  if info is not None:
    epath.Path(sidecar_path(path)).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _load_safetensors(data: bytes, source: str) -> dict:
  tensors = {}
  for key, view in safetensors.deserialize(data):
    if view["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{source}: tensor {key!r} has unsupported dtype {view['dtype']}")
    dtype = _SAFETENSORS_DTYPES[view["dtype"]]
    tensors[key] = np.frombuffer(view["data"], dtype=dtype).reshape(view["shape"])
  return tensors


def _torch_load(path: epath.Path):
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
    return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)


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
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.suffix == ".safetensors":
    checkpoint = _load_safetensors(path.read_bytes(), str(path))
  elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
    checkpoint = _torch_load(path)
    if not isinstance(checkpoint, Mapping):
      raise ValueError(f"{path}: expected a dict of tensors, found a {type(checkpoint).__name__}")
  else:
    raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, .pth, .pt, .bin "
                     "or .ckpt")
  return {key: to_numpy(value)
          for key, value in unwrap_state_dict(checkpoint, source=str(path)).items()}
