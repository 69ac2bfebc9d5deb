"""Pretraining: train state, the jitted update step, and the loop.

The loop reads top to bottom: checks (config, workdir, existing checkpoints) -> mesh -> data ->
model -> eval_shape -> shardings -> (first write to the workdir) -> jitted update -> loop with
logging, pictures, checkpoints. Every objective trains through this one loop.

What survives what (README "What survives what"): a kill at any moment loses at most the steps
since the last complete checkpoint (Orbax writes a step to a tmp directory and renames it when
complete); SIGTERM stops after the current step with a checkpoint; a non-finite loss stops
before anything is saved from the bad state ('stop') or drops that update ('skip').
"""
import collections
import functools
import json
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
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
  kernel_cast_dtype(config)  # a bad model.cast_params_once fails here, before compiling
  return objectives.build(config, dtype=DTYPES[config.compute_dtype])


def kernel_cast_dtype(config):
  """The dtype that the step casts the matmul kernels to once (model.cast_params_once), or None
  (each layer casts its kernel where it uses it)."""
  once = config.model.get("cast_params_once", False)
  if not isinstance(once, bool):
    raise ValueError(f"config model.cast_params_once: {once!r} is not True or False")
  dtype = DTYPES[config.compute_dtype]
  return dtype if once and dtype != jnp.float32 else None


def cast_kernels(params, dtype):
  """Every floating leaf named 'kernel' (the Dense / Conv weights, which the layers cast to the
  compute dtype where they use them) in `dtype`; the other leaves as they are."""
  def cast(path, leaf):
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return leaf.astype(dtype) if getattr(path[-1], "key", None) == "kernel" and floating else leaf
  return jax.tree_util.tree_map_with_path(cast, params)


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
          "batch_stats": variables.get("batch_stats", {}), "rng": train_rng,
          "nonfinite_steps": jnp.zeros((), jnp.int32)}


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


def make_train_step(model, tx, schedule, mesh, grad_accum_steps: int = 1, *,
                    skip_nonfinite: bool = False, poison_step: int = 0, finish_batch=None,
                    kernel_dtype=None):
  """Pure update: (state, global batch) -> (new state, scalar metrics).

  With grad_accum_steps = n the batch is split into n strided micro-batches (micro-batch i gets
  rng fold_in(step rng, i)); gradients, loss and metrics are averaged over them and BatchNorm
  statistics are threaded through them in order.

  A step whose loss or gradient norm is not finite increments state['nonfinite_steps'] (also
  returned as a metric, so the host never has to sync just to look); with `skip_nonfinite` its
  update is dropped (params, optimizer state and BatchNorm statistics stay as they were; the step
  counter still advances, the batch is consumed). `poison_step` (a test hook) multiplies the
  images of that step (1-based, as logged) by NaN. With `finish_batch` (data.augment_on_device)
  the step receives pre-batches (uint8 images, crop boxes, random draws) and computes the views
  itself, on the accelerator. With `kernel_dtype` (model.cast_params_once, `kernel_cast_dtype`)
  the matmul kernels are cast to it once per step, before any micro-batch split, instead of at
  each use; their gradients are cast back to float32 per micro-batch.
  """
  grad_fn = make_grad_fn(model)

  def train_step(state, batch):
    if finish_batch is not None:
      batch = finish_batch(batch)
    if poison_step:
      poison = jnp.where(state["step"] + 1 == poison_step, jnp.nan, 1.0)
      batch = dict(batch, images=batch["images"] * poison)
    rng = jax.random.fold_in(state["rng"], state["step"])
    params = state["params"]
    compute_params, gradients = params, grad_fn
    if kernel_dtype is not None:
      compute_params = cast_kernels(params, kernel_dtype)

      def gradients(*args):
        out, grads = grad_fn(*args)
        return out, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if grad_accum_steps == 1:
      (loss, (metrics, batch_stats)), grads = gradients(compute_params, state["batch_stats"],
                                                        batch, rng)
    else:
      micro = microbatches(batch, grad_accum_steps, mesh)

      def accumulate(carry, inputs):
        batch_stats, sums = carry
        index, micro_batch = inputs
        (loss, (metrics, batch_stats)), grads = gradients(
            compute_params, batch_stats, micro_batch, jax.random.fold_in(rng, index))
        sums = jax.tree.map(jnp.add, sums, (loss, metrics, grads))
        return (batch_stats, sums), None

      first = jax.tree.map(lambda x: x[0], micro)
      shapes = jax.eval_shape(gradients, compute_params, state["batch_stats"], first, rng)
      (loss_s, (metrics_s, _)), grads_s = shapes
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
      (batch_stats, sums), _ = jax.lax.scan(
          accumulate, (state["batch_stats"], zeros), (jnp.arange(grad_accum_steps), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps, sums)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    updated = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "batch_stats": batch_stats}
    if skip_nonfinite:
      updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             {key: state[key] for key in updated})
    nonfinite_steps = state["nonfinite_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32)
    new_state = dict(state, step=state["step"] + 1, nonfinite_steps=nonfinite_steps, **updated)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   nonfinite_steps=nonfinite_steps)
    return new_state, metrics

  return train_step


