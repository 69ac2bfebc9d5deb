"""The optimizer policy of every training program: schedule, optimizer, per-parameter multipliers.

One config block (`config_lib.optim_config`) says it all:
  name            'adamw' (MAE pretraining and fine-tuning) or 'lars' (MAE's linear probe);
  lr_mults        (regex, multiplier) pairs over parameter paths ('encoder/blocks_0/attn/qkv/kernel'),
                  the first full match wins, default 1. Multiplier 0 freezes a parameter: it gets
                  no update and no optimizer state (pretraining's fixed sin-cos tables, the linear
                  probe's encoder, MaPeT's teacher);
  layer_decay     < 1: MAE fine-tuning's layer-wise lr decay, generated lr multipliers (below);
  wd_mults        (regex, multiplier) pairs for the weight decay, the same way;
  decay_1d        False: no weight decay on 1-D parameters (biases, norm scales), MAE's rule.
The schedule is MAE's: per-step linear warmup from 0, then half-cosine to min_lr.
"""
import math
import re

import jax
import jax.numpy as jnp
import optax

from sjmae_jax import config_lib
from sjmae_jax.sharding import path_str

# MAE's no_weight_decay_list for fine-tuning; its layer ids put them at layer 0 as well.
EMBEDDING_PARAMS = ("pos_embed", "cls_token", "dist_token")
_BLOCK = re.compile(r"blocks_(\d+)/")


def base_learning_rate(config) -> float:
  """lr = blr * effective global batch / 256, unless an absolute `lr` is set."""
  if config.get("lr"):
    return float(config.lr)
  return config.blr * config.batch_size / 256


def warmup_cosine(peak_lr: float, warmup_steps: float, total_steps: int, min_lr: float = 0.0):
  """Per-step linear warmup from 0 then half-cosine to min_lr: MAE's util/lr_sched.py, which sets
  the lr of every step from the fractional epoch step / steps_per_epoch. `warmup_steps` may be
  fractional (warmup_epochs x steps_per_epoch, not rounded)."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / warmup_steps if warmup_steps > 0 else peak_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-6)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0, 1)))
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def make_schedule(config, steps_per_epoch: int):
  """The run's lr schedule: blr/lr, warmup_* (any duration unit), epochs, min_lr."""
  warmup = config_lib.steps(config, "warmup", steps_per_epoch=steps_per_epoch,
                            batch_size=config.batch_size)
  return warmup_cosine(base_learning_rate(config), warmup, config.epochs * steps_per_epoch,
                       config.get("min_lr", 0.0))


def first_match(rules, path: str, default: float = 1.0) -> float:
  for pattern, value in rules:
    if re.fullmatch(pattern, path):
      return float(value)
  return default


def layer_id(path: str, depth: int) -> int:
  """MAE's layer id of a parameter (util/lr_decay.py): patch_embed, cls_token, pos_embed -> 0;
  blocks_i -> i + 1; everything else (fc_norm, norm, head) -> depth + 1."""
  name = path.split("/", 1)[1] if path.startswith("encoder/") else path
  if name in EMBEDDING_PARAMS or name.startswith("patch_embed/"):
    return 0
  block = _BLOCK.match(name)
  return int(block.group(1)) + 1 if block else depth + 1


def encoder_depth(params) -> int:
  """The number of `encoder/blocks_<i>` in a parameter tree."""
  blocks = {int(m.group(1)) for path, _ in jax.tree_util.tree_leaves_with_path(params)
            for m in [re.match(r"encoder/blocks_(\d+)/", path_str(path))] if m}
  return max(blocks) + 1 if blocks else 0


def lr_multipliers(params, optim) -> dict:
  """Per-parameter lr multipliers: lr_mults times layer_decay ** (depth + 1 - layer_id)."""
  depth = encoder_depth(params)

  def multiplier(path, _):
    name = path_str(path)
    layer = optim.layer_decay ** (depth + 1 - layer_id(name, depth)) if optim.layer_decay < 1 else 1.0
    return layer * first_match(optim.lr_mults, name)
  return jax.tree_util.tree_map_with_path(multiplier, params)


