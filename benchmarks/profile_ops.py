"""Which ops take the device's time: a summary of a jax.profiler trace, without TensorBoard.

  python benchmarks/profile_ops.py TRACE_DIR [--top 20]

Reads the newest *.xplane.pb under TRACE_DIR (written by jax.profiler.trace, e.g. by
`train_step.py --profile TRACE_DIR`) with jaxlib's own XSpace reader (jax.profiler.ProfileData;
no TensorFlow), and sums event durations by name: on a GPU or TPU the device plane's 'XLA Ops' line when the trace has
one, else the kernels on all its stream lines; on a CPU the XLA executor threads of the host
plane, whose times overlap (threads run in parallel), so there the shares are of busy time.
"""
import argparse
import collections
import glob
import os

SKIPPED_DEVICE_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                        "Framework Name Scope", "Source code")


def newest_trace(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def _op_lines(space):
  """(plane, [lines]) of the device ops: the accelerator plane, else the host XLA threads."""
  devices = [plane for plane in space.planes
             if plane.name.startswith(("/device:GPU", "/device:TPU"))]
  if devices:
    plane = devices[0]
    ops = [line for line in plane.lines if line.name == "XLA Ops"]
    return plane, ops or [line for line in plane.lines if line.name not in SKIPPED_DEVICE_LINES]
  host = space.find_plane_with_name("/host:CPU")
  return host, [line for line in host.lines if line.name.startswith("tf_XLA")]


SOURCE_STATS = ("tf_op", "long_name", "hlo_op")  # first found names an op's origin


def _source_op(event) -> str:
  """Where an op or kernel came from, when the trace says: the framework op (JAX's name stack),
  else the HLO op of a GPU kernel. (An event's stats include its metadata's.)"""
  found = {}
  for name, value in event.stats:
    if name in SOURCE_STATS and name not in found:
      found[name] = str(value)
  return next((found[name] for name in SOURCE_STATS if found.get(name)), "")


def top_ops(trace_dir: str, count: int = 20):
  """(device name, [(op, picoseconds, share of the total, source op)]) of the newest trace."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  space = ProfileData.from_file(newest_trace(trace_dir))
  plane, lines = _op_lines(space)
  durations = collections.Counter()
  sources = {}
  for line in lines:
    for event in line.events:
      name = event.name
      if "::" in name:  # runtime regions around the ops (ThunkExecutor::Execute, ...)
        continue
      durations[name] += round(event.duration_ns * 1000)
      if name not in sources:
        sources[name] = _source_op(event)
  total = sum(durations.values()) or 1
  return plane.name, [(name, ps, ps / total, sources[name])
                      for name, ps in durations.most_common(count)]


def format_top_ops(trace_dir: str, count: int = 20) -> str:
  device, ops = top_ops(trace_dir, count)
  lines = [f"time by op on {device} ({trace_dir}):"]
  for name, ps, share, source in ops:
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
