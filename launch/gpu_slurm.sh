#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per node, each driving all of its node's GPUs.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh --config=configs/laion.py --workdir=/shared/runs/uvit512 \
#     --config.data.shards='/shared/laion-hr/{00000..99999}.tar'
#
# The checkout and its .venv must be on a filesystem every node sees. Once, on a login node:
#   python3 -m venv .venv && . .venv/bin/activate && \
#     pip install -r requirements.txt && pip install "jax[cuda13]==0.10.2"
# jax.distributed.initialize() (main.py --multihost) reads the coordinator (first node
# of the step), the process count and this process's id from SLURM_* itself.
# Resuming: submit the same command again.
#SBATCH --job-name=unidiffuser
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=unidiffuser-%j.out
set -euo pipefail

REPO_ROOT="${REPO_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
cd "$REPO_ROOT"
. .venv/bin/activate

# Overlap collectives with compute; let XLA take most of each GPU's memory up front.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

echo "nodes: ${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-?} x ${SLURM_GPUS_PER_NODE:-?} GPUs)"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  python -m unidiffuser_jax.main --multihost "$@"
