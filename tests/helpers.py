"""Shared test utilities: tiny configs and running train.py in a subprocess."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


TINY_OVERRIDES = {
    "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
    "decoder.embed_dim": 32, "decoder.depth": 1, "decoder.num_heads": 2,
    "batch_size": 32, "log_every_steps": 5, "picture_every_steps": 0,
    "checkpoint.every_steps": 1000, "epochs": 2, "warmup_epochs": 1,
}


# train.py's tiny MAE for 44 steps: the conftest's `uninterrupted_run` fixture, which the resume
# tests compare with.
UNINTERRUPTED_RUN = {"epochs": 1, "warmup_epochs": 0.5}


def override(config, overrides: dict):
  """`config` with its dotted keys ('model.depth') set to the values of `overrides`."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def tiny_config(name: str = "mae", **overrides):
  return override(load_config(name), {**TINY_OVERRIDES, **overrides})


def train_losses(config, steps: int, batch_size: int = 32) -> list:
  """The per-step losses of `steps` jitted train steps on `config`'s data, in process."""
  import jax
  from sjmae_jax import data, optim, sharding, trainer
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  pipeline = data.build_train_pipeline(config.data, global_batch_size=batch_size, seed=0)
  tx, schedule = optim.make_optimizer(config, pipeline.steps_per_epoch)
  state = trainer.init_state(model, tx, config, jax.random.PRNGKey(0))
  step = jax.jit(trainer.make_train_step(model, tx, schedule, mesh))
  losses = []
  for _, batch in zip(range(steps), pipeline):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def run_train(workdir, config_name="mae", overrides=None, devices=1, env=None, timeout=600, **popen):
  """Run train.py with TINY_OVERRIDES (+ overrides) on `devices` forced CPU devices."""
  args = [sys.executable, str(REPO / "train.py"), f"--config={REPO / 'configs' / config_name}.py",
          f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **(overrides or {})}.items()]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  if popen:
    return subprocess.Popen(args, env=full_env, cwd=REPO, **popen)
  return subprocess.run(args, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def start_train(workdir, log_dir, config_name="mae", overrides=None, devices=1, env=None, **popen):
  """train.py in the background (see run_train), stdout and stderr going to log_dir/stdout.txt and
  log_dir/stderr.txt so that a test can poll them (no pipe to fill up)."""
  log_dir = Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  stdout = open(log_dir / "stdout.txt", "w")
  stderr = open(log_dir / "stderr.txt", "w")
  process = run_train(workdir, config_name, overrides, devices, env, stdout=stdout, stderr=stderr,
                      **popen)
  process.stdout_path, process.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
  stdout.close()  # the child holds its own copies
  stderr.close()
  return process


def wait_until(condition, process=None, timeout=600, poll_seconds=0.02, what="condition"):
  """Polls `condition()` until it returns something truthy, which is returned. Fails when
  `process` ends first or after `timeout` seconds (generous: the machine may be slow and loaded)."""
  import time
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    result = condition()
    if result:
      return result
    if process is not None and process.poll() is not None:
      raise AssertionError(f"process ended (exit {process.returncode}) before {what}")
    time.sleep(poll_seconds)
  raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def train_command(workdir, config="mae", overrides=None):
  """The argv run_train runs; `config` may carry an arg ('sjmae:model=vit_tiny')."""
  name, _, arg = config.partition(":")
  config_arg = f"{REPO / 'configs' / name}.py" + (f":{arg}" if arg else "")
  args = [sys.executable, str(REPO / "train.py"), f"--config={config_arg}", f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **(overrides or {})}.items()]


def train_env(devices=1, env=None):
  """The environment run_train runs train.py in (CPU, `devices` forced devices)."""
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))


def take(iterator, count: int) -> list:
  """The next `count` batches of a pipeline."""
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  """Two lists of batches hold the same keys and the same arrays, bit for bit."""
  import numpy as np
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def shared_between_workers(tmp_path_factory, name: str, build) -> Path:
  """A directory built once per test run by `build(directory)`, also under pytest-xdist: the first
  worker to ask builds it while the others wait on a file lock, then all read it. Tests must not
  write into it (copy it first)."""
  import fcntl
  import shutil
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one run's workers
  directory = root / f"shared-{name}"
  with open(root / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not (directory / ".built").exists():
        shutil.rmtree(directory, ignore_errors=True)  # a build that failed part way
        directory.mkdir()
        build(directory)
        (directory / ".built").touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return directory
