#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice, one host or a pod slice of many, with the same train.py.
# Every worker runs train.py with --config.distributed.enabled=True; on TPU VMs
# jax.distributed.initialize() finds the other workers by itself.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [-- train.py flags]

Commands:
  launch    create (or reuse) the TPU VM, install, start train.py, stream worker 0's log
  create    create the TPU VM, or reuse it (a preempted or failed one is deleted and recreated)
  install   copy this repository (git-tracked and untracked-not-ignored files) to every worker
            and install it with jax[tpu] into ~/sjmae_venv there
  train     start train.py in the background on every worker (needs --workdir)
  logs      stream worker 0's log until train.py exits (Ctrl-C stops the stream, not training)
  stop      stop train.py on every worker (SIGTERM: it checkpoints, then exits)
  delete    delete the TPU VM (and its queued resource)

Options:
  --name NAME         TPU VM name (required)
  --zone ZONE         zone, e.g. us-central2-b (required)
  --project PROJECT   Google Cloud project (default: gcloud's configured project)
  --type TYPE         accelerator type, e.g. v4-32, v5litepod-64 (default: v4-8)
  --runtime VERSION   TPU software version (default by type: v4 tpu-ubuntu2204-base,
                      v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot              Spot capacity: much cheaper, may be preempted at any time
  --queued            ask for the slice through a queued resource and wait until it is granted
  --workdir gs://...  the run directory (must be on GCS: every worker writes its checkpoint
                      shards there, and a recreated VM starts with empty disks)
  --python VERSION    Python of the workers' virtualenv (default: 3.11)
  --dry-run           print the gcloud commands instead of running them
  -h, --help          this text

Everything after -- goes to train.py. Example (ViT-L MAE on a v4-32 slice, Spot, queued):
  scripts/tpu_vm.sh launch --name mae-l --zone us-central2-b --type v4-32 --spot --queued \
      --workdir gs://my-bucket/runs/mae_l -- \
      --config configs/mae.py:model=vit_large,data=imagenet2012 \
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets \
      --config.mesh.fsdp=4 --config.compute_dtype=bfloat16

After a preemption, the same launch command deletes and recreates the slice, installs again and
starts train.py, which resumes from the latest checkpoint in --workdir. launch exits 0 when
train.py exits and fails when the slice goes away, so this keeps a Spot run going:
  until scripts/tpu_vm.sh launch ...; do sleep 300; done
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

command_name=""
name=""
zone=""
project=""
accelerator_type="v4-8"
runtime=""
spot=0
queued=0
workdir=""
python_version="3.11"
dry_run=0
train_args=()

if [[ $# -gt 0 && "$1" != -* ]]; then
  command_name="$1"
  shift
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --type) accelerator_type="${2:?--type needs a value}"; shift 2 ;;
    --runtime) runtime="${2:?--runtime needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --python) python_version="${2:?--python needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$command_name" in
  launch|create|install|train|logs|stop|delete) ;;
  "") usage >&2; die "missing COMMAND" ;;
  *) usage >&2; die "unknown command: $command_name" ;;
esac
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
if [[ -z "$runtime" ]]; then
  case "$accelerator_type" in
    v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5litepod-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) die "no default --runtime for --type $accelerator_type; give one" ;;
  esac
