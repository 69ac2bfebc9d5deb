"""What survives what, through train.py in subprocesses: kill -9 (also during async saves),
SIGTERM (one and two processes), non-finite losses, bad workdirs, a full disk, checkpoints of
another model, corrupt images.

The runs are the tiny MAE on digits for one epoch (44 steps). Kill/SIGTERM moments are found by
polling the checkpoint directory or the printed `step N:` lines, never by fixed sleeps.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sjmae_jax import checkpointing, trainer
from tests.helpers import (REPO, UNINTERRUPTED_RUN, run_train, start_train, tiny_config,
                           train_command, train_env, wait_until)

RUN = UNINTERRUPTED_RUN  # 44 steps
TOTAL_STEPS = 44


def error_lines(stderr: str) -> list:
  """The `error:` lines of stderr; there must be one at most, and it must be the last line."""
  lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert not lines or stderr.strip().splitlines()[-1] == lines[-1], stderr[-3000:]
  return lines


def complete_steps(workdir) -> list:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def partial_saves(workdir) -> list:
  directory = workdir / "checkpoints"
  return [p.name for p in directory.iterdir() if "tmp" in p.name] if directory.exists() else []


def latest_step(workdir):
  """What a restart resumes from: the latest complete checkpoint, as Orbax sees it."""
  checkpointer = checkpointing.Checkpointer(workdir, read_only=True)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step


def snapshot(directory) -> dict:
  """{relative path: sha256} of every file under `directory`."""
  return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(directory.rglob("*")) if path.is_file()}


def checkpoint_files(workdir) -> dict:
  """snapshot() of the complete checkpoints only."""
  return {name: digest for name, digest in snapshot(workdir / "checkpoints").items()
          if name.split("/")[0].isdigit()}


def assert_identical(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def final_params(workdir):
  return checkpointing.load_params(workdir)[0]


@pytest.fixture(scope="module")
def reference_params(uninterrupted_run):
  """Final params of an uninterrupted RUN."""
  return final_params(uninterrupted_run)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
  """A workdir of RUN stopped at step 10 with checkpoints at steps 1 (the first), 5 and 10."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  result = run_train(workdir, overrides={**RUN, "stop_at_step": 10, "checkpoint.every_steps": 5})
  assert result.returncode == 0, result.stderr[-3000:]
  assert complete_steps(workdir) == [1, 5, 10]
  return workdir


