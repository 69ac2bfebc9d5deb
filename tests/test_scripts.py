"""The launchers in scripts/: bash -n, shellcheck, and the commands they build (--dry-run)."""
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY_OVERRIDES

SCRIPTS = sorted(p for p in (REPO / "scripts").iterdir() if p.suffix in (".sh", ".sbatch"))
TPU = REPO / "scripts" / "tpu_vm.sh"
SLURM = REPO / "scripts" / "slurm_gpu.sbatch"
# Train flags that a careless quoting would break on the remote shell / in srun.
TRAIN_FLAGS = ["--config", "configs/mae.py:model=vit_large,data=imagenet2012",
               "--config.data.data_dir=gs://bucket/tensorflow datasets",
               "--config.note=it's a \"test\" of $HOME; `date`"]


def shell_words(command_line: str) -> list:
  """The words bash makes of a (shell-quoted) command line, without running it."""
  words = subprocess.run(["bash", "-c", 'eval "set -- $1" && printf "%s\\0" "$@"', "_", command_line],
                         capture_output=True, text=True, check=True).stdout
  return words.split("\0")[:-1]


def test_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "slurm_gpu.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (CI installs it: apt-get install shellcheck)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  run = subprocess.run(["shellcheck", "--shell=bash", "--severity=style", str(script)],
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stdout + run.stderr


def tpu(*args):
  return subprocess.run(["bash", str(TPU), *args], capture_output=True, text=True, timeout=600)


def test_tpu_launch_creates_installs_starts_on_all_workers_and_streams_worker_0():
  run = tpu("launch", "--name", "mae-l", "--zone", "us-central2-b", "--type", "v4-32", "--spot",
            "--queued", "--project", "my-project", "--workdir", "gs://bucket/runs/mae l",
            "--dry-run", "--", *TRAIN_FLAGS)
  assert run.returncode == 0, run.stderr
  commands = [shell_words(line) for line in run.stdout.splitlines() if line.startswith("gcloud")]
  location = ["--zone=us-central2-b", "--project=my-project"]
  create, copy, install, start, logs = commands
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "mae-l", *location,
                    "--node-id=mae-l", "--accelerator-type=v4-32",
                    "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert copy[6:] == ["mae-l:sjmae_jax.tar.gz", *location, "--worker=all"]
  for ssh in (install, start):
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mae-l", *location]
    assert ssh[8] == "--worker=all"
  assert "-r ~/sjmae_jax/requirements.txt 'jax[tpu]'" in install[9]
  assert logs[8:] == ["--worker=0",
                      '--command=tail -n 200 -F --pid="$(cat ~/sjmae_train.pid)" ~/sjmae_train.log']

  # What the workers' shell runs: train.py with exactly our flags, whatever their quoting needs.
  remote = start[9].removeprefix("--command=")
  nohup = next(line for line in remote.splitlines() if line.startswith("nohup "))
  prefix, suffix = "nohup ~/sjmae_venv/bin/python train.py ", " >> ~/sjmae_train.log 2>&1 < /dev/null &"
  assert nohup.startswith(prefix) and nohup.endswith(suffix)
  assert shell_words(nohup[len(prefix):-len(suffix)]) == [
      "--workdir=gs://bucket/runs/mae l", "--config.distributed.enabled=True", *TRAIN_FLAGS]


def test_tpu_runtime_follows_the_accelerator_type_and_spot_is_optional():
  run = tpu("create", "--name", "x", "--zone", "us-west4-a", "--type", "v5litepod-64", "--dry-run")
  assert run.returncode == 0, run.stderr
  assert shell_words(run.stdout.strip()) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "x", "--zone=us-west4-a",
      "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]


@pytest.mark.parametrize("args, message", [
    (["train", "--name", "x", "--zone", "z", "--workdir", "/home/me/run"], "must be a gs:// path"),
    (["train", "--name", "x", "--zone", "z"], "must be a gs:// path"),
    (["launch", "--zone", "z", "--workdir", "gs://b/r"], "--name is required"),
    (["create", "--name", "x", "--zone", "z", "--type", "v9-8"], "no default --runtime"),
    (["fly", "--name", "x", "--zone", "z"], "unknown command: fly"),
    (["create", "--name", "x", "--zone", "z", "--colour", "red"], "unknown option: --colour"),
])
def test_tpu_rejects_bad_arguments(args, message):
  run = tpu(*args, "--dry-run")
  assert run.returncode == 2
  assert message in run.stderr
  assert "gcloud" not in run.stdout


def test_tpu_help():
  run = tpu("--help")
  assert run.returncode == 0 and "Usage: scripts/tpu_vm.sh COMMAND" in run.stdout


