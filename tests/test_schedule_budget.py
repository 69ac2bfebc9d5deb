"""Budget mode (config.train_minutes, sjmae_jax/schedule_budget.py) on a tiny model: the
calibrated schedule completes at the deadline, its epochs are in the summary and config.json,
and a resumed run keeps the chosen total steps."""
import json

import pytest

from sjmae_jax import schedule_budget, trainer
from tests.helpers import tiny_config

MINUTES = 0.05  # 3 s of training


def budget_config(**overrides):
  # stop_after_minutes 1: the 150 % safety stop off, so that a noisy shared CPU cannot cut it.
  return tiny_config("mae", **{"model.depth": 1, "monitors.knn.every_epochs": 0, "checkpoint.every_steps": 1000,
                               "log_every_steps": 20, "train_minutes": MINUTES,
                               "stop_after_minutes": 1.0, "budget_calibration_steps": 30,
                               "budget_warmup_fraction": 0.1, **overrides})


@pytest.mark.slow
def test_budget_sizes_the_schedule_to_end_at_the_deadline_and_resumes_with_it(tmp_path, capsys):
  workdir = tmp_path / "run"
  budget_file = workdir / schedule_budget.BUDGET_FILE
  summary = trainer.train_and_evaluate(budget_config(), str(workdir))
  chosen = json.loads(budget_file.read_text())
  spe = chosen["steps_per_epoch"]
  # The choice: whole epochs of the steps that fit at the measured speed; warmup 10 % of them.
  assert chosen["epochs"] == max(int(60 * MINUTES / chosen["seconds_per_step"]) // spe, 1)
  assert chosen["total_steps"] == chosen["epochs"] * spe and chosen["warmup_epochs"] == (
      pytest.approx(0.1 * chosen["epochs"]))
  # The schedule ran to its end (not cut), and the summary / config.json say what was chosen.
  assert summary["step"] == summary["total_steps"] == chosen["total_steps"]
  assert "stopped_after_minutes" not in summary
  assert summary["budget/epochs"] == chosen["epochs"] and summary["budget/train_minutes"] == MINUTES
  assert json.loads((workdir / "config.json").read_text())["epochs"] == chosen["epochs"]
  # On time, loosely (a shared CPU is noisy; whole epochs may end it up to one epoch early).
  assert 0.3 * 60 * MINUTES <= summary["timed_seconds"] <= 2.0 * 60 * MINUTES
  assert "time budget 0.05 min" in capsys.readouterr().out

  # A rerun is complete: nothing recalibrated.
  before = budget_file.stat().st_mtime_ns
  again = trainer.train_and_evaluate(budget_config(), str(workdir))
  assert again["already_complete"] and again["total_steps"] == chosen["total_steps"]
  assert budget_file.stat().st_mtime_ns == before and "time budget" not in capsys.readouterr().out
  # A resume trains to budget.json's total steps, not to a new calibration's (here one epoch
  # more, as if the first machine had been slower): the schedule is the one chosen at the start.
  budget_file.write_text(json.dumps(dict(chosen, epochs=chosen["epochs"] + 1)))
  resumed = trainer.train_and_evaluate(budget_config(), str(workdir))
  assert resumed["step"] == resumed["total_steps"] == (chosen["epochs"] + 1) * spe
  assert resumed["budget/epochs"] == chosen["epochs"] + 1

  with pytest.raises(ValueError, match="train_minutes: 0.2 differs from 0.05"):
    trainer.train_and_evaluate(budget_config(train_minutes=0.2), str(workdir))
  budget_file.unlink()
  with pytest.raises(ValueError, match="without a time budget"):
    trainer.train_and_evaluate(budget_config(), str(workdir))
