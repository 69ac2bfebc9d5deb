"""The training engine: the one loop of pretraining, fine-tuning and the linear probe.

A program (sjmae_jax/trainer.py: pretraining; sjmae_jax/evaluation/finetune.py and
linear_probe.py) says what to train, as a `Program`: its config, the shapes of its train state (checked against existing
checkpoints before anything else), and `build(start_step) -> Task`: data, model loss, optimizer,
monitors. The engine does everything else, the same way for all three:

  checks -> resume (checkpoint + data position) or init -> jitted step (gradient accumulation,
  views finished on the device, non-finite watch) -> loop with progress, metrics, pictures,
  monitors, best params, checkpoints -> summary.

What survives what (docs/reliability.md): a kill at any moment loses at most the steps since the
last complete checkpoint (Orbax writes a step to a tmp directory and renames it when complete);
SIGTERM and Ctrl-C stop after the current step with a checkpoint; a non-finite loss stops before
anything is saved from the bad state ('stop') or drops that update ('skip'). Rerunning a finished
run changes nothing.
"""
import collections
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from sjmae_jax import (checkpointing, config_lib, console, metric_writers, paths,
                       schedule_budget, sharding)


ABORTED_BY_CTRL_C = ("interrupted (Ctrl-C): stopped at once, without saving; the same command resumes "
                     "from the last complete checkpoint")


class NonFiniteLossError(RuntimeError):
  """Training stopped at a non-finite loss (config nonfinite='stop'); one-line message."""


@dataclasses.dataclass
class Task:
  """What a program trains, for `run`.

  init_state: rng -> {'params', 'batch_stats' ({} if none), 'rng' (the step rngs' root), and any
    entry of the program's own}; the engine adds 'step', 'opt_state' and 'nonfinite_steps'.
  loss_fn: (params, batch_stats, batch, rng) -> (loss, (scalar metrics, new batch_stats)), pure;
    `batch` is a finished global batch ({'images': (B, V, H, W, C), 'label', ...}).
  describe: (number of parameters, start step) -> the first lines of the run.
  """
  config: Any
  train_data: Any               # data.TrainPipeline positioned at the start step
  total_steps: int              # the schedule's length
  init_state: Callable
  loss_fn: Callable
  tx: optax.GradientTransformation
  schedule: Callable
  describe: Callable
  monitors: list = dataclasses.field(default_factory=list)
  pictures_fn: Callable | None = None    # (state, finished batch) -> {name: images in [0, 1]}
  after_update: Callable | None = None   # new state -> new state, in the step (an EMA)
  after_init: Callable | None = None     # (state, shardings) -> state, on a fresh start
  kernel_dtype: Any = None               # model.cast_params_once (trainer.kernel_cast_dtype)
  summary_file: str = "summary.json"
  keep_best: str = ""                    # a monitor metric to maximize: best params in WORKDIR/best
  finalize: Callable | None = None       # summary -> what summary_file holds
  last_lines: Callable | None = None     # (workdir, summary) -> lines printed at the end
  loss_takes_step: bool = False          # loss_fn(..., rng, step): the 0-based step, traced
  summary_extra: dict | None = None      # more entries of the summary (the time budget's choice)


@dataclasses.dataclass
class Program:
  """A training program: `abstract_state()` the whole train state's shapes (`abstract_train_state`;
  no data read) for the checkpoint check; `build(start_step)` the Task."""
  config: Any
  abstract_state: Callable
  build: Callable


def run(program: Program, workdir) -> dict:
  """Train `program` in `workdir` (relative: from the current directory), resuming from its latest
  checkpoint; returns the summary. A complete run is left as it is."""
  config = program.config
  workdir = epath.Path(paths.absolute(workdir))
  checkpointing.check_writable(workdir)
  start_step = resume_step(workdir, program.abstract_state(), config)
  chosen = schedule_budget.size_schedule(  # config.train_minutes
      config, workdir, start_step, lambda num_steps: measure_step_speed(program, num_steps))
  preemption = PreemptionNotice(start_step)
  try:
    task = program.build(start_step)
    task.summary_extra = chosen
    return _train(task, workdir, start_step, preemption)
  finally:
    preemption.close()


