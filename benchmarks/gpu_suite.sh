#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md's Train step table, one stage per call (each well under 10
# minutes on one H100, compilation included):
#
#   bash benchmarks/gpu_suite.sh STAGE
#
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
# machine's results come back with $OUT. Environment: PYTHON (default python), SJMAE_CIFAR10_DIR (the
# CIFAR-10 ImageFolder; default ../shared/data/cifar10), MAE_DIR (for `official`).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${OUT:-runs/bench_out}
stage=${1:-}
mkdir -p "$out"

bench() {
  echo "+ benchmarks/train_step.py $*"
  "$python" benchmarks/train_step.py "$@" --append BENCHMARKS.md
}

run_stage() {
  case "$stage" in
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
      sed -n '2,18p' "$0"
      return 2 ;;
  esac
}

run_stage 2>&1 | tee "$out/${stage:-usage}.log"
status=${PIPESTATUS[0]}
cp BENCHMARKS.md "$out/"
exit "$status"
