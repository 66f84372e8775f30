"""The machine's measured float32 matmul peak, JAX and PyTorch side by side.

  python benchmarks/matmul_peak.py               # n = 2048, 4096; best of 10
  python benchmarks/matmul_peak.py --quick       # n = 512, 1024; best of 3 (sanity only)

A square n x n @ n x n matmul costs 2 n^3 floating-point operations. Each
library multiplies the same matrices several times; the best repetition is the
peak (the least disturbed by other processes). bench_train.py divides its
achieved FLOP/s by this number. Both libraries use every core unless
--threads says otherwise (torch.set_num_threads; XLA's CPU client uses its own
Eigen thread pool of one thread per core).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _best_seconds(fn, reps: int) -> float:
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def jax_peak(n: int, reps: int) -> float:
  """GFLOP/s of jnp.matmul on the default device (float32, highest precision): the
  trainer's own measurement (unidiffuser_jax.perf.matmul_peak_flops)."""
  from unidiffuser_jax import perf
  return perf.matmul_peak_flops(n, reps) / 1e9


def torch_peak(n: int, reps: int) -> float:
  """GFLOP/s of torch.mm (float32)."""
  import torch
  gen = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=gen)
  b = torch.randn(n, n, generator=gen)
  out = torch.empty(n, n)
  torch.mm(a, b, out=out)
  sec = _best_seconds(lambda: torch.mm(a, b, out=out), reps)
  return 2 * n ** 3 / sec / 1e9


def measure(sizes, reps: int) -> dict:
  """{n: (jax GFLOP/s, torch GFLOP/s)} and the best of each over all sizes."""
  rows = {n: (jax_peak(n, reps), torch_peak(n, reps)) for n in sizes}
  best = (max(r[0] for r in rows.values()), max(r[1] for r in rows.values()))
  return {"rows": rows, "best_jax": best[0], "best_torch": best[1], "peak": max(best)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
  parser.add_argument("--sizes", type=int, nargs="*", default=None)
  parser.add_argument("--reps", type=int, default=None)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  args = parser.parse_args()
  sizes = args.sizes or ([512, 1024] if args.quick else [2048, 4096])
  reps = args.reps or (3 if args.quick else 10)

  import torch
  torch.set_num_threads(args.threads or os.cpu_count())
  import jax
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | cores: {os.cpu_count()} | "
        f"torch threads: {torch.get_num_threads()} | jax {jax.__version__}, torch {torch.__version__}")
  res = measure(sizes, reps)
  print(f"{'n':>6} | {'jax GFLOP/s':>12} | {'torch GFLOP/s':>13} | jax/torch")
  for n, (gj, gt) in res["rows"].items():
    print(f"{n:>6} | {gj:12.1f} | {gt:13.1f} | {gj / gt:.2f}")
  print(f"peak (best of both, used by bench_train.py): {res['peak']:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
