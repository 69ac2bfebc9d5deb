"""The console: the live progress line on a terminal, plain lines elsewhere, quiet library logs."""
import io
import logging

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


def test_quiet_logs_hide_library_info_and_warnings_but_not_ours_or_errors():
  handler = absl_logging.get_absl_handler()
  before_filters, before_level = list(handler.filters), absl_logging.get_verbosity()
  before_levels = {name: logging.getLogger(name).level for name in (*console.QUIET_LOGGERS, "absl")}
  try:
    console.quiet_logs()
    make = lambda level, path: logging.LogRecord("absl", level, path, 1, "m", (), None)
    keep = lambda record: all(f.filter(record) for f in handler.filters)
    assert not keep(make(logging.WARNING, "/site-packages/orbax/checkpoint/manager.py"))
    assert keep(make(logging.ERROR, "/site-packages/orbax/checkpoint/manager.py"))
    assert keep(make(logging.WARNING, "/repo/sjmae_jax/data/sources.py"))
    assert absl_logging.get_verbosity() == absl_logging.WARNING
  finally:
    handler.filters[:] = before_filters
    absl_logging.set_verbosity(before_level)  # sets the absl logger's level: put it back too
    for name, level in before_levels.items():
      logging.getLogger(name).setLevel(level)
