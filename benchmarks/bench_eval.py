"""FID Inception feature throughput (images/s): ours (Flax, jit) vs pytorch-fid, same batch.

  python benchmarks/bench_eval.py [--batch 16] [--size 256] [--iters 5]

Both networks get the same random weights (pytorch-fid's download patched out) and the same
uint8-range images at --size (resized to 299 inside each network, as in an evaluation), and
run one after the other in this process, alternating, `iters` timed batches each after a
warm-up (compilation excluded). pytorch-fid runs torch with all this machine's threads.
Prints images/s of each and the ratio; the pool3 features are checked to agree (1e-3).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.torchvision_compat import import_torchvision  # noqa: E402

import_torchvision()  # before pytorch-fid imports torchvision
from pytorch_fid import inception as pf_inception  # noqa: E402
from tests.test_fid import _random_state_dict  # noqa: E402
from unidiffuser_jax import eval_features  # noqa: E402
from unidiffuser_jax.weights import inception as winception  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--size", type=int, default=256)
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()
  sd = _random_state_dict(0)
  pf_inception.load_state_dict_from_url = lambda *a, **k: dict(sd)
  theirs = pf_inception.InceptionV3([3]).eval()
  params = winception.inception_params_from_tensors({k: v.numpy() for k, v in sd.items()})
  ours = jax.jit(eval_features.inception_fn)
  x = np.random.default_rng(0).uniform(0, 1, (args.batch, args.size, args.size, 3)
                                       ).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  def run_ours():
    return np.asarray(ours(x, params))

  def run_theirs():
    with torch.no_grad():
      return theirs(xt)[0].squeeze(-1).squeeze(-1).numpy()

  a, b = run_ours(), run_theirs()   # warm-up (compilation) + agreement
  err = float(np.abs(a - b).max())
  times = {"ours": [], "pytorch-fid": []}
  for _ in range(args.iters):
    for name, fn in (("ours", run_ours), ("pytorch-fid", run_theirs)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  rate = {k: args.batch / float(np.median(v)) for k, v in times.items()}
  print(f"batch {args.batch} at {args.size}px -> 299, {args.iters} timed batches each "
        f"(median), torch threads {torch.get_num_threads()}, jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  for k, v in rate.items():
    print(f"  {k:<12} {v:7.2f} images/s")
  print(f"  ratio ours / pytorch-fid: {rate['ours'] / rate['pytorch-fid']:.2f}x "
        f"(max |pool3 difference| {err:.2e})")
  assert err < 1e-3, err


if __name__ == "__main__":
  main()