def make_pictures_fn(model, num_images: int = 8, finish_batch=None):
  def pictures(state, batch):
    small = jax.tree.map(lambda x: x[:num_images], batch)
    if finish_batch is not None:
      small = finish_batch(small)
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


class NonFiniteLossError(RuntimeError):
  """Training stopped at a non-finite loss (config nonfinite='stop'); one-line message."""


class PreemptionNotice:
  """SIGTERM (the preemption notice of TPU VMs, SLURM, Kubernetes) -> stop at a step that every
  process agrees on.

  Several processes: JAX's preemption service (started by jax.distributed.initialize) catches
  SIGTERM on any process and makes `reached_preemption_sync_point` true at the same step on all
  of them. One process: a Python handler sets a flag that the loop reads after each step.
  """

  def __init__(self, start_step: int):
    self.received = False
    self._previous_handler = None
    self.mode = "jax" if jax.process_count() > 1 else "signal"
    if self.mode == "jax":
      try:  # registers the step the count starts from, as early as possible
        multihost_utils.reached_preemption_sync_point(start_step)
      except RuntimeError:  # jax_enable_preemption_service is off
        logging.warning("JAX preemption service off: SIGTERM kills the run; it resumes from the "
                        "last checkpoint")
        self.mode = "off"
    elif threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = True

  def reached(self, step: int) -> bool:
    """True at the step to stop at; call after every step, on every process."""
    if self.mode == "jax":
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


class NonFiniteWatch:
  """Finds non-finite steps without a host sync per step.

  The jitted step counts them in state['nonfinite_steps'], also a metric. The host reads that
  count only when it fetches metrics anyway (every log_every_steps) and, under the 'stop' policy,
  before each save, so a checkpoint is never written from a poisoned state. The metrics of the
  steps since the last look stay on device so that the first bad step can be named.
  """

  def __init__(self, count: int):
    self.count = count  # non-finite steps seen up to the last look
    self.unseen = []    # [(step, device metrics)] since the last look

  def record(self, step: int, metrics) -> None:
    self.unseen.append((step, metrics))

  def look(self, step: int, count: int) -> list:
    """[(step, host metrics)] of the non-finite steps up to `step`, whose count is `count`."""
    seen = [entry for entry in self.unseen if entry[0] <= step]
    self.unseen = [entry for entry in self.unseen if entry[0] > step]
    if count == self.count:
      return []
    bad, previous = [], self.count
    for seen_step, metrics in jax.device_get(seen):
      if int(metrics["nonfinite_steps"]) > previous:
        bad.append((seen_step, metrics))
      previous = int(metrics["nonfinite_steps"])
    self.count = count
    return bad


def loss_terms(metrics) -> str:
  names = sorted(k for k in metrics if k == "loss" or k.startswith("loss/")) + ["grad_norm"]
  return ", ".join(f"{name} {float(metrics[name]):.4g}" for name in names if name in metrics)


def resume_step(workdir, config) -> int:
  """The step of the workdir's latest complete checkpoint (0: none), once checked to hold this
  config's model. Reads only."""
  found = checkpointing.Checkpointer(workdir, read_only=True)
  step = found.latest_step() or 0
  if step:
    checkpointing.check_compatible(found, step, abstract_train_state(config), workdir, config)
  found.close()
  return step


def train_and_evaluate(config, workdir: str) -> dict:
  """Pretrain according to `config` in `workdir`, resuming from its latest checkpoint.

  Everything that can be checked (config values, workdir writable, existing checkpoints of the
  same model, data readable) is checked before anything is compiled or written.
  """
  config_lib.validate(config, num_devices=jax.device_count())
  workdir = epath.Path(workdir)
  checkpointing.check_writable(workdir)
  if config.init_from and not epath.Path(config.init_from).exists():
    raise FileNotFoundError(f"config init_from: {config.init_from} does not exist")
  start_step = resume_step(workdir, config)
  preemption = PreemptionNotice(start_step)
  try:
    return train_from(config, workdir, start_step, preemption)
  finally:
    preemption.close()


