"""What a compiled training step is made of, measurable without its accelerator.

- `inventory(compiled)`: the kernels of XLA's optimized HLO (the instructions of the top-level
  computations: fusions, dots, copies, ...), its converts, the kernels that only cast (fusions
  made of converts and layout ops: a float32 round trip through memory), its scatters and the
  bytes they write (on a GPU XLA runs a scatter-add with atomic adds), and the buffer sizes of
  `compiled.memory_analysis()` (temp = activations saved for the backward pass + gradients +
  scratch).
- `residual_bytes(fn, *args)`: the bytes JAX's autodiff saves for the backward pass of `fn`
  (jax.ad_checkpoint's saved residuals, before XLA fuses anything), the backend-independent count
  of "bytes of saved activations".
- `dot_flops(lowered_text)`: FLOPs counted from the dot_general / convolution shapes of the
  lowered StableHLO (before XLA), plus cuDNN attention custom calls from their operand shapes.
  XLA's cost analysis on GPU leaves out the cuBLAS / cuDNN custom calls that its compiler makes
  of the dots; the lowered program is the same on every backend and names every product.
"""
import collections
import math
import re

# Instructions that are no kernels of their own.
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
             "partition-id", "replica-id", "opt-barrier"}
# A fusion made only of these (and at least one convert) does nothing but cast.
_CAST_ONLY_OPS = {"parameter", "convert", "bitcast", "broadcast", "reshape", "copy", "transpose",
                  "constant", "tuple", "get-tuple-element"}
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\(")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)="
                     r"\{?([^,}]+(?:, %[^,}]+)*)\}?")


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_RESULT = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\]")


def _result_bytes(line: str) -> int:
  match = _RESULT.search(line)
  if not match:
    return 0
  dims = [int(d) for d in match.group(2).split(",") if d]
  return math.prod(dims) * _BYTES.get(match.group(1), 4)


def parse_hlo(text: str):
  """{computation: [op kinds]}, the entry's name, {computation: how it is called}, and the
  bytes written by scatters."""
  computations, entry, current = {}, None, None
  called = {}
  scatter_bytes = 0
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line) if current else None
    if match:
      op = match.group(1)
      computations[current].append(op)
      if op == "scatter":
        scatter_bytes += _result_bytes(line)
      for how, names in _CALLED.findall(line):
        for name in re.findall(r"%([^\s,}]+)", names):
          called.setdefault(name, "fusion" if op == "fusion" else how)
  return computations, entry, called, scatter_bytes


def inventory(compiled) -> dict:
  """Kernel and convert counts of a compiled step's optimized HLO, and its buffer sizes."""
  computations, entry, called, scatter_bytes = parse_hlo(compiled.as_text())
  # Top level: the entry and what control flow runs (while bodies, conditional branches, calls);
  # not fusion bodies or reducers (`to_apply`), which run inside one kernel.
  top = [name for name in computations
         if name == entry or called.get(name) in ("body", "condition", "branch_computations",
                                                  "calls")]
  kernels = collections.Counter()
  for name in top:
    kernels.update(op for op in computations[name] if op not in _FREE_OPS)
  fusion_bodies = [name for name, how in called.items() if how == "fusion" and name in computations]
  cast_only = sum(1 for name in fusion_bodies
                  if "convert" in computations[name]
                  and set(computations[name]) <= _CAST_ONLY_OPS)
  result = {
      "kernels": sum(kernels.values()),
      "fusions": kernels["fusion"],
      "dots": sum(ops.count("dot") + ops.count("convolution") for ops in computations.values()),
      "converts": sum(ops.count("convert") for ops in computations.values()),
      "scatters": sum(ops.count("scatter") for ops in computations.values()),
      "scatter_bytes": scatter_bytes,
      "cast_kernels": kernels["convert"] + cast_only,
  }
  memory = compiled.memory_analysis()
  if memory is not None:
    result.update(temp_bytes=memory.temp_size_in_bytes,
                  argument_bytes=memory.argument_size_in_bytes,
                  output_bytes=memory.output_size_in_bytes,
                  alias_bytes=memory.alias_size_in_bytes)
  return result


def residual_bytes(fn, *args):
  """Bytes of the values that autodiff of `fn` (a scalar loss) saves for its backward pass,
  without `fn`'s own arguments and literals; None where this JAX does not say."""
  try:
    from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  total = 0
  for aval, source in saved_residuals(fn, *args):
    if "from the argument" in source or "from a literal" in source or not aval.shape:
      continue
    total += math.prod(aval.shape) * aval.dtype.itemsize
  return total


_TENSOR = re.compile(r"tensor<([0-9x]*)x?([a-z0-9]+)>")


def _dims(tensor_type: str):
  match = _TENSOR.fullmatch(tensor_type.strip())
  if not match:
    return None
  return [int(d) for d in match.group(1).split("x") if d] if match.group(1) else []


def _types(signature: str):
  """'(tensor<2x3xf32>, tensor<3x4xf32>) -> tensor<2x4xf32>' -> ([[2,3],[3,4]], [2,4])."""
  inputs, _, output = signature.rpartition("->")
  operands = [_dims(t) for t in re.findall(r"tensor<[^>]*>", inputs)]
  outputs = [_dims(t) for t in re.findall(r"tensor<[^>]*>", output)]
  return operands, outputs


def dot_flops(lowered_text: str) -> dict:
  """{'dot': FLOPs of the dot_generals, 'conv': of the convolutions, 'attention': of cuDNN
  attention custom calls} in a lowered StableHLO module (`jax.jit(f).lower(...).as_text()`).

  A product of (..., K) by (K, ...) counts 2 x K x output elements. Loops are not unrolled:
  a while body (gradient accumulation's scan) counts once.
  """
  totals = collections.Counter()
  for line in lowered_text.splitlines():
    if "stablehlo.dot_general" in line:
      contracting = re.search(r"contracting_dims = \[([0-9, ]*)\] x", line)
      operands, outputs = _types(line.rsplit(" : ", 1)[-1])
      if not contracting or not operands or not outputs or outputs[0] is None:
        continue
      lhs = operands[0]
      k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i.strip())
      totals["dot"] += 2 * k * math.prod(outputs[0])
    elif "stablehlo.convolution" in line:
      spec = re.search(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]->", line)
      groups = re.search(r"feature_group_count = (\d+)", line)
      operands, outputs = _types(line.rsplit(" : ", 1)[-1])
      if not spec or len(operands) < 2 or not outputs:
        continue
      rhs_letters = [d.strip() for d in spec.group(1).split(",")]
      rhs = operands[1]
      per_output = math.prod(size for letter, size in zip(rhs_letters, rhs) if letter != "o")
      totals["conv"] += 2 * per_output * math.prod(outputs[0]) // int(groups.group(1) if groups
                                                                      else 1)
    elif "stablehlo.custom_call" in line and "fmha" in line:
      operands, _ = _types(line.rsplit(" : ", 1)[-1])
      if len(operands) < 2:
        continue
      q, k = operands[0], operands[1]  # (B, T, N, H) as jax.nn.dot_product_attention
      forward = 4 * q[0] * q[2] * q[1] * k[1] * q[3]  # QK^T and PV
      totals["attention"] += 2 * forward if "Backward" in line else forward
  return dict(totals)
