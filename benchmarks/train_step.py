"""Train-step throughput (images/s) and MFU of MAE / SJ-MAE, PyTorch peers, end-to-end runs.

  python benchmarks/train_step.py --method mae --model vit_base --batch 256 --peer timm
  python benchmarks/train_step.py --method mae,sjmae --model vit_tiny,vit_small,vit_base \
      --batch 256 --levers all --best
  python benchmarks/train_step.py --method mae,sjmae --model vit_tiny --img 32 --batch 1024 \
      --e2e cifar10
  python benchmarks/train_step.py --method mae,sjmae --model vit_base --batch 4 --compile-only
  python benchmarks/train_step.py --smoke   # CPU in seconds (tiny model): the CI smoke run
  add --append BENCHMARKS.md to put the rows in its Train step table and the command in its runs

The step is the one train.py runs: configs/<method>.py (model, img and data args), then
trainer.build_model / init_state / make_train_step, jit with NamedShardings over
sharding.make_mesh and the train state donated. Inputs are random images already on the device
(one batch, reused), except in the end-to-end runs. Timing: --warmup untimed steps (compilation),
then --repeats runs of --steps steps, each ended by one block_until_ready (no host sync inside a
run); images/s from the median run. FLOPs per image are counted analytically (benchmarks/flops.py:
6 x forward MACs) and printed beside XLA's cost analysis of the compiled step and the count from
the lowered program's dot shapes (benchmarks/step_hlo.py); MFU divides the analytic count by the
device's bf16 dense peak (blank for devices not in flops.BF16_PEAK_TFLOPS, e.g. CPUs).
MiB/img: the compiled step's buffers (XLA's memory analysis: arguments + outputs - aliased +
temporaries) per image.

--peer timm,mae:DIR,sjmae:DIR times benchmarks/torch_peer.py (the same MAE from timm Blocks,
facebookresearch/mae's own model from a clone in DIR, the original SJ-MAE model from a clone of
JulesCollenne/SJ-MAE in DIR) in a subprocess on the same device, before JAX starts: one table row
each, and the first peer of a method fills the peer columns of that method's rows.
--levers all | a comma list of LEVERS measures the same case with each fast-path lever switched
(one row each; --levers-for limits them to some methods); xla_flags rows (one per set in
--xla-flag-sets) run in a process of their own, as XLA reads its flags once. --best then
measures every method with the levers that gained >= 2 % together (not dtype, donate, batch or
the approximate GELU, which change what is computed or how much).
--inventory prints, per measurement, the compiled step's HLO inventory (kernels, converts,
cast-only kernels, temporaries, autodiff's saved residuals); --compile-only skips the timing.
--e2e cifar10 adds end-to-end rows: the CIFAR-10 ImageFolder through the input pipeline,
engine.device_prefetch and the step, with the views computed on the host (train.py's default)
and in the step on the device (data.augment_on_device=True, as train.py does with it).
Printed: one detail line per measurement, then a markdown table in BENCHMARKS.md's column order.
"""
import argparse
import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
  sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
import flax
import jax
import numpy as np

from benchmarks import flops, profile_ops, step_hlo
from sjmae_jax import config_lib, data, engine, objectives, optim, sharding, trainer
from sjmae_jax.models.sizes import SIZES
from sjmae_jax.models.vit import vit_kwargs
# pylint: enable=wrong-import-position

SCRIPT = os.path.abspath(__file__)
PEER_SCRIPT = os.path.join(REPO, "benchmarks", "torch_peer.py")

COLUMNS = ("date", "device", "method", "model", "img", "batch", "img/s", "MFU %", "peer",
           "peer img/s", "ours/peer", "step ms", "MiB/img")
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |"
TABLE_RULE = "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
SECTION_TITLE = "## Train step"
RUNS_TITLE = "Runs"
INVENTORY_COLUMNS = ("method", "model", "img", "batch", "kernels", "fusions", "converts",
                     "cast-only kernels", "scatter MiB", "temp MiB", "saved residuals MiB/img",
                     "dot GFLOP/img")

# A tiny model for CPU smoke runs: every code path, seconds per compile and step.
SMOKE_DEFAULTS = dict(model="vit_micro", img=32, patch=4, batch=8, steps=2, repeats=2, warmup=1,
                      override=["model.depth=2", "decoder.embed_dim=128", "decoder.depth=1",
                                "decoder.num_heads=4"])
