"""The smallest program that aborts libtpu 0.0.42.1 (SIGABRT) on v5p, and shapes that do not.

  python benchmarks/libtpu_pincer_repro.py            # needs libtpu (no TPU): every case
  python benchmarks/libtpu_pincer_repro.py 132 1105 1536 v5p:2x2x1   # one case, in-process

The U-ViT's position-table gradient: sum over the batch of f32[B, L, D] (batch sharded over
the chips), the result laid out along D over the same chips. XLA fuses the all-reduce and the
slice into an all-reduce-scatter fusion; for [1105, 1536] on a 4-chip v5p slice libtpu's
RotatedPincerFusionEmitter then fails `Check failed: s_count.has_value()` and aborts the
process. Each case compiles (compile-only devices, nothing runs) in a child process, so an
abort is one line of the table. configs/common.py replicates the tables (logical axis
pos_width) so the laion step never builds this; benchmarks/README.md has the table.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

NO_FUSION = "--xla_tpu_enable_all_reduce_scatter_fusion=false"  # the other workaround
CASES = (  # (batch, rows, width, topology[, LIBTPU_INIT_ARGS])
    (132, 1105, 1536, "v5p:2x2x1"),   # laion's table, the U-ViT at 512 px: aborts
    (132, 1105, 1536, "v5p:2x2x1", NO_FUSION),
    (128, 1105, 1536, "v5p:2x2x1"),
    (132, 1104, 1536, "v5p:2x2x1"),   # one row fewer
    (132, 1100, 1536, "v5p:2x2x1"),
    (132, 77, 1536, "v5p:2x2x1"),
    (132, 1105, 512, "v5p:2x2x1"),
    (132, 1105, 1280, "v5p:2x2x1"),
    (128, 1105, 1536, "v5p:4x4x4"),
    (128, 1105, 1536, "v5e:4x4"),
    (128, 1105, 1536, "v4:2x2x1"),
)


def compile_one(batch: int, rows: int, width: int, topology: str) -> None:
  devices = topologies.get_topology_desc(topology, "tpu").devices
  mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))
  x = jax.ShapeDtypeStruct((batch, rows, width), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  step = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P(None, "fsdp")))
  text = step.lower(x).compile().as_text()
  print(f"compiled; all-reduce-scatter fusion: {'all-reduce-scatter' in text}", flush=True)
  os._exit(0)  # libtpu's compile-only client can crash while tearing down


def main() -> None:
  if len(sys.argv) == 5:
    compile_one(*(int(a) for a in sys.argv[1:4]), sys.argv[4])
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
  print(f"{'f32[B, L, D]':<22} {'topology':<10} result")
  for case in CASES:
    flags = dict(LIBTPU_INIT_ARGS=case[4]) if len(case) > 4 else {}
    proc = subprocess.run([sys.executable, __file__, *map(str, case[:4])], env={**env, **flags},
                          text=True, capture_output=True, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    check = next((line.split("] ", 1)[-1] for line in lines if "Check failed" in line), "")
    done = next((line for line in lines if line.startswith("compiled")), "")
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    print(f"{str(list(case[:3])):<22} {case[3]:<10} {done or how + ': ' + (check or lines[-1])}"
          + (f" (LIBTPU_INIT_ARGS={case[4]})" if flags else ""), flush=True)


if __name__ == "__main__":
  main()