def copy_of(workdir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  return copy


# --- kill -9 and SIGTERM -------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_any_moment_then_the_same_command_gives_identical_params(tmp_path,
                                                                            reference_params):
  """Saves every step (async), so kills land during saves and deletions of old steps; three
  kills, each after some more steps, each restart resuming from the latest complete step."""
  workdir = tmp_path / "run"
  overrides = {**RUN, "checkpoint.every_steps": 1, "checkpoint.keep": 2}
  resume_from, killed_during_a_save = 0, 0
  for attempt, (min_step, during_a_save) in enumerate([(6, False), (16, True), (28, True)]):
    process = start_train(workdir, tmp_path / f"log{attempt}", overrides=overrides)
    try:
      wait_until(lambda: f"from step {resume_from};" in process.stdout_path.read_text(), process,
                 what=f"resuming from step {resume_from}")
      wait_until(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= min_step
                 and (partial_saves(workdir) or not during_a_save), process,
                 what=f"a checkpoint >= {min_step}")
    finally:
      process.kill()  # SIGKILL
      process.wait()
    killed_during_a_save += bool(partial_saves(workdir))
    resume_from = latest_step(workdir)
    assert resume_from == complete_steps(workdir)[-1] >= min_step
  assert killed_during_a_save >= 1, "no kill landed during a save"

  result = run_train(workdir, overrides=overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"from step {resume_from};" in result.stdout
  assert not partial_saves(workdir)  # what the killed saves left was deleted
  assert complete_steps(workdir)[-1] == TOTAL_STEPS
  assert_identical(reference_params, final_params(workdir))


@pytest.mark.parametrize("signum,status,said", [(signal.SIGTERM, 0, "SIGTERM"),
                                                 (signal.SIGINT, 130, "Ctrl-C")])
@pytest.mark.slow
def test_sigterm_or_ctrl_c_finishes_the_step_saves_it_and_exits_in_one_line(
    tmp_path, reference_params, signum, status, said):
  workdir = tmp_path / "run"
  process = start_train(workdir, tmp_path / "log", overrides=RUN)  # periodic saves: never
  try:
    wait_until(lambda: "step 5/" in process.stdout_path.read_text(), process, what="step 5")
    process.send_signal(signum)
    assert process.wait(timeout=600) == status, process.stderr_path.read_text()[-3000:]
  finally:
    process.kill()
  stdout, stderr = process.stdout_path.read_text(), process.stderr_path.read_text()
  assert "Traceback" not in stderr and not error_lines(stderr), stderr[-3000:]
  stopped = re.findall(rf"Stopped by {said} at step (\d+): checkpoint saved in .*; run the same "
                       r"command to resume", stdout)
  assert len(stopped) == 1, stdout
  step = int(stopped[0])
  assert 5 < step < TOTAL_STEPS and latest_step(workdir) == step
  assert not partial_saves(workdir) and not (workdir / "summary.json").exists()

  result = run_train(workdir, overrides=RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"from step {step};" in result.stdout
  assert_identical(reference_params, final_params(workdir))
  summary = json.loads((workdir / "summary.json").read_text())  # time over both segments
  assert summary["wall_seconds"] > summary["segment_wall_seconds"] > 0
  assert f" since the resume at step {step}): loss" in result.stdout


@contextlib.contextmanager
def busy_cores():
  """Both cores kept busy by other processes meanwhile (a loaded machine)."""
  spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
  try:
    yield
  finally:
    for spinner in spinners:
      spinner.kill()
      spinner.wait()


@pytest.mark.parametrize("moment", ["compiling", "stepping", "saving"])
@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line_without_saving(tmp_path, moment,
                                                                   reference_params):
  workdir = tmp_path / "run"
  overrides = dict(RUN, **{"checkpoint.every_steps": 1}) if moment == "saving" else RUN
  process = start_train(workdir, tmp_path / "log", overrides=overrides)
  stdout = lambda: process.stdout_path.read_text()
  try:
    if moment == "compiling":  # the first lines are printed before the step is compiled
      wait_until(lambda: "from step 0;" in stdout(), process, what="the first lines")
    elif moment == "stepping":
      wait_until(lambda: "step 5/" in stdout(), process, what="step 5")
    else:  # async saves of every step: wait for one in flight
      wait_until(lambda: partial_saves(workdir), process, poll_seconds=0.002,
                 what="a checkpoint being written")
    with busy_cores():
      process.send_signal(signal.SIGINT)
      wait_until(lambda: "Ctrl-C again to abort" in stdout(), process,
                 what="the first Ctrl-C's notice")
      process.send_signal(signal.SIGINT)
      assert process.wait(timeout=600) == 130, process.stderr_path.read_text()[-3000:]
  finally:
    process.kill()
  stderr = process.stderr_path.read_text()
  assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
  assert error_lines(stderr) == ["error: interrupted (Ctrl-C): stopped at once, without saving; "
                                 "the same command resumes from the last complete checkpoint"]
  assert "Stopped by Ctrl-C" not in stdout()
  if moment == "compiling":
    assert not complete_steps(workdir)
  if moment != "saving":
    return
  # Cut while a save was in flight: the same command resumes from a complete checkpoint.
  result = run_train(workdir, overrides=overrides)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_identical(reference_params, final_params(workdir))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  workdir = tmp_path / "run"
  port = free_port()
  processes = []
  for pid in range(2):
    dist = {"distributed.enabled": True, "distributed.coordinator_address": f"localhost:{port}",
            "distributed.num_processes": 2, "distributed.process_id": pid}
    processes.append(start_train(workdir, tmp_path / f"log{pid}", overrides={**RUN, **dist}))
  try:
    wait_until(lambda: "step 5/" in processes[0].stdout_path.read_text(), processes[0],
               what="step 5")
    processes[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    for process in processes:
      assert process.wait(timeout=600) == 0, process.stderr_path.read_text()[-3000:]
  finally:
    for process in processes:
      process.kill()
  steps = [int(re.search(r"Stopped by SIGTERM at step (\d+)", p.stdout_path.read_text()).group(1))
           for p in processes]
  assert steps[0] == steps[1] and 5 < steps[0] < TOTAL_STEPS
  assert complete_steps(workdir)[-1] == steps[0] and not partial_saves(workdir)
  params = final_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# --- non-finite losses ----------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_terms_and_the_last_checkpoint_stays(tmp_path):
  workdir = tmp_path / "run"
  # Poisoned at 13; metrics are looked at only every 5 steps, so the save at 15 is what notices.
  result = run_train(workdir, overrides={**RUN, "debug.poison_step": 13,
                                         "checkpoint.every_steps": 5})
  assert result.returncode == 3, result.stderr[-3000:]
  assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
  message = error_lines(result.stderr)[0]
  assert "non-finite loss at step 13: loss nan, loss/mae nan, grad_norm nan" in message
  assert "last checkpoint: step 10" in message and "nonfinite=skip" in message
  assert complete_steps(workdir) == [1, 5, 10] and not partial_saves(workdir)
  params, _ = checkpointing.load_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_nan_loss_found_at_a_metrics_fetch_and_the_skip_policy(tmp_path):
  """In process: 'stop' notices at the metrics fetch (no save in between); 'skip' trains on."""
  config = tiny_config("mae", stop_at_step=8, log_every_steps=2, **{"debug.poison_step": 3})
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 3: loss nan.*last checkpoint: step 1 "):
    trainer.train_and_evaluate(config, str(tmp_path / "stop"))
  assert complete_steps(tmp_path / "stop") == [1]

  config.nonfinite = "skip"
  summary = trainer.train_and_evaluate(config, str(tmp_path / "skip"))
  assert summary["step"] == 8 and summary["nonfinite_steps"] == 1
  assert np.isfinite(summary["loss"])
  params, _ = checkpointing.load_params(tmp_path / "skip")
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# --- workdir problems ------------------------------------------------------------------------------


def assert_fails_with_one_line(result, expected):
  assert result.returncode == 2, result.stderr[-3000:]
  lines = error_lines(result.stderr)
  assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
  return lines[0]


def test_a_checkpoint_of_another_model_is_refused_and_left_alone(tmp_path, stopped_run):
  workdir = copy_of(stopped_run, tmp_path)
  before = snapshot(workdir)
  result = run_train(workdir, overrides={**RUN, "model.embed_dim": 64})
  line = assert_fails_with_one_line(result, "holds checkpoints (step 10) of a different model")
  assert "model.embed_dim: 32 there vs 64 here" in line
  assert "Traceback" not in result.stderr
  assert snapshot(workdir) == before


def test_workdir_under_a_file_fails_with_one_line(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  result = run_train(tmp_path / "file" / "run", overrides=RUN)
  assert_fails_with_one_line(result, "is not a directory")
  assert "Traceback" not in result.stderr
  assert (tmp_path / "file").read_text() == "not a directory"


def namespace_tools_work() -> bool:
  """Whether this machine lets us mount in a private user+mount namespace (unshare -rm)."""
  if shutil.which("unshare") is None:
    return False
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                         capture_output=True)
  return probe.returncode == 0


def run_in_mount_namespace(setup: str, command: list, devices=1):
  """`setup` (shell, may mount) then `command`, in a private user+mount namespace."""
  script = f"{setup} && exec \"$@\""
  return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], cwd=REPO,
                        env=train_env(devices), capture_output=True, text=True, timeout=900)


def test_read_only_workdir_fails_with_one_line_and_stays_as_it_was(tmp_path, stopped_run):
  workdir = copy_of(stopped_run, tmp_path)
  before = snapshot(workdir)
  if os.geteuid() != 0:
    workdir.chmod(0o555)
    try:
      result = run_train(workdir, overrides=RUN)
    finally:
      workdir.chmod(0o755)
  elif namespace_tools_work():  # root ignores permissions: make the file system read-only
    result = run_in_mount_namespace(f"mount --bind {workdir} {workdir} && "
                                    f"mount -o remount,ro,bind {workdir}",
                                    train_command(workdir, overrides=RUN))
  else:
    pytest.skip("running as root without unshare: cannot make a read-only workdir")
  assert_fails_with_one_line(result, "is not writable")
  assert "Traceback" not in result.stderr
  assert snapshot(workdir) == before


# Runs python with the size of any file it writes limited to 64 KiB (set in the process itself:
# a preexec_fn would fork the multithreaded test process).
LIMITED_FILE_SIZE = ("import os, resource, sys; "
                     "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024)); "
                     "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.mark.slow
def test_write_failure_while_saving_fails_with_one_line_and_keeps_the_checkpoints(tmp_path,
                                                                                  stopped_run):
  """A real failing write (RLIMIT_FSIZE: EFBIG from the kernel, where a full disk gives ENOSPC);
  a rerun once writes work again resumes from the last complete checkpoint."""
  workdir = copy_of(stopped_run, tmp_path)
  before = checkpoint_files(workdir)
  python, *args = train_command(workdir, overrides={**RUN, "checkpoint.every_steps": 5})
  result = subprocess.run([python, "-c", LIMITED_FILE_SIZE, *args], env=train_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = error_lines(result.stderr)
  # Nothing else: not the tracebacks each of Orbax's save threads logs, nor TensorStore's
  # callbacks into the closed event loop of the failed save.
  assert result.stderr.strip().splitlines() == lines, result.stderr[-3000:]
  assert re.search(r"cannot write checkpoint step 15 in .*: File too large; existing checkpoints "
                   r"are untouched \(latest complete: step 10\)", lines[0]), lines[0]
  assert checkpoint_files(workdir) == before

  rerun = run_train(workdir, overrides={**RUN, "checkpoint.every_steps": 5, "stop_at_step": 15})
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "from step 10;" in rerun.stdout
  assert complete_steps(workdir)[-1] == 15 and not partial_saves(workdir)


@pytest.mark.skipif(not namespace_tools_work(), reason="needs unshare -rm to mount a small tmpfs")
def test_disk_full_while_saving_fails_with_one_line_and_keeps_the_checkpoints(tmp_path,
                                                                             stopped_run):
  """The workdir on a tmpfs with room for the existing checkpoints and little more: ENOSPC."""
  used_kib = sum(p.stat().st_blocks // 2 for p in stopped_run.rglob("*")) + 64
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  workdir = disk / "run"
  setup = (f"mount -t tmpfs -o size={used_kib + 200}k tmpfs {disk} && "
           f"cp -a {stopped_run} {workdir}")
  command = train_command(workdir, overrides={**RUN, "checkpoint.every_steps": 5})
  # Copy the workdir out of the tmpfs (which vanishes with the namespace) after the run.
  result = run_in_mount_namespace(setup, ["sh", "-c", f"\"$@\"; status=$?; cp -a {workdir} {out}; "
                                          f"exit $status", "sh", *command])
  assert result.returncode == 2, result.stderr[-3000:]
  lines = error_lines(result.stderr)
  assert result.stderr.strip().splitlines() == lines, result.stderr[-3000:]  # one line, only
  assert re.search(r"cannot write checkpoint step 15 in .*: No space left on device; existing "
                   r"checkpoints are untouched \(latest complete: step 10\)", lines[0]), lines[0]
  assert checkpoint_files(out) == checkpoint_files(stopped_run)


# --- corrupt data ----------------------------------------------------------------------------------


def image_folder(root, count=72, size=16):
  """ROOT/{train,test}/<class>/<i>.png (72 images: 2 steps of 32), plus one corrupt train file."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for i in range(count):
      class_dir = root / split / f"class{i % 2}"
      class_dir.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(class_dir / f"{i}.png")
  corrupt = root / "train" / "class0" / "broken.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  return corrupt


@pytest.mark.slow
def test_corrupt_image_fails_with_one_line_or_is_skipped_and_counted(tmp_path):
  corrupt = image_folder(tmp_path / "images")
  overrides = {**RUN, "stop_at_step": 2, "data.source": f"folder:{tmp_path / 'images'}",
               "data.data_dir": str(tmp_path / "cache")}
  result = run_train(tmp_path / "run", overrides=overrides)
  line = assert_fails_with_one_line(result, f"cannot decode image {corrupt}")
  assert "data.skip_corrupt=True" in line and "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()

  result = run_train(tmp_path / "run", overrides={**overrides, "data.skip_corrupt": True})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "skipped 1 undecodable image(s)" in result.stderr
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 2
