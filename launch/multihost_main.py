"""Multi-process entry point: jax.distributed.initialize(), then unidiffuser_jax.main.

  python launch/multihost_main.py --config=configs/laion.py --workdir=gs://BUCKET/run [...]

Every host (TPU pod worker, SLURM task) runs this same command. With no
arguments jax.distributed.initialize() finds the coordinator, the number of
processes and this process's id itself on Cloud TPU VMs (GCE metadata), under
SLURM (SLURM_* variables), Open MPI and Kubernetes; set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID to override. It must run before anything
touches a device, which is why it sits in front of main rather than inside a job.
UNIDIFFUSER_SINGLE_PROCESS=1 skips it; with no cluster in sight it runs single-process.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


_CLUSTER_VARS = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "JAX_COORDINATOR_ADDRESS", "KUBERNETES_SERVICE_HOST")


def _initialize() -> None:
  if os.environ.get("UNIDIFFUSER_SINGLE_PROCESS") == "1":
    return
  import jax
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError:
    # No cluster detected at all (a workstation): one process is the whole job. Inside a
    # cluster the error stands, since N independent runs would share one workdir.
    if any(os.environ.get(v) for v in _CLUSTER_VARS):
      raise
    print("launch: no multi-process cluster detected; running as a single process", flush=True)
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)


if __name__ == "__main__":
  _initialize()
  from unidiffuser_jax import main  # noqa: E402  (after the distributed runtime is up)
  main.main()
