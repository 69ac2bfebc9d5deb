"""Where the train step's GPU time goes, kernel by kernel: the evidence that picks the next lever.

  python benchmarks/gpu_evidence.py --out DIR            # MAE ViT-B/16, 224 px, batch 256
  python benchmarks/gpu_evidence.py --out DIR --smoke    # CPU, tiny model, seconds per part

Run by benchmarks/gpu_evidence.sh (one call of <= 6 minutes on a bare H200). This process never
starts a JAX backend: each part runs in a process of its own (JAX takes most of the accelerator's
memory when it starts), stopped after --part-timeout; no part starts once --deadline has passed
(the skipped ones are named at the end of summary.md). Parts, in order:
  default, fast  the default step and the --fast step (train_step.py's Setup, the same jit, shardings
          and donation as train.py): compile, the optimized HLO of the step's module only
          (`compiled.as_text()`, what --xla_dump_to writes as *after_optimizations.txt) into
          hlo_<case>.txt.gz, a few timed steps, then --profile-steps steps under
          jax.profiler; the trace is joined with the HLO by benchmarks/kernel_table.py: the top
          kernels (HLO fusion, ops inside, ms/step, bytes, GB/s against --peak-gbs, TFLOP/s) and
          ms per step by kind, into summary.md and kernels_<case>.csv;
  micro   candidate kernels against flax's ops at the step's shapes, forward + VJP in the
          compute dtype: LayerNorm (flax, norm_impl=fused's custom VJP, norm_impl=pallas's
          kernels where they apply, and tokamax's when that package is importable: an optional
          extra, carried as wheels) at (B x 197 decoder tokens, 512) and (B x 50 encoder tokens,
          768); GELU of fc1's output + bias (flax, gelu_impl=fused, gelu_impl=pallas's backward
          kernel where it applies) at the MLP widths;
  torch   the timm peer (benchmarks/torch_peer.py) under torch.profiler, its kernels grouped into
          the same kinds, into torch_kernels.csv;
  flags   one row per XLA flag set (--flag-sets), each in a process of its own (train_step.py
          with --xla-flags); a flag this jaxlib does not know (XLA aborts at start-up) is
          reported as such instead of a number.
Files in --out (at most 7): evidence.log (written by the .sh), summary.md, hlo_default.txt.gz,
hlo_fast.txt.gz, kernels_default.csv, kernels_fast.csv, torch_kernels.csv.
"""
import argparse
import functools
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script
  sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp

from benchmarks import kernel_table
from benchmarks.step_bench import StepBench, synthetic_batch
from benchmarks.step_setup import FAST_LEVERS, MODEL_LEVERS, Setup, build_config
from sjmae_jax.models.vit import vit_kwargs
# pylint: enable=wrong-import-position

FLAG_SETS = ("--xla_gpu_enable_cudnn_layer_norm=true", "--xla_gpu_enable_triton_gemm=false",
             "--xla_gpu_experimental_enable_fusion_block_level_rewriter=true",
             "--xla_gpu_exhaustive_tiling_search=true")
SMOKE = dict(model="vit_micro", img=32, patch=4, batch=8, steps=2, profile_steps=2,
             override=["model.depth=2", "decoder.embed_dim=128", "decoder.depth=1",
                       "decoder.num_heads=4"])
