"""Learning-rate schedule and optimizer (MAE recipe: AdamW with masked weight decay)."""
import math
import re

import jax
import jax.numpy as jnp
import optax

from sjmae_jax.sharding import path_str


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


def decay_mask(params):
  """MAE's rule: no weight decay on 1-D parameters (biases, norms); everything else decays."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def frozen_labels(params, frozen_patterns):
  patterns = [re.compile(p) for p in frozen_patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if any(p.fullmatch(path_str(path)) for p in patterns) else "train",
      params)


def make_optimizer(config, steps_per_epoch: int):
  """Returns (optax transformation, schedule). Schedules count optimizer steps."""
  total = config.epochs * steps_per_epoch
  schedule = warmup_cosine(base_learning_rate(config), config.warmup_epochs * steps_per_epoch,
                           total, config.get("min_lr", 0.0))
  opt = config.optim
  adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.get("eps", 1e-8),
                      weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.get("clip_grad_norm"):
    adamw = optax.chain(optax.clip_by_global_norm(opt.clip_grad_norm), adamw)
  frozen = tuple(opt.get("frozen_params", ()))
  if frozen:
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, frozen))
  else:
    tx = adamw
  return tx, schedule
