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

import jax

from sjmae_jax import checkpointing, paths

BUDGET_FILE = "budget.json"
SAFETY_FACTOR = 1.5  # stop_after_minutes of a budget run, as a multiple of train_minutes


def size_schedule(config, workdir, start_step: int, measure_step_speed) -> dict | None:
  """Sets config's epochs / warmup_epochs (and stop_after_minutes, if unset) for
  config.train_minutes; returns what the summary records (None when there is no budget).
  `measure_step_speed(num_steps)` (engine.measure_step_speed of the program) times the step on
  a fresh run's first batches: {'seconds_per_step', 'calibration_steps', 'steps_per_epoch',
  'images_per_second'}."""
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
    num_steps = int(config.budget_calibration_steps)
    if num_steps < 1:
      raise ValueError(f"config budget_calibration_steps: must be >= 1, got {num_steps}")
    chosen = choose(config, minutes, measure_step_speed(num_steps))
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