# The model levers: config.model key -> its fast value (the default is the plain form).
MODEL_LEVERS = {"norm_impl": "fused", "gelu_impl": "fused", "gelu_approximate": True,
                "gather_impl": "permute", "cast_params_once": True}
LEVERS = ("dtype", "attention", "remat", "donate", "batch_passes", *MODEL_LEVERS, "xla_flags",
          "batch")
REMAT_POLICY_LEVER = "dots_with_no_batch_dims_saveable"
# XLA GPU flags measured one set at a time by the xla_flags lever (--xla-flag-sets overrides).
XLA_FLAG_SETS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true",
                 "--xla_gpu_autotune_level=0")
# Levers that --best may combine: they change how the step runs, not what it computes.
COMBINABLE = ("attention", "remat", "batch_passes", *(k for k in MODEL_LEVERS
                                                      if k != "gelu_approximate"), "xla_flags")
BEST_GAIN = 1.02


@dataclasses.dataclass(frozen=True)
class Setup:
  """The fast-path levers of one measurement."""
  dtype: str = "bfloat16"
  attention: str = "auto"   # model.attention_impl: auto (cuDNN on GPU) | xla | cudnn
  remat: str = ""           # '' off, 'full' (save block inputs only), or a checkpoint policy
  donate: bool = True       # donate the train state to the step (as train.py)
  batch_passes: bool = True  # SJ-MAE: both encoder passes in one call
  norm_impl: str = "flax"   # model.norm_impl
  gelu_impl: str = "flax"   # model.gelu_impl
  gelu_approximate: bool = False  # model.gelu_approximate
  gather_impl: str = "take"  # model.gather_impl
  cast_params_once: bool = False  # model.cast_params_once
  xla_flags: str = ""       # XLA_FLAGS of its own (the measurement runs in a new process)
  batch_scale: int = 1      # the global batch is --batch times this

  def tags(self, method: str) -> list:
    """How this setup differs from the fast path (FAST_PATH), as 'lever=value' strings."""
    tags = []
    for field in dataclasses.fields(self):
      if field.name == "batch_passes" and method != "sjmae":
        continue
      value = getattr(self, field.name)
      if value != getattr(FAST_PATH, field.name):
        tags.append(lever_tag(field.name, value))
    return tags


def lever_tag(name: str, value) -> str:
  """'norm_impl=fused', 'donate=off', 'batch x2': how a row names a lever's value."""
  if name == "batch_scale":
    return f"batch x{value}"
  shown = ("on" if value else "off") if isinstance(value, bool) else (value or "off")
  return f"{name}={shown}"