def wd_multipliers(params, optim) -> dict:
  def multiplier(path, leaf):
    if not optim.decay_1d and leaf.ndim <= 1:
      return 0.0
    return first_match(optim.wd_mults, path_str(path))
  return jax.tree_util.tree_map_with_path(multiplier, params)


def scale_by_multipliers(multipliers_fn) -> optax.GradientTransformation:
  """Multiply each update by its parameter's multiplier (after the lr: the whole AdamW step,
  decay included, as MAE's per-group lr scale)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers_fn(updates)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def lars(learning_rate, *, momentum: float, trust_coefficient: float, weight_decay: float,
         decay_mask) -> optax.GradientTransformation:
  """LARS as facebookresearch/mae util/lars.py (the linear probe's optimizer).

  For a parameter p with more than one dimension: d = g + wd * p, then d *= trust * ||p|| / ||d||
  (1 where either norm is 0). 1-D parameters skip the adaptation. Then mu = momentum * mu + d and
  p -= lr * mu: the learning rate scales the momentum buffer at each step, so a schedule acts
  immediately (optax.lars scales before the momentum trace, which differs while the learning
  rate changes, e.g. during warmup).
  """
  is_matrix = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), is_matrix),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


def flat_adamw(schedule, optim, decay_mask) -> optax.GradientTransformation:
  """optax.adamw with `decay_mask`, as two updates over flat vectors: the decayed parameters
  concatenated (optax.flatten), and the others. The same arithmetic per element as the update
  of each leaf; what changes is the kernels: XLA makes a few over two long vectors instead of
  several per parameter leaf. The optimizer state is flat too, so checkpoints of the two forms
  do not load into each other."""
  adam = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps)
  return optax.multi_transform(
      {"decay": optax.flatten(optax.adamw(schedule, weight_decay=optim.weight_decay, **adam)),
       "no_decay": optax.flatten(optax.adam(schedule, **adam))},
      lambda params: jax.tree.map(lambda decayed: "decay" if decayed else "no_decay",
                                  decay_mask(params)))


def make_optimizer(config, steps_per_epoch: int):
  """(optax transformation, schedule) of `config.optim`; schedules count optimizer steps."""
  schedule = make_schedule(config, steps_per_epoch)
  return optimizer(config.optim, schedule), schedule


def optimizer(optim, schedule) -> optax.GradientTransformation:
  def decay_mask(params):  # weight-decay multipliers are 0 or 1 (checked below)
    return jax.tree.map(lambda m: m > 0, wd_multipliers(params, optim))

  if any(value not in (0, 1) for _, value in optim.wd_mults):
    raise ValueError(f"config optim.wd_mults: {optim.wd_mults} (multipliers other than 0 and 1 "
                     f"are not supported: use optim.weight_decay and lr_mults)")
  if optim.name == "adamw" and optim.get("flatten", False):
    core = flat_adamw(schedule, optim, decay_mask)
  elif optim.name == "adamw":
    core = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  else:
    core = lars(schedule, momentum=optim.momentum, trust_coefficient=optim.trust_coefficient,
                weight_decay=optim.weight_decay, decay_mask=decay_mask)
  parts = [optax.clip_by_global_norm(optim.clip_grad_norm)] if optim.clip_grad_norm else []
  parts.append(core)
  scaled = optim.layer_decay < 1 or any(value not in (0, 1) for _, value in optim.lr_mults)
  if scaled:
    parts.append(scale_by_multipliers(lambda tree: lr_multipliers(tree, optim)))
  tx = optax.chain(*parts) if len(parts) > 1 else core
  if not any(value == 0 for _, value in optim.lr_mults):
    return tx
  labels = lambda params: jax.tree.map(lambda m: "frozen" if m == 0 else "train",
                                       lr_multipliers(params, optim))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
