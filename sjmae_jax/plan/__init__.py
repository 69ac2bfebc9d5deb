"""Per-device memory of a training run on a (data, fsdp) mesh, computed without any device.

  python -m sjmae_jax.plan --config mae:model=vit_large,data=imagenet2012 \\
      --devices 32 --config.mesh.data=8 --config.mesh.fsdp=4 [--device_memory_gib 32]

It takes train.py's --config and --config.key=value flags, so a planned run is started by the
same command line with `python train.py ... --workdir DIR` in place of `--devices N`. It runs on
the host CPU only (it never opens an accelerator, so it can run on a TPU VM while a training run
holds the chips) and nothing is compiled: everything is traced on abstract arrays.

Counted per device:
  params, optimizer state, batch_stats/step/rng: exact. The train state's shapes come from
    jax.eval_shape (train_state.abstract_train_state) and each array is cut by the
    PartitionSpec that train.py gives it (sharding.partition_specs, the same rules): a dimension
    sharded over fsdp is divided by the fsdp size, the rest is replicated.
  gradients: a params-sized tree sharded like the params, plus the accumulator when
    grad_accum_steps > 1.
  activations: what jax.vjp of the training loss keeps for the backward pass (its residuals),
    read off the traced forward pass (jax.make_jaxpr) at batch 1 and 2: the per-example part
    times the per-device micro-batch b = batch_size / grad_accum_steps / devices. This follows
    the config exactly: compute_dtype, model.remat (only each block's input is kept), the method,
    masking ratios, attention_impl.
  weight copies kept for backward: the batch-independent residuals (the bfloat16 copies of the
    weights with compute_dtype=bfloat16; ~0 in float32), taken as sharded like the params.
XLA adds temporaries during the backward pass (on CPU, ViT-B MAE compiled to ~1.2x residuals +
gradients): keep 20-30% of the device's memory free.
"""
import dataclasses
import math
import os

import jax
import numpy as np
from jax.extend import core as jax_core

from sjmae_jax import objectives, sharding, train_state
from sjmae_jax.models.sizes import SIZES
from sjmae_jax.models.vit import vit_kwargs

GIB = 2 ** 30


@dataclasses.dataclass
class Plan:
  title: str
  data: int
  fsdp: int
  micro_batch: int           # examples per device per micro-step
  num_params: int
  full_bytes: dict           # params / opt_state / other, unsharded
  per_device_bytes: dict     # params / opt_state / other / gradients / weight_copies / activations

  @property
  def num_devices(self) -> int:
    return self.data * self.fsdp

  @property
  def total_per_device(self) -> int:
    return sum(self.per_device_bytes.values())


def nbytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def shard_bytes(leaf, spec, fsdp_size: int) -> int:
  """Bytes of one device's shard of `leaf` under PartitionSpec `spec` on a fsdp axis of fsdp_size."""
  axes = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
  shard_shape = [dim // fsdp_size if axis == "fsdp" else dim for dim, axis in zip(leaf.shape, axes)]
  return math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize


def state_bytes(abstract_state, fsdp_size: int, rules, min_size: int) -> dict:
  """Per-device bytes of the train state's parts: {'params', 'opt_state', 'other'}."""
  specs = sharding.partition_specs(abstract_state, fsdp_size, rules, min_size)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  totals = {"params": 0, "opt_state": 0, "other": 0}
  for name, part in abstract_state.items():
    part_specs = jax.tree.leaves(specs[name], is_leaf=is_spec)
    key = name if name in totals else "other"
    totals[key] += sum(shard_bytes(leaf, spec, fsdp_size)
                       for leaf, spec in zip(jax.tree.leaves(part), part_specs))
  return totals


def residual_bytes(config, model, abstract_state, batch_size: int) -> int:
  """Bytes of the intermediates that jax.vjp of the loss keeps for the backward pass, for a batch
  of `batch_size` (traced, not computed). Inputs (the train state, the batch) and constants are
  not counted."""
  def loss(params, batch_stats, batch, rng):  # the loss_fn of train_state.make_loss_fn
    (value, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, batch, train=True,
                                rngs=objectives.step_rngs(model, rng), mutable=["batch_stats"])
    return value

  def forward(params, batch_stats, batch, rng):
    return jax.vjp(lambda p: loss(p, batch_stats, batch, rng), params)

  batch = jax.eval_shape(lambda: train_state.sample_batch(config, batch_size))
  closed, shapes = jax.make_jaxpr(forward, return_shape=True)(
      abstract_state["params"], abstract_state["batch_stats"], batch, abstract_state["rng"])
  jaxpr = closed.jaxpr
  num_residuals = len(jax.tree.leaves(shapes[1]))  # the vjp function's leaves are its residuals
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  residuals = {v for v in jaxpr.outvars[len(jaxpr.outvars) - num_residuals:]
               if not isinstance(v, jax_core.Literal) and v not in inputs}
  return sum(nbytes(v.aval) for v in residuals)


def model_title(config) -> str:
  encoder = vit_kwargs(config.model)
  variant = config.model.get("variant", "base")
  name = (f"ViT-{SIZES[variant].letter}" if variant in SIZES
          else f"ViT-{encoder['embed_dim']}x{encoder['depth']}")
  return (f"{config.method} {name}/{encoder['patch_size']} (img {encoder['img_size']}), "
          f"global batch {config.batch_size}, grad_accum {config.grad_accum_steps}, "
          f"compute {config.compute_dtype}, remat {bool(config.model.get('remat', False))}")


def make_plan(config, num_devices: int) -> Plan:
  if "mesh" not in config or "grad_accum_steps" not in config:
    raise ValueError("config: not a train.py pretraining config (it has no mesh or "
                     "grad_accum_steps); the plan sizes train.py runs")
  data, fsdp = sharding.mesh_shape(config.mesh, num_devices)
  per_step = config.grad_accum_steps * num_devices
  if config.batch_size % per_step:
    raise ValueError(f"config batch_size: {config.batch_size} is not divisible by grad_accum_steps "
                     f"({config.grad_accum_steps}) x devices ({num_devices})")
  micro_batch = config.batch_size // per_step
  model = train_state.build_model(config)
  abstract_state = train_state.abstract_train_state(config)
  rules, min_size = config.sharding.rules, config.sharding.min_size
  full = state_bytes(abstract_state, 1, rules, min_size)
  per_device = state_bytes(abstract_state, fsdp, rules, min_size)
  per_device["gradients"] = (2 if config.grad_accum_steps > 1 else 1) * per_device["params"]
  one, two = (residual_bytes(config, model, abstract_state, n) for n in (1, 2))
  per_device["weight_copies"] = max(2 * one - two, 0) // fsdp
  per_device["activations"] = (two - one) * micro_batch
  num_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_state["params"]))
  return Plan(model_title(config), data, fsdp, micro_batch, num_params, full, per_device)


def device_memory_bytes(device) -> int | None:
  """What one device can hold: the allocator's limit on accelerators; on the host CPU, physical
  memory shared by the process's CPU devices. None when unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # not implemented on some backends  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
    return total // max(len(jax.local_devices(backend="cpu")), 1)
  return None


def format_plan(plan: Plan, device_memory_gib: float = 0.0) -> str:
  gib = lambda n: f"{n / GIB:9.2f} GiB"
  row = lambda label, whole, device: f"  {label:<36}{whole:>14}{device:>14}"
  full, dev = plan.full_bytes, plan.per_device_bytes
  lines = [
      plan.title,
      f"mesh data={plan.data} x fsdp={plan.fsdp} ({plan.num_devices} devices), "
      f"{plan.micro_batch} examples per device per micro-step",
      row("", "whole model", "per device"),
      row(f"params ({plan.num_params / 1e6:.1f} M)", gib(full["params"]), gib(dev["params"])),
      row("optimizer state", gib(full["opt_state"]), gib(dev["opt_state"])),
      row("batch_stats, step, rng", gib(full["other"]), gib(dev["other"])),
      row("gradients", "", gib(dev["gradients"])),
      row("weight copies kept for backward", "", gib(dev["weight_copies"])),
      row("activations kept for backward", "", gib(dev["activations"])),
      row("total (add 20-30% for XLA temporaries)", "", gib(plan.total_per_device)),
  ]
  if device_memory_gib:
    left = device_memory_gib - plan.total_per_device / GIB
    verdict = f"fits, {left:.1f} GiB left" if left >= 0 else f"does NOT fit, {-left:.1f} GiB over"
    lines.append(f"  device memory {device_memory_gib:g} GiB: {verdict}")
  return "\n".join(lines)