fi
if [[ "$command_name" == "launch" || "$command_name" == "train" ]]; then
  [[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path (got '${workdir}')"
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
location=(--zone="$zone")
if [[ -n "$project" ]]; then
  location+=(--project="$project")
fi

# Runs a command, or prints it (shell-quoted, as it would run) with --dry-run.
run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Runs a shell command on the workers (all, or one number).
on_workers() {
  local worker="$1" remote_command="$2"
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker="$worker" \
    --command="$remote_command"
}

# The VM's state (READY, PREEMPTED, ...) or "" when it does not exist; "" with --dry-run.
vm_state() {
  [[ "$dry_run" == 1 ]] && return 0
  gcloud compute tpus tpu-vm describe "$name" "${location[@]}" --format='value(state)' \
    2>/dev/null || true
}

queued_state() {
  [[ "$dry_run" == 1 ]] && return 0
  gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

delete_vm() {
  if [[ "$queued" == 1 || -n "$(queued_state)" ]]; then
    run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
  fi
}

wait_until_granted() {
  [[ "$dry_run" == 1 ]] && return 0
  local state
  while true; do
    state="$(queued_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDED) die "queued resource $name is $state" ;;
      *) echo "queued resource $name: ${state:-unknown}; waiting for capacity..."; sleep 60 ;;
    esac
  done
}

create_vm() {
  local capacity=()
  if [[ "$spot" == 1 ]]; then
    capacity=(--spot)
  fi
  if [[ "$queued" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$name" "${location[@]}" --node-id="$name" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime" \
      ${capacity[@]+"${capacity[@]}"}
    wait_until_granted
  else
    run gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime" ${capacity[@]+"${capacity[@]}"}
  fi
}

create_or_reuse() {
  local state
  state="$(vm_state)"
  case "$state" in
    READY)
      echo "reusing TPU VM $name (READY)" ;;
    "")
      if [[ "$queued" == 1 && -n "$(queued_state)" ]]; then
        wait_until_granted  # requested earlier, not granted yet
      else
        create_vm
      fi ;;
    PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDED)
      echo "TPU VM $name is $state: deleting and creating it again"
      delete_vm
      create_vm ;;
    *)
      die "TPU VM $name is $state; wait, or delete it with: scripts/tpu_vm.sh delete --name $name --zone $zone" ;;
  esac
}

install() {
  local tarball
  tarball="$(mktemp -t sjmae_jax.XXXXXX)"
  if [[ "$dry_run" == 1 ]]; then
    echo "# pack the git-tracked and untracked-not-ignored files of $repo into $tarball"
  else
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
      | tar -czf "$tarball" -C "$repo" --null -T -
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name":sjmae_jax.tar.gz "${location[@]}" \
    --worker=all
  rm -f "$tarball"
  local python_quoted
  python_quoted="$(printf '%q' "$python_version")"
  on_workers all "set -euo pipefail
rm -rf ~/sjmae_jax && mkdir -p ~/sjmae_jax && tar -xzf ~/sjmae_jax.tar.gz -C ~/sjmae_jax
python3 -m pip install --user --quiet --upgrade uv
~/.local/bin/uv venv --quiet --allow-existing --python $python_quoted ~/sjmae_venv
~/.local/bin/uv pip install --quiet --python ~/sjmae_venv/bin/python \
  -r ~/sjmae_jax/requirements.txt 'jax[tpu]'"
}

start_training() {
  local arguments
  arguments="$(printf '%q ' --workdir="$workdir" --config.distributed.enabled=True \
    ${train_args[@]+"${train_args[@]}"})"
  on_workers all "set -euo pipefail
cd ~/sjmae_jax
if [ -f ~/sjmae_train.pid ] && kill -0 \"\$(cat ~/sjmae_train.pid)\" 2>/dev/null; then
  echo \"train.py is already running on \$(hostname): not starting another (stop it first)\" >&2
  exit 0
fi
nohup ~/sjmae_venv/bin/python train.py $arguments >> ~/sjmae_train.log 2>&1 < /dev/null &
echo \$! > ~/sjmae_train.pid"
}

# Ends when worker 0's train.py exits (status 0), or fails when the connection is lost (e.g. the
# slice was preempted): `until scripts/tpu_vm.sh launch ...; do sleep 300; done` relaunches.
stream_log() {
  on_workers 0 "tail -n 200 -F --pid=\"\$(cat ~/sjmae_train.pid)\" ~/sjmae_train.log"
}

stop_training() {
  on_workers all "if [ -f ~/sjmae_train.pid ]; then kill \"\$(cat ~/sjmae_train.pid)\" || true; fi"
}

case "$command_name" in
  launch) create_or_reuse; install; start_training; stream_log ;;
  create) create_or_reuse ;;
  install) install ;;
  train) start_training ;;
  logs) stream_log ;;
  stop) stop_training ;;
  delete) delete_vm ;;
esac
