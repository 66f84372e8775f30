"""One process per host: jax.distributed set-up from the cluster or from three variables.

`initialize()` is what `--multihost` calls, on a TPU pod, a SLURM cluster and launch/local.sh
alike. jax finds the coordinator, the process count and this process's id itself on Cloud TPU,
SLURM, Open MPI and Kubernetes; otherwise JAX_COORDINATOR_ADDRESS (read by jax) and
JAX_NUM_PROCESSES / JAX_PROCESS_ID (read here: jax 0.10 does not) give them.
"""
import os

import jax


def initialize() -> None:
  n, i = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(n) if n else None,
                             process_id=int(i) if i else None)
