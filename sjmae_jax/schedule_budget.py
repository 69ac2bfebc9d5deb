"""Schedules sized to a time budget: `--config.train_minutes=4`.

`stop_after_minutes` cuts a schedule where it stands when the time is up; `train_minutes` instead
chooses the schedule's length so that warmup and decay complete at the deadline. Before the run,
the program's own jitted step runs `budget_calibration_steps` steps after its compiling step on a
throwaway state; their speed sets the epochs (whole epochs, so the run ends up to one epoch before
the deadline) and the warmup (`budget_warmup_fraction` of them); the steps that read the batches
the input pipeline prepared during the compilation are not timed. Minutes count as
stop_after_minutes counts them: from the end of the first (compiling) step. The calibration costs
one more compilation and a few steps, outside the minutes.

The choice is written to WORKDIR/budget.json before training starts and read back on a resume,
so a resumed run keeps its total steps whatever the speed of the machine it resumes on. It is in
the summary too (`budget/*`; the config.json of the workdir holds the chosen epochs). As a safety
net, a run that turns out much slower than its calibration (monitors, a busy host) stops at
150 % of the minutes unless stop_after_minutes says otherwise. The calibration fetches metrics
every log_every_steps as the loop does; evaluations during the run (monitors) are not in it.
"""
import json
import math
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from sjmae_jax import checkpointing, config_lib, engine, paths, sharding

BUDGET_FILE = "budget.json"
SAFETY_FACTOR = 1.5  # stop_after_minutes of a budget run, as a multiple of train_minutes


def size_schedule(program, workdir, start_step: int) -> dict | None:
  """Sets program.config's epochs / warmup_epochs (and stop_after_minutes, if unset) for
  config.train_minutes; returns what the summary records (None when there is no budget)."""
  config = program.config
  minutes = float(config.get("train_minutes", 0.0) or 0.0)
  if not minutes:
    return None
  path = workdir / BUDGET_FILE
  if path.exists():
    chosen = json.loads(path.read_text())
    if chosen["train_minutes"] != minutes:
      raise ValueError(f"config train_minutes: {minutes} differs from {chosen['train_minutes']} "
                       f"in {paths.shown(path)} (the schedule this run was sized to); use that, "
                       f"or start a new workdir")
  elif start_step:
    raise ValueError(f"config train_minutes: {paths.shown(workdir)} has checkpoints of a run "
                     f"without a time budget (no {BUDGET_FILE}); start a new workdir")
  else:
    chosen = choose(config, minutes, calibrate(program))
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      checkpointing.write_text_atomically(path, json.dumps(chosen, indent=2, sort_keys=True))
    print(f"time budget {minutes:g} min: {chosen['seconds_per_step'] * 1e3:.1f} ms/step over "
          f"{chosen['calibration_steps']} steps -> {chosen['epochs']} epochs "
          f"({chosen['total_steps']} steps, warmup {chosen['warmup_epochs']:g} epochs)", flush=True)
  with config.unlocked():
    config.epochs = int(chosen["epochs"])
    config.warmup_epochs = float(chosen["warmup_epochs"])
    if not config.get("stop_after_minutes"):
      config.stop_after_minutes = round(minutes * SAFETY_FACTOR, 6)
  return {f"budget/{key}": value for key, value in chosen.items()}


def choose(config, minutes: float, measured: dict) -> dict:
  """Whole epochs whose steps fit `minutes` at the measured seconds per step (at least one)."""
  steps_per_epoch = measured["steps_per_epoch"]
  fitting_steps = int(60.0 * minutes / max(measured["seconds_per_step"], 1e-9))
  epochs = max(fitting_steps // steps_per_epoch, 1)
  warmup_epochs = round(epochs * float(config.budget_warmup_fraction), 6)
  return dict(measured, train_minutes=minutes, epochs=epochs, warmup_epochs=warmup_epochs,
              total_steps=epochs * steps_per_epoch)


def calibrate(program) -> dict:
  """Seconds per step of the program's jitted step, on a fresh state and the run's first
  batches (process 0's measure on every process)."""
  config = program.config
  num_steps = int(config.budget_calibration_steps)
  if num_steps < 1:
    raise ValueError(f"config budget_calibration_steps: must be >= 1, got {num_steps}")
  task = program.build(0)
  mesh = sharding.make_mesh(config.mesh)
  init_fn = lambda rng: engine.with_bookkeeping(task.init_state(rng), task.tx)
  rng = jax.random.PRNGKey(config.seed)
  state_shardings = sharding.tree_shardings(jax.eval_shape(init_fn, rng), mesh,
                                            config.sharding.rules, config.sharding.min_size)
  state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
  train_step = engine.jitted_train_step(task, mesh, state_shardings)
  batches = engine.device_prefetch(iter(task.train_data), mesh)
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
