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


def tiny_config(name: str = "mae", **overrides):
  config = load_config(name)
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


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
