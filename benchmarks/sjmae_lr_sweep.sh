#!/usr/bin/env bash
# SJ-MAE learning-rate sweep on a CPU-sized model (docs/sjmae.md, "Learning rate at large batch"):
#
#   SJMAE_CIFAR10_DIR=/path/to/cifar10 bash benchmarks/sjmae_lr_sweep.sh [LR ...]
#
# One short SJ-MAE pretraining per absolute peak lr (default: 1.5e-4 6e-4 2.4e-3 8e-3 3.2e-2, the
# peak lrs that blr 1e-5 .. 2e-3 give at batch 4096): vit_micro (128 wide, 4 deep) with patch 8 at
# 32 px (the official CIFAR model's patch), decoder 128x2, CIFAR-10 train, batch 256, EPOCHS
# epochs (default 2: 390 steps), warmup 10% of them, cosine to 0; scored by the kNN monitor (10k
# train / 10k test images) at the end. Adam's step size is set by the lr, not by the batch, so an
# absolute lr that diverges or loses accuracy here is no better at batch 4096.
# Prints one row per lr: lr | final loss | mae | jigsaw | contrastive | kNN top-1 | non-finite
# steps. Workdirs go to $OUT (default runs/sjmae_lr_sweep). About 4 CPU-minutes per lr.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${OUT:-runs/sjmae_lr_sweep}
epochs=${EPOCHS:-2}
lrs=("$@")
[ ${#lrs[@]} -gt 0 ] || lrs=(1.5e-4 6e-4 2.4e-3 8e-3 3.2e-2)
mkdir -p "$out"
for lr in "${lrs[@]}"; do
  workdir="$out/lr_$lr"
  [ -f "$workdir/summary.json" ] || "$python" train.py \
      --config "configs/sjmae.py:data=cifar10,model=vit_micro,patch=8" --workdir "$workdir" \
      --config.batch_size=256 --config.epochs="$epochs" --config.warmup_epochs="$(
        "$python" -c "print($epochs / 10)")" --config.lr="$lr" --config.nonfinite=skip \
      --config.decoder.embed_dim=128 --config.decoder.depth=2 --config.decoder.num_heads=4 \
      --config.monitors.knn.num_train=10000 --config.monitors.knn.num_eval=10000 --config.picture_every_steps=0 \
      --config.checkpoint.every_steps=100000 --config.log_every_steps=50 \
      > "$workdir.log" 2>&1
done
echo "| lr (batch 256) | loss | mae | jigsaw | contrastive | kNN top-1 | non-finite steps |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for lr in "${lrs[@]}"; do
  "$python" - "$out/lr_$lr/summary.json" "$lr" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
get = lambda k: s.get(k, float("nan"))
print(f"| {sys.argv[2]} | {get('loss'):.3f} | {get('loss/mae'):.3f} | {get('loss/jigsaw'):.3f} | "
      f"{get('loss/contrastive'):.3f} | {get('knn/top1'):.4f} | {int(get('nonfinite_steps'))} |")
EOF
done