FAST_PATH = Setup()


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", default="mae", help="comma list of mae, sjmae")
  parser.add_argument("--model", default="vit_base",
                      help="comma list of vit_micro|vit_tiny|vit_small|vit_base|vit_large|vit_huge")
  parser.add_argument("--img", type=int, default=224)
  parser.add_argument("--patch", type=int, default=0, help="0: 4 up to 64 px, else 16")
  parser.add_argument("--batch", type=int, default=256, help="global batch")
  parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=FAST_PATH.dtype)
  parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default=FAST_PATH.attention)
  parser.add_argument("--remat", default=FAST_PATH.remat,
                      help="'' (off), full, or a jax.checkpoint_policies name")
  parser.add_argument("--no-donate", action="store_true")
  parser.add_argument("--no-batch-passes", action="store_true")
  parser.add_argument("--norm-impl", choices=["flax", "fused"], default=FAST_PATH.norm_impl)
  parser.add_argument("--gelu-impl", choices=["flax", "fused"], default=FAST_PATH.gelu_impl)
  parser.add_argument("--gelu-approximate", action="store_true")
  parser.add_argument("--gather-impl", choices=["take", "permute"],
                      default=FAST_PATH.gather_impl)
  parser.add_argument("--cast-params-once", action="store_true")
  parser.add_argument("--fast", action="store_true",
                      help="all model levers on but the approximate GELU (fused norm and GELU, "
                      "permute gathers, kernels cast once)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compile included)")
  parser.add_argument("--levers", default="", help=f"all or a comma list of {', '.join(LEVERS)}")
  parser.add_argument("--levers-for", default="",
                      help="comma list of the methods whose lever rows run (default: all)")
  parser.add_argument("--xla-flag-sets", default=";".join(XLA_FLAG_SETS),
                      help="';'-separated XLA flag sets of the xla_flags lever")
  parser.add_argument("--best", action="store_true",
                      help="after the lever rows, every method with the winning levers together")
  parser.add_argument("--peer", default="none", help="none, or a comma list of timm | "
                      "mae:/path/to/mae (a clone of github.com/facebookresearch/mae) | "
                      "sjmae:/path/to/SJ-MAE (a clone of github.com/JulesCollenne/SJ-MAE)")
  parser.add_argument("--e2e", default="", choices=["", "cifar10"])
  parser.add_argument("--cifar-dir", default=None,
                      help="CIFAR-10 ImageFolder (default: $SJMAE_CIFAR10_DIR)")
  parser.add_argument("--data-dir", default=None,
                      help="where the decoded CIFAR-10 cache is kept (default: data.data_dir)")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. decoder.depth=4 (repeatable)")
  parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="trace a few steps of each base case (and of --best's) into "
                      "DIR/<case> and print the ops that take the device's time "
                      "(benchmarks/profile_ops.py); the summaries go to DIR/summary.txt")
  parser.add_argument("--inventory", action="store_true",
                      help="print the compiled steps' HLO inventory table (benchmarks/step_hlo.py)")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile and take the inventory, no timing (implies --inventory)")
  parser.add_argument("--deadline", type=float, default=0.0, metavar="SECONDS",
                      help="start no new measurement after this many seconds (0: no limit); "
                      "what is skipped is listed")
  parser.add_argument("--json-out", default="", help=argparse.SUPPRESS)  # for a parent process
  parser.add_argument("--profile-name", default="", help=argparse.SUPPRESS)  # its trace folder
  parser.add_argument("--append", default="", metavar="BENCHMARKS.md",
                      help="add the rows to this file's Train step table")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny CPU-sized defaults: {SMOKE_DEFAULTS}")
  pre, _ = parser.parse_known_args(argv)
  if pre.smoke:
    parser.set_defaults(**SMOKE_DEFAULTS)
  args = parser.parse_args(argv)
  args.methods = [m for m in args.method.split(",") if m]
  args.models = [m for m in args.model.split(",") if m]
  unknown = sorted(set(args.methods) - {"mae", "sjmae"})
  if unknown:
    parser.error(f"--method: unknown {unknown} (mae, sjmae)")
  args.lever_names = list(LEVERS) if args.levers == "all" else [
      name for name in args.levers.split(",") if name]
  unknown = sorted(set(args.lever_names) - set(LEVERS))
  if unknown:
    parser.error(f"--levers: unknown {unknown} (all, {', '.join(LEVERS)})")
  args.lever_methods = [m for m in args.levers_for.split(",") if m] or args.methods
  args.flag_sets = [flags.strip() for flags in args.xla_flag_sets.split(";") if flags.strip()]
  args.peers = [] if args.peer == "none" else [p for p in args.peer.split(",") if p]
  for peer in args.peers:
    if peer != "timm" and not peer.startswith(("mae:", "sjmae:")):
      parser.error(f"--peer: {peer!r} is not timm, mae:DIR or sjmae:DIR")
  args.inventory = args.inventory or args.compile_only
  model_levers = dict(norm_impl=args.norm_impl, gelu_impl=args.gelu_impl,
                      gelu_approximate=args.gelu_approximate, gather_impl=args.gather_impl,
                      cast_params_once=args.cast_params_once)
  if args.fast:
    model_levers.update({k: v for k, v in MODEL_LEVERS.items() if k != "gelu_approximate"})
  args.setup = Setup(dtype=args.dtype, attention=args.attention, remat=args.remat,
                     donate=not args.no_donate, batch_passes=not args.no_batch_passes,
                     **model_levers)
  return args


