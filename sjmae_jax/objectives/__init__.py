"""Objectives: one file per method or loss term; `build(config)` picks one by `config.method`.

An objective is a Flax module whose `__call__(batch, *, train)` returns (loss, metrics) with
scalar metrics, that uses the 'masking' and 'dropout' rng streams, and that offers
`encode(images)` (tokens after the final norm, for monitors) and `pictures(batch)` (images for
TensorBoard). Modules with BatchNorm keep its statistics in the 'batch_stats' collection.
"""
import importlib

_REGISTRY = {}
_MODULES = ("mae", "sjmae",
            "can",
            "simmim",
            "ssat",
            "mapet",
            )


def register(name: str):
  def wrap(build_fn):
    _REGISTRY[name] = build_fn
    return build_fn
  return wrap


def build(config, dtype):
  for module in _MODULES:
    importlib.import_module(f"sjmae_jax.objectives.{module}")
  if config.method not in _REGISTRY:
    raise ValueError(f"config method: unknown objective {config.method!r}; known: {sorted(_REGISTRY)}")
  return _REGISTRY[config.method](config, dtype=dtype)
