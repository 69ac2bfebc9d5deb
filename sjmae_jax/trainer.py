"""Pretraining: any objective (`config.method`) on the engine's loop (sjmae_jax/engine.py).

`train_and_evaluate(config, workdir)` checks everything that can be checked (config values, the
objective's own config block, the workdir, existing checkpoints of the same model, the data,
memory) before anything is compiled or written, then hands the engine its Task: the objective's
loss, the optimizer policy, the monitors of `config.monitors`, the objective's pictures.
"""
import os
import sys

import jax
import jax.numpy as jnp
from etils import epath

from sjmae_jax import (checkpointing, config_lib, data, engine, evaluation, objectives, optim,
                       paths, plan, sharding)
from sjmae_jax.engine import NonFiniteLossError, PreemptionNotice  # noqa: F401 (the programs' API)
from sjmae_jax.train_state import (DTYPES, abstract_train_state, build_model,  # noqa: F401
                                   init_state, kernel_cast_dtype, make_loss_fn, make_train_step,
                                   model_state, pictures_fn, sample_batch)


def initialize_distributed(dist_config) -> None:
  """jax.distributed.initialize() for multi-host runs; must run before anything touches devices."""
  if not dist_config.enabled:
    return
  if dist_config.cpu_collectives:  # only affects CPU devices (tests, CPU clusters)
    jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
  kwargs = {}
  if dist_config.coordinator_address:
    kwargs = dict(coordinator_address=dist_config.coordinator_address,
                  num_processes=dist_config.num_processes, process_id=dist_config.process_id)
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrain according to `config` in `workdir`, resuming from its latest checkpoint; returns the
  summary. A run that is already complete is left as it is. Relative paths are taken from the
  current directory."""
  config = paths.with_absolute_paths(config)
  config_lib.validate(config, num_devices=jax.device_count())
  objectives.check(config)
  if config.init_from and not epath.Path(config.init_from).exists():
    raise FileNotFoundError(f"config init_from: {paths.shown(config.init_from)} does not exist")
  program = engine.Program(config, abstract_state=lambda: abstract_train_state(config),
                           build=lambda start_step: pretraining_task(config, start_step))
  return engine.run(program, workdir)


def pretraining_task(config, start_step: int) -> engine.Task:
  train_data = data.build_train_pipeline(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=start_step)
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  memory = check_memory(config, jax.device_count())
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  mesh = sharding.make_mesh(config.mesh)

  def features(state, images):  # CLS after the final norm
    tokens = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, images,
                         method="encode")
    return tokens[:, 0].astype(jnp.float32)

  def logits(state, images):
    return model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, images,
                       method="classify")

  monitors = evaluation.build_monitors(
      config, mesh, steps_per_epoch=steps_per_epoch, features_fn=features,
      logits_fn=logits if model.has_classifier else None)

  def describe(num_params, start):
    encoder = config.model
    width = f"{encoder.embed_dim}x{encoder.depth}" if encoder.get("embed_dim") else encoder.variant
    devices = jax.devices()
    return (f"{config.method} pretraining: ViT {width}/{encoder.patch_size} at "
            f"{encoder.img_size} px, {num_params / 1e6:.2f} M params, {config.compute_dtype}; "
            f"data {config.data.source} ({train_data.num_examples:,} train images)\n"
            f"{len(devices)} {devices[0].platform} device(s), global batch {config.batch_size}, "
            f"{total_steps} steps ({config.epochs} epoch{'' if config.epochs == 1 else 's'} x "
            f"{steps_per_epoch}), from step "
            f"{start}; {memory}")

  return engine.Task(
      config=config, train_data=train_data, total_steps=total_steps,
      init_state=lambda rng: model_state(model, config, rng), loss_fn=make_loss_fn(model),
      tx=tx, schedule=schedule, describe=describe, monitors=monitors,
      pictures_fn=pictures_fn(model, config.data), kernel_dtype=kernel_cast_dtype(config),
      after_init=(lambda state, shardings: initialize_encoder_from(state, config, shardings))
      if config.init_from else None,
      last_lines=lambda workdir, summary: [probe_hint(config, workdir)])


def probe_hint(config, workdir) -> str:
  shown = paths.shown(workdir)
  data_arg = config.get("arg", {}).get("data", "digits")
  data = "" if data_arg == "digits" else f":data={data_arg}"
  if os.path.basename(sys.argv[0]) == "train.py":  # in a clone, as the README runs it
    program = f"python eval_linprobe.py --config configs/linprobe.py{data}"
  else:  # the installed commands, from any folder
    program = f"sjmae-linprobe --config linprobe{data}"
  return f"  probe it:     {program} --workdir {shown}_probe --config.init_from={shown}"


def check_memory(config, num_devices: int) -> str:
  """Stops (one ValueError line) when sjmae_jax.plan's per-device estimate is over what a device
  has; otherwise returns 'est. X of Y GiB per device' for the first lines."""
  estimate = plan.make_plan(config, num_devices)
  capacity = plan.device_memory_bytes(jax.local_devices()[0])
  needed = estimate.total_per_device
  if capacity and needed > capacity:
    raise ValueError(
        f"this run needs about {needed / plan.GIB:.1f} GiB per device ({estimate.micro_batch} "
        f"examples per device per micro-step; python -m sjmae_jax.plan details it), "
        f"{jax.local_devices()[0].platform} devices here have {capacity / plan.GIB:.1f} GiB: lower "
        f"--config.batch_size ({config.batch_size}), raise --config.grad_accum_steps "
        f"({config.grad_accum_steps}) or --config.mesh.fsdp ({config.mesh.fsdp}), or set "
        f"--config.model.remat=True")
  if not capacity:
    return f"est. {needed / plan.GIB:.2f} GiB per device"
  return f"est. {needed / plan.GIB:.2f} of {capacity / plan.GIB:.1f} GiB per device"


def initialize_encoder_from(state, config, state_shardings):
  """Replace the encoder params with those of another workdir or an imported weights file.

  Every encoder parameter must be present with the same shape, except the final `norm`, which a
  global-pool (fc_norm) checkpoint does not have and which then keeps its fresh init.
  """
  from sjmae_jax import interop
  source = epath.Path(config.init_from)
  if source.is_dir():
    encoder = checkpointing.load_params(source)[0]["encoder"]
  else:
    encoder = interop.load_pretrained(str(source), img_size=config.model.img_size,
                                      patch_size=config.model.patch_size)["encoder"]
  try:
    merged = interop.merge_params({"encoder": state["params"]["encoder"]}, {"encoder": encoder},
                                  allow_missing=["encoder/norm"])
  except ValueError as e:
    raise ValueError(f"config init_from: {source}: {e}") from None
  params = dict(state["params"], encoder=merged["encoder"])
  return dict(state, params=jax.device_put(params, state_shardings["params"]))
