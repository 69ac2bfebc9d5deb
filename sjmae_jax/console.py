"""What a run prints: a live progress line on a terminal, plain lines otherwise, and quiet logs.

On a terminal the last line is redrawn in place (step/total, epoch, img/s, loss, ETA) a few times
a second; anything else printed meanwhile goes above it. When stdout is a file or a pipe (CI,
SLURM, nohup) the same facts come as one plain line every `log_every_steps` steps.
"""
import logging
import os
import re
import sys
import time
import traceback

from absl import logging as absl_logging

# Libraries whose INFO/WARNING chatter (Orbax's per-save lines, TFDS's preparation, etils) is hidden
# unless --verbosity asks for it; their errors always show.
QUIET_LOGGERS = ("orbax", "tensorflow_datasets", "etils", "grain")
QUIET_MODULE_PATHS = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/", "/clu/")


def os_error_reason(error: BaseException) -> str | None:
  """'No space left on device' for an OS-level write failure anywhere in `error`'s chain, also
  when TensorStore reports it as a ValueError carrying `os_error_code='28'`; else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return os.strerror(error.errno)
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


class _ThirdPartyBelowError(logging.Filter):
  """Drops records below ERROR that come from the libraries of QUIET_MODULE_PATHS (they all log
  through absl's one logger, so only the source file tells them apart), and Orbax's error records
  of a checkpoint write that failed on the file system: each thread of the save logs it with its
  traceback, and the checkpointer reports it in one line (checkpointing.WorkdirError)."""

  def filter(self, record):
    if not any(part in record.pathname for part in QUIET_MODULE_PATHS):
      return True
    if record.levelno < logging.ERROR:
      return False
    return not ("/orbax/" in record.pathname and (
        "os_error_code=" in record.getMessage()
        or (record.exc_info and os_error_reason(record.exc_info[1]))))


def _is_closed_loop_callback(error) -> bool:
  """RuntimeError('Event loop is closed') raised in asyncio's call_soon_threadsafe: TensorStore
  completing a write of a failed Orbax save whose event loop has already been closed."""
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  frames = [frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)]
  return "call_soon_threadsafe" in frames


def _quiet_unraisablehook(original):
  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable.exc_value):
      original(unraisable)
  hook.quiet = True
  return hook


def quiet_logs() -> None:
  """Default console: our own warnings, the libraries' errors; no INFO lines."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  # On the logger, not only absl's handler: a program without absl's app.run (the export) logs
  # through Python's own handlers ("WARNING:absl:Given directory is read only", Orbax opening a
  # checkpoint to read it).
  for filtered in (absl_logging.get_absl_handler(), logging.getLogger("absl")):
    if not any(isinstance(f, _ThirdPartyBelowError) for f in filtered.filters):
      filtered.addFilter(_ThirdPartyBelowError())
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  # Native callbacks report their exceptions as unraisable (no thread, no logger).
  if not getattr(sys.unraisablehook, "quiet", False):
    sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)


def exit_at_once(message: str, status: int) -> None:
  """Ends the process now, from any thread: what stdout holds, then one `error:` line on stderr;
  no exception to catch, no atexit handlers, no in-flight save awaited (Orbax's partial save is a
  tmp directory that the next run deletes)."""
  try:
    sys.stdout.flush()
  except Exception:  # a closed or broken stdout must not keep the process alive
    pass
  newline = "\n" if sys.stderr.isatty() else ""  # a live progress line may be half drawn there
  os.write(2, f"{newline}error: {message}\n".encode())
  os._exit(status)


def duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m"


class Progress:
  """Progress of a loop from start_step to end_step (default total_steps).

  `step(step)` after every step (cheap: no device sync; redraws at most `redraw_seconds` apart
  on a terminal; off one, a plain line when `heartbeat_seconds` passed without one, whatever the
  step cadence); `metrics(step, scalars)` when metrics were fetched (every log_every_steps):
  a plain line off a terminal, the loss shown in the live line on one; `print(text)` for any
  other line. The loss shown is the last one fetched: when it is not the shown step's, the line
  names its step. Throughput and ETA are measured from the second step on (the first compiles).
  """

  def __init__(self, total_steps: int, start_step: int, *, steps_per_epoch: int,
               examples_per_step: int, end_step: int | None = None, stream=None,
               live: bool | None = None, redraw_seconds: float = 0.25,
               heartbeat_seconds: float = 30.0):
    self.stream = stream or sys.stdout
    self.live = self.stream.isatty() if live is None else live
    self.total_steps = total_steps
    self.end_step = end_step or total_steps  # where this run stops (stop_at_step), for the ETA
    self.steps_per_epoch = steps_per_epoch
    self.examples_per_step = examples_per_step
    self.redraw_seconds = redraw_seconds
    self.heartbeat_seconds = heartbeat_seconds
    self._timed_from = None  # (step, time) of the first finished step
    self._last_draw = -float("inf")
    self._last_plain_line = None  # when the last plain line was written (off a terminal)
    self._line_shown = False
    self._step = start_step
    self._loss = None
    self._loss_step = None

  def step(self, step: int) -> None:
    self._step = step
    now = time.monotonic()
    if self._timed_from is None:
      self._timed_from = (step, now)
      self._last_plain_line = now
    if self.live:
      if now - self._last_draw >= self.redraw_seconds:
        self._draw(now)
    elif now - self._last_plain_line >= self.heartbeat_seconds:
      self._plain_line(step, now)

  def metrics(self, step: int, scalars: dict) -> None:
    self._loss, self._loss_step = scalars.get("loss"), step
    now = time.monotonic()
    if self.live:
      self._draw(now)
    else:
      self._plain_line(step, now)

  def _plain_line(self, step: int, now: float) -> None:
    self._last_plain_line = now
    self._write(self.status(step, now) + "\n")

  def print(self, text: str) -> None:
    if self._line_shown:
      self._write("\r\033[K")
      self._line_shown = False
    self._write(text + "\n")
    if self.live:
      self._draw(time.monotonic())

  def close(self) -> None:
    if self._line_shown:
      self._write("\r\033[K")
      self._line_shown = False

  def rate(self, now: float | None = None) -> float | None:
    """Steps per second since the first finished step (None until two steps are done)."""
    if self._timed_from is None:
      return None
    first_step, first_time = self._timed_from
    now = time.monotonic() if now is None else now
    if self._step <= first_step or now <= first_time:
      return None
    return (self._step - first_step) / (now - first_time)

  def status(self, step: int, now: float | None = None) -> str:
    """'step 120/660: loss 7.1234 | epoch 11.0/60 | 512 img/s | ETA 3m10s'."""
    loss = ""
    if self._loss is not None:
      loss = f": loss {self._loss:.4f}" + ("" if self._loss_step == step
                                           else f" (step {self._loss_step})")
    parts = [f"step {step}/{self.total_steps}{loss}"]
    epochs = self.total_steps / self.steps_per_epoch
    parts.append(f"epoch {step / self.steps_per_epoch:.1f}/{epochs:g}")
    rate = self.rate(now)
    if rate:
      parts.append(f"{rate * self.examples_per_step:,.0f} img/s")
      parts.append(f"ETA {duration((self.end_step - step) / rate)}")
    return " | ".join(parts)

  def _draw(self, now: float) -> None:
    self._last_draw = now
    self._write("\r\033[K" + self.status(self._step, now))
    self._line_shown = True

  def _write(self, text: str) -> None:
    self.stream.write(text)
    self.stream.flush()
