"""benchmarks/kernel_table.py (a profiled step's kernels joined with its optimized HLO) on a small
real CPU trace and on HLO text, and benchmarks/gpu_evidence.sh at --smoke size on the CPU."""
import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from benchmarks import kernel_table
from helpers import REPO

CUBLAS_HLO = """HloModule jit_step, entry_computation_layout={(bf16[64,32]{1,0}, bf16[32,16]{1,0})->bf16[64,16]{1,0}}

%fused_convert (param_0: f32[64,16]) -> bf16[64,16] {
  %param_0 = f32[64,16]{1,0} parameter(0)
  ROOT %convert.1 = bf16[64,16]{1,0} convert(%param_0), metadata={op_name="jit(step)/encoder/blocks_0/mlp/fc1/convert_element_type"}
}

ENTRY %main.9 (Arg_0.1: bf16[64,32], Arg_1.2: bf16[32,16]) -> bf16[64,16] {
  %Arg_0.1 = bf16[64,32]{1,0} parameter(0)
  %Arg_1.2 = bf16[32,16]{1,0} parameter(1)
  %custom-call.3 = (f32[64,16]{1,0}, s8[4194304]{0}) custom-call(%Arg_0.1, %Arg_1.2), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp(MAE))/encoder/blocks_0/mlp/fc1/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %get-tuple-element.4 = f32[64,16]{1,0} get-tuple-element(%custom-call.3), index=0
  ROOT %loop_convert_fusion = bf16[64,16]{1,0} fusion(%get-tuple-element.4), kind=kLoop, calls=%fused_convert
}
"""


def test_hlo_parse_bytes_flops_and_kinds_of_a_gpu_module():
  """A cuBLAS custom call: its FLOPs from the backend config's contracting dimensions, its bytes
  without the workspace; a convert-only fusion is a cast; the name stack gives 'where'."""
  hlo = kernel_table.parse_hlo(CUBLAS_HLO)
  assert hlo["__module__"] == "jit_step" and hlo["__entry__"] == "main.9"
  gemm = kernel_table.describe_instruction("custom-call.3", hlo)
  assert gemm.flops == 2 * 64 * 16 * 32
  assert gemm.bytes == (64 * 32 + 32 * 16) * 2 + 64 * 16 * 4  # operands + result, no workspace
  assert gemm.where == "bwd encoder/blocks_0/mlp/fc1" and gemm.target == "__cublas$gemm"
  assert kernel_table.kind_of(gemm, "nvjet_sm90_tst_128x160") == "matmul"
  cast = kernel_table.describe_instruction("loop_convert_fusion", hlo)
  assert cast.ops == {"convert": 1} and cast.bytes == 64 * 16 * (4 + 2)
  assert kernel_table.kind_of(cast) == "casts"


def test_kernel_names_of_the_gpu_libraries_and_inductor():
  kind = kernel_table.kind_of_kernel_name
  assert kind("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT") == "matmul"
  assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16") == "attention"
  assert kind("triton_per_fused_native_layer_norm_backward_12") == "layernorm"
  assert kind("triton_poi_fused_add_gelu_backward_7") == "gelu"
  assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>") == (
      "optimizer")
  assert kind("triton_poi_fused__to_copy_3") == "casts"


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm1")(x)
    return x + nn.Dense(x.shape[-1], name="fc1")(h)


def test_kernel_table_of_a_real_cpu_trace(tmp_path):
  """Profile 3 steps of a small jitted train step on the CPU; every thunk of the step's module
  is joined with its HLO instruction: the LayerNorm's kernels (reductions over the rows) and the
  product are named, with bytes, ms per step and the gaps; the kinds sum to the traced time."""
  model = _Block()
  x = jax.random.normal(jax.random.PRNGKey(0), (256, 64))
  params = model.init(jax.random.PRNGKey(1), x)

  @jax.jit
  def train_step(params, x):
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)

  hlo = train_step.lower(params, x).compile().as_text()
  params = train_step(params, x)
  jax.block_until_ready(params)
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      params = train_step(params, x)
    jax.block_until_ready(params)
  device, rows, kinds, span_ms = kernel_table.kernel_rows(str(tmp_path), hlo, steps=3)
  assert device == "/host:CPU" and rows and span_ms > 0
  assert all(row.hlo_op and row.ms_per_step > 0 and row.calls_per_step >= 1 for row in rows)
  by_kind = {}
  for row in rows:
    by_kind.setdefault(row.kind, []).append(row)
  assert "matmul" in by_kind and "layernorm" in by_kind, [(r.kernel, r.kind, r.where) for r in rows]
  assert any("reduce[rows" in row.ops for row in by_kind["layernorm"])
  assert all(row.where.endswith("norm1") for row in by_kind["layernorm"])
  assert any(row.flops_per_call == 2 * 256 * 64 * 64 for row in by_kind["matmul"])
  assert all(row.bytes_per_call > 0 for row in rows)
  assert kinds["gaps"] >= 0 and set(kinds) <= set(kernel_table.KINDS)
  table = kernel_table.format_table(device, rows, kinds, span_ms, top=5, peak_gb_per_s=0)
  assert "| kind | ms/step | share |" in table and len(table.splitlines()) > 8


@pytest.mark.no_tf  # also runs in the virtualenv without TensorFlow (.ci/run)
@pytest.mark.slow
def test_gpu_evidence_smoke(tmp_path):
  """`SMOKE=1 bash benchmarks/gpu_evidence.sh`: every part at tiny sizes on the CPU, the kernel
  tables from CPU traces (with the note that a GPU's need a GPU), at most 8 files, and a flag
  that XLA does not know reported as such (XLA aborts on unknown flags)."""
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", SMOKE="1", OUT=str(out),
             CACHE_DIR=str(tmp_path / "cache"), PYTHON=sys.executable)
  torch_part = "torch," if _has_torch() else ""
  result = subprocess.run(
      ["bash", str(REPO / "benchmarks" / "gpu_evidence.sh"),
       f"--parts=default,fast,micro,{torch_part}flags", "--flag-sets=--xla_gpu_no_such_flag=true"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  files = sorted(os.listdir(out))
  assert len(files) <= 8 and all(os.path.getsize(out / f) < 16 * 2 ** 20 for f in files)
  assert {"evidence.log", "summary.md", "hlo_default.txt.gz", "hlo_fast.txt.gz",
          "kernels_default.csv", "kernels_fast.csv"} <= set(files)
  summary = (out / "summary.md").read_text()
  assert "FAILED" not in summary and "not run" not in summary
  assert "### default step (levers off)" in summary and "### fast step (norm_impl=fused" in summary
  assert summary.count("the GPU kernel table needs a GPU") == 2
  assert "| matmul |" in summary and "| layernorm |" in summary and "| gaps |" in summary
  assert "| LayerNorm | (" in summary and "| fused (norm_impl=fused) |" in summary
  assert "| `--xla_gpu_no_such_flag=true` | | | no such flag in this jaxlib" in summary
  if torch_part:
    assert "### torch peer (timm" in summary and (out / "torch_kernels.csv").exists()
  hlo = kernel_table.read_text(str(out / "hlo_default.txt.gz"))
  assert hlo.startswith("HloModule jit_train_step")


def _has_torch() -> bool:
  return all(importlib.util.find_spec(name) for name in ("torch", "timm"))
