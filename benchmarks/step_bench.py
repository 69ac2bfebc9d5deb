"""The JAX step of train_step.py: compiled as train.py compiles it (StepBench), timed on a
synthetic batch or end to end through the input pipeline, profiled, or measured in a process of
its own (for XLA flags, which XLA reads once)."""
import copy
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import flops, profile_ops, step_hlo
from benchmarks.step_setup import Setup, build_config, setup_argv
from benchmarks.step_table import Measurement
from sjmae_jax import config_lib, data, engine, objectives, optim, sharding, trainer

# The script that measure_in_subprocess runs (with the measurement's own XLA_FLAGS).
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")


class StepBench:
  """One training step compiled as train.py compiles it, and its train state."""

  def __init__(self, config, setup: Setup, finish_batch=None):
    self.mesh = sharding.make_mesh(config.mesh)
    self.model = trainer.build_model(config)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=1000)
    init_fn = functools.partial(trainer.init_state, self.model, tx, config)
    rng = jax.random.PRNGKey(config.seed)
    state_shardings = sharding.tree_shardings(jax.eval_shape(init_fn, rng), self.mesh,
                                              config.sharding.rules, config.sharding.min_size)
    self.state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
    self.kernel_dtype = trainer.kernel_cast_dtype(config)
    step_fn = trainer.make_train_step(self.model, tx, schedule, self.mesh,
                                      config.grad_accum_steps, finish_batch=finish_batch,
                                      kernel_dtype=self.kernel_dtype)
    self.step = jax.jit(step_fn,
                        in_shardings=(state_shardings, sharding.batch_sharding(self.mesh)),
                        out_shardings=(state_shardings, sharding.replicated(self.mesh)),
                        donate_argnums=(0,) if setup.donate else ())
    self.metrics = None

  def lower(self, batch):
    return self.step.lower(self.state, batch)

  def compile(self, lowered):
    """Compiles a lowering of the step (later calls reuse it); (compiled, seconds)."""
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start

  def residual_bytes(self, batch):
    """Bytes that autodiff saves for the backward pass of the step's loss (step_hlo)."""
    def loss(params):
      if self.kernel_dtype is not None:
        params = engine.cast_kernels(params, self.kernel_dtype)
      (value, _), _ = self.model.apply(
          {"params": params, "batch_stats": self.state["batch_stats"]}, batch, train=True,
          rngs=objectives.step_rngs(self.model, jax.random.PRNGKey(0)), mutable=["batch_stats"])
      return value
    return step_hlo.residual_bytes(loss, self.state["params"])

  def time_runs(self, next_batch, steps: int, repeats: int, warmup: int) -> list:
    """Seconds of each of `repeats` runs of `steps` steps, after `warmup` steps."""
    for _ in range(warmup):
      self.state, self.metrics = self.step(self.state, next_batch())
    jax.block_until_ready((self.state, self.metrics))
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        self.state, self.metrics = self.step(self.state, next_batch())
      jax.block_until_ready((self.state, self.metrics))
      seconds.append(time.perf_counter() - start)
    return seconds

  def loss(self) -> float:
    return float(self.metrics["loss"]) if self.metrics is not None else float("nan")


def synthetic_batch(config, mesh):
  size, views = config.model.img_size, len(config.data.views)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((config.batch_size, views, size, size, 3), np.float32)
  return sharding.global_batch({"images": images,
                                "label": np.zeros((config.batch_size,), np.int32)}, mesh)


def attention_used(compiled) -> str:
  return "cudnn" if "__cudnn$fmha" in compiled.as_text() else "xla"


def measure_synthetic(bench, config, method, model, setup, args, profile_dir=""):
  batch = synthetic_batch(config, bench.mesh)
  lowered = bench.lower(batch)
  dots = sum(step_hlo.dot_flops(lowered.as_text()).values())
  compiled, compile_seconds = bench.compile(lowered)
  xla = flops.xla_flops(compiled)
  inventory = step_hlo.inventory(compiled)
  if args.inventory:
    inventory["residual_bytes"] = bench.residual_bytes(batch)
  seconds = []
  if not args.compile_only:
    seconds = bench.time_runs(lambda: batch, args.steps, args.repeats, args.warmup)
  if profile_dir and not args.compile_only:
    attempt("profile", lambda: profile(bench, batch, min(args.steps, 5), profile_dir))
  return Measurement(
      method=method, model=model, img=config.model.img_size, batch=config.batch_size,
      tags=setup.tags(method), step_seconds=[s / args.steps for s in seconds],
      flops_per_image=flops.train_flops_per_image(config, config.batch_size),
      xla_flops_per_image=xla / config.batch_size if xla else None,
      hlo_dot_flops_per_image=dots / config.batch_size if dots else None,
      attention=attention_used(compiled), compile_seconds=compile_seconds, loss=bench.loss(),
      inventory=inventory)


