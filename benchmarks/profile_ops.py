"""Which ops take the device's time: a summary of a jax.profiler trace, without TensorBoard.

  python benchmarks/profile_ops.py TRACE_DIR [--top 20]

Reads the newest *.xplane.pb under TRACE_DIR (written by jax.profiler.trace, e.g. by
`train_step.py --profile TRACE_DIR`) with jax.profiler.ProfileData (jaxlib's own reader, so no
TensorFlow), and sums event durations by name: on a GPU or TPU the device plane's 'XLA Ops' line
when the trace has one, else the kernels on all its stream lines; on a CPU the XLA executor
threads of the host plane, whose times overlap (threads run in parallel), so there the shares are
of busy time. `kind_shares` sorts the ops into matrix products, attention, reductions, layout and
elementwise work, the breakdown of docs/performance.md.
"""
import argparse
import collections
import glob
import os
import re

SKIPPED_DEVICE_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                        "Framework Name Scope", "Source code")
SOURCE_STATS = ("tf_op", "long_name", "hlo_op")  # the first found names an op's origin

# (kind, pattern) in the order tried; the names are XLA's fusion names and the GPU libraries'
# kernel names (cuBLAS nvjet / cutlass, cuDNN, XLA's Triton gemm fusions).
KINDS = (
    ("attention", re.compile(r"fmha|sdpa|flash|attention", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cublas|cutlass|xmma|matmul|\bdot|dot[._]|conv|ynn_", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("layout", re.compile(r"transpose|concatenate|gather|scatter|slice|copy|pad|sort|memcpy",
                          re.I)),
    ("elementwise", re.compile(r"loop_|fusion|convert|wrapped_|multiply|add|select|exp|tanh",
                               re.I)),
)


def newest_trace(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def _op_lines(profile):
  """(plane name, [lines]) of the device ops: the accelerator plane, else the host XLA threads."""
  planes = list(profile.planes)
  devices = [plane for plane in planes if plane.name.startswith(("/device:GPU", "/device:TPU"))]
  if devices:
    plane = devices[0]
    lines = list(plane.lines)
    ops = [line for line in lines if line.name == "XLA Ops"]
    return plane.name, ops or [line for line in lines if line.name not in SKIPPED_DEVICE_LINES]
  host = next(plane for plane in planes if plane.name == "/host:CPU")
  return host.name, [line for line in host.lines if line.name.startswith("tf_XLA")]


def _source_op(event) -> str:
  """Where an op or kernel came from, when the trace says: the framework op (JAX's name stack),
  else the HLO op of a GPU kernel."""
  found = {}
  for name, value in event.stats:
    if name in SOURCE_STATS and name not in found and isinstance(value, str):
      found[name] = value
  return next((found[name] for name in SOURCE_STATS if found.get(name)), "")


def top_ops(trace_dir: str, count=20):
  """(device name, [(op, picoseconds, share of the total, source op)]) of the newest trace;
  count=None gives every op."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  profile = ProfileData.from_file(newest_trace(trace_dir))
  device, lines = _op_lines(profile)
  durations = collections.Counter()
  sources = {}
  for line in lines:
    for event in line.events:
      name = event.name
      if "::" in name or name.startswith("end: "):  # runtime regions around the ops
        continue
      durations[name] += int(round(event.duration_ns * 1000))
      if name not in sources:
        sources[name] = _source_op(event)
  total = sum(durations.values()) or 1
  return device, [(name, ps, ps / total, sources[name])
                  for name, ps in durations.most_common(count)]


def kind_of(op: str) -> str:
  return next((kind for kind, pattern in KINDS if pattern.search(op)), "other")


def kind_shares(ops) -> dict:
  """{kind: (picoseconds, share)} over `ops` (top_ops' list), largest first."""
  totals = collections.Counter()
  for name, ps, _, _ in ops:
    totals[kind_of(name)] += ps
  total = sum(totals.values()) or 1
  return {kind: (ps, ps / total) for kind, ps in totals.most_common()}


def format_top_ops(trace_dir: str, count: int = 20) -> str:
  device, ops = top_ops(trace_dir, None)
  lines = [f"time by kind of op on {device} ({trace_dir}):"]
  for kind, (ps, share) in kind_shares(ops).items():
    lines.append(f"  {100 * share:5.1f} %  {ps / 1e9:10.3f} ms  {kind}")
  lines.append(f"time by op on {device} ({trace_dir}):")
  for name, ps, share, source in ops[:count]:
    lines.append(f"  {100 * share:5.1f} %  {ps / 1e9:10.3f} ms  {name}"
                 + (f"  <- {source}" if source and source != name else ""))
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir")
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args()
  print(format_top_ops(args.trace_dir, args.top))


if __name__ == "__main__":
  main()