def load_method_config(method: str, arg: str):
  spec = importlib.util.spec_from_file_location(f"config_{method}",
                                                os.path.join(REPO, "configs", f"{method}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_config_value(config, key: str, text: str):
  """--override key=value: the value is parsed as the type of the key's current value."""
  node = config
  *parents, leaf = key.split(".")
  for parent in parents:
    node = node[parent]
  if leaf not in node:
    raise ValueError(f"--override {key}: no such config key")
  current = node[leaf]
  if isinstance(current, bool):
    value = text.lower() in ("1", "true", "yes", "on")
  elif isinstance(current, (int, float, str)):
    value = type(current)(text)
  else:
    raise ValueError(f"--override {key}: a {type(current).__name__} cannot be set from the "
                     "command line")
  node[leaf] = value


def build_config(method: str, model: str, args, setup: Setup):
  """configs/<method>.py for `model` at args.img (data=cifar10: only the e2e runs read data; any
  dataset other than the digits demo gives the 512 x 8 decoder), then the setup's levers."""
  arg = f"model={model},data=cifar10,img={args.img}"
  if args.patch:
    arg += f",patch={args.patch}"
  config = load_method_config(method, arg)
  config.batch_size = args.batch * setup.batch_scale
  for item in args.override:
    key, _, value = item.partition("=")
    set_config_value(config, key, value)
  config.compute_dtype = setup.dtype
  config.model.attention_impl = setup.attention
  config.model.remat = bool(setup.remat)
  if setup.remat not in ("", "full"):
    config.model.remat_policy = setup.remat
  for key in MODEL_LEVERS:
    config.model[key] = getattr(setup, key)
  if method == "sjmae":
    config.sjmae.batch_passes = setup.batch_passes
  return config


def setup_argv(setup: Setup) -> list:
  """The command-line options of this script that give `setup` (for a child process)."""
  argv = ["--dtype", setup.dtype, "--attention", setup.attention, f"--remat={setup.remat}",
          "--norm-impl", setup.norm_impl, "--gelu-impl", setup.gelu_impl,
          "--gather-impl", setup.gather_impl]
  argv += ["--no-donate"] * (not setup.donate) + ["--no-batch-passes"] * (not setup.batch_passes)
  argv += ["--gelu-approximate"] * setup.gelu_approximate
  argv += ["--cast-params-once"] * setup.cast_params_once
  return argv


def model_label(config, model: str) -> str:
  """'vit_base_patch16' for the standard sizes with MAE's 512 x 8 decoder; sizes spelled out
  otherwise."""
  encoder = vit_kwargs(config.model)
  sizes = (encoder["embed_dim"], encoder["depth"], encoder["num_heads"])
  decoder = (config.decoder.embed_dim, config.decoder.depth, config.decoder.num_heads)
  variant = config_lib.MODELS.get(model, ("custom",))[0]
  if variant in SIZES and SIZES[variant][:3] == sizes and decoder == (512, 8, 16):
    return f"{model}_patch{encoder['patch_size']}"
  return (f"vit_{sizes[0]}x{sizes[1]}_dec{decoder[0]}x{decoder[1]}"
          f"_patch{encoder['patch_size']}")


# ----------------------------------------------------------------------------- PyTorch peer

def peer_method(peer: str) -> str:
  """The method a peer implements: sjmae:DIR is SJ-MAE, timm and mae:DIR are MAE."""
  return "sjmae" if peer.startswith("sjmae:") else "mae"


def run_peer(peer: str, config, args) -> dict:
  """benchmarks/torch_peer.py in a subprocess for this config; its JSON result."""
  encoder = vit_kwargs(config.model)
  method = peer_method(peer)
  block = config.sjmae if method == "sjmae" else config.mae
  command = [sys.executable, PEER_SCRIPT, "--peer", peer,
             "--img", str(encoder["img_size"]), "--patch", str(encoder["patch_size"]),
             "--embed-dim", str(encoder["embed_dim"]), "--depth", str(encoder["depth"]),
             "--heads", str(encoder["num_heads"]), "--mlp-ratio", str(encoder["mlp_ratio"]),
             "--decoder-dim", str(config.decoder.embed_dim),
             "--decoder-depth", str(config.decoder.depth),
             "--decoder-heads", str(config.decoder.num_heads),
             "--mask-ratio", str(block.mask_ratio), "--batch", str(config.batch_size),
             "--dtype", config.compute_dtype, "--steps", str(args.steps),
             "--repeats", str(args.repeats), "--warmup", str(max(args.warmup, 3))]
  if method == "sjmae":
    command += ["--mask-ratio-jigsaw", str(block.mask_ratio_jigsaw),
                "--predictor-dim", str(block.predictor_hidden_dim)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
  except subprocess.TimeoutExpired:
    return {"peer": peer.split(":")[0], "skipped": "timed out after 1800 s"}
  lines = result.stdout.strip().splitlines()
  if result.returncode != 0 or not lines:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"peer": peer.split(":")[0], "skipped": f"exit {result.returncode}: {tail[0]}"}
  return json.loads(lines[-1])


def describe_peer(result: dict) -> str:
  if "skipped" in result:
    return f"peer {result['peer']}: skipped ({result['skipped']})"
  how = ", ".join(filter(None, ["AMP bf16" if result["amp_bf16"] else "float32",
                                "torch.compile" if result["compiled"] else "eager"]))
  return (f"peer {result['peer']} (torch {result['torch']}, timm {result['timm']}; {how}) on "
          f"{result['device']}: {result['images_per_second']:,.0f} img/s, step "
          f"{result['step_ms']:.2f} ms, {result['params']:,} params, loss {result['loss']:.4f}")


def peer_row(result: dict, method: str, model: str, config, date: str, device_kind: str,
             num_devices: int) -> str:
  """The table row of a peer: its img/s, and MFU by our analytic FLOPs of the same step."""
  label = f"peer {result['peer']} ({method})"
  rate = mfu = step_ms = ""
  if "skipped" in result:
    label += " (skipped)"
  else:
    rate = f"{result['images_per_second']:,.0f}"
    value = flops.mfu_percent(flops.train_flops_per_image(config, config.batch_size),
                              result["images_per_second"], device_kind, num_devices)
    mfu = "" if value is None else f"{value:.1f}"
    step_ms = f"{result['step_ms']:.1f}"
  cells = [date, device_name(device_kind, num_devices), label, model,
           str(config.model.img_size), str(config.batch_size), rate, mfu, "", "", "", step_ms, ""]
  return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------- JAX step

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


def device_name(device_kind: str, num_devices: int) -> str:
  return device_kind if num_devices == 1 else f"{num_devices} x {device_kind}"


def attention_used(compiled) -> str:
  return "cudnn" if "__cudnn$fmha" in compiled.as_text() else "xla"


def footprint_bytes(inventory: dict):
  """The compiled step's buffers: arguments + outputs - aliased (donated) + temporaries."""
  if "temp_bytes" not in inventory:
    return None
  return (inventory["argument_bytes"] + inventory["output_bytes"] - inventory["alias_bytes"]
          + inventory["temp_bytes"])


@dataclasses.dataclass
class Measurement:
  method: str
  model: str
  img: int
  batch: int
  tags: list
  step_seconds: list
  flops_per_image: float
  xla_flops_per_image: float = None
  hlo_dot_flops_per_image: float = None
  attention: str = ""
  compile_seconds: float = 0.0
  loss: float = float("nan")
  peer: dict = None
  inventory: dict = dataclasses.field(default_factory=dict)

  @property
  def timed(self) -> bool:
    return bool(self.step_seconds)

  @property
  def images_per_second(self) -> float:
    return self.batch / statistics.median(self.step_seconds) if self.timed else float("nan")

  def label(self) -> str:
    return self.method + (f" [{', '.join(self.tags)}]" if self.tags else "")

  def mib_per_image(self):
    footprint = footprint_bytes(self.inventory)
    return None if footprint is None else footprint / self.batch / 2 ** 20

  def describe(self, device_kind: str, num_devices: int) -> str:
    """One line: step time, img/s, MFU, FLOPs (analytic, XLA's, HLO dots), attention, compile,
    memory, loss."""
    parts = []
    if self.timed:
      steps_ms = sorted(1e3 * s for s in self.step_seconds)
      mfu = flops.mfu_percent(self.flops_per_image, self.images_per_second, device_kind,
                              num_devices)
      parts += [f"{statistics.median(steps_ms):.2f} ms/step (runs {steps_ms[0]:.2f}-"
                f"{steps_ms[-1]:.2f})", f"{self.images_per_second:,.0f} img/s",
                "MFU n/a" if mfu is None else f"MFU {mfu:.1f} %"]
    parts.append(f"FLOPs/img analytic {self.flops_per_image / 1e9:.4g} G")
    if self.xla_flops_per_image:
      parts.append(f"XLA {self.xla_flops_per_image / 1e9:.4g} G "
                   f"(XLA/analytic {self.xla_flops_per_image / self.flops_per_image:.3f})")
    if self.hlo_dot_flops_per_image:
      parts.append(f"HLO dots {self.hlo_dot_flops_per_image / 1e9:.4g} G "
                   f"(dots/analytic {self.hlo_dot_flops_per_image / self.flops_per_image:.3f})")
    if self.attention:
      parts.append(f"attention {self.attention}")
    if self.compile_seconds:
      parts.append(f"compile {self.compile_seconds:.1f} s")
    if self.mib_per_image() is not None:
      parts.append(f"{self.mib_per_image():.1f} MiB/img")
    if self.timed:
      parts.append(f"loss {self.loss:.4f}" if math.isfinite(self.loss)
                   else f"LOSS NOT FINITE ({self.loss})")
    return f"{self.label()} {self.model} {self.img}px batch {self.batch}: " + ", ".join(parts)

  def row(self, date: str, device_kind: str, num_devices: int) -> str:
    mfu = (flops.mfu_percent(self.flops_per_image, self.images_per_second, device_kind,
                             num_devices) if self.timed else None)
    peer_name = peer_rate = ratio = ""
    if self.peer is not None:
      peer_name = self.peer["peer"]
      if "skipped" in self.peer:
        peer_name += " (skipped)"
      else:
        peer_rate = f"{self.peer['images_per_second']:,.0f}"
        if self.timed:
          ratio = f"{self.images_per_second / self.peer['images_per_second']:.2f}x"
    rate = f"{self.images_per_second:,.0f}" if self.timed else ""
    step_ms = f"{1e3 * statistics.median(self.step_seconds):.1f}" if self.timed else ""
    memory = "" if self.mib_per_image() is None else f"{self.mib_per_image():.1f}"
    cells = [date, device_name(device_kind, num_devices), self.label(), self.model,
             str(self.img), str(self.batch), rate, "" if mfu is None else f"{mfu:.1f}",
             peer_name, peer_rate, ratio, step_ms, memory]
    return "| " + " | ".join(cells) + " |"

  def inventory_row(self) -> str:
    inv = self.inventory
    mib = lambda value: "" if value is None else f"{value / 2 ** 20:,.1f}"
    residuals = inv.get("residual_bytes")
    cells = [self.label(), self.model, str(self.img), str(self.batch)]
    cells += [f"{inv[key]:,}" if key in inv else "" for key in
              ("kernels", "fusions", "converts", "cast_kernels")]
    cells += [mib(inv.get("scatter_bytes")), mib(inv.get("temp_bytes")),
              mib(None if residuals is None else residuals / self.batch),
              "" if not self.hlo_dot_flops_per_image else
              f"{self.hlo_dot_flops_per_image / 1e9:.2f}"]
    return "| " + " | ".join(cells) + " |"


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


def lever_setups(base: Setup, method: str, names: list, platform_name: str,
                 flag_sets=XLA_FLAG_SETS):
  """[(setup, None) or (None, why skipped)] with each named lever switched from `base`."""
  variants = []
  for name in names:
    if name == "dtype":
      other = "float32" if base.dtype == "bfloat16" else "bfloat16"
      variants.append((dataclasses.replace(base, dtype=other), None))
    elif name == "attention":
      if base.attention in ("auto", "cudnn"):
        if platform_name != "gpu":
          variants.append((None, f"attention: auto is XLA's on {platform_name}; cuDNN needs a "
                                 "CUDA GPU"))
        else:
          variants.append((dataclasses.replace(base, attention="xla"), None))
      elif platform_name == "gpu":
        variants.append((dataclasses.replace(base, attention="cudnn"), None))
      else:
        variants.append((None, f"attention=cudnn: needs a CUDA GPU (this is {platform_name})"))
    elif name == "remat":
      if base.remat:
        variants.append((dataclasses.replace(base, remat=""), None))
      else:
        variants.append((dataclasses.replace(base, remat="full"), None))
        variants.append((dataclasses.replace(base, remat=REMAT_POLICY_LEVER), None))
    elif name == "donate":
      variants.append((dataclasses.replace(base, donate=not base.donate), None))
    elif name == "batch_passes":
      if method == "sjmae":
        variants.append((dataclasses.replace(base, batch_passes=not base.batch_passes), None))
    elif name in MODEL_LEVERS:
      plain = getattr(Setup(), name)
      value = MODEL_LEVERS[name] if getattr(base, name) == plain else plain
      variants.append((dataclasses.replace(base, **{name: value}), None))
    elif name == "xla_flags":
      for flags in flag_sets:
        variants.append((dataclasses.replace(base, xla_flags=flags), None))
    elif name == "batch":
      variants.append((dataclasses.replace(base, batch_scale=2 * base.batch_scale), None))
  return variants


def best_setup(base: Setup, base_rate: float, lever_results: list):
  """`base` with every combinable lever whose row ran >= BEST_GAIN x base_rate (the fastest
  value of each lever; the flag sets that won, together); and the winning tags."""
  best = {}
  for setup, rate in lever_results:
    if not rate or rate < BEST_GAIN * base_rate:
      continue
    for field in COMBINABLE:
      value = getattr(setup, field)
      if value == getattr(base, field):
        continue
      if field == "xla_flags":
        best.setdefault("xla_flags", []).append(value)
      elif field not in best or rate > best[field][1]:
        best[field] = (value, rate)
  changes = {field: (" ".join(value) if field == "xla_flags" else value[0])
             for field, value in best.items()}
  combined = dataclasses.replace(base, **changes)
  won = [lever_tag(field.name, getattr(combined, field.name))
         for field in dataclasses.fields(Setup) if field.name in changes]
  return combined, won


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


# ----------------------------------------------------------------------------- BENCHMARKS.md

def append_to_benchmarks(path: str, rows: list, run_note: str) -> None:
  """Adds `rows` at the end of the Train step table and `run_note` at the end of its run list."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  try:
    start = lines.index(SECTION_TITLE)
  except ValueError:
    raise ValueError(f"{path}: no '{SECTION_TITLE}' section") from None
  end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
  header = next((i for i in range(start, end) if lines[i].strip() == TABLE_HEADER), None)
  if header is None:
    raise ValueError(f"{path}: the '{SECTION_TITLE}' section has no table with the header "
                     f"{TABLE_HEADER}")
  table_end = header
  while table_end + 1 < end and lines[table_end + 1].startswith("|"):
    table_end += 1
  lines[table_end + 1:table_end + 1] = rows
  end += len(rows)
  runs = next((i for i in range(table_end, end) if lines[i].startswith(RUNS_TITLE)), None)
  if runs is None:
    raise ValueError(f"{path}: the '{SECTION_TITLE}' section has no '{RUNS_TITLE}' list")
  runs_end = runs
  while runs_end + 1 < end and lines[runs_end + 1].startswith("- "):
    runs_end += 1
  lines.insert(runs_end + 1, run_note)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


# ----------------------------------------------------------------------------- main

def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.xla_flags:  # read once, when JAX starts its backends
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  started = time.monotonic()
  skipped = []

  def in_time(what: str) -> bool:
    if args.deadline and time.monotonic() - started > args.deadline:
      skipped.append(what)
      return False
    return True

  cases = [(method, model) for model in args.models for method in args.methods]
  configs = {case: build_config(*case, args, args.setup) for case in cases}
  peers = {}  # (method, model) -> [peer results]
  for peer in args.peers:  # first, while JAX has not yet taken the accelerator's memory
    for (method, model), config in configs.items():
      if method == peer_method(peer) and in_time(f"peer {peer} {method} {model}"):
        peers.setdefault((method, model), []).append(run_peer(peer, config, args))
        print(describe_peer(peers[(method, model)][-1]), flush=True)

  date = datetime.date.today().isoformat()
  device_kind = jax.devices()[0].device_kind
  num_devices = jax.device_count()
  versions = (f"Python {platform.python_version()}, jax {jax.__version__}, "
              f"jaxlib {importlib.metadata.version('jaxlib')}, "
              f"flax {flax.__version__}")
  peer_versions = next((f", torch {p['torch']}, timm {p['timm']}"
                        for results in peers.values() for p in results if "torch" in p), "")
  xla_flags = os.environ.get("XLA_FLAGS", "")
  command = "python benchmarks/train_step.py " + shlex.join(argv)
  print(f"# {date}, {num_devices} x {device_kind} ({jax.default_backend()}); {versions}"
        f"{peer_versions}" + (f"; XLA_FLAGS={xla_flags}" if xla_flags else ""), flush=True)
  print(f"# {command}", flush=True)

  measurements, bases, lever_rates = [], {}, {}
  rows = []

  def show(result):
    if result is not None:
      measurements.append(result)
      rows.append(result.row(date, device_kind, num_devices))
      print(result.describe(device_kind, num_devices), flush=True)
    return result

  for (method, model), config in configs.items():
    label = model_label(config, model)
    what = f"{method} {label}"
    for result in peers.get((method, model), []):
      rows.append(peer_row(result, method, label, config, date, device_kind, num_devices))
    case = args.profile_name or f"{method}_{label}"
    profile_dir = os.path.join(args.profile, case) if args.profile else ""
    base = bench = None
    if in_time(what):
      bench = attempt(what, lambda: StepBench(config, args.setup))
      base = bench and attempt(what, lambda: measure_synthetic(bench, config, method, label,
                                                               args.setup, args, profile_dir))
    if base:
      base.peer = next(iter(peers.get((method, model), [])), None)
      bases[(method, label)] = base
      show(base)
    if args.e2e and not (cifar10_dir(args) and os.path.isdir(cifar10_dir(args))):
      print(f"e2e {args.e2e}: skipped (no folder {cifar10_dir(args)}; set --cifar-dir or "
            "$SJMAE_CIFAR10_DIR)", flush=True)
    elif args.e2e and in_time(f"{what} e2e"):
      if bench:
        show(attempt(f"{what} e2e, views on host", lambda: measure_e2e(
            bench, config, method, label, args.setup, args, views_on_device=False)))
      bench = None  # one train state on the device at a time
      show(attempt(f"{what} e2e, views on device", lambda: measure_e2e(
          None, config, method, label, args.setup, args, views_on_device=True)))
    bench = None
    if method not in args.lever_methods:
      continue
    for setup, why in lever_setups(args.setup, method, args.lever_names, jax.default_backend(),
                                   args.flag_sets):
      if why:
        print(f"lever {why}: skipped", flush=True)
        continue
      tagged = f"{what} [{', '.join(setup.tags(method))}]"
      if in_time(tagged):
        result = show(attempt(tagged, lambda: measure_lever(method, model, label, setup, args)))
        if result is not None and result.timed and setup.batch_scale == args.setup.batch_scale:
          lever_rates.setdefault((method, model), []).append(
              (setup, result.images_per_second))

  if args.best:
    for (method, model), config in configs.items():
      label = model_label(config, model)
      # The method's own lever rows, else those of the first method that had some.
      source = next((m for m in [method, *args.lever_methods] if (m, model) in lever_rates), None)
      base = bases.get((source, label))
      if base is None or not base.timed:
        print(f"best {method} {label}: skipped (no timed base and lever rows)", flush=True)
        continue
      setup, won = best_setup(args.setup, base.images_per_second, lever_rates[(source, model)])
      print(f"best {method} {label}: {', '.join(won) or 'no lever gained >= 2 %'}", flush=True)
      if not won:  # (no deadline here: the combination is what the lever rows are for)
        continue
      profile_dir = os.path.join(args.profile, f"{method}_{label}_best") if args.profile else ""
      result = attempt(f"best {method} {label}",
                       lambda: measure_lever(method, model, label, setup, args, profile_dir))
      if result is not None:
        result.tags = [f"best: {', '.join(result.tags)}"]
        show(result)

  for (method, label), sjmae in bases.items():
    mae = bases.get(("mae", label))
    if method == "sjmae" and mae is not None and sjmae.timed and mae.timed:
      ratio = statistics.median(sjmae.step_seconds) / statistics.median(mae.step_seconds)
      print(f"sjmae/mae step time, {label}: {ratio:.2f}x (issue target <= 1.3x)", flush=True)

  print()
  print(TABLE_HEADER)
  print(TABLE_RULE)
  print("\n".join(rows), flush=True)
  if args.inventory:
    print()
    print("| " + " | ".join(INVENTORY_COLUMNS) + " |")
    print("|---|---|---:|---:|" + "---:|" * (len(INVENTORY_COLUMNS) - 4))
    print("\n".join(m.inventory_row() for m in measurements if m.inventory), flush=True)
  if args.profile and PROFILE_SUMMARIES and not args.json_out:
    os.makedirs(args.profile, exist_ok=True)
    with open(os.path.join(args.profile, "summary.txt"), "w", encoding="utf-8") as f:
      f.write(f"# {command}\n")
      for case, summary in PROFILE_SUMMARIES:
        f.write(f"\n## {case}\n{summary}\n")
    print(f"\nprofile summaries: {os.path.join(args.profile, 'summary.txt')}")
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump({"measurements": [dataclasses.asdict(m) for m in measurements],
                 "profiles": PROFILE_SUMMARIES}, f)
  if args.append:
    note = (f"- {date}, {device_name(device_kind, num_devices)}: {versions}{peer_versions}"
            + (f", XLA_FLAGS=`{xla_flags}`" if xla_flags else "") + f": `{command}`")
    append_to_benchmarks(args.append, rows, note)
    print(f"\nappended {len(rows)} row(s) to {args.append}")
  if skipped:
    print(f"not run (past --deadline {args.deadline:.0f} s): {'; '.join(skipped)}", flush=True)
  if FAILURES:
    print(f"failed: {'; '.join(FAILURES)}", flush=True)
  return measurements


if __name__ == "__main__":
  main()
  sys.exit(1 if FAILURES else 0)
