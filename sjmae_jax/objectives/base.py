"""The objective contract, and the typed config blocks objectives are built from.

An objective is a Flax module (`Objective`) built from a frozen dataclass of its own settings
(its `config_class`: the `config.<method>` block, plus the encoder's kwargs and the `decoder`
block where it has a decoder), never from the whole run config. Building that dataclass checks
every value, so a method-specific typo or impossible value is one error line naming the key,
before any data is read or anything traced (`objectives.check`).
"""
import dataclasses
import typing
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sjmae_jax.models.vit import vit_kwargs
from sjmae_jax.objectives.masking import num_kept

# Streams split from the step rng since the first version (jax.random.split(rng) -> masking,
# dropout): objectives drawing only from these keep their draws bit for bit.
SPLIT_STREAMS = ("masking", "dropout")


class Objective(nn.Module):
  """A training objective on a ViT encoder (the submodule `encoder`).

  `__call__(batch, *, train)` returns (scalar loss, {name: scalar metric}); `batch` holds
  'images' (B, V, H, W, C) and 'label' (B,). It draws randomness only from the streams it
  declares in `rng_streams` (`step_rngs` makes them); BatchNorm statistics live in the
  'batch_stats' collection. `encode(images)` gives the features monitors and probes read;
  `pictures(batch)` the images TensorBoard shows; objectives with `has_classifier` offer
  `classify(images, *, train=False) -> logits (B, num_classes)`.
  """
  config: Any   # an instance of `config_class`
  dtype: Any = jnp.float32

  config_class = None            # the frozen dataclass of this objective's settings
  rng_streams = SPLIT_STREAMS    # the rng streams `__call__` and `pictures` draw from
  has_classifier = False         # True: `classify(images, *, train=False)` gives class logits

  @classmethod
  def from_config(cls, config, dtype=jnp.float32) -> "Objective":
    """The objective of a run config. Objectives that need more than their settings (a number of
    classes from the dataset, a tokenizer) read it here, so the module itself never sees the
    run config."""
    return cls(cls.config_class.from_config(config), dtype=dtype)

  def __call__(self, batch, *, train: bool = True):
    raise NotImplementedError

  def encode(self, images):
    """Full-image features for monitors and probes: all tokens (B, 1+L, D), cls first, after the
    encoder's final norm."""
    return self.encoder(images, train=False)

  def pictures(self, batch) -> dict:
    """{name: (1, H, W, C) image in [0, 1]} for TensorBoard; none by default."""
    del batch
    return {}


def step_rngs(model, rng) -> dict:
  """The `rngs=` of `model.apply` for one step from one key: 'masking' and 'dropout' are
  jax.random.split(rng) (as before streams were declared), every other stream `model` declares is
  rng folded in with its name, so it never depends on which other streams exist."""
  masking, dropout = jax.random.split(rng)
  split = {"masking": masking, "dropout": dropout}
  return {name: split[name] if name in split else jax.random.fold_in(rng, stream_id(name))
          for name in model.rng_streams}


def stream_id(name: str) -> int:
  """A fixed 31-bit number for a stream name (what `step_rngs` folds in)."""
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


# ---- typed config blocks ----

def read_block(config, block: str, cls, **resolved):
  """cls(**resolved, **config.<block>), each key of the block checked against cls's fields: an
  unknown key, a missing one or a value of the wrong type is one error line naming `block.key`.
  `resolved` are the fields that do not come from the block (encoder kwargs, other blocks)."""
  if config.get(block) is None:
    raise ValueError(f"config {block}: missing; the {config.get('method')!r} objective reads its "
                     f"settings from it")
  values = dict(config[block].items())
  fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in resolved}
  for key in values:
    if key not in fields:
      raise ValueError(f"config {block}.{key}: unknown key (known: {sorted(fields)})")
  for key, field in fields.items():
    has_default = (field.default is not dataclasses.MISSING
                   or field.default_factory is not dataclasses.MISSING)
    if key not in values and not has_default:
      raise ValueError(f"config {block}.{key}: missing (the {config.get('method')!r} objective "
                       "needs it)")
  hints = typing.get_type_hints(cls)
  for key, value in values.items():
    values[key] = checked_type(f"{block}.{key}", value, hints.get(key))
  return cls(**resolved, **values)


def checked_type(key: str, value, kind):
  """`value` as a `kind` (bool, int, float or str; an int is taken as a float), else one error
  line naming the key. Other kinds are not checked."""
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif kind is str:
    ok = isinstance(value, str)
  else:
    return value
  if not ok:
    raise ValueError(f"config {key}: {value!r} is not a {kind.__name__}")
  return value


def encoder_kwargs(config) -> dict:
  """VisionTransformer kwargs of the run's `model` block (checked by vit_kwargs)."""
  return vit_kwargs(config.model)


def num_patches(encoder: dict) -> int:
  return (encoder["img_size"] // encoder["patch_size"]) ** 2


def check_mask_ratio(key: str, ratio: float, encoder: dict, keep_rule: str = "floor") -> None:
  """A mask ratio in [0, 1) that keeps at least one patch of the encoder's grid."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"config {key}: {ratio} must be in [0, 1)")
  if num_kept(num_patches(encoder), ratio, keep_rule) < 1:
    raise ValueError(f"config {key}: {ratio} keeps no patch of the {num_patches(encoder)} "
                     "(model.img_size / model.patch_size squared)")


def check_choice(key: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config {key}: {value!r} is not one of {tuple(choices)}")


def check_range(key: str, value, low=None, high=None) -> None:
  """low <= value <= high (either bound may be None)."""
  if (low is not None and value < low) or (high is not None and value > high):
    bounds = (f"in [{low}, {high}]" if low is not None and high is not None
              else f">= {low}" if low is not None else f"<= {high}")
    raise ValueError(f"config {key}: {value} must be {bounds}")
