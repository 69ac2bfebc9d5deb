#!/usr/bin/env bash
# CIFAR-10 results of one method on one accelerator, end to end in one command (docs/results.md):
#
#   bash benchmarks/cifar10_results.sh METHOD        # sjmae | mae | can | scratch
#
# sjmae / mae / can: pretrain ViT-T/4 (32 px, 64 patches; decoder 256 wide, 4 deep, 8 heads) on
#   the 50,000 CIFAR-10 train images for PRETRAIN_MINUTES (4) of training, then on that encoder:
#   the kNN monitor (CLS, k 20, all 50k train / 10k test images), the linear probe in both modes
#   (fast: cached features; protocol: MAE's, augmented views, frozen encoder) for PROBE_EPOCHS,
#   and a fine-tune of FINETUNE_MINUTES (2), all scored on the 10,000 test images.
# scratch: the supervised baseline: the fine-tune recipe from a random init (layer_decay 1) for
#   PRETRAIN_MINUTES + FINETUNE_MINUTES (the pretrained methods' total training time).
# Minutes count training steps from the end of the first (compiling) step (stop_after_minutes);
# the lr schedules are set by the *_EPOCHS knobs, sized to fit those minutes (the JSON line says
# how many epochs would fit at the measured speed: set the knob to that).
#
# Writes one JSON line (stdout, and appended to $OUT/cifar10_results.jsonl) with every number,
# the device, the minutes and the command; stage logs go to $OUT/METHOD-*.log.
# Data: $SJMAE_CIFAR10_DIR (an ImageFolder with train/ and test/) if it is set, else PACK
# (default packed_data/cifar10.pack, made by benchmarks/pack_imagefolder.py pack) unpacked into
# DATA_DIR (default runs/cifar10_data). Workdirs (checkpoints) go to WORK (default
# runs/cifar10_results/METHOD), not to $OUT.
# Knobs (environment): PYTHON, OUT (default runs/cifar10_results), WORK, PRETRAIN_MINUTES,
# FINETUNE_MINUTES, PRETRAIN_EPOCHS, FINETUNE_EPOCHS, PROBE_EPOCHS, PRETRAIN_BATCH (4096),
# DTYPE (bfloat16), EXTRA_PRETRAIN / EXTRA_PROBE / EXTRA_FINETUNE (more --config.k=v args).
# TINY=1: a few steps of every stage of a tiny model on CPU, float32 (tests/test_scripts.py).
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:-}
case "$method" in
  sjmae|mae|can|scratch) ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
python=${PYTHON:-python}
out=${OUT:-runs/cifar10_results}
work=${WORK:-runs/cifar10_results/$method}
pretrain_minutes=${PRETRAIN_MINUTES:-4}
finetune_minutes=${FINETUNE_MINUTES:-2}
dtype=${DTYPE:-bfloat16}
mkdir -p "$out"
rm -rf "$work/pretrain" "$work/probe" "$work/finetune"
mkdir -p "$work"
command_line="bash benchmarks/cifar10_results.sh $method"
for knob in TINY PRETRAIN_MINUTES FINETUNE_MINUTES PRETRAIN_EPOCHS FINETUNE_EPOCHS PROBE_EPOCHS \
    PRETRAIN_BATCH DTYPE EXTRA_PRETRAIN EXTRA_PROBE EXTRA_FINETUNE; do
  if [ -n "${!knob:-}" ]; then command_line="$knob=$(printf %q "${!knob}") $command_line"; fi
done

# Pretraining epochs sized to PRETRAIN_MINUTES at an estimated speed (set from the first run's
# `pretrain_epochs_fitting` field); warmup as each original's fraction (MAE/CAN 40 of 800 epochs,
# SJ-MAE 10 of 400).
case "$method" in
  mae) default_epochs=200; warmup_fraction=0.05 ;;
  sjmae) default_epochs=150; warmup_fraction=0.025 ;;
  can) default_epochs=100; warmup_fraction=0.05 ;;
  scratch) default_epochs=0; warmup_fraction=0 ;;
esac
pretrain_epochs=${PRETRAIN_EPOCHS:-$default_epochs}
finetune_epochs=${FINETUNE_EPOCHS:-80}
probe_epochs=${PROBE_EPOCHS:-30}
model_arg="data=cifar10,model=vit_tiny,patch=4"
pretrain_args=(--config.batch_size="${PRETRAIN_BATCH:-4096}" --config.compute_dtype="$dtype"
  --config.decoder.embed_dim=256 --config.decoder.depth=4 --config.decoder.num_heads=8
  --config.data.augment_on_device=True --config.log_every_steps=100
  --config.picture_every_steps=0 --config.checkpoint.every_steps=1000000
  --config.monitors.knn.every_epochs=1000000 --config.monitors.knn.num_train=0 --config.monitors.knn.num_eval=0)
probe_args=(--config.compute_dtype="$dtype" --config.data.augment_on_device=True
  --config.mode=both --config.monitors.eval.every_epochs=1000)
