"""Fine-tuning and the linear probe run on the engine's loop, so they survive what pretraining
survives: SIGTERM / Ctrl-C mid-run stop with a checkpoint and the rerun ends where an
uninterrupted run ends; a NaN stops with the last good checkpoint intact; another model's
checkpoint is refused in one line."""
import contextlib
import io
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sjmae_jax import checkpointing, engine
from sjmae_jax.evaluation import finetune, linear_probe
from tests.helpers import REPO, load_config, override, train_env, wait_until

EPOCHS = 4  # of 11 (fine-tune) or 5 (probe) steps: long enough to be stopped in the middle


@pytest.fixture(scope="module")
def pretrained(pretrained_mae):
  return pretrained_mae[0]


PROGRAMS = {  # name: (script, run function, overrides)
    "finetune": ("eval_finetune.py", finetune.run, {}),
    "linprobe": ("eval_linprobe.py", linear_probe.run, {"mode": "full", "warmup_epochs": 1.0}),
}


def program_config(name, pretrained, **overrides):
  config = load_config(name)
  config.unlock()
  config.init_from = str(pretrained)
  return override(config, {"epochs": EPOCHS, "log_every_steps": 1, **PROGRAMS[name][2],
                           **overrides})


def command(name, workdir, pretrained, **overrides):
  script, _, defaults = PROGRAMS[name]
  settings = {"epochs": EPOCHS, "log_every_steps": 1, **defaults, **overrides}
  return [sys.executable, str(REPO / script), f"--config={REPO / 'configs' / name}.py",
          f"--workdir={workdir}", f"--config.init_from={pretrained}",
          *[f"--config.{key}={value}" for key, value in settings.items()]]


def quietly(function, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return function(*args)


def final_params(workdir):
  return checkpointing.load_params(workdir)[0]


def assert_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name,signum,status", [("finetune", signal.SIGTERM, 0),
                                                 ("linprobe", signal.SIGINT, 130)])
@pytest.mark.slow
def test_stopped_mid_run_saves_and_the_rerun_ends_as_an_uninterrupted_run(
    name, signum, status, pretrained, tmp_path):
  reference = tmp_path / "reference"
  quietly(PROGRAMS[name][1], program_config(name, pretrained), str(reference))

  workdir = tmp_path / "run"
  with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w") as err:
    process = subprocess.Popen(command(name, workdir, pretrained), cwd=REPO, env=train_env(),
                               stdout=out, stderr=err)
  stdout = lambda: (tmp_path / "stdout.txt").read_text()
  try:
    wait_until(lambda: re.search(r"^step 5/", stdout(), re.M), process, what="step 5")
    process.send_signal(signum)
    assert process.wait(timeout=600) == status, (tmp_path / "stderr.txt").read_text()[-3000:]
  finally:
    process.kill()
  assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
  by = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
  step = int(re.search(rf"Stopped by {by} at step (\d+): checkpoint saved", stdout()).group(1))
  total = int(re.search(r"^step 5/(\d+)", stdout(), re.M).group(1))
  assert 5 <= step < total
  assert checkpointing.Checkpointer(workdir, read_only=True).latest_step() == step
  assert not (workdir / "results.json").exists()

  results = quietly(PROGRAMS[name][1], program_config(name, pretrained), str(workdir))
  assert results["step"] == results["total_steps"] == total
  assert_identical(final_params(reference), final_params(workdir))


def test_a_nan_stops_the_fine_tune_with_the_last_good_checkpoint_intact(pretrained, tmp_path):
  config = program_config("finetune", pretrained, **{"debug.poison_step": 15,
                                                     "checkpoint.every_epochs": 0,
                                                     "checkpoint.every_steps": 5})
  with pytest.raises(engine.NonFiniteLossError,
                     match=r"non-finite loss at step 15: loss nan.*last checkpoint: step 10 "):
    quietly(finetune.run, config, str(tmp_path))
  assert checkpointing.Checkpointer(tmp_path, read_only=True).latest_step() == 10
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final_params(tmp_path)))
  assert not (tmp_path / "results.json").exists()


def test_a_probe_checkpoint_of_another_head_is_refused_in_one_line(pretrained, tmp_path):
  quietly(linear_probe.run, program_config("linprobe", pretrained, epochs=1), str(tmp_path))
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  other = program_config("linprobe", pretrained, epochs=2, global_pool="avg")  # adds fc_norm
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as raised:
    quietly(linear_probe.run, other, str(tmp_path))
  message = str(raised.value)
  assert "\n" not in message and "holds checkpoints (step 5) of a different model" in message
  assert "global_pool: 'token' there vs 'avg' here" in message and "array(s) differ" in message
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
