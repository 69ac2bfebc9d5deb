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


def check(config) -> None:
  """Builds `config.method`'s objective and traces its init (no data, nothing computed), so that a
  bad value of its config block fails at start, in one line."""
  import jax  # pylint: disable=import-outside-toplevel
  from sjmae_jax import train_state  # pylint: disable=import-outside-toplevel
  model = build(config, dtype=jax.numpy.float32)
  rngs = {name: jax.random.PRNGKey(0) for name in ("params", "masking", "dropout")}
  jax.eval_shape(lambda: model.init(rngs, train_state.sample_batch(config), train=True))


def has_classifier(model) -> bool:
  """Whether the objective also classifies (`classify(images) -> logits`, e.g. SSAT)."""
  return hasattr(model, "classify")