finetune_args=(--config.compute_dtype="$dtype" --config.data.augment_on_device=True)
if [ "${TINY:-0}" = 1 ]; then  # seconds on a CPU: a 1-block, 32-wide encoder, batch 16
  pretrain_minutes=${PRETRAIN_MINUTES:-0.000001}  # stops at step 2: the time budget works
  finetune_minutes=${FINETUNE_MINUTES:-0.000001}
  pretrain_epochs=${PRETRAIN_EPOCHS:-1}; finetune_epochs=${FINETUNE_EPOCHS:-1}
  probe_epochs=${PROBE_EPOCHS:-1}
  dtype=float32
  model_arg="data=cifar10,model=vit_micro,patch=8"
  tiny_model=(--config.model.embed_dim=32 --config.model.depth=1 --config.model.num_heads=2)
  pretrain_args=("${tiny_model[@]}" --config.batch_size=16 --config.compute_dtype=float32
    --config.decoder.embed_dim=32 --config.decoder.depth=1 --config.decoder.num_heads=2
    --config.log_every_steps=1 --config.picture_every_steps=0
    --config.checkpoint.every_steps=1000000 --config.monitors.knn.every_epochs=1000000
    --config.monitors.knn.num_train=0 --config.monitors.knn.num_eval=0)
  probe_args=(--config.batch_size=8 --config.mode=both)
  finetune_args=(--config.batch_size=8 --config.data.recipes.finetune.randaugment=)
  [ "$method" = scratch ] && finetune_args+=("${tiny_model[@]}")
fi

if [ -z "${SJMAE_CIFAR10_DIR:-}" ]; then
  pack=${PACK:-packed_data/cifar10.pack}
  data_dir=${DATA_DIR:-runs/cifar10_data}
  if [ ! -f "$data_dir/.unpacked" ]; then
    [ -f "$pack" ] || { echo "error: no $pack and no SJMAE_CIFAR10_DIR (see the header)" >&2; exit 2; }
    rm -rf "$data_dir"
    "$python" benchmarks/pack_imagefolder.py unpack "$pack" "$data_dir" >/dev/null
    touch "$data_dir/.unpacked"
  fi
  export SJMAE_CIFAR10_DIR=$(cd "$data_dir" && pwd)
fi

seconds=()
stage() {  # stage NAME command...: runs it with its log in $out, times it
  local name=$1 started=$SECONDS
  shift
  echo "+ $name: $*" | tee "$out/$method-$name.log"
  if ! "$@" >> "$out/$method-$name.log" 2>&1; then
    tail -n 20 "$out/$method-$name.log" >&2
    echo "error: stage $name failed (log: $out/$method-$name.log)" >&2
    exit 1
  fi
  seconds+=("$name=$((SECONDS - started))")
}

fraction() { "$python" -c "print(round($1 * $2, 6))"; }

if [ "$method" = scratch ]; then
  total=$("$python" -c "print($pretrain_minutes + $finetune_minutes)")
  epochs=$(( finetune_epochs * 3 ))
  stage finetune "$python" eval_finetune.py --config "configs/finetune.py:$model_arg" \
    --workdir "$work/finetune" --config.from_scratch=True --config.optim.layer_decay=1.0 \
    --config.epochs="$epochs" --config.warmup_epochs="$(fraction "$epochs" 0.1)" \
    --config.monitors.eval.every_epochs="$(( epochs / 4 > 0 ? epochs / 4 : 1 ))" \
    --config.stop_after_minutes="$total" "${finetune_args[@]}" ${EXTRA_FINETUNE:-}
else
  stage pretrain "$python" train.py --config "configs/$method.py:$model_arg" \
    --workdir "$work/pretrain" --config.epochs="$pretrain_epochs" \
    --config.warmup_epochs="$(fraction "$pretrain_epochs" "$warmup_fraction")" \
    --config.stop_after_minutes="$pretrain_minutes" "${pretrain_args[@]}" ${EXTRA_PRETRAIN:-}
  stage probe "$python" eval_linprobe.py --config "configs/linprobe.py:$model_arg" \
    --workdir "$work/probe" --config.init_from="$work/pretrain" \
    --config.epochs="$probe_epochs" --config.warmup_epochs="$(fraction "$probe_epochs" 0.1)" \
    "${probe_args[@]}" ${EXTRA_PROBE:-}
  stage finetune "$python" eval_finetune.py --config "configs/finetune.py:$model_arg" \
    --workdir "$work/finetune" --config.init_from="$work/pretrain" \
    --config.epochs="$finetune_epochs" --config.warmup_epochs="$(fraction "$finetune_epochs" 0.1)" \
    --config.monitors.eval.every_epochs="$(( finetune_epochs / 4 > 0 ? finetune_epochs / 4 : 1 ))" \
    --config.stop_after_minutes="$finetune_minutes" "${finetune_args[@]}" ${EXTRA_FINETUNE:-}
fi

"$python" benchmarks/cifar10_results_row.py --method "$method" --work "$work" \
  --append "$out/cifar10_results.jsonl" --command "$command_line" \
  --pretrain-minutes "$pretrain_minutes" --finetune-minutes "$finetune_minutes" "${seconds[@]}"