PARTS = ("default", "fast", "micro", "torch", "flags")
FAST = Setup(**{k: MODEL_LEVERS[k] for k in FAST_LEVERS})  # train_step.py --fast
UNKNOWN_FLAG = "Unknown flag"  # XLA's fatal line: 'Unknown flag in XLA_FLAGS: --xla_...'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--method", default="mae")
  parser.add_argument("--model", default="vit_base")
  parser.add_argument("--img", type=int, default=224)
  parser.add_argument("--patch", type=int, default=0)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5, help="timed steps before each profile")
  parser.add_argument("--profile-steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--peak-gbs", type=float, default=4800.0,
                      help="the memory bandwidth GB/s is read against (H200: 4,800)")
  parser.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # runs one part
  parser.add_argument("--flag-sets", default=";".join(FLAG_SETS),
                      help="';'-separated XLA flag sets, one row each")
  parser.add_argument("--deadline", type=float, default=0.0, metavar="SECONDS",
                      help="start no part (no flag row) after this many seconds; 0: none")
  parser.add_argument("--part-timeout", type=float, default=240.0, metavar="SECONDS",
                      help="each part's (and each flag row's) process is stopped after this")
  parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--smoke", action="store_true", help=f"CPU sizes: {SMOKE}")
  pre, _ = parser.parse_known_args(argv)
  if pre.smoke:
    parser.set_defaults(**SMOKE)
  args = parser.parse_args(argv)
  args.parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(args.parts) - set(PARTS))
  if unknown:
    parser.error(f"--parts: unknown {unknown} ({', '.join(PARTS)})")
  args.flag_sets = [f.strip() for f in args.flag_sets.split(";") if f.strip()]
  # what train_step.build_config reads
  args.repeats, args.warmup = 1, 1
  return args