def resume_step(workdir, abstract_state, config) -> int:
  """The step of the workdir's latest complete checkpoint (0: none), once checked to hold arrays
  of `abstract_state`'s shapes. Reads only."""
  found = checkpointing.Checkpointer(workdir, read_only=True)
  step = found.latest_step() or 0
  if step:
    checkpointing.check_compatible(found, step, abstract_state, workdir, config)
  found.close()
  return step


def with_bookkeeping(state, tx) -> dict:
  """A program's fresh state plus the optimizer state and the counters."""
  return dict(state, step=jnp.zeros((), jnp.int32), opt_state=tx.init(state["params"]),
              nonfinite_steps=jnp.zeros((), jnp.int32))


def abstract_train_state(init_state, tx) -> dict:
  """Shapes of the whole train state of `init_state` (rng -> program state) and `tx`."""
  return jax.eval_shape(lambda rng: with_bookkeeping(init_state(rng), tx), jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# The step.


def microbatches(batch, num: int, mesh):
  """(B, ...) -> (num, B/num, ...) taking rows strided, so each micro-batch spans every device."""
  spec = NamedSharding(mesh, P(None, sharding.DATA_AXES))

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.tree.map(split, batch)


def cast_kernels(params, dtype):
  """Every floating leaf named 'kernel' (the Dense / Conv weights, which the layers cast to the
  compute dtype where they use them) in `dtype`; the other leaves as they are."""
  def cast(path, leaf):
    floating = jnp.issubdtype(leaf.dtype, jnp.floating)
    return leaf.astype(dtype) if getattr(path[-1], "key", None) == "kernel" and floating else leaf
  return jax.tree_util.tree_map_with_path(cast, params)


def make_train_step(loss_fn, tx, schedule, mesh, grad_accum_steps: int = 1, *,
                    skip_nonfinite: bool = False, poison_step: int = 0, finish_batch=None,
                    kernel_dtype=None, after_update=None, loss_takes_step=False):
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
  itself, on the accelerator. With `kernel_dtype` (model.cast_params_once) the matmul kernels are
  cast to it once per step, before any micro-batch split, instead of at each use; their
  gradients are cast back to float32 per micro-batch. With `loss_takes_step` the loss also gets
  the step (0-based, traced) as its last argument (a schedule inside the loss: mixup's end).
  """
  def train_step(state, batch):
    step_loss_fn = (functools.partial(loss_fn, step=state["step"]) if loss_takes_step
                    else loss_fn)
    grad_fn = jax.value_and_grad(step_loss_fn, has_aux=True)
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
    if after_update is not None:
      updated = after_update(dict(state, **updated))
      updated = {key: updated[key] for key in updated if key not in ("step", "nonfinite_steps")}
    if skip_nonfinite:
      updated = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                             {key: state[key] for key in updated})
    nonfinite_steps = state["nonfinite_steps"] + jnp.where(finite, 0, 1).astype(jnp.int32)
    new_state = dict(state, step=state["step"] + 1, nonfinite_steps=nonfinite_steps, **updated)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]),
                   nonfinite_steps=nonfinite_steps)
    return new_state, metrics

  return train_step


def jitted_train_step(task: "Task", mesh, state_shardings):
  """The task's step, jitted over the mesh: (state (donated), global batch) -> (state, metrics)."""
  config, train_data = task.config, task.train_data
  step_fn = make_train_step(
      task.loss_fn, task.tx, task.schedule, mesh, config.grad_accum_steps,
      skip_nonfinite=config.nonfinite == "skip", poison_step=config.debug.poison_step,
      finish_batch=train_data.finish_batch if train_data.augment_on_device else None,
      kernel_dtype=task.kernel_dtype, after_update=task.after_update,
      loss_takes_step=task.loss_takes_step)
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def device_prefetch(host_batches, mesh, depth: int = 2):
  """Global device batches, `depth` ahead of the consumer (transfers overlap the step)."""
  queue = collections.deque()
  for local in host_batches:
    queue.append(sharding.global_batch(local, mesh))
    if len(queue) >= depth:
      yield queue.popleft()


def state_layout(task: Task, mesh):
  """(init_fn, rng, abstract state, shardings) of the task's training state on `mesh`: what the
  run restores into or initializes, and what the step's state is sharded by."""
  config = task.config
  init_fn = lambda rng: with_bookkeeping(task.init_state(rng), task.tx)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init_fn, rng)
  return init_fn, rng, abstract_state, sharding.tree_shardings(
      abstract_state, mesh, config.sharding.rules, config.sharding.min_size)


def measure_step_speed(program: Program, num_steps: int) -> dict:
  """Seconds per step of the program's jitted step over `num_steps` steps, on a fresh state and
  the run's first batches, after the compiling step and the steps that read what the input
  pipeline prepared meanwhile (process 0's measure on every process); for time budgets
  (schedule_budget)."""
  config = program.config
  task = program.build(0)
  mesh = sharding.make_mesh(config.mesh)
  init_fn, rng, _, state_shardings = state_layout(task, mesh)
  state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
  train_step = jitted_train_step(task, mesh, state_shardings)
  batches = device_prefetch(iter(task.train_data), mesh)
  log_every = config_lib.every_steps(config, "log_every", batch_size=config.batch_size,
                                     steps_per_epoch=task.train_data.steps_per_epoch)
  # The input pipeline fills its buffers while the first step compiles: the steps that read
  # those batches are left out of the timing, which would otherwise miss the input's cost.
  warm_steps = 1 + int(config.data.get("prefetch", 2)) + 2  # + device_prefetch's depth
  started = None
  for step in range(1, warm_steps + num_steps + 1):
    state, metrics = train_step(state, next(batches))
    if step % log_every == 0:  # the loop's metric fetches
      jax.device_get(metrics)
    if step == warm_steps:
      jax.block_until_ready(metrics)
      started = time.time()
  jax.block_until_ready((state, metrics))
  seconds = (time.time() - started) / num_steps
  if jax.process_count() > 1:
    seconds = float(multihost_utils.broadcast_one_to_all(np.asarray(seconds, np.float64)))
  del state, metrics
  return {"seconds_per_step": round(seconds, 6), "calibration_steps": num_steps,
          "steps_per_epoch": int(task.train_data.steps_per_epoch),
          "images_per_second": round(config.batch_size / seconds) if seconds else math.inf}


# ---------------------------------------------------------------------------------------------
# What stops a run: signals, time, non-finite steps.


class PreemptionNotice:
  """SIGTERM (the preemption notice of TPU VMs, SLURM, Kubernetes) or Ctrl-C -> stop at a step that
  every process agrees on, with a checkpoint.

  Several processes: JAX's preemption service (started by jax.distributed.initialize) catches
  SIGTERM on any process and makes `reached_preemption_sync_point` true at the same step on all
  of them (Ctrl-C there stays Python's KeyboardInterrupt). One process: a Python handler sets a
  flag that the loop reads after each step, and a watcher thread (woken by the signal module's
  wakeup fd, which the C-level handler writes at once even while the main thread is inside XLA)
  prints the first Ctrl-C's notice and ends the process at a second Ctrl-C: one `error:` line,
  exit 130, no exception (one raised from a handler lands wherever the interpreter happens to be,
  inside a GC callback say, where Python swallows it). `received` names the signal ('SIGTERM' or
  'SIGINT'), or is None.
  """

  def __init__(self, start_step: int):
    self.received = None
    self._previous_handlers = {}
    self._previous_wakeup_fd = None
    self._watcher = None
    self.mode = "jax" if jax.process_count() > 1 else "signal"
    if self.mode == "jax":
      try:  # registers the step the count starts from, as early as possible
        multihost_utils.reached_preemption_sync_point(start_step)
      except RuntimeError:  # jax_enable_preemption_service is off
        logging.warning("JAX preemption service off: SIGTERM kills the run; it resumes from the "
                        "last checkpoint")
        self.mode = "off"
    elif threading.current_thread() is threading.main_thread():
      read_fd, write_fd = os.pipe()
      os.set_blocking(write_fd, False)
      self._wakeup_fds = (read_fd, write_fd)
      self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
      self._watcher = threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                                       name="sjmae-signal-watcher")
      self._watcher.start()

  def _on_signal(self, signum, frame):
    del frame
    self.received = self.received or signal.Signals(signum).name

  def _watch(self, read_fd: int):
    interrupts = 0
    while True:
      try:
        signums = os.read(read_fd, 64)
      except OSError:
        return
      if not signums:  # close(): the write end is gone
        return
      for signum in signums:
        if signum != signal.SIGINT:
          continue
        interrupts += 1
        if interrupts == 1:
          os.write(1, b"\nCtrl-C: stopping after this step, with a checkpoint (Ctrl-C again to "
                      b"abort at once)\n")
        else:
          console.exit_at_once(ABORTED_BY_CTRL_C, status=130)

  def reached(self, step: int) -> bool:
    """True at the step to stop at; call after every step, on every process."""
    if self.mode == "jax":
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = "SIGTERM"
        return True
      return False
    return self.received is not None

  def close(self):
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}
    if self._watcher is not None:
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      read_fd, write_fd = self._wakeup_fds
      os.close(write_fd)  # the watcher reads end-of-file and returns
      self._watcher.join(timeout=10)
      os.close(read_fd)
      self._watcher = None


