"""The kernels of a profiled step, each with the HLO instruction it ran and what that holds.

  python benchmarks/kernel_table.py TRACE_DIR HLO.txt[.gz] --steps N [--top 30]

Joins a jax.profiler trace (the newest *.xplane.pb under TRACE_DIR, read with jaxlib's
jax.profiler.ProfileData: no TensorBoard) with the optimized HLO of the same step
(`compiled.as_text()`, the module that XLA ran). Each kernel event names its HLO instruction in
its `hlo_op` stat (on a GPU also the cuBLAS / cuDNN kernels of custom calls; on a CPU the
thunks); a kernel without that stat is matched by name (XLA names a fusion's kernel after the
fusion, with '_' for '.'). A row says:

  kernel | HLO instruction | kind | the ops inside (reductions marked `rows` when they reduce the
  minor dimension, `cols` otherwise) | where (JAX's name stack: the module path, `bwd` for the
  transposed pass) | calls and ms per step | bytes read + written per call | GB/s | TFLOP/s

Bytes are the instruction's operands and result as XLA sees them (an upper bound where a fusion
reads a slice of an operand); FLOPs are those of its dots and convolutions. The summary sums ms per
step by kind (KINDS): matmul, attention, layernorm, gelu, bias (a Dense layer's bias add or its
gradient), residual (the blocks' adds), optimizer, casts, layout (transposes, copies,
concatenates, gathers), loss, rng, other, and `gaps`: the device time inside the traced span with
no kernel running. The kinds come from the HLO (custom-call targets, opcodes) and JAX's name
stack in its metadata (module names such as norm1, mlp, fc1), so they follow sjmae_jax's module
names. `kind_of_kernel_name` sorts kernels by name alone (the torch peer's kernels).
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import os
import re

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16, "token": 0}
ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                   + r")\[([0-9,]*)\]")
# Opcodes that move or relabel data, and those that carry no work of their own.
LAYOUT_OPS = {"transpose", "copy", "concatenate", "slice", "dynamic-slice",
              "dynamic-update-slice", "gather", "scatter", "pad", "reverse", "reshape",
              "bitcast", "broadcast", "iota", "copy-start", "copy-done"}
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
KINDS = ("matmul", "attention", "layernorm", "gelu", "bias", "residual", "optimizer", "casts",
         "layout", "loss", "rng", "other", "gaps")
# Kernel names of the GPU libraries and of PyTorch Inductor (the peer's kernels have no HLO).
NAME_KINDS = (
    ("attention", re.compile(r"fmha|sdpa|flash|attention|cudnn_generated", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cublas|cutlass|xmma|matmul|wgmma|sm90_|ampere_|"
                          r"conv|aten::(mm|addmm|bmm|linear|convolution)\b|\bdot\b", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach|optimizer|addcdiv|addcmul|lerp",
                             re.I)),
    ("layernorm", re.compile(r"layer_norm|layernorm|native_layer_norm", re.I)),
    ("gelu", re.compile(r"gelu", re.I)),
    ("loss", re.compile(r"mse|loss|cross_entropy|log_softmax|nll", re.I)),
    ("casts", re.compile(r"_to_copy|convert|\bcast", re.I)),
    ("layout", re.compile(r"transpose|permute|clone|copy|cat\b|concat|gather|scatter|index|"
                          r"slice|contiguous|memcpy|memset", re.I)),
)


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str
  operands: list
  attributes: str
  computation: str

  @property
  def op_name(self) -> str:
    found = re.search(r'op_name="([^"]*)"', self.attributes)
    return found.group(1) if found else ""

  @property
  def called(self) -> list:
    return re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", self.attributes)


def array_shapes(shape: str) -> list:
  """[(dtype, (dims...))] of every array in an HLO shape (a tuple gives several)."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d))
          for dtype, dims in ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in array_shapes(shape):
    count = 1
    for d in dims:
      count *= d
    total += count * DTYPE_BYTES[dtype]
  return total


