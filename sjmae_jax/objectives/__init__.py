"""Objectives: one file per method or loss term; `build(config)` picks one by `config.method`.

The contract is `base.Objective` (a Flax module: `__call__(batch, *, train) -> (loss, metrics)`,
`encode`, `pictures`, optional `classify`, declared rng streams); each objective is built from
its own typed config (`Objective.config_class`), which `check(config)` builds and validates
without reading data or tracing. A module of this package registers its objective with
`@register(name)`; every module here is imported before a lookup, so no list is kept by hand.
"""
import importlib
import pkgutil

import jax.numpy as jnp

from sjmae_jax.objectives.base import Objective, step_rngs  # noqa: F401  (the contract)

_REGISTRY = {}


def register(name: str):
  """Class decorator: the Objective subclass that `config.method == name` builds."""
  def wrap(objective_class):
    if not issubclass(objective_class, Objective):
      raise TypeError(f"objective {name!r}: {objective_class.__name__} is not an Objective")
    _REGISTRY[name] = objective_class
    return objective_class
  return wrap


def modules() -> list:
  """Names of this package's modules."""
  return sorted(info.name for info in pkgutil.iter_modules(__path__))


def registered() -> dict:
  """{method name: Objective subclass}, after importing every module of the package."""
  for module in modules():
    importlib.import_module(f"{__name__}.{module}")
  return dict(_REGISTRY)


def objective_class(method: str):
  known = registered()
  if method not in known:
    raise ValueError(f"config method: unknown objective {method!r}; known: {sorted(known)}")
  return known[method]


def check(config):
  """The typed config of `config.method`'s objective, every value checked (one error line naming
  the key), without reading data or tracing anything; the engine calls it at start."""
  return objective_class(config.method).config_class.from_config(config)


def build(config, dtype=jnp.float32) -> Objective:
  return objective_class(config.method).from_config(config, dtype=dtype)