class TimeBudget:
  """Says when `minutes` of training have passed (0 = never), counted from the end of the first
  step, so that its compilation is not counted. Call `up(step, outputs)` after every step: the
  first call waits for that step's outputs and starts the clock. The clock is read on the host,
  which may be a few dispatched steps ahead of the device. With several processes the decision
  is process 0's, broadcast every `check_every` steps, so that all stop at the same step.
  """

  def __init__(self, minutes: float, check_every: int = 1):
    self.seconds = 60.0 * float(minutes or 0.0)
    self.check_every = max(int(check_every), 1) if jax.process_count() > 1 else 1
    self.started = None
    self.reached = False
    self.elapsed = 0.0  # seconds since the clock started, at the last check

  def up(self, step: int, outputs) -> bool:
    if not self.seconds:
      return False
    if self.started is None:
      jax.block_until_ready(outputs)
      self.started = time.time()
      return False
    if step % self.check_every:
      return False
    self.elapsed = time.time() - self.started
    reached = self.elapsed >= self.seconds
    if jax.process_count() > 1:
      reached = bool(multihost_utils.broadcast_one_to_all(np.asarray(reached)))
    self.reached = reached
    return reached


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


# ---------------------------------------------------------------------------------------------
# Writing.


class LazyWriter:
  """A metric writer that creates its event file at the first write: a run that fails before
  logging anything leaves no empty event file behind in WORKDIR/tensorboard."""

  def __init__(self, create, hparams: dict):
    self._create, self._hparams, self._writer = create, hparams, None

  def _get(self):
    if self._writer is None:
      self._writer = self._create()
      self._writer.write_hparams(self._hparams)
    return self._writer

  def write_scalars(self, step, scalars):
    self._get().write_scalars(step, scalars)

  def write_images(self, step, images):
    self._get().write_images(step, images)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()