def _split_type(rest: str):
  """'TYPE opcode(...)...' -> (TYPE, 'opcode(...)...'); TYPE may be a parenthesised tuple."""
  if rest.startswith("("):
    depth = 0
    for i, char in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def parse_hlo(text: str) -> dict:
  """{instruction name: Instruction} of every computation of an HLO module's text, plus
  '__module__' -> the module's name, '__entry__' -> the entry computation's name and
  '__computations__' -> {computation name: [Instruction]}."""
  module = re.search(r"^HloModule ([\w.\-]+)", text, re.M)
  instructions = {"__module__": module.group(1) if module else "", "__entry__": ""}
  computation = ""
  for line in text.splitlines():
    stripped = line.strip()
    if stripped.endswith("{") and " = " not in stripped.split("(")[0]:
      header = stripped[len("ENTRY "):] if stripped.startswith("ENTRY ") else stripped
      computation = header.split()[0].lstrip("%")
      if stripped.startswith("ENTRY "):
        instructions["__entry__"] = computation
      continue
    found = re.match(r"(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", stripped)
    if not found or not computation:
      continue
    name, rest = found.groups()
    shape, rest = _split_type(rest)
    op = re.match(r"([\w\-]+)\((.*)$", rest)
    if not op:
      continue
    opcode, body = op.groups()
    depth, end = 1, len(body)
    for i, char in enumerate(body):
      depth += {"(": 1, ")": -1}.get(char, 0)
      if depth == 0:
        end = i
        break
    operands = re.findall(r"%([\w.\-]+)", body[:end])
    instructions[name] = Instruction(name, opcode, shape, operands, body[end + 1:], computation)
  by_computation = collections.defaultdict(list)
  for inst in instructions.values():
    if isinstance(inst, Instruction):
      by_computation[inst.computation].append(inst)
  instructions["__computations__"] = by_computation
  return instructions


def _computation_ops(instructions: dict, computation: str) -> list:
  """The instructions of `computation` and of the computations it calls (fusions nest)."""
  ops, todo, seen = [], [computation], set()
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for inst in instructions["__computations__"].get(name, ()):
      ops.append(inst)
      todo.extend(inst.called)
  return ops


def _dot_flops(inst: Instruction, instructions: dict) -> float:
  out = array_shapes(inst.shape)
  if not out or not inst.operands or inst.operands[0] not in instructions:
    return 0.0
  lhs = array_shapes(instructions[inst.operands[0]].shape)
  found = (re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attributes)
           or re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attributes))
  if not lhs or not found:
    return 0.0
  contracted = 1
  for dim in re.findall(r"\d+", found.group(1)):
    contracted *= lhs[0][1][int(dim)]
  count = 1
  for d in out[0][1]:
    count *= d
  return 2.0 * count * contracted


def _conv_flops(inst: Instruction, instructions: dict) -> float:
  out = array_shapes(inst.shape)
  labels = re.search(r"dim_labels=\w+_(\w+)->", inst.attributes)
  if not out or len(inst.operands) < 2 or not labels or inst.operands[1] not in instructions:
    return 0.0
  kernel = array_shapes(instructions[inst.operands[1]].shape)[0][1]
  per_output = 1
  for label, size in zip(labels.group(1), kernel):
    if label != "o":
      per_output *= size
  count = 1
  for d in out[0][1]:
    count *= d
  return 2.0 * count * per_output


@dataclasses.dataclass
class Work:
  """What one top-level HLO instruction (one kernel, or a few for a custom call) does."""
  opcode: str
  ops: collections.Counter
  reductions: list
  where: str
  bytes: int
  flops: float
  target: str


