#!/usr/bin/env bash
# CIFAR-10 results of methods at equal GPU minutes on one accelerator, in one command
# (docs/results.md):
#
#   bash benchmarks/cifar10_results.sh METHOD[:MINUTES][,METHOD[:MINUTES]...]
#   e.g.  bash benchmarks/cifar10_results.sh sjmae,mae,scratch
#         bash benchmarks/cifar10_results.sh sjmae:1.5+1,mae:1.5+1,scratch:2.5
#
# METHOD: sjmae | mae | can | scratch. MINUTES: PRE+FT for the pretrained methods (default
# PRETRAIN_MINUTES+FINETUNE_MINUTES, 4+2; FT 0 = no fine-tune), one number for scratch (default
# their sum: the supervised baseline gets the pretrained methods' total training time).
# sjmae / mae / can: pretrain ViT-T/4 (32 px, 64 patches; decoder 256 wide, 4 deep, 8 heads) on
#   the CIFAR-10 train images for PRE minutes, then on that encoder: the kNN monitor (CLS, k 20,
#   all train / test images), the linear probe (PROBE_MODE: fast = cached features, full = MAE's
#   protocol, both) for PROBE_EPOCHS, and a fine-tune of FT minutes, all scored on the test images.
# scratch: the fine-tune recipe from a random init (layer_decay 1) for its minutes.
# Minutes are budgets (config.train_minutes): each stage measures its step speed after compiling
# and sizes its schedule so that warmup and cosine decay end when the minutes do; they count
# training steps from the end of the first (compiling) step. The chosen epochs are in the rows.
#
# Writes one JSON line per method run to $OUT/cifar10_results.jsonl (and stdout), the README
# table rows of all lines in the file to $OUT/cifar10_table.md and the plot (fine-tune top-1
# against GPU minutes) to $OUT/cifar10.png; README=FILE also puts the rows into FILE's
# <!-- cifar10-results --> block. Stage logs: $OUT/METHOD-STAGE.log.
# Knobs (environment): PYTHON, OUT (default runs/cifar10_results), WORK (workdirs, default
# runs/cifar10_results/work), PRETRAIN_MINUTES, FINETUNE_MINUTES, PROBE_EPOCHS (30), PROBE_MODE
# (both), PRETRAIN_BATCH (4096), DTYPE (bfloat16), EXTRA_PRETRAIN / EXTRA_PROBE / EXTRA_FINETUNE
# (more --config.k=v args), CACHE_DIR (persistent XLA compilation cache shared by the stages,
# default runs/jax_cache), HOLDOUT=1 (recipe selection: train on 45,000 train images and score on
# the other 5,000, class balanced, benchmarks/cifar10_holdout.py; the test set is not read),
# SWEEP='ARGS;ARGS;...' (each method once per entry of pretraining args, e.g.
# SWEEP='--config.lr=1.2e-3;--config.lr=2.4e-3;--config.lr=4.8e-3'; the entry labels the row).
# Data: $SJMAE_CIFAR10_DIR (an ImageFolder with train/ and test/) if it is set, else PACK
# (default packed_data/cifar10.pack, made by benchmarks/pack_imagefolder.py pack) unpacked into
# DATA_DIR (default runs/cifar10_data).
# TINY=1: a few steps of every stage of a tiny model on CPU, float32 (tests/test_cifar10_results.py).
set -euo pipefail
cd "$(dirname "$0")/.."
spec=${1:-}
python=${PYTHON:-python}
out=${OUT:-runs/cifar10_results}
work_root=${WORK:-runs/cifar10_results/work}
default_pretrain=${PRETRAIN_MINUTES:-4}
default_finetune=${FINETUNE_MINUTES:-2}
dtype=${DTYPE:-bfloat16}
probe_epochs=${PROBE_EPOCHS:-30}
probe_mode=${PROBE_MODE:-both}
IFS=',' read -r -a method_specs <<< "$spec"
[ ${#method_specs[@]} -gt 0 ] || { sed -n '2,40p' "$0"; exit 2; }
for item in "${method_specs[@]}"; do
  case "${item%%:*}" in
    sjmae|mae|can|scratch) ;;
    *) echo "error: unknown method '${item%%:*}' in '$spec' (sjmae, mae, can, scratch)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then  # the stages share their compiled programs
  export JAX_COMPILATION_CACHE_DIR=$(mkdir -p "${CACHE_DIR:-runs/jax_cache}" && cd "${CACHE_DIR:-runs/jax_cache}" && pwd)
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
fi
command_line="bash benchmarks/cifar10_results.sh $spec"
for knob in TINY HOLDOUT PRETRAIN_MINUTES FINETUNE_MINUTES PROBE_EPOCHS PROBE_MODE PRETRAIN_BATCH \
    DTYPE SWEEP EXTRA_PRETRAIN EXTRA_PROBE EXTRA_FINETUNE; do
  if [ -n "${!knob:-}" ]; then command_line="$knob=$(printf %q "${!knob}") $command_line"; fi