def write_parameter_table(workdir, params) -> int:
  """WORKDIR/parameters.txt (name, shape, dtype, size, mean, std of every parameter); returns the
  number of parameters."""
  if jax.process_index() == 0:
    checkpointing.write_text_atomically(workdir / "parameters.txt",
                                        parameter_overview.get_parameter_overview(params) + "\n")
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def shown(value) -> str:
  """A metric on the console: counts as they are, fractions to 4 decimals."""
  return str(value) if isinstance(value, int) else f"{value:.4f}"


def write_metrics(writer, step: int, metrics) -> dict:
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  writer.write_scalars(step, scalars)
  return scalars


def close_quietly(checkpointer) -> None:
  """Waits for in-flight saves while another error is on its way out; logs a second error."""
  try:
    checkpointer.close()
  except Exception as e:  # the error being raised matters more
    logging.error("While stopping: %s", e)


def already_complete(workdir, summary_file: str, step: int, total_steps: int) -> dict:
  """Says that the run in `workdir` is done and returns its summary; writes nothing."""
  summary_path = workdir / summary_file
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"step": step}
  if jax.process_index() == 0:
    until = "" if step >= total_steps else f" (stop_at_step; the schedule runs to {total_steps})"
    print(f"{paths.shown(workdir)} is already complete at step {step}{until}: nothing to do. "
          f"Summary: {paths.shown(summary_path)}; raise --config.epochs to train longer.",
          flush=True)
  return dict(summary, already_complete=True)


