"""Pretraining: train state, the jitted update step, and the loop.

The loop reads top to bottom: mesh -> data -> model -> eval_shape -> shardings -> jitted update
-> loop with logging, pictures, checkpoints. Every objective trains through this one loop.
"""
import collections
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from sjmae_jax import checkpointing, config_lib, data, evaluation, objectives, optim, sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def build_model(config):
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"config compute_dtype: {config.compute_dtype!r} is not one of {sorted(DTYPES)}")
  return objectives.build(config, dtype=DTYPES[config.compute_dtype])


def sample_batch(config, batch_size: int = 2) -> dict:
  img, chans = config.model.img_size, config.model.get("in_chans", 3)
  return {"images": jnp.zeros((batch_size, len(config.data.views), img, img, chans), jnp.float32),
          "label": jnp.zeros((batch_size,), jnp.int32)}


def init_state(model, tx, config, rng) -> dict:
  params_rng, masking_rng, dropout_rng, train_rng = jax.random.split(rng, 4)
  variables = model.init({"params": params_rng, "masking": masking_rng, "dropout": dropout_rng},
                         sample_batch(config), train=True)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "batch_stats": variables.get("batch_stats", {}), "rng": train_rng}


def abstract_train_state(config):
  """Shapes/dtypes of the train state (no computation, no devices needed)."""
  model = build_model(config)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  return jax.eval_shape(functools.partial(init_state, model, tx, config), jax.random.PRNGKey(0))


def microbatches(batch, num: int, mesh):
  """(B, ...) -> (num, B/num, ...) taking rows strided, so each micro-batch spans every device."""
  spec = NamedSharding(mesh, P(None, sharding.DATA_AXES))

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(split, batch)


def make_grad_fn(model):
  """(params, batch_stats, batch, rng) -> ((loss, (metrics, new batch_stats)), grads)."""
  def loss_fn(params, batch_stats, batch, rng):
    masking_rng, dropout_rng = jax.random.split(rng)
    (loss, metrics), updated = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch, train=True,
        rngs={"masking": masking_rng, "dropout": dropout_rng}, mutable=["batch_stats"])
    return loss, (metrics, updated.get("batch_stats", batch_stats))
  return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(model, tx, schedule, mesh, grad_accum_steps: int = 1):
  """Pure update: (state, global batch) -> (new state, scalar metrics).

  With grad_accum_steps = n the batch is split into n strided micro-batches (micro-batch i gets
  rng fold_in(step rng, i)); gradients, loss and metrics are averaged over them and BatchNorm
  statistics are threaded through them in order.
  """
  grad_fn = make_grad_fn(model)

  def train_step(state, batch):
    rng = jax.random.fold_in(state["rng"], state["step"])
    params = state["params"]
    if grad_accum_steps == 1:
      (loss, (metrics, batch_stats)), grads = grad_fn(params, state["batch_stats"], batch, rng)
    else:
      micro = microbatches(batch, grad_accum_steps, mesh)

      def accumulate(carry, inputs):
        batch_stats, sums = carry
        index, micro_batch = inputs
        (loss, (metrics, batch_stats)), grads = grad_fn(
            params, batch_stats, micro_batch, jax.random.fold_in(rng, index))
        sums = jax.tree.map(jnp.add, sums, (loss, metrics, grads))
        return (batch_stats, sums), None

      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(grad_fn, params, state["batch_stats"], first, rng)
      (loss_s, (metrics_s, _)), grads_s = shapes
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
      (batch_stats, sums), _ = jax.lax.scan(
          accumulate, (state["batch_stats"], zeros), (jnp.arange(grad_accum_steps), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, sums)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(state, step=state["step"] + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state, batch_stats=batch_stats)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=schedule(state["step"]))
    return new_state, metrics

  return train_step


def make_pictures_fn(model, num_images: int = 8):
  def pictures(state, batch):
    small = jax.tree.map(lambda x: x[:num_images], batch)
    rng = jax.random.fold_in(state["rng"], 2 ** 31 - 1)  # fixed, apart from step rngs
    return model.apply({"params": state["params"], "batch_stats": state["batch_stats"]}, small,
                       method="pictures", rngs={"masking": rng, "dropout": rng})
  return pictures