done

model_arg="data=cifar10,model=vit_tiny,patch=4"
pretrain_args=(--config.batch_size="${PRETRAIN_BATCH:-4096}" --config.compute_dtype="$dtype"
  --config.decoder.embed_dim=256 --config.decoder.depth=4 --config.decoder.num_heads=8
  --config.data.augment_on_device=True --config.log_every_steps=100
  --config.picture_every_steps=0 --config.checkpoint.every_steps=1000000
  --config.monitors.knn.every_epochs=1000000 --config.monitors.knn.num_train=0 --config.monitors.knn.num_eval=0)
probe_args=(--config.compute_dtype="$dtype" --config.data.augment_on_device=True
  --config.mode="$probe_mode" --config.monitors.eval.every_epochs=1000)
# Evaluation at the end only: evaluations inside the minutes would shorten the schedule.
finetune_args=(--config.compute_dtype="$dtype" --config.data.augment_on_device=True
  --config.budget_warmup_fraction=0.1 --config.monitors.eval.every_epochs=1000000)
if [ "${TINY:-0}" = 1 ]; then  # seconds on a CPU: a 1-block, 32-wide encoder, batch 16
  default_pretrain=${PRETRAIN_MINUTES:-0.01}; default_finetune=${FINETUNE_MINUTES:-0.01}
  probe_epochs=${PROBE_EPOCHS:-1}
  dtype=float32
  model_arg="data=cifar10,model=vit_micro,patch=8"
  tiny_model=(--config.model.embed_dim=32 --config.model.depth=1 --config.model.num_heads=2)
  pretrain_args=("${tiny_model[@]}" --config.batch_size=16 --config.compute_dtype=float32
    --config.decoder.embed_dim=32 --config.decoder.depth=1 --config.decoder.num_heads=2
    --config.log_every_steps=1 --config.picture_every_steps=0 --config.budget_calibration_steps=2
    --config.stop_after_minutes=10  # no 150 % safety stop: a busy CPU's speed is too noisy
    --config.checkpoint.every_steps=1000000 --config.monitors.knn.every_epochs=1000000
    --config.monitors.knn.num_train=0 --config.monitors.knn.num_eval=0)
  probe_args=(--config.batch_size=8 --config.mode="$probe_mode")
  finetune_args=(--config.batch_size=8 --config.data.recipes.finetune.randaugment=
    --config.budget_calibration_steps=2 --config.monitors.eval.every_epochs=1000000
    --config.stop_after_minutes=10)
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
data_label="cifar10 train / test"
if [ "${HOLDOUT:-0}" = 1 ]; then  # the held-out 10 % of train stands in for the test set
  holdout_dir="$SJMAE_CIFAR10_DIR.holdout"
  if [ ! -f "$holdout_dir/.made" ]; then
    rm -rf "$holdout_dir"
    "$python" benchmarks/cifar10_holdout.py "$SJMAE_CIFAR10_DIR" "$holdout_dir" >&2
    touch "$holdout_dir/.made"
  fi
  export SJMAE_CIFAR10_DIR=$(cd "$holdout_dir" && pwd)
  data_label="cifar10 train minus held-out / held-out 10% of train (not the test set)"