def slurm(tasks_per_node, node_list="gpu[007-010]", ntasks=32, extra_env=None):
  env = dict(os.environ, SLURM_JOB_ID="12345", SLURM_JOB_NODELIST=node_list, SLURM_NTASKS=str(ntasks),
             SLURM_NTASKS_PER_NODE=tasks_per_node, SLURM_SUBMIT_DIR=str(REPO), SJMAE_DRY_RUN="1",
             **(extra_env or {}))
  return subprocess.run(["bash", str(SLURM), "--workdir", "/shared/runs/mae l", *TRAIN_FLAGS],
                        env=env, capture_output=True, text=True, timeout=600)


def test_slurm_one_task_per_gpu_leaves_the_cluster_to_jax_auto_detection():
  run = slurm("8(x4)")
  assert run.returncode == 0, run.stderr
  assert shell_words(run.stdout.splitlines()[-1]) == [
      "srun", "--kill-on-bad-exit=1", "python", "train.py", "--workdir", "/shared/runs/mae l",
      *TRAIN_FLAGS, "--config.distributed.enabled=True"]


@pytest.mark.parametrize("node_list, coordinator", [
    ("gpu[007-010]", "gpu007"), ("gpu[3,5-6],cpu1", "gpu3"), ("a1,b2", "a1"), ("node12", "node12")])
def test_slurm_one_task_per_node_names_the_coordinator_as_jax_would(node_list, coordinator):
  run = slurm("1(x4)", node_list=node_list, ntasks=4)
  assert run.returncode == 0, run.stderr
  words = shell_words(run.stdout.splitlines()[-1])
  assert words[:3] == ["srun", "--kill-on-bad-exit=1", "bash"]
  # Run what srun would run in task 3, with a program in front of the train command that prints
  # the command it is given and whether SLURM_LOCALID is still set.
  show = ["bash", "-c", 'printf "%s\\0" "$@" "SLURM_LOCALID=${SLURM_LOCALID-unset}"', "_"]
  task = subprocess.run(words[2:6] + show + words[6:], capture_output=True, text=True, check=True,
                        env=dict(os.environ, SLURM_PROCID="3", SLURM_LOCALID="0"))
  port = 12345 % 4096 + 61440  # jax._src.clusters.slurm_cluster's choice
  assert task.stdout.split("\0")[:-1] == [
      "python", "train.py", "--workdir", "/shared/runs/mae l", *TRAIN_FLAGS,
      "--config.distributed.enabled=True",
      f"--config.distributed.coordinator_address={coordinator}:{port}",
      "--config.distributed.num_processes=4", "--config.distributed.process_id=3",
      "SLURM_LOCALID=unset"]


def test_slurm_refuses_to_run_outside_a_job():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  run = subprocess.run(["bash", str(SLURM), "--workdir", "/x"], env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 2 and "SLURM_JOB_ID is not set" in run.stderr


def free_port_in_jax_slurm_range() -> int:
  """A free port among those JAX's SLURM detection derives from a job id (61440 + id % 4096)."""
  for port in random.sample(range(61440, 65536), 200):
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
        return port
      except OSError:
        continue
  pytest.skip("no free port in 61440-65535")


@pytest.mark.slow
def test_slurm_one_task_per_node_command_trains_as_one_two_process_job(tmp_path):
  """Runs the srun command the script builds, as SLURM would run it in 2 tasks on this machine
  (with SLURM_LOCALID set, which the command must hide from JAX). One task per GPU relies on
  JAX's SLURM detection alone; its command is checked above."""
  job_id = free_port_in_jax_slurm_range() - 61440
  flags = [f"--config={REPO / 'configs' / 'mae.py'}", "--config.mesh.data=2",
           "--config.epochs=1", "--config.stop_at_step=3"]
  flags += [f"--config.{key}={value}" for key, value in TINY_OVERRIDES.items() if key != "epochs"]
  env = dict(os.environ, SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost",
             SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1(x2)",
             SLURM_SUBMIT_DIR=str(REPO), SJMAE_DRY_RUN="1", SJMAE_PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             TF_CPP_MIN_LOG_LEVEL="2")
  dry = subprocess.run(["bash", str(SLURM), "--workdir", str(tmp_path / "run"), *flags], env=env,
                       capture_output=True, text=True, timeout=600)
  assert dry.returncode == 0, dry.stderr
  command = shell_words(dry.stdout.splitlines()[-1])
  assert command[:2] == ["srun", "--kill-on-bad-exit=1"]
  task_command = command[2:]
  tasks = [subprocess.Popen(task_command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
           for i in range(2)]
  outputs = [task.communicate(timeout=600) for task in tasks]
  for task, (_, err) in zip(tasks, outputs):
    assert task.returncode == 0, err[-3000:]
  # mesh.data=2 needs both processes' devices: a process left alone would have failed.
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3
