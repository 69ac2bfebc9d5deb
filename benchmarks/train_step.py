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
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
  sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position,unused-import
import flax
import jax

from benchmarks.step_bench import (FAILURES, PROFILE_SUMMARIES, StepBench, attempt, cifar10_dir,
                                   measure_e2e, measure_lever, measure_synthetic)
from benchmarks.step_peers import describe_peer, peer_method, peer_row, run_peer
# (REMAT_POLICY_LEVER, setup_argv, COLUMNS, SECTION_TITLE: this script's names for its users)
from benchmarks.step_setup import (FAST_LEVERS, FAST_PATH, LEVERS, MODEL_LEVERS,
                                   REMAT_POLICY_LEVER, XLA_FLAG_SETS, Setup, best_setup,
                                   build_config, lever_setups, model_label, setup_argv)
from benchmarks.step_table import (COLUMNS, INVENTORY_COLUMNS, SECTION_TITLE, TABLE_HEADER,
                                   TABLE_RULE, append_to_benchmarks, device_name)
# pylint: enable=wrong-import-position,unused-import

# A tiny model for CPU smoke runs: every code path, seconds per compile and step.
SMOKE_DEFAULTS = dict(model="vit_micro", img=32, patch=4, batch=8, steps=2, repeats=2, warmup=1,
                      override=["model.depth=2", "decoder.embed_dim=128", "decoder.depth=1",
                                "decoder.num_heads=4"])


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
  parser.add_argument("--norm-impl", choices=["flax", "fused", "pallas"],
                      default=FAST_PATH.norm_impl)
  parser.add_argument("--gelu-impl", choices=["flax", "fused", "pallas"],
                      default=FAST_PATH.gelu_impl)
  parser.add_argument("--gelu-approximate", action="store_true")
  parser.add_argument("--gather-impl", choices=["take", "permute"],
                      default=FAST_PATH.gather_impl)
  parser.add_argument("--cast-params-once", action="store_true")
  parser.add_argument("--qkv-impl", choices=["fused", "split"], default=FAST_PATH.qkv_impl)
  parser.add_argument("--optim-flatten", action="store_true",
                      help="optim.flatten: AdamW over flat vectors")
  parser.add_argument("--fast", action="store_true",
                      help="the model levers measured together on 2026-12-04: fused norm and "
                      "GELU, permute gathers, kernels cast once")
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
                      cast_params_once=args.cast_params_once, qkv_impl=args.qkv_impl)
  if args.fast:
    model_levers.update({k: MODEL_LEVERS[k] for k in FAST_LEVERS})
  args.setup = Setup(dtype=args.dtype, attention=args.attention, remat=args.remat,
                     donate=not args.no_donate, batch_passes=not args.no_batch_passes,
                     optim_flatten=args.optim_flatten, **model_levers)
  return args


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