def train_from(config, workdir, start_step: int, preemption: PreemptionNotice) -> dict:
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
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

  checkpointing.write_config(workdir, config)  # the first write to the workdir
  checkpointer = checkpointing.Checkpointer(  # deletes what killed saves left behind
      workdir, max_to_keep=config.checkpoint.keep, save_every_steps=config.checkpoint.every_steps,
      async_save=config.checkpoint.async_save)
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
  finish_batch = train_data.finish_batch if train_data.augment_on_device else None
  step_fn = make_train_step(model, tx, schedule, mesh, config.grad_accum_steps,
                            skip_nonfinite=config.nonfinite == "skip",
                            poison_step=config.debug.poison_step, finish_batch=finish_batch,
                            kernel_dtype=kernel_cast_dtype(config))
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=(0,))
  pictures_fn = jax.jit(make_pictures_fn(model, finish_batch=finish_batch),
                        out_shardings=sharding.replicated(mesh))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  monitors = evaluation.build_monitors(config, model, mesh)
  monitor_metrics = {}
  nonfinite = NonFiniteWatch(int(jax.device_get(state["nonfinite_steps"])))

  def look_for_nonfinite(step, count):
    bad = nonfinite.look(step, count)
    if bad and config.nonfinite == "stop":
      bad_step, metrics = bad[0]
      checkpointer.wait()  # a save in flight is of an earlier, good state
      latest = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss at step {bad_step}: {loss_terms(metrics)}; stopped without saving "
          f"(last checkpoint: {f'step {latest}' if latest else 'none'} in "
          f"{checkpointer.directory}); --config.nonfinite=skip drops such steps instead")
    if bad and is_main:
      print(f"step {bad[0][0]}: non-finite loss ({loss_terms(bad[0][1])}); skipped update(s) of "
            f"step(s) {', '.join(str(s) for s, _ in bad)}; {count} skipped so far", flush=True)

  def fetch_metrics(step, metrics):
    scalars = write_metrics(writer, step, metrics)
    if is_main:
      print(f"step {step}: loss {scalars['loss']:.4f}", flush=True)
    look_for_nonfinite(step, int(scalars["nonfinite_steps"]))
    return scalars

  print(f"Training {config.method} for {total_steps} steps ({config.epochs} epochs x "
        f"{steps_per_epoch}) from step {start_step}; checkpoints: {checkpointer.directory}; "
        f"TensorBoard: {workdir / 'tensorboard'}", flush=True)
  last_metrics, pending = {}, None
  started = time.time()
  batches = device_prefetch(iter(train_data), mesh)
  step = start_step
  preempted = False
  try:
    while step < stop_step:
      batch = next(batches)
      state, metrics = train_step(state, batch)
      step += 1
      nonfinite.record(step, metrics)
      report(step)
      if pending is not None:  # fetch the previous step's metrics after dispatching this one
        last_metrics = fetch_metrics(*pending)
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
      preempted = preemption.reached(step)
      if preempted or step == stop_step or checkpointer.should_save(step):
        if config.nonfinite == "stop":  # never save a poisoned state (one fetch, at saves only)
          look_for_nonfinite(step, int(jax.device_get(state["nonfinite_steps"])))
        checkpointer.save(step, state, force=True)
      if preempted:
        break
    if pending is not None:
      last_metrics = fetch_metrics(*pending)
    checkpointer.wait()
  except BaseException:
    close_quietly(checkpointer)  # lets a save of an earlier, good state finish
    raise
  checkpointer.close()
  writer.flush()

  summary = {"step": step, "total_steps": total_steps, "wall_seconds": round(time.time() - started, 2),
             **{k: float(v) for k, v in last_metrics.items()}, **monitor_metrics}
  if preempted:
    print(f"Preempted (SIGTERM) at step {step}: checkpoint saved in {checkpointer.directory}; "
          f"run the same command to resume", flush=True)
    return dict(summary, preempted=True)
  if is_main:
    checkpointing.write_text_atomically(workdir / "summary.json",
                                        json.dumps(summary, indent=2, sort_keys=True))
    print(f"Done at step {step}: loss {summary.get('loss', float('nan')):.4f}; "
          f"checkpoints: {checkpointer.directory}; TensorBoard logs: {workdir / 'tensorboard'}; "
          f"summary: {workdir / 'summary.json'}", flush=True)
  return summary


def close_quietly(checkpointer) -> None:
  """Waits for in-flight saves while another error is on its way out; logs a second error."""
  try:
    checkpointer.close()
  except Exception as e:  # the error being raised matters more
    logging.error("While stopping: %s", e)


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
