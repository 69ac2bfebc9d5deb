"""The console: the live progress line on a terminal, plain lines elsewhere, quiet library logs."""
import io
import logging

import pytest
from absl import logging as absl_logging

from sjmae_jax import console


class Terminal(io.StringIO):
  def isatty(self):
    return True


def test_plain_lines_off_a_terminal_carry_step_epoch_throughput_and_eta(monkeypatch):
  clock = iter([100.0, 101.0, 102.0, 103.0])
  monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
  out = io.StringIO()
  progress = console.Progress(100, 0, steps_per_epoch=10, examples_per_step=64, stream=out)
  progress.step(1)  # compiles: timing starts here
  progress.step(2)
  progress.step(3)
  progress.metrics(3, {"loss": 1.23456})
  assert out.getvalue() == "step 3/100: loss 1.2346 | epoch 0.3/10 | 43 img/s | ETA 2m26s\n"
  progress.print("step 3: knn/top1 0.5")
  assert out.getvalue().endswith("knn/top1 0.5\n") and "\r" not in out.getvalue()


def test_on_a_terminal_the_line_is_redrawn_in_place_and_other_lines_go_above_it(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
  out = Terminal()
  progress = console.Progress(50, 10, end_step=20, steps_per_epoch=5, examples_per_step=8,
                              stream=out, redraw_seconds=0.5)
  for step in range(11, 16):
    now[0] += 0.25
    progress.step(step)
  draws = out.getvalue().split("\r\033[K")[1:]
  assert len(draws) == 3  # steps 11, 13, 15: at most one redraw per 0.5 s
  assert draws[-1] == "step 15/50 | epoch 3.0/10 | 32 img/s | ETA 1s"  # ETA to end_step 20
  progress.print("a message")
  assert out.getvalue().endswith("\r\033[Ka message\n\r\033[Kstep 15/50 | epoch 3.0/10 | 32 img/s "
                                 "| ETA 1s")
  progress.close()
  assert out.getvalue().endswith("\r\033[K")


def test_off_a_terminal_a_line_comes_every_heartbeat_and_an_older_loss_names_its_step(
    monkeypatch):
  now = [0.0]
  monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
  out = io.StringIO()
  progress = console.Progress(1000, 0, steps_per_epoch=100, examples_per_step=10, stream=out,
                              heartbeat_seconds=30.0)
  progress.step(1)
  progress.metrics(1, {"loss": 2.5})
  for step in range(2, 30):  # 10 s a step, metrics every 100 steps: silent for minutes before
    now[0] += 10.0
    progress.step(step)
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("step 1/1000: loss 2.5000 |")
  assert [line.split(" |")[0] for line in lines[1:]] == [
      f"step {step}/1000: loss 2.5000 (step 1)" for step in (4, 7, 10, 13, 16, 19, 22, 25, 28)]


def test_on_a_terminal_the_live_line_names_the_step_of_an_older_loss(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
  out = Terminal()
  progress = console.Progress(100, 0, steps_per_epoch=10, examples_per_step=8, stream=out)
  progress.step(20)
  progress.metrics(20, {"loss": 1.0})
  assert out.getvalue().split("\r\033[K")[-1].startswith("step 20/100: loss 1.0000 |")
  now[0] += 1.0
  progress.step(25)
  assert out.getvalue().split("\r\033[K")[-1].startswith("step 25/100: loss 1.0000 (step 20) |")


@pytest.fixture
def logging_restored():
  """What quiet_logs changes (absl's handler and logger filters, levels) put back afterwards."""
  handler = absl_logging.get_absl_handler()
  absl_logger = logging.getLogger("absl")
  before_filters, before_level = list(handler.filters), absl_logging.get_verbosity()
  before_logger_filters = list(absl_logger.filters)
  before_levels = {name: logging.getLogger(name).level for name in (*console.QUIET_LOGGERS, "absl")}
  yield handler, absl_logger
  handler.filters[:] = before_filters
  absl_logger.filters[:] = before_logger_filters
  absl_logging.set_verbosity(before_level)  # sets the absl logger's level: put it back too
  for name, level in before_levels.items():
    logging.getLogger(name).setLevel(level)


def test_quiet_logs_hide_library_info_and_warnings_but_not_ours_or_errors(logging_restored):
  handler, absl_logger = logging_restored
  console.quiet_logs()
  make = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", (), None)
  keep = lambda record: all(f.filter(record) for f in handler.filters)
  assert not keep(make(logging.WARNING, "/site-packages/orbax/checkpoint/manager.py"))
  assert keep(make(logging.ERROR, "/site-packages/orbax/checkpoint/manager.py"))
  assert keep(make(logging.WARNING, "/repo/sjmae_jax/data/sources.py"))
  assert absl_logging.get_verbosity() == absl_logging.WARNING
  # Without absl's app.run (the export) records reach Python's handlers: the logger filters too.
  assert not absl_logger.filter(make(logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
  assert absl_logger.filter(make(logging.WARNING, "/repo/sjmae_jax/export.py"))
  # A checkpoint write that failed on the file system: the checkpointer says it in one line.
  disk_full = ValueError("RESOURCE_EXHAUSTED: Failed to write 56712 bytes to file 7: No space "
                         "left on device [os_error_code='28']")
  for message, exc_info in (("Save Finalize thread failed.", (ValueError, disk_full, None)),
                            (str(disk_full), None)):
    record = logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/f.py", 1,
                               message, (), exc_info)
    assert not keep(record)
  other = ValueError("RESOURCE_EXHAUSTED: out of memory")
  assert keep(logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/f.py", 1,
                                "failed", (), (ValueError, other, None)))


def raised_by(function):
  try:
    function()
  except Exception as caught:  # pylint: disable=broad-except
    return caught
  raise AssertionError("nothing raised")


def test_quiet_console_hides_only_callbacks_into_a_closed_event_loop(monkeypatch,
                                                                    logging_restored):
  import asyncio
  import sys
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  console.quiet_logs()
  loop = asyncio.new_event_loop()
  loop.close()
  # TensorStore completing a write of a failed Orbax save, whose loop is closed already:
  closed = raised_by(lambda: loop.call_soon_threadsafe(print))
  def same_words_elsewhere():
    raise RuntimeError("Event loop is closed")
  errors = [closed, raised_by(same_words_elsewhere), raised_by(lambda: 1 / 0)]
  for error in errors:
    sys.unraisablehook(type("Unraisable", (), {"exc_value": error})())
  assert [unraisable.exc_value for unraisable in reported] == errors[1:]
