#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker runs the same `python -m ast_jax.main --distributed ...`, and JAX
# reads the coordinator, process count and process id from the pod's metadata.
set -euo pipefail

# --- What to run where (each can be set in the environment instead) ------------------------------------------
NAME=${NAME:-ast-jax}                      # TPU VM name
ZONE=${ZONE:-us-central2-b}
TYPE=${TYPE:-v4-32}                        # accelerator type: v4-32 = 16 chips on 4 workers
VERSION=${VERSION:-tpu-ubuntu2204-base}    # runtime: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                                           # v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
CONFIG=${CONFIG:-configs/audioset.py}
BUCKET=${BUCKET:-}                         # optional: a GCS bucket mounted with gcsfuse on every worker ...
MOUNT=${MOUNT:-/mnt/ast_jax}               # ... at this path
WORKDIR=${WORKDIR:-$MOUNT/workdirs/$(basename "${CONFIG%%:*}" .py)}  # a path every worker reaches (shared mount)
REPO_URL=${REPO_URL:-}                     # empty: copy this checkout (uncommitted changes too); else git clone it
BRANCH=${BRANCH:-main}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}     # the runtime images ship Python 3.10; JAX needs a newer one
DETACH=${DETACH:-0}                        # 1: train in the background on the workers, log to ~/ast_jax_train.log
RESUMES=${RESUMES:-10}                     # 'train' runs again after a preemption (exit status 75), this often
PREEMPTED=75                               # the exit status of a run stopped by SIGTERM with its checkpoint saved
REMOTE_DIR=ast_jax                         # on every worker, under $HOME
VENV=ast_jax_venv

usage() {
  cat <<EOF
usage: [NAME=... ZONE=... TYPE=... VERSION=... CONFIG=... WORKDIR=... BUCKET=...] $0 STAGE [-- ast_jax.main flags]

stages:
  all      create (or reuse) the slice, set up every worker, train (default)
  create   gcloud compute tpus tpu-vm create \$NAME, unless it exists
  setup    copy (or clone) the repository to every worker, install requirements.txt and jax[tpu] in ~/$VENV,
           mount gs://\$BUCKET at \$MOUNT when BUCKET is set
  train    run 'python -m ast_jax.main --distributed --config=\$CONFIG --workdir=\$WORKDIR [flags]' on all workers;
           after a preemption (exit status $PREEMPTED) wait until the slice is READY and run it again, up to
           \$RESUMES times
  logs     tail ~/ast_jax_train.log on every worker (DETACH=1 runs)
  stop     stop a DETACH=1 run (SIGTERM to the pid each worker recorded: it saves a checkpoint first)
  delete   delete the slice

The workdir must be one directory that every worker reads and writes (checkpoints are written by all workers,
metrics.jsonl by worker 0): a gcsfuse mount (BUCKET=...) or an NFS/Filestore mount. Re-running 'train' resumes.

Preemption: SIGTERM to any worker's run (a maintenance event, a spot VM being reclaimed, 'stop') makes every worker
stop after the same step, save a checkpoint there and exit with status $PREEMPTED; 'train' then resumes it once the
slice is READY again. A slice in state PREEMPTED must be recreated ('delete', then 'all'); 'train' resumes there.
example:
  BUCKET=my-bucket CONFIG=configs/audioset.py $0 all -- --config.data.train_datafile=$MOUNT/data/train.json
EOF
}

STAGE=${1:-all}
shift || true
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA_FLAGS=("$@")

