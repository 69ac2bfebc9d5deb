#!/usr/bin/env bash
# Kernel-level evidence for the MAE ViT-B/16 train step on one GPU, in one call of <= 6 minutes
# on a bare H200 (benchmarks/gpu_evidence.py says what each part measures):
#
#   OUT=DIR bash benchmarks/gpu_evidence.sh [gpu_evidence.py options]
#
# Writes at most 7 files to $OUT (default runs/evidence/), each well under 16 MB: evidence.log,
# summary.md (every table: the kernels of the default and the fast step, ms per kind, the torch
# peer's kernels, the candidate kernels against flax, one row per XLA flag set),
# hlo_{default,fast}.txt.gz (the optimized HLO of the step's module), kernels_{default,fast}.csv
# and torch_kernels.csv (every kernel). Environment: PYTHON (default python3), CACHE_DIR (XLA's
# autotuning results shared by the parts' processes, and Inductor's cache; default
# /tmp/sjmae_jax_evidence_cache), DEADLINE (no part or flag row starts after it; default 300
# seconds, none with SMOKE). SMOKE=1: the same parts at tiny sizes on a CPU (the CI check; the
# kernel table is then one of XLA's CPU thunks).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
out=${OUT:-runs/evidence}
mkdir -p "$out"
cache=${CACHE_DIR:-/tmp/sjmae_jax_evidence_cache}
mkdir -p "$cache"
export TORCHINDUCTOR_CACHE_DIR="$cache/inductor"
autotune="--xla_gpu_per_fusion_autotune_cache_dir=$cache/autotune"
if [[ -z "${SMOKE:-}" ]] && XLA_FLAGS="$autotune" "$python" -c "import jax; jax.devices()" \
    >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} $autotune"
fi
if [[ -n "${SMOKE:-}" ]]; then
  args=(--out "$out" --deadline "${DEADLINE:-0}" --smoke)
else
  args=(--out "$out" --deadline "${DEADLINE:-300}")
fi
echo "+ benchmarks/gpu_evidence.py ${args[*]} $*"
PYTHONUNBUFFERED=1 "$python" benchmarks/gpu_evidence.py "${args[@]}" "$@" 2>&1 \
  | tee "$out/evidence.log"
exit "${PIPESTATUS[0]}"