class BestParams:
  """The params of the best value so far of a monitor metric: WORKDIR/best/checkpoints (Orbax)
  and WORKDIR/best/best.json ({'metric', 'value', 'step'}), kept across resumes."""

  def __init__(self, workdir, metric: str):
    self.metric = metric
    self.directory = workdir / "best"
    self.record_path = self.directory / "best.json"
    self.checkpointer = checkpointing.Checkpointer(self.directory, max_to_keep=1,
                                                   save_every_steps=1, async_save=False)
    self.record = (json.loads(self.record_path.read_text()) if self.record_path.exists()
                   else {"metric": metric, "value": None, "step": None})

  def update(self, step: int, results: dict, params) -> bool:
    value = results.get(self.metric)
    if value is None or (self.record["value"] is not None and value <= self.record["value"]):
      return False
    self.checkpointer.save(step, {"params": params}, force=True)
    self.checkpointer.wait()
    self.record = {"metric": self.metric, "value": float(value), "step": int(step)}
    if jax.process_index() == 0:
      checkpointing.write_text_atomically(self.record_path, json.dumps(self.record))
    return True

  def close(self):
    self.checkpointer.close()


# ---------------------------------------------------------------------------------------------
# The loop.


def _train(task: Task, workdir, start_step: int, preemption: PreemptionNotice) -> dict:
  total_steps = task.total_steps
  stop_step = min(total_steps, task.config.stop_at_step or total_steps)
  if start_step and start_step >= stop_step:
    return already_complete(workdir, task.summary_file, start_step, total_steps)
  run = _Run.start(task, workdir, start_step, stop_step)
  try:
    stopped = run.loop(preemption)
  except BaseException:
    run.close_after_error()
    raise
  run.close()
  return run.report(preemption if stopped else None)


