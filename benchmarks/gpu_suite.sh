#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md's Train step table, one stage per call (each well under 10
# minutes on one H100, compilation included):
#
#   bash benchmarks/gpu_suite.sh STAGE
#
#   speed       issue 16 in one call (<= 9 min on one H100/H200, compiles included): MAE + SJ-MAE
#               ViT-B/16 224 px batch 256 with the PyTorch peers (timm; facebookresearch/mae from
#               $MAE_DIR; the original SJ-MAE from $SJMAE_DIR), each speed lever switched alone on
#               MAE, then MAE and SJ-MAE with the levers that won; one table, op profiles of the
#               base and best steps in $OUT/profile/summary.txt
#   base        MAE + SJ-MAE ViT-B/16 224 px, batch 256, PyTorch peer (timm), op profile
#   sizes       MAE + SJ-MAE ViT-T/16 and ViT-S/16 224 px, batch 256, PyTorch peer (timm)
#   levers_mae  MAE ViT-B/16: each fast-path lever switched (dtype, attention, remat, donate)
#   levers_sjmae  SJ-MAE ViT-B/16: batch_passes, attention, remat switched
#   cifar       MAE + SJ-MAE ViT-T/4 32 px, batch 1024: step alone and end to end on CIFAR-10
#   xla_flags   MAE ViT-B/16 with XLA GPU flags (latency-hiding scheduler; no Triton GEMMs)
#   official    MAE ViT-B/16 against facebookresearch/mae's own model ($MAE_DIR, a clone)
#
# Rows and the command go to BENCHMARKS.md (--append); the output goes to $OUT/STAGE.log (OUT
# defaults to runs/bench_out/) and BENCHMARKS.md is copied to $OUT/ too, so that a remote
# machine's results come back with $OUT. Environment: PYTHON (default python), SJMAE_CIFAR10_DIR
# (the CIFAR-10 ImageFolder, for `cifar`), MAE_DIR (for `official` and `speed`; a
# clone of facebookresearch/mae, default runs/mae), SJMAE_DIR (for `speed`: a clone of
# JulesCollenne/SJ-MAE, default runs/sjmae), CACHE_DIR (`speed`'s compilation caches, default
# /tmp/sjmae_jax_speed_cache: a second call of the stage on the same machine compiles nothing).
# SMOKE=1 runs the stage's options at train_step.py's --smoke sizes (tiny model, batch 8, CPU in
# seconds per row) and appends to $OUT/BENCHMARKS.md only: the CI check that every stage runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python}
out=${OUT:-runs/bench_out}
stage=${1:-}
mkdir -p "$out"
benchmarks_md=BENCHMARKS.md
if [[ -n "${SMOKE:-}" ]]; then
  cp BENCHMARKS.md "$out/BENCHMARKS.md"
  benchmarks_md="$out/BENCHMARKS.md"
fi

bench() {
  local args=()
  if [[ -n "${SMOKE:-}" ]]; then  # drop the sizes and timing options: --smoke sets tiny ones
    while (($#)); do
      case "$1" in
        --model|--img|--batch|--steps|--repeats|--warmup|--deadline) shift 2 ;;
        *) args+=("$1"); shift ;;
      esac
    done
    args+=(--smoke)
  else
    args=("$@")
  fi
  echo "+ benchmarks/train_step.py ${args[*]}"
  "$python" benchmarks/train_step.py "${args[@]}" --append "$benchmarks_md"
}

run_stage() {
  case "$stage" in
    speed)
      # Sizing (docs/performance.md): 3 torch.compile peers (~60 s each), 17 JAX compiles (base
      # MAE and SJ-MAE, 13 lever rows, 2 best rows; ~20-40 s each for MAE ViT-B once XLA's
      # autotuning results are cached, ~60 s for SJ-MAE), timing 3 x 10 steps per row. No lever
      # row starts after --deadline (330 s); the best rows always run, so the stage ends within
      # about 8.5 minutes and names any lever row it had no time for (the last ones: the levers
      # measured as a group on 2026-12-04 come after issue 23's new ones).
      cache=${CACHE_DIR:-/tmp/sjmae_jax_speed_cache}
      mkdir -p "$cache"
      export JAX_COMPILATION_CACHE_DIR="$cache/jax" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
      export TORCHINDUCTOR_CACHE_DIR="$cache/inductor"
      autotune="--xla_gpu_per_fusion_autotune_cache_dir=$cache/autotune"
      if XLA_FLAGS="$autotune" "$python" -c "import jax; jax.devices()" >/dev/null 2>&1; then
        export XLA_FLAGS="${XLA_FLAGS:-} $autotune"  # shared by the xla_flags rows' processes
      fi
      # issue 23's kernel levers first, then issue 16's in the order of their predicted gain
      levers=norm_pallas,gelu_pallas,qkv_impl,optim_flatten,gather_impl,norm_impl,gelu_impl
      levers=$levers,xla_flags,cast_params_once,gelu_approximate
      bench --method mae,sjmae --model vit_base --img 224 --batch 256 \
        --peer "timm,mae:${MAE_DIR:-runs/mae},sjmae:${SJMAE_DIR:-runs/sjmae}" \
        --levers "$levers,attention,batch" --levers-for mae --best --profile "$out/profile" \
        --steps 10 --repeats 3 --warmup 2 --deadline 330 ;;
    base)
      bench --method mae,sjmae --model vit_base --img 224 --batch 256 --peer timm \
        --profile "$out/profile" ;;
    sizes)
      bench --method mae,sjmae --model vit_tiny,vit_small --img 224 --batch 256 --peer timm ;;
    levers_mae)
      bench --method mae --model vit_base --img 224 --batch 256 \
        --levers dtype,attention,remat,donate ;;
    levers_sjmae)
      bench --method sjmae --model vit_base --img 224 --batch 256 \
        --levers batch_passes,attention,remat ;;
    cifar)
      bench --method mae,sjmae --model vit_tiny --img 32 --batch 1024 --e2e cifar10 \
        ${SJMAE_CIFAR10_DIR:+--cifar-dir "$SJMAE_CIFAR10_DIR"} ;;
    xla_flags)
      bench --method mae --model vit_base --img 224 --batch 256 \
        --xla-flags=--xla_gpu_enable_latency_hiding_scheduler=true
      bench --method mae --model vit_base --img 224 --batch 256 \
        --xla-flags=--xla_gpu_enable_triton_gemm=false ;;
    official)
      bench --method mae --model vit_base --img 224 --batch 256 \
        --peer "mae:${MAE_DIR:?set MAE_DIR to a clone of facebookresearch/mae}" ;;
    *)
      sed -n '2,28p' "$0"
      return 2 ;;
  esac
}

run_stage 2>&1 | tee "$out/${stage:-usage}.log"
status=${PIPESTATUS[0]}
[[ "$benchmarks_md" == BENCHMARKS.md ]] && cp BENCHMARKS.md "$out/"
exit "$status"