def describe_instruction(name: str, instructions: dict) -> Work:
  inst = instructions.get(name)
  if not isinstance(inst, Instruction):
    return Work("", collections.Counter(), [], "", 0, 0.0, "")
  inner = [inst]
  for called in inst.called:
    inner += _computation_ops(instructions, called)
  ops = collections.Counter(op.opcode for op in inner[1:] if op.opcode not in FREE_OPS)
  if not inst.called:
    ops[inst.opcode] += 1
  reductions, flops = [], 0.0
  for op in inner:
    if op.opcode == "reduce" and op.operands and op.operands[0] in instructions:
      source = array_shapes(instructions[op.operands[0]].shape)
      dims = [int(d) for d in re.findall(r"\d+", (re.search(r"dimensions=\{([0-9,]*)\}",
                                                           op.attributes) or [None, ""])[1])]
      if source:
        rank = len(source[0][1])
        reductions.append("rows" if rank - 1 in dims else "cols")
    elif op.opcode == "dot":
      flops += _dot_flops(op, instructions)
    elif op.opcode == "convolution":
      flops += _conv_flops(op, instructions)
    elif op.opcode == "custom-call" and "gemm" in op.attributes.lower():
      flops += _dot_flops(op, instructions)
  target = (re.search(r'custom_call_target="([^"]*)"', inst.attributes) or [None, ""])[1]
  operand_bytes = sum(shape_bytes(instructions[o].shape) for o in inst.operands
                      if isinstance(instructions.get(o), Instruction))
  result = array_shapes(inst.shape)
  result_bytes = shape_bytes(inst.shape)
  if target and len(result) > 1:  # cuBLAS / cuDNN return (result..., workspace)
    result_bytes -= shape_bytes(f"{result[-1][0]}[{','.join(map(str, result[-1][1]))}]")
  names = collections.Counter(_scope(op.op_name) for op in inner if op.op_name)
  where = names.most_common(1)[0][0] if names else ""
  return Work(inst.opcode, ops, reductions, where, operand_bytes + result_bytes, flops, target)


def _scope(op_name: str) -> str:
  """JAX's name stack without the jit wrapper and the primitive: 'encoder/blocks_0/norm1',
  'bwd encoder/blocks_0/norm1' for the transposed (backward) pass."""
  parts = op_name.split("/")[:-1]
  backward = any(part.startswith("transpose(") for part in parts)
  parts = [p for p in parts if not re.match(r"(jit|jvp|transpose|vmap)\(", p)
           and not re.match(r"\w+\._pass$|\w+\.<locals>", p)]
  return ("bwd " if backward else "") + "/".join(parts)


def kind_of(work: Work, kernel: str = "") -> str:
  """The kind of a kernel from its HLO instruction (or its name alone, without one)."""
  target = work.target.lower()
  ops = set(work.ops)
  if "fmha" in target or re.search(r"fmha|sdpa|flash_", kernel, re.I):
    return "attention"
  where = work.where.split(" ", 1)[-1] if work.where.startswith("bwd ") else work.where
  segments = where.split("/")
  if ops & {"dot", "convolution"} or "gemm" in target or "matmul" in target:
    if segments[-1] == "attn" and ops & {"exponential", "reduce"}:
      return "attention"  # XLA's attention: the products with the softmax fused in
    return "matmul"
  if ops and ops <= LAYOUT_OPS | {"convert"} and "convert" in ops:
    return "casts"
  if ops and ops <= LAYOUT_OPS:
    return "layout"
  if any("threefry" in s or s in ("_uniform", "argsort", "random_bits") for s in segments):
    return "rng"
  if any(re.fullmatch(r"\w*norm\w*", s) and "batch" not in s for s in segments):
    return "layernorm"
  if "mlp" in segments and not ({"fc1", "fc2"} & set(segments)):
    return "gelu"
  if segments[-1] in ("qkv", "proj", "fc1", "fc2", "decoder_embed", "decoder_pred", "head"):
    return "bias"  # a Dense layer's bias add, or its bias gradient (a column reduction)
  if re.fullmatch(r"\w*blocks_\d+", segments[-1]):
    return "residual"
  if not work.where.startswith("bwd ") and not where.startswith(("encoder", "decoder")) and (
      where == "" or where.startswith(("clip", "_where"))):
    return "optimizer" if work.where == where else "loss"
  if not any(s.startswith(("encoder", "decoder", "blocks", "patch")) for s in segments):
    return "loss"
  if not work.opcode:
    return kind_of_kernel_name(kernel)
  return "other"