def device_prefetch(host_batches, mesh, depth: int = 2):
  """Global device batches, `depth` ahead of the consumer (transfers overlap the step)."""
  queue = collections.deque()
  for local in host_batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) >= depth:
      yield queue.popleft()


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrain according to `config` in `workdir`, resuming from its latest checkpoint."""
  config_lib.validate(config)
  workdir = epath.Path(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  if config.batch_size % (config.grad_accum_steps * mesh.size):
    raise ValueError(f"config batch_size: {config.batch_size} is not divisible by grad_accum_steps "
                     f"({config.grad_accum_steps}) x devices ({mesh.size})")

  checkpointer = checkpointing.Checkpointer(
      workdir, max_to_keep=config.checkpoint.keep, save_every_steps=config.checkpoint.every_steps,
      async_save=config.checkpoint.async_save)
  start_step = checkpointer.latest_step() or 0
  checkpointing.write_config(workdir, config)

  train_data = data.build_train_pipeline(config.data, global_batch_size=config.batch_size,
                                         seed=config.seed, start_step=start_step)
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  stop_step = min(total_steps, config.stop_at_step or total_steps)

  model = build_model(config)
  tx, schedule = optim.make_optimizer(config, steps_per_epoch)
  init_fn = functools.partial(init_state, model, tx, config)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_shardings = sharding.tree_shardings(abstract_state, mesh, config.sharding.rules,
                                            config.sharding.min_size)
  if start_step:
    logging.info("Resuming from checkpoint at step %d", start_step)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        state_shardings)
    state = checkpointer.restore(start_step, abstract_state)
  else:
    state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
    if config.init_from:
      state = initialise_encoder_from(state, config, state_shardings)

  writer = metric_writers.create_default_writer(workdir / "tensorboard", just_logging=not is_main)
  if is_main:
    parameter_overview.log_parameter_overview(state["params"])
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str))})

  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(model, tx, schedule, mesh, config.grad_accum_steps),
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  pictures_fn = jax.jit(make_pictures_fn(model), out_shardings=sharding.replicated(mesh))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  monitors = evaluation.build_monitors(config, model, mesh)
  monitor_metrics = {}

  print(f"Training {config.method} for {total_steps} steps ({config.epochs} epochs x "
        f"{steps_per_epoch}) from step {start_step}; checkpoints: {checkpointer.directory}; "
        f"TensorBoard: {workdir / 'tensorboard'}", flush=True)
  last_metrics, pending = {}, None
  started = time.time()
  batches = device_prefetch(iter(train_data), mesh)
  step = start_step
  while step < stop_step:
    batch = next(batches)
    state, metrics = train_step(state, batch)
    step += 1
    report(step)
    if pending is not None:  # fetch the previous step's metrics after dispatching this one
      last_metrics = write_metrics(writer, *pending)
      pending = None
    if step % config.log_every_steps == 0 or step == stop_step:
      pending = (step, metrics)
    if config.picture_every_steps and (step % config.picture_every_steps == 0 or step == stop_step):
      pictures = jax.device_get(pictures_fn(state, batch))
      writer.write_images(step, {k: np.asarray(v, np.float32) for k, v in pictures.items()})
    for monitor in monitors:
      if step % monitor.every_steps == 0 or step == stop_step:
        results = monitor(state)
        writer.write_scalars(step, results)
        monitor_metrics.update(results)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
    checkpointer.save(step, state, force=step == stop_step)
  if pending is not None:
    last_metrics = write_metrics(writer, *pending)

  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  summary = {"step": step, "total_steps": total_steps, "wall_seconds": round(time.time() - started, 2),
             **{k: float(v) for k, v in last_metrics.items()}, **monitor_metrics}
  if is_main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"Done at step {step}: loss {summary.get('loss', float('nan')):.4f}; "
          f"checkpoints: {checkpointer.directory}; TensorBoard logs: {workdir / 'tensorboard'}; "
          f"summary: {workdir / 'summary.json'}", flush=True)
  return summary


def write_metrics(writer, step: int, metrics) -> dict:
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  writer.write_scalars(step, scalars)
  return scalars


def initialise_encoder_from(state, config, state_shardings):
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