fi

stage() {  # stage NAME command...: runs it with its log in $out, times it
  local name=$1 started=$SECONDS
  shift
  echo "+ $name: $*" | tee "$out/$label-$name.log" >&2
  if ! "$@" >> "$out/$label-$name.log" 2>&1; then
    tail -n 20 "$out/$label-$name.log" >&2
    echo "error: stage $name failed (log: $out/$label-$name.log)" >&2
    exit 1
  fi
  seconds+=("$name=$((SECONDS - started))")
}

IFS=';' read -r -a sweep <<< "${SWEEP:-}"
[ ${#sweep[@]} -gt 0 ] || sweep=("")
for item in "${method_specs[@]}"; do
  method=${item%%:*}
  minutes=$([ "$item" = "$method" ] && echo "" || echo "${item#*:}")
  for variant in "${sweep[@]}"; do
    label=$method
    [ -n "$variant" ] && label="$method-$(echo "$variant" | tr -c 'A-Za-z0-9.=\n-' '_' | tr -s '_')"
    work="$work_root/$label"
    rm -rf "$work"; mkdir -p "$work"
    seconds=()
    case "$method" in  # warmup: each original's fraction of its schedule
      mae|can) warmup_fraction=0.05 ;;  # 40 of 800 epochs
      sjmae) warmup_fraction=0.025 ;;   # 10 of 400
    esac
    if [ "$method" = scratch ]; then
      total=${minutes:-$("$python" -c "print($default_pretrain + $default_finetune)")}
      pretrain_minutes=0; finetune_minutes=$total
      scratch_args=()
      [ "${TINY:-0}" = 1 ] && scratch_args=("${tiny_model[@]}")
      stage finetune "$python" eval_finetune.py --config "configs/finetune.py:$model_arg" \
        --workdir "$work/finetune" --config.from_scratch=True --config.optim.layer_decay=1.0 \
        --config.train_minutes="$total" "${finetune_args[@]}" "${scratch_args[@]}" $variant \
        ${EXTRA_FINETUNE:-}
    else
      pretrain_minutes=${minutes%%+*}; pretrain_minutes=${pretrain_minutes:-$default_pretrain}
      finetune_minutes=$([[ "$minutes" == *+* ]] && echo "${minutes#*+}" || echo "$default_finetune")
      stage pretrain "$python" train.py --config "configs/$method.py:$model_arg" \
        --workdir "$work/pretrain" --config.train_minutes="$pretrain_minutes" \
        --config.budget_warmup_fraction="$warmup_fraction" "${pretrain_args[@]}" $variant \
        ${EXTRA_PRETRAIN:-}
      stage probe "$python" eval_linprobe.py --config "configs/linprobe.py:$model_arg" \
        --workdir "$work/probe" --config.init_from="$work/pretrain" \
        --config.epochs="$probe_epochs" \
        --config.warmup_epochs="$("$python" -c "print(round($probe_epochs * 0.1, 6))")" \
        "${probe_args[@]}" ${EXTRA_PROBE:-}
      if "$python" -c "import sys; sys.exit(float('$finetune_minutes') <= 0)"; then
        stage finetune "$python" eval_finetune.py --config "configs/finetune.py:$model_arg" \
          --workdir "$work/finetune" --config.init_from="$work/pretrain" \
          --config.train_minutes="$finetune_minutes" "${finetune_args[@]}" ${EXTRA_FINETUNE:-}
      fi
    fi
    "$python" benchmarks/cifar10_results_row.py --method "$method" --variant "$variant" \
      --work "$work" --data "$data_label" --append "$out/cifar10_results.jsonl" \
      --command "$command_line" --pretrain-minutes "$pretrain_minutes" \
      --finetune-minutes "$finetune_minutes" "${seconds[@]}"
  done
done
readme_args=()
[ -n "${README:-}" ] && readme_args=(--readme "$README")
"$python" benchmarks/cifar10_results_table.py "$out/cifar10_results.jsonl" \
  --markdown "$out/cifar10_table.md" --plot "$out/cifar10.png" "${readme_args[@]}" >&2
