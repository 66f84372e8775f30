#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: copy this checkout to every worker, install, run on all.
#
#   TPU_NAME=my-v5e-256 ZONE=us-west4-a WORKDIR=gs://BUCKET/uvit512 \
#     launch/tpu_pod.sh --config=configs/laion.py \
#       --config.data.shards='gs://BUCKET/laion-hr/{00000..99999}.tar'
#
# Environment:
#   TPU_NAME, ZONE   (required) the TPU VM (created beforehand with `gcloud compute tpus tpu-vm create`)
#   WORKDIR          (required) gs:// path: checkpoints, TensorBoard events, samples
#   PROJECT          GCP project (default: gcloud's configured one)
#   MODE             --mode for main (default train); describe needs no TPU at all
#   SETUP=0          skip copying the code and installing requirements (re-runs)
#   DETACH=1         start in the background on each worker (log: ~/unidiffuser.log) and return;
#                    default: stream every worker's output here and wait
#   REMOTE_DIR       code directory on the workers (default ~/unidiffuser-jax)
# Resuming: run the same command again; training continues from WORKDIR's newest checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${WORKDIR:?set WORKDIR (a gs:// path every worker can write)}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
MODE="${MODE:-train}"
SETUP="${SETUP:-1}"
DETACH="${DETACH:-0}"
REMOTE_DIR="${REMOTE_DIR:-unidiffuser-jax}"
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"

case "$WORKDIR" in gs://*) ;; *) echo "error: WORKDIR must be a gs:// path on a pod (got $WORKDIR)" >&2; exit 2;; esac

tpu() {  # tpu <ssh|scp> args...: gcloud on every worker of the slice
  local what="$1"; shift
  gcloud compute tpus tpu-vm "$what" --zone="$ZONE" --project="$PROJECT" --worker=all "$@"
}

if [[ "$SETUP" == "1" ]]; then
  tarball="$(mktemp -d)/code.tar.gz"
  # Tracked files only: no .venv, workdirs or caches travel.
  git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
  tpu scp "$tarball" "$TPU_NAME:~/unidiffuser-code.tar.gz"
  tpu ssh "$TPU_NAME" --command="set -e
    rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/unidiffuser-code.tar.gz -C ~/$REMOTE_DIR
    cd ~/$REMOTE_DIR
    python3 -m venv .venv && . .venv/bin/activate
    pip install -q --upgrade pip
    pip install -q -r requirements.txt -r requirements-tpu.txt"
fi

# One process per worker; `--multihost` makes main call jax.distributed.initialize() first.
quoted="$(printf ' %q' "$@" --workdir="$WORKDIR" --mode="$MODE")"
run="cd ~/$REMOTE_DIR && . .venv/bin/activate && python -m unidiffuser_jax.main --multihost$quoted"
if [[ "$DETACH" == "1" ]]; then
  tpu ssh "$TPU_NAME" --command="nohup bash -c '$run' > ~/unidiffuser.log 2>&1 < /dev/null & echo started on \$(hostname)"
else
  tpu ssh "$TPU_NAME" --command="$run"
fi