@dataclasses.dataclass
class _Run:
  """One segment of a run, from its start (fresh or resumed) to its end: what the loop reads and
  writes, and the three parts the loop has (`start`, `loop`, `report`)."""
  task: Task
  workdir: Any
  mesh: Any
  start_step: int
  stop_step: int
  log_every: int
  picture_every: int
  state: Any
  train_step: Callable
  pictures_fn: Callable | None
  checkpointer: checkpointing.Checkpointer
  best: BestParams | None
  writer: LazyWriter
  progress: console.Progress
  nonfinite: NonFiniteWatch
  budget: TimeBudget
  earlier_seconds: float                 # wall time of the run's segments before this one
  started: float = 0.0
  step: int = 0
  last_metrics: dict = dataclasses.field(default_factory=dict)
  monitor_metrics: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    return self.task.config

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @classmethod
  def start(cls, task: Task, workdir, start_step: int, stop_step: int) -> "_Run":
    """The state (restored with the data position, or fresh), the checkpointer, writers and the
    progress line, the jitted step; prints the run's first lines."""
    config = task.config
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    train_data = task.train_data
    every = lambda block, name: config_lib.every_steps(
        block, name, steps_per_epoch=train_data.steps_per_epoch, batch_size=config.batch_size)

    init_fn, rng, abstract_state, state_shardings = state_layout(task, mesh)
    checkpointing.write_config(workdir, config)  # the first write to the workdir
    checkpointer = checkpointing.Checkpointer(  # deletes what killed saves left behind
        workdir, max_to_keep=config.checkpoint.keep,
        save_every_steps=every(config.checkpoint, "every"),
        async_save=config.checkpoint.async_save)
    if start_step:
      abstract_state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
          state_shardings)
      state = checkpointer.restore(start_step, abstract_state)
      train_data.restore(checkpointer.data_state(start_step))
      earlier_seconds = (checkpointer.run_state(start_step) or {}).get("wall_seconds", 0.0)
    else:
      state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
      if task.after_init is not None:
        state = task.after_init(state, state_shardings)
      earlier_seconds = 0.0

    hparams = {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str))}
    metric_writers.import_backend()  # not at the first metrics, inside the timed steps
    writer = LazyWriter(lambda: metric_writers.create_default_writer(
        workdir / "tensorboard", just_logging=not is_main), hparams)
    num_params = write_parameter_table(workdir, state["params"])
    progress = console.Progress(task.total_steps, start_step, end_step=stop_step,
                                steps_per_epoch=train_data.steps_per_epoch,
                                examples_per_step=config.batch_size,
                                live=None if is_main else False)
    if is_main:
      print(task.describe(num_params, start_step)
            + f" (parameter table: {paths.shown(workdir / 'parameters.txt')})", flush=True)

    picture_every = every(config, "picture_every")
    pictures_fn = None
    if task.pictures_fn is not None and picture_every:
      finish_batch = train_data.finish_batch if train_data.augment_on_device else None

      def pictures(state, batch, num_images=8):
        small = jax.tree.map(lambda x: x[:num_images], batch)
        return task.pictures_fn(state, finish_batch(small) if finish_batch else small)
      pictures_fn = jax.jit(pictures, out_shardings=sharding.replicated(mesh))
    log_every = every(config, "log_every")
    return cls(
        task=task, workdir=workdir, mesh=mesh, start_step=start_step, stop_step=stop_step,
        log_every=log_every, picture_every=picture_every, state=state,
        train_step=jitted_train_step(task, mesh, state_shardings), pictures_fn=pictures_fn,
        checkpointer=checkpointer,
        best=BestParams(workdir, task.keep_best) if task.keep_best else None,
        writer=writer, progress=progress,
        nonfinite=NonFiniteWatch(int(jax.device_get(state["nonfinite_steps"]))),
        budget=TimeBudget(config.get("stop_after_minutes", 0.0), log_every),
        earlier_seconds=earlier_seconds, step=start_step)

  # --- the loop

  def loop(self, preemption: PreemptionNotice) -> bool:
    """Steps to stop_step (or a time budget's end, or a signal's step); True when a signal
    stopped it."""
    pending = None
    self.started = time.time()
    batches = device_prefetch(iter(self.task.train_data), self.mesh)
    while self.step < self.stop_step:
      batch = next(batches)
      self.state, metrics = self.train_step(self.state, batch)
      self.step += 1
      step = self.step
      if self.budget.up(step, metrics):
        self.stop_step = step  # the last step: log, monitors and checkpoint as at the end
      self.nonfinite.record(step, metrics)
      self.progress.step(step)
      if pending is not None:  # fetch the previous step's metrics after dispatching this one
        self.last_metrics = self.fetch_metrics(*pending)
        pending = None
      if step % self.log_every == 0 or step == self.stop_step:
        pending = (step, metrics)
      if self.pictures_fn is not None and (step % self.picture_every == 0
                                           or step == self.stop_step):
        pictures = jax.device_get(self.pictures_fn(self.state, batch))
        self.writer.write_images(step, {k: np.asarray(v, np.float32)
                                        for k, v in pictures.items()})
      self.monitor(step)
      stopped = preemption.reached(step)
      if stopped or step == self.stop_step or self.checkpointer.should_save(step):
        self.save(step)
      if stopped:
        break
    else:
      stopped = False
    if pending is not None:
      self.last_metrics = self.fetch_metrics(*pending)
    self.checkpointer.wait()
    return stopped

  def monitor(self, step: int) -> None:
    """The monitors due at `step`. Not at an early stop (stop_at_step): the schedule is not
    done. A time budget's last step is the run's result: monitored."""
    results = {}
    for monitor in self.task.monitors:
      if (monitor.every_steps and step % monitor.every_steps == 0) or (
          step == self.task.total_steps) or self.budget.reached:
        results.update(monitor(self.state))
    if not results:
      return
    self.writer.write_scalars(step, results)
    self.monitor_metrics.update(results)
    if self.best is not None and self.best.update(step, results, self.state["params"]):
      results[f"best {self.best.metric}"] = results[self.best.metric]
    if self.is_main:
      self.progress.print(f"step {step}: " + ", ".join(f"{k} {shown(v)}"
                                                       for k, v in results.items()))

  def save(self, step: int) -> None:
    if self.config.nonfinite == "stop":  # never save a poisoned state (one fetch, at saves only)
      self.look_for_nonfinite(step, int(jax.device_get(self.state["nonfinite_steps"])))
    self.checkpointer.save(
        step, self.state, force=True, data_state=self.task.train_data.checkpoint_state(step),
        run_state={"wall_seconds": self.earlier_seconds + time.time() - self.started})

  def fetch_metrics(self, step: int, metrics) -> dict:
    scalars = write_metrics(self.writer, step, metrics)
    rate = self.progress.rate()
    if rate:
      self.writer.write_scalars(step, {"steps_per_sec": rate,
                                       "images_per_sec": rate * self.config.batch_size})
    if self.is_main:
      self.progress.metrics(step, scalars)
    self.look_for_nonfinite(step, int(scalars["nonfinite_steps"]))
    return scalars

  def look_for_nonfinite(self, step: int, count: int) -> None:
    bad = self.nonfinite.look(step, count)
    if bad and self.config.nonfinite == "stop":
      bad_step, metrics = bad[0]
      self.checkpointer.wait()  # a save in flight is of an earlier, good state
      latest = self.checkpointer.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss at step {bad_step}: {loss_terms(metrics)}; stopped without saving "
          f"(last checkpoint: {f'step {latest}' if latest else 'none'} in "
          f"{paths.shown(self.checkpointer.directory)}); --config.nonfinite=skip drops such "
          f"steps instead")
    if bad and self.is_main:
      self.progress.print(f"step {bad[0][0]}: non-finite loss ({loss_terms(bad[0][1])}); skipped "
                          f"update(s) of step(s) {', '.join(str(s) for s, _ in bad)}; {count} "
                          f"skipped so far")

  def close_after_error(self) -> None:
    self.progress.close()
    close_quietly(self.checkpointer)  # lets a save of an earlier, good state finish
    if self.best is not None:
      close_quietly(self.best.checkpointer)

  def close(self) -> None:
    self.progress.close()
    self.checkpointer.close()
    if self.best is not None:
      self.best.close()
    self.writer.flush()

  # --- the end

  def report(self, stopped_by: PreemptionNotice | None) -> dict:
    """The summary (written to the workdir when the run is done) and the last lines."""
    config, task, step = self.config, self.task, self.step
    segment_seconds = time.time() - self.started
    wall_seconds = self.earlier_seconds + segment_seconds  # over every segment of the run
    summary = {"step": step, "total_steps": task.total_steps,
               "wall_seconds": round(wall_seconds, 2),
               "segment_wall_seconds": round(segment_seconds, 2),
               **{k: float(v) for k, v in self.last_metrics.items()}, **self.monitor_metrics}
    best = self.best
    if best is not None and best.record["value"] is not None:
      summary.update({f"best/{best.metric}": best.record["value"],
                      "best/step": best.record["step"]})
    summary.update(task.summary_extra or {})
    if self.budget.seconds:  # steps after the first, and their seconds (for img/s)
      summary["timed_steps"] = step - self.start_step - 1
      summary["timed_seconds"] = round(self.budget.elapsed, 2)
    if self.budget.reached:
      summary["stopped_after_minutes"] = config.stop_after_minutes
      if self.is_main:
        print(f"Stopped at step {step} of {task.total_steps}: stop_after_minutes="
              f"{config.stop_after_minutes} reached", flush=True)
    if stopped_by is not None:
      by = "Ctrl-C" if stopped_by.received == "SIGINT" else stopped_by.received
      print(f"Stopped by {by} at step {step}: checkpoint saved in "
            f"{paths.shown(self.checkpointer.directory)}; run the same command to resume",
            flush=True)  # every process: each log says where it stopped
      return dict(summary, preempted=True, stopped_by=stopped_by.received)
    if task.finalize is not None:
      summary = task.finalize(summary)
    if self.is_main:
      self.print_done(summary, wall_seconds, segment_seconds)
    return summary

  def print_done(self, summary: dict, wall_seconds: float, segment_seconds: float) -> None:
    workdir, best = self.workdir, self.best
    summary_path = workdir / self.task.summary_file
    checkpointing.write_text_atomically(summary_path, json.dumps(summary, indent=2, sort_keys=True))
    results = ", ".join([f"loss {summary.get('loss', float('nan')):.4f}"]
                        + [f"{k} {shown(v)}" for k, v in self.monitor_metrics.items()])
    took = console.duration(wall_seconds) + (
        f" ({console.duration(segment_seconds)} since the resume at step {self.start_step})"
        if self.start_step else "")
    lines = [f"Done at step {self.step} of {self.task.total_steps} in {took}: {results}",
             f"  checkpoints:  {paths.shown(self.checkpointer.directory)}",
             f"  summary:      {paths.shown(summary_path)}",
             f"  TensorBoard:  tensorboard --logdir {paths.shown(workdir / 'tensorboard')}"]
    if best is not None and best.record["value"] is not None:
      lines.insert(2, f"  best params:  {paths.shown(best.directory / 'checkpoints')} "
                      f"({best.metric} {best.record['value']:.4f} at step {best.record['step']})")
    if self.task.last_lines is not None:
      lines += self.task.last_lines(workdir, summary)
    print("\n".join(lines), flush=True)
