#!/usr/bin/env bash
# N trainer processes on this machine, the way a pod runs them: one process per "host", each
# with DEVICES/N fake CPU devices, joined by jax.distributed (gloo collectives on CPU).
#
#   launch/local.sh 2 --config=configs/demo.py:tiny --workdir=workdirs/w2 --config.train.steps=20
#
# Every process runs `python -m unidiffuser_jax.main --multihost ARGS` (the pod launcher's
# command) with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i.
# Output lines are prefixed [p<i>]. The exit status is the worst (highest) of the processes'.
# SIGTERM/SIGINT to this script is passed to every process (a pod-wide preemption notice);
# SIGTERM to one trainer process alone is a one-host notice (jax tells the others).
# Environment: DEVICES (default 8, divisible by N), PORT (default: a free one), PYTHON.
set -uo pipefail

N="${1:?usage: launch/local.sh N [main args...]}"
shift
DEVICES="${DEVICES:-8}"
PYTHON="${PYTHON:-python}"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]] || (( DEVICES % N )); then
  echo "error: N=$N must be a positive divisor of DEVICES=$DEVICES" >&2
  exit 2
fi
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
# One device count per process: drop any inherited one, keep the other XLA flags.
FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"

cd "$(dirname "$0")/.."
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="$FLAGS --xla_force_host_platform_device_count=$((DEVICES / N))" \
    "$PYTHON" -u -m unidiffuser_jax.main --multihost "$@" \
    > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

worst=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; rc=$?
    # wait returns >128 when a trapped signal interrupts it: wait again for the real status.
    if (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  (( rc > worst )) && worst=$rc
done
wait  # the output filters
exit "$worst"