PROFILE_SUMMARIES = []  # (case, summary text) of this run's profiles


def profile(bench, batch, steps: int, trace_dir: str):
  with jax.profiler.trace(trace_dir):
    bench.time_runs(lambda: batch, steps, repeats=1, warmup=0)
  summary = profile_ops.format_top_ops(trace_dir, count=25)
  PROFILE_SUMMARIES.append((os.path.basename(trace_dir), summary))
  print(summary, flush=True)


def cifar10_dir(args) -> str:
  folder = args.cifar_dir or config_lib.cifar10_dir()
  return os.path.abspath(folder) if folder else ""


def e2e_pipeline(config, args, views_on_device: bool):
  data_config = copy.deepcopy(config.data)  # keeps augment_on_device's bool-or-'auto' type
  data_config.source = f"folder:{cifar10_dir(args)}"
  if args.data_dir:
    data_config.data_dir = args.data_dir
  data_config.augment_on_device = views_on_device
  return data.build_train_pipeline(data_config, global_batch_size=config.batch_size, seed=0,
                                   process_index=0, process_count=1)


def measure_e2e(bench, config, method, model, setup, args, views_on_device: bool):
  """Input pipeline + device_prefetch + step. With views_on_device a new step is compiled
  (bench=None); otherwise `bench`'s step is reused (same batch shapes)."""
  pipeline = e2e_pipeline(config, args, views_on_device)
  compile_seconds, attention, xla = 0.0, "", None
  if views_on_device:
    bench = StepBench(config, setup, finish_batch=pipeline.finish_batch)
  batches = engine.device_prefetch(iter(pipeline), bench.mesh)
  if views_on_device:
    first = next(batches)
    compiled, compile_seconds = bench.compile(bench.lower(first))
    attention, xla = attention_used(compiled), flops.xla_flops(compiled)
  seconds = bench.time_runs(lambda: next(batches), args.steps, args.repeats, args.warmup)
  where = "device" if views_on_device else "host"
  return Measurement(
      method=method, model=model, img=config.model.img_size, batch=config.batch_size,
      tags=setup.tags(method) + [f"e2e {args.e2e}, views on {where}"],
      step_seconds=[s / args.steps for s in seconds],
      flops_per_image=flops.train_flops_per_image(config, config.batch_size),
      xla_flops_per_image=xla / config.batch_size if xla else None, attention=attention,
      compile_seconds=compile_seconds, loss=bench.loss())


def measure_lever(method, model, label, setup, args, profile_dir=""):
  config = build_config(method, model, args, setup)
  if setup.xla_flags:
    return measure_in_subprocess(method, model, setup, args, profile_dir)
  return measure_synthetic(StepBench(config, setup), config, method, label, setup, args,
                           profile_dir)


def measure_in_subprocess(method, model, setup, args, profile_dir=""):
  """This script in a new process with setup.xla_flags in its XLA_FLAGS (XLA reads them once,
  at start-up); the child's one measurement, with this setup's tags."""
  argv = [sys.executable, SCRIPT, "--method", method, "--model", model, "--img", str(args.img),
          "--patch", str(args.patch), "--batch", str(args.batch * setup.batch_scale),
          "--steps", str(args.steps), "--repeats", str(args.repeats),
          "--warmup", str(args.warmup), f"--xla-flags={setup.xla_flags}"]
  argv += [f"--override={item}" for item in args.override] + setup_argv(setup)
  argv += ["--compile-only"] * args.compile_only + ["--inventory"] * args.inventory
  if profile_dir:
    argv += ["--profile", os.path.dirname(profile_dir),
             f"--profile-name={os.path.basename(profile_dir)}"]
  fd, json_path = tempfile.mkstemp(suffix=".json")
  os.close(fd)
  try:
    result = subprocess.run(argv + ["--json-out", json_path], capture_output=True, text=True,
                            timeout=1800, check=False)
    with open(json_path, encoding="utf-8") as f:
      text = f.read()
  finally:
    os.remove(json_path)
  if result.returncode != 0 or not text:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"child process exit {result.returncode}: {tail[0]}")
  child = json.loads(text)
  PROFILE_SUMMARIES.extend(tuple(item) for item in child["profiles"])
  fields = child["measurements"][0]
  fields["tags"] = setup.tags(method)
  return Measurement(**fields)


FAILURES = []  # what failed in this process; the script then exits with status 1


def attempt(what: str, function):
  """function() or, when it fails, None after one line saying so: one bad case (say, out of
  memory) does not lose the other rows of a run on a scarce GPU."""
  try:
    return function()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"{what}: FAILED ({type(e).__name__}: {message})", flush=True)
    FAILURES.append(what)
    return None