if [[ "$WORKDIR" == gs://* ]]; then
  path=${WORKDIR#gs://}
  echo "error: WORKDIR=$WORKDIR: the trainer writes metrics.jsonl and the model through the local file system;" \
       "mount the bucket instead: BUCKET=${path%%/*} WORKDIR=$MOUNT/${path#*/}" >&2
  exit 2
fi

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all_workers() { tpu ssh "$NAME" --worker=all --command="$1"; }

create() {
  if tpu describe "$NAME" >/dev/null 2>&1; then
    echo "reusing TPU VM $NAME ($(tpu describe "$NAME" --format='value(acceleratorType,state)'))"
  else
    tpu create "$NAME" --accelerator-type="$TYPE" --version="$VERSION"
  fi
}

copy_repository() {
  if [[ -n "$REPO_URL" ]]; then
    on_all_workers "set -e; if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch -q origin $BRANCH &&
      git -C ~/$REMOTE_DIR checkout -q -B $BRANCH FETCH_HEAD; else git clone -q -b $BRANCH $REPO_URL ~/$REMOTE_DIR; fi"
    return
  fi
  local root archive
  root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  archive=$(mktemp --suffix=.tar.gz)
  # Tracked and untracked-but-not-ignored files: what this checkout would run, without workdirs or caches.
  (cd "$root" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive")
  tpu scp "$archive" "$NAME":ast_jax.tar.gz --worker=all
  rm -f "$archive"
  on_all_workers "set -e; rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/ast_jax.tar.gz -C ~/$REMOTE_DIR"
}

install() {
  # uv brings its own CPython $PYTHON_VERSION, so the image's Python does not matter.
  # tcmalloc: ast_jax's entry points preload it when present (ast_jax/runtime.py); optional, so failures are ignored.
  on_all_workers "sudo apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || true"
  on_all_workers "set -e; python3 -m pip install -q --user uv;
    python3 -m uv venv -q --allow-existing --python $PYTHON_VERSION ~/$VENV;
    python3 -m uv pip install -q --python ~/$VENV/bin/python -r ~/$REMOTE_DIR/requirements.txt 'jax[tpu]';
    ~/$VENV/bin/python -c 'import jax; print(jax.__version__, jax.local_device_count(), \"local TPU devices\")'"
}

mount_bucket() {
  [[ -n "$BUCKET" ]] || return 0
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then
      apt=https://packages.cloud.google.com/apt; key=/usr/share/keyrings/cloud.google.asc;
      echo \"deb [signed-by=\$key] \$apt gcsfuse-\$(lsb_release -cs) main\" |
        sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;
      curl -fsSL \$apt/doc/apt-key.gpg | sudo tee \$key >/dev/null;
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi;
    sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT;
    mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
}

train() {
  local command
  command="cd ~/$REMOTE_DIR && ~/$VENV/bin/python -m ast_jax.main --distributed $(printf '%q ' \
    "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA_FLAGS[@]}")"
  if [[ "$DETACH" == 1 ]]; then
    # The run outlives this ssh session; each worker keeps its own log and pid. A preempted run ends with status
    # $PREEMPTED in the log; 'train' again resumes it.
    on_all_workers "nohup setsid bash -c $(printf '%q' "$command") > ~/ast_jax_train.log 2>&1 < /dev/null &
      echo \$! > ~/ast_jax_train.pid; echo started \$(hostname) pid \$(cat ~/ast_jax_train.pid)"
    echo "follow with: $0 logs"
    return
  fi
  # Each worker prints its run's exit status: the ssh command's own status does not say which worker ended how.
  local output status resume
  output=$(mktemp)
  for resume in $(seq 0 "$RESUMES"); do
    status=0
    on_all_workers "$command; status=\$?; echo \"ast_jax exit status \$status\"; exit \$status" 2>&1 |
      tee "$output" || status=$?
    if ! grep -q "ast_jax exit status $PREEMPTED" "$output"; then
      rm -f "$output"
      return "$status"
    fi
    echo "$(date) preempted: the checkpoint is saved (resume $((resume + 1)) of $RESUMES)"
    wait_until_ready && mount_bucket
  done
  rm -f "$output"
  echo "error: preempted $((RESUMES + 1)) times; run '$0 train' to resume" >&2
  return "$PREEMPTED"
}

wait_until_ready() {
  local state
  for _ in $(seq 120); do  # an hour
    state=$(tpu describe "$NAME" --format='value(state)' 2>/dev/null || true)
    case "$state" in
      READY) return 0 ;;
      PREEMPTED|TERMINATED) echo "error: TPU VM $NAME is $state: recreate it ('$0 delete', then '$0 all')" >&2
                            exit "$PREEMPTED" ;;
    esac
    echo "$(date) TPU VM $NAME is ${state:-unreachable}; waiting until it is READY"
    sleep 30
  done
  echo "error: TPU VM $NAME is still not READY after an hour; run '$0 train' to resume" >&2
  exit "$PREEMPTED"
}

case "$STAGE" in
  all) create; copy_repository; install; mount_bucket; train ;;
  create) create ;;
  setup) copy_repository; install; mount_bucket ;;
  train) train ;;
  logs) on_all_workers "tail -n 20 -f ~/ast_jax_train.log" ;;
  stop) on_all_workers "[ -f ~/ast_jax_train.pid ] && kill -- -\$(cat ~/ast_jax_train.pid) || true" ;;
  delete) tpu delete "$NAME" --quiet ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