class Report:
  """summary.md, written as it grows (a part cut short by the call's limit loses nothing)."""

  def __init__(self, path: str, new: bool):
    self.path = path
    if new:
      with open(path, "w", encoding="utf-8") as f:
        f.write("")

  def add(self, text: str) -> None:
    print(text, flush=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(text + "\n\n")


def median_ms(function, *inputs, repeats: int = 10) -> float:
  jax.block_until_ready(function(*inputs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(function(*inputs))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------- steps

def step_evidence(case: str, setup: Setup, args, report: Report) -> None:
  config = build_config(args.method, args.model, args, setup)
  bench = StepBench(config, setup)
  batch = synthetic_batch(config, bench.mesh)
  compiled, compile_seconds = bench.compile(bench.lower(batch))
  hlo = compiled.as_text()
  with gzip.open(os.path.join(args.out, f"hlo_{case}.txt.gz"), "wt", encoding="utf-8") as f:
    f.write(hlo)
  seconds = bench.time_runs(lambda: batch, args.steps, repeats=1, warmup=1)
  step_ms = 1e3 * seconds[0] / args.steps
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      bench.time_runs(lambda: batch, args.profile_steps, repeats=1, warmup=0)
    device, rows, kinds, span_ms = kernel_table.kernel_rows(trace_dir, hlo, args.profile_steps)
  kernel_table.write_csv(os.path.join(args.out, f"kernels_{case}.csv"), rows)
  peak = args.peak_gbs if jax.default_backend() == "gpu" else 0.0
  title = (f"{case} step ({', '.join(setup.tags(args.method)) or 'levers off'}): "
           f"{args.method} {args.model} {config.model.img_size} px batch {config.batch_size}, "
           f"{step_ms:.2f} ms/step timed, compile {compile_seconds:.1f} s, loss {bench.loss():.4f}")
  note = ("" if jax.default_backend() == "gpu" else
          "\n\n(A CPU trace: its 'kernels' are XLA's CPU thunks, run on several threads at once, "
          "so the ms add up to more than the step; the GPU kernel table needs a GPU.)")
  report.add(kernel_table.format_table(device, rows, kinds, span_ms, args.top, peak, title)
             + note)


# ----------------------------------------------------------------------------- micro

def micro_shapes(args) -> tuple:
  """(rows, width) of the step's LayerNorms and (rows, hidden) of its GELUs: the encoder on the
  kept tokens, the decoder on all tokens."""
  config = build_config(args.method, args.model, args, Setup())
  encoder = vit_kwargs(config.model)
  tokens = (encoder["img_size"] // encoder["patch_size"]) ** 2
  kept = int(tokens * (1 - config.mae.mask_ratio)) + 1
  b = config.batch_size
  ratio = encoder["mlp_ratio"]
  norms = [(b * (tokens + 1), config.decoder.embed_dim), (b * kept, encoder["embed_dim"])]
  gelus = [(rows, int(width * ratio)) for rows, width in norms]
  return norms, gelus, jnp.dtype(config.compute_dtype)


def layer_norm_candidates(shape):
  """{name: f(x, scale, bias) -> y, or why it does not run here}: flax's LayerNorm and the
  candidates (norm_impl=fused, norm_impl=pallas, tokamax's when it is importable)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from sjmae_jax.models import pallas_norm, vit  # pylint: disable=import-outside-toplevel

  def flax_ln(x, scale, bias):
    return nn.LayerNorm(epsilon=1e-6, dtype=x.dtype).apply(
        {"params": {"scale": scale, "bias": bias}}, x)

  candidates = {"flax": flax_ln,
                "fused (norm_impl=fused)": lambda x, s, b: vit.fused_layer_norm(x, s, b, 1e-6,
                                                                                x.dtype)}
  if pallas_norm.kernel_applies(shape):
    candidates["pallas (norm_impl=pallas)"] = lambda x, s, b: pallas_norm.pallas_layer_norm(
        x, s, b, 1e-6, x.dtype)
  else:
    candidates["pallas (norm_impl=pallas)"] = (
        f"the kernels do not apply here ({jax.default_backend()}, width {shape[-1]}): "
        "norm_impl=pallas is the fused row's function")
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
    candidates["tokamax (auto: Triton on a GPU)"] = functools.partial(tokamax.layer_norm,
                                                                      epsilon=1e-6)
  except Exception as e:  # pylint: disable=broad-except  (absent, or built for another jax)
    candidates["tokamax"] = f"not importable ({type(e).__name__}: {e})"
  return candidates


def micro_evidence(args, report: Report) -> None:
  from sjmae_jax.models import pallas_norm, vit  # pylint: disable=import-outside-toplevel
  norms, gelus, dtype = micro_shapes(args)
  bytes_of = jnp.dtype(dtype).itemsize
  lines = [f"### Candidate kernels against flax, forward + VJP, {dtype.name} "
           f"({jax.devices()[0].device_kind})", "",
           "| op | shape | implementation | ms | GB/s (x, dy read; y, dx written) | "
           "max abs diff vs flax (y, dx) |", "|---|---|---|---:|---:|---|"]
  key = jax.random.PRNGKey(0)

  def run_case(op, shape, name, function, inputs):
    cotangent = jax.random.normal(key, shape, dtype)

    @jax.jit
    def fwd_vjp(*inputs):
      y, vjp = jax.vjp(function, *inputs)
      return y, vjp(cotangent)

    try:
      ms = median_ms(fwd_vjp, *inputs)
      y, grads = fwd_vjp(*inputs)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0][:120]
      lines.append(f"| {op} | {shape} | {name} | | | failed: {type(e).__name__}: {first} |")
      return None
    gbs = 4 * shape[0] * shape[1] * bytes_of / (ms / 1e3) / 1e9
    return ms, gbs, y, grads[0]

  for shape in norms:
    x = jax.random.normal(key, shape, dtype)
    scale = 1 + 0.1 * jax.random.normal(jax.random.PRNGKey(1), shape[-1:], jnp.float32)
    bias = 0.1 * jax.random.normal(jax.random.PRNGKey(2), shape[-1:], jnp.float32)
    reference = None
    for name, function in layer_norm_candidates(shape).items():
      if isinstance(function, str):
        lines.append(f"| LayerNorm | {shape} | {name} | | | {function} |")
        continue
      result = run_case("LayerNorm", shape, name, function, (x, scale, bias))
      if result is None:
        continue
      reference = reference or result
      diff = max_differences(result, reference)
      lines.append(f"| LayerNorm | {shape} | {name} | {result[0]:.3f} | {result[1]:,.0f} | "
                   f"{diff[0]:.3g}, {diff[1]:.3g} |")
  for shape in gelus:  # gelu(h + fc1's bias): VJP for h and the bias
    h = jax.random.normal(key, shape, dtype)
    bias = 0.1 * jax.random.normal(jax.random.PRNGKey(1), shape[-1:], jnp.float32)
    candidates = {"flax": lambda v, b: jax.nn.gelu(v + b.astype(v.dtype), approximate=False),
                  "fused (gelu_impl=fused)": lambda v, b: vit.fused_gelu(v + b.astype(v.dtype))}
    if pallas_norm.kernel_applies(shape):
      candidates["pallas (gelu_impl=pallas)"] = pallas_norm.pallas_gelu_bias
    else:
      lines.append(f"| GELU + bias | {shape} | pallas (gelu_impl=pallas) | | | the kernel does "
                   f"not apply here ({jax.default_backend()}, width {shape[-1]}) |")
    reference = None
    for name, function in candidates.items():
      result = run_case("GELU + bias", shape, name, function, (h, bias))
      if result is None:
        continue
      reference = reference or result
      diff = max_differences(result, reference)
      lines.append(f"| GELU + bias | {shape} | {name} | {result[0]:.3f} | {result[1]:,.0f} | "
                   f"{diff[0]:.3g}, {diff[1]:.3g} |")
  report.add("\n".join(lines))


def max_differences(result, reference) -> tuple:
  """Largest absolute differences of a candidate's two outputs (result[2], result[3]) from the
  reference candidate's, in float32."""
  return tuple(float(jnp.max(jnp.abs(result[i].astype(jnp.float32)
                                     - reference[i].astype(jnp.float32)))) for i in (2, 3))


# ----------------------------------------------------------------------------- torch peer

def torch_evidence(args, report: Report) -> None:
  config = build_config(args.method, args.model, args, Setup())
  encoder = vit_kwargs(config.model)
  command = [sys.executable, os.path.join(REPO, "benchmarks", "torch_peer.py"), "--peer", "timm",
             "--img", str(encoder["img_size"]), "--patch", str(encoder["patch_size"]),
             "--embed-dim", str(encoder["embed_dim"]), "--depth", str(encoder["depth"]),
             "--heads", str(encoder["num_heads"]), "--mlp-ratio", str(encoder["mlp_ratio"]),
             "--decoder-dim", str(config.decoder.embed_dim),
             "--decoder-depth", str(config.decoder.depth),
             "--decoder-heads", str(config.decoder.num_heads),
             "--mask-ratio", str(config.mae.mask_ratio), "--batch", str(config.batch_size),
             "--dtype", config.compute_dtype, "--steps", str(args.steps), "--repeats", "1",
             "--warmup", "3", "--profile-steps", str(args.profile_steps),
             "--profile-out", os.path.join(args.out, "torch_kernels.csv")]
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
  lines = result.stdout.strip().splitlines()
  peer = json.loads(lines[-1]) if result.returncode == 0 and lines else {
      "skipped": f"exit {result.returncode}: "
                 f"{((result.stderr or result.stdout).strip().splitlines() or [''])[-1]}"}
  if "skipped" in peer:
    report.add(f"### torch peer: skipped ({peer['skipped']})")
    return
  profile = peer["profile"]
  text = [f"### torch peer (timm, torch {peer['torch']}, "
          f"{'torch.compile' if peer['compiled'] else 'eager'}, "
          f"{'AMP bf16' if peer['amp_bf16'] else 'float32'}) on {peer['device']}: "
          f"{peer['step_ms']:.2f} ms/step timed; kernels from torch.profiler "
          f"({profile['device']})", "", "| kernel | kind | calls/step | ms/step |",
          "|---|---|---:|---:|"]
  text += [f"| {name[:90]} | {kind} | {calls:g} | {ms:.3f} |"
           for name, kind, calls, ms in profile["top"][:args.top]]
  kinds = profile["kinds"]
  text += ["", kernel_table.format_kinds(kinds)]
  report.add("\n".join(text))


# ----------------------------------------------------------------------------- XLA flags

def flag_known(flags: str) -> tuple:
  """(True, '') when this jaxlib starts with `flags` in XLA_FLAGS; else (False, why)."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  result = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  if result.returncode == 0:
    return True, ""
  lines = (result.stderr or result.stdout).strip().splitlines()
  unknown = next((line for line in lines if UNKNOWN_FLAG in line), "")
  if unknown:
    return False, "no such flag in this jaxlib: " + unknown.split("] ", 1)[-1]
  return False, f"jax did not start (exit {result.returncode}): {(lines or [''])[-1]}"


def flag_row(flags: str, args) -> str:
  known, why = flag_known(flags)
  if not known:
    return f"| `{flags}` | | | {why} |"
  argv = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"),
          "--method", args.method, "--model", args.model, "--img", str(args.img),
          "--patch", str(args.patch), "--batch", str(args.batch), "--steps", str(args.steps),
          "--repeats", "3", "--warmup", "2", f"--xla-flags={flags}"]
  argv += [f"--override={item}" for item in args.override]
  fd, json_path = tempfile.mkstemp(suffix=".json")
  os.close(fd)
  try:
    result = subprocess.run(argv + ["--json-out", json_path], capture_output=True, text=True,
                            timeout=args.part_timeout, check=False)
    with open(json_path, encoding="utf-8") as f:
      text = f.read()
  except subprocess.TimeoutExpired:
    return f"| `{flags}` | | | timed out after {args.part_timeout:.0f} s (compile included) |"
  finally:
    os.remove(json_path)
  if result.returncode != 0 or not text:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"| `{flags}` | | | failed (exit {result.returncode}): {tail[0][:160]} |"
  measured = json.loads(text)["measurements"][0]
  step_ms = 1e3 * statistics.median(measured["step_seconds"])
  return (f"| `{flags}` | {step_ms:.2f} | {measured['batch'] / step_ms * 1e3:,.0f} | "
          f"compile {measured['compile_seconds']:.1f} s, loss {measured['loss']:.4f} |")


def run_part(part: str, args, report: Report) -> None:
  if part in ("default", "fast"):
    step_evidence(part, Setup() if part == "default" else FAST, args, report)
  elif part == "micro":
    micro_evidence(args, report)
  elif part == "torch":
    torch_evidence(args, report)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  report = Report(os.path.join(args.out, "summary.md"), new=not args.child)
  if args.child:  # one part, in this process
    try:
      run_part(args.parts[0], args, report)
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [""])[0]
      report.add(f"{args.parts[0]}: FAILED ({type(e).__name__}: {first})")
      return 1
    return 0
  # This process never starts a JAX backend: each part runs in a process of its own, so that
  # each gets the whole accelerator (JAX takes most of its memory when it starts).
  started = time.monotonic()
  skipped, failures = [], []

  def in_time(what: str) -> bool:
    if args.deadline and time.monotonic() - started > args.deadline:
      skipped.append(what)
      return False
    return True

  report.add(f"## GPU evidence: {args.method} {args.model}, jax {jax.__version__}\n\n"
             f"`python benchmarks/gpu_evidence.py {' '.join(argv)}`")
  passed, skip = [], False  # argv without --parts (each child gets its own)
  for arg in argv:
    if skip or arg.startswith("--parts="):
      skip = False
    elif arg == "--parts":
      skip = True
    else:
      passed.append(arg)
  for part in args.parts:
    if part == "flags":
      rows = ["### XLA flag sets, each in a process of its own (the default step)", "",
              "| XLA_FLAGS | ms/step | img/s | note |", "|---|---:|---:|---|"]
      for flags in args.flag_sets:
        if in_time(f"flags {flags}"):
          rows.append(flag_row(flags, args))
          print(rows[-1], flush=True)
      report.add("\n".join(rows))
    elif in_time(part):
      try:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--parts",
                                 part, "--child"], timeout=args.part_timeout, check=False)
        if result.returncode != 0:
          failures.append(part)
      except subprocess.TimeoutExpired:
        report.add(f"{part}: stopped after --part-timeout {args.part_timeout:.0f} s")
        failures.append(part)
  if skipped:
    report.add(f"not run (past --deadline {args.deadline:.0f} s): {'; '.join(skipped)}")
  if failures:
    report.add(f"failed: {'; '.join(failures)}")
  print(f"evidence in {args.out}: {', '.join(sorted(os.listdir(args.out)))}; "
        f"{time.monotonic() - started:.0f} s", flush=True)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