def kind_of_kernel_name(name: str) -> str:
  return next((kind for kind, pattern in NAME_KINDS if pattern.search(name)), "other")


def ops_text(work: Work, limit: int = 6) -> str:
  """'reduce[rows x2, cols x1], multiply x5, convert x2' (the most frequent first)."""
  parts = []
  for opcode, count in work.ops.most_common():
    if opcode == "reduce" and work.reductions:
      shown = collections.Counter(work.reductions)
      parts.append("reduce[" + ", ".join(f"{k} x{v}" for k, v in sorted(shown.items())) + "]")
    else:
      parts.append(opcode + (f" x{count}" if count > 1 else ""))
  if work.target:
    parts.insert(0, work.target)
  return ", ".join(parts[:limit]) + (", ..." if len(parts) > limit else "")


# ----------------------------------------------------------------------------- the trace

def newest_trace(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


@dataclasses.dataclass
class KernelEvent:
  name: str
  hlo_op: str
  module: str
  start_ns: float
  duration_ns: float


def kernel_events(trace_dir: str, module: str = "") -> tuple:
  """(device plane name, [KernelEvent]) of the newest trace: a GPU's or TPU's kernels (its stream
  lines), else a CPU's XLA thunks (the host's tf_XLA* threads); with `module`, only the events
  whose hlo_module stat is that module (the step's; events without the stat are kept)."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  profile = ProfileData.from_file(newest_trace(trace_dir))
  planes = list(profile.planes)
  devices = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  if devices:
    plane = devices[0]
    lines = [line for line in plane.lines
             if line.name not in ("XLA Ops", "XLA Modules", "Steps", "XLA TraceMe",
                                  "Framework Ops", "Framework Name Scope", "Source code",
                                  "Launch Stats")]
  else:
    plane = next(p for p in planes if p.name == "/host:CPU")
    lines = [line for line in plane.lines if line.name.startswith("tf_XLA")]
  events = []
  for line in lines:
    for event in line.events:
      if "::" in event.name or event.name.startswith("end: ") or event.duration_ns <= 0:
        continue
      stats = {k: v for k, v in event.stats if k in ("hlo_op", "hlo_module")}
      if module and stats.get("hlo_module") not in (None, module):
        continue
      if not devices and "hlo_op" not in stats:
        continue
      events.append(KernelEvent(event.name, str(stats.get("hlo_op", "")),
                                str(stats.get("hlo_module", "")), event.start_ns,
                                event.duration_ns))
  return plane.name, events


def busy_and_span_ns(events) -> tuple:
  """(time with at least one kernel running, first start to last end), in ns."""
  intervals = sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events)
  if not intervals:
    return 0.0, 0.0
  busy, (start, end) = 0.0, intervals[0]
  first = start
  last = end
  for s, e in intervals[1:]:
    last = max(last, e)
    if s > end:
      busy += end - start
      start, end = s, e
    else:
      end = max(end, e)
  busy += end - start
  return busy, last - first


@dataclasses.dataclass
class Row:
  kernel: str
  hlo_op: str
  kind: str
  ops: str
  where: str
  calls_per_step: float
  ms_per_step: float
  bytes_per_call: int
  flops_per_call: float

  @property
  def gb_per_s(self) -> float:
    seconds = self.ms_per_step / 1e3 / self.calls_per_step if self.calls_per_step else 0
    return self.bytes_per_call / seconds / 1e9 if seconds else 0.0

  @property
  def tflop_per_s(self) -> float:
    seconds = self.ms_per_step / 1e3 / self.calls_per_step if self.calls_per_step else 0
    return self.flops_per_call / seconds / 1e12 if seconds else 0.0


def kernel_rows(trace_dir: str, hlo_text: str, steps: int):
  """(device, rows largest first, {kind: ms per step} with 'gaps', traced span ms per step)."""
  instructions = parse_hlo(hlo_text)
  device, events = kernel_events(trace_dir, instructions["__module__"])
  groups = collections.defaultdict(lambda: [0, 0.0])
  for event in events:
    group = groups[(event.name, event.hlo_op)]
    group[0] += 1
    group[1] += event.duration_ns
  # Kernels without an hlo_op stat: XLA names a fusion's kernel after the fusion, '.' -> '_'.
  by_kernel_name = {name.replace(".", "_").replace("-", "_"): name for name, inst
                    in instructions.items() if isinstance(inst, Instruction)
                    and inst.computation == instructions["__entry__"]}
  rows = []
  for (kernel, hlo_op), (calls, ns) in groups.items():
    hlo_op = hlo_op or by_kernel_name.get(kernel, "")
    work = describe_instruction(hlo_op, instructions)
    rows.append(Row(kernel, hlo_op, kind_of(work, kernel), ops_text(work), work.where,
                    calls / steps, ns / 1e6 / steps, work.bytes, work.flops))
  rows.sort(key=lambda row: -row.ms_per_step)
  busy, span = busy_and_span_ns(events)
  kinds = collections.Counter()
  for row in rows:
    kinds[row.kind] += row.ms_per_step
  kinds["gaps"] = max(0.0, span - busy) / 1e6 / steps
  return device, rows, kinds, span / 1e6 / steps


def format_table(device: str, rows, kinds, span_ms: float, top: int = 30,
                 peak_gb_per_s: float = 4800.0, title: str = "") -> str:
  """Markdown: the top kernels, then ms per step by kind."""
  lines = [f"### {title or 'kernels'} on {device}: {span_ms:.3f} ms per step traced", "",
           "| kernel | HLO op | kind | ops inside | where | calls/step | ms/step | MB/call | "
           "GB/s | TFLOP/s |", "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
  for row in rows[:top]:
    gbs = f"{row.gb_per_s:,.0f}" if row.bytes_per_call else ""
    if gbs and peak_gb_per_s:
      gbs += f" ({100 * row.gb_per_s / peak_gb_per_s:.0f} %)"
    lines.append(f"| {row.kernel[:60]} | {row.hlo_op} | {row.kind} | {row.ops} | {row.where} | "
                 f"{row.calls_per_step:g} | {row.ms_per_step:.3f} | "
                 f"{row.bytes_per_call / 1e6:.2f} | {gbs} | "
                 + (f"{row.tflop_per_s:.1f}" if row.flops_per_call else "") + " |")
  lines += ["", format_kinds(kinds)]
  return "\n".join(lines)


def format_kinds(kinds) -> str:
  total = sum(kinds.values()) or 1.0
  lines = ["| kind | ms/step | share |", "|---|---:|---:|"]
  for kind in sorted(kinds, key=lambda k: -kinds[k]):
    lines.append(f"| {kind} | {kinds[kind]:.3f} | {100 * kinds[kind] / total:.1f} % |")
  return "\n".join(lines)


def write_csv(path: str, rows) -> None:
  import csv  # pylint: disable=import-outside-toplevel
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["kernel", "hlo_op", "kind", "ops", "where", "calls_per_step",
                     "ms_per_step", "bytes_per_call", "flops_per_call", "gb_per_s",
                     "tflop_per_s"])
    for row in rows:
      writer.writerow([row.kernel, row.hlo_op, row.kind, row.ops, row.where,
                       f"{row.calls_per_step:g}", f"{row.ms_per_step:.4f}", row.bytes_per_call,
                       f"{row.flops_per_call:.0f}", f"{row.gb_per_s:.1f}",
                       f"{row.tflop_per_s:.2f}"])


def read_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return f.read()


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace_dir")
  parser.add_argument("hlo", help="the step's optimized HLO text (.txt or .txt.gz)")
  parser.add_argument("--steps", type=int, required=True, help="steps in the trace")
  parser.add_argument("--top", type=int, default=30)
  args = parser.parse_args()
  print(format_table(*kernel_rows(args.trace_dir, read_text(args.hlo), args.steps), top=args.top))


if __name__ == "__main__":
  main()
