"""Paths a user passes (workdirs, init_from, data folders, tokenizer files, export files).

Local paths are made absolute once, where a program starts: Orbax refuses relative checkpoint
paths, and an absolute path means the same thing in every thread and after any chdir. URLs
(gs://bucket/..., any scheme://) are left exactly as they are.
"""
import copy
import os

# Config keys, at any depth, that name a file or directory.
PATH_KEYS = ("init_from", "data_dir", "tokenizer")
FOLDER_SOURCE = "folder:"


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def absolute(path):
  """`path` as an absolute local path ('~' expanded); URLs and '' unchanged."""
  path = os.fspath(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def shown(path) -> str:
  """How to print a path to the user: relative to the current directory when it lies below it."""
  path = os.fspath(path)
  if is_url(path) or not os.path.isabs(path):
    return path
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def with_absolute_paths(config):
  """A copy of `config` whose path-valued keys (PATH_KEYS, and data.source='folder:PATH') are
  absolute; the caller's config is left as it is."""
  config = copy.deepcopy(config)
  _resolve(config)
  return config


def _resolve(node) -> None:
  for key in list(node.keys()):
    value = node[key]
    if hasattr(value, "keys"):
      _resolve(value)
    elif isinstance(value, str) and key in PATH_KEYS:
      node[key] = absolute(value)
    elif key == "source" and isinstance(value, str) and value.startswith(FOLDER_SOURCE):
      node[key] = FOLDER_SOURCE + absolute(value[len(FOLDER_SOURCE):])
