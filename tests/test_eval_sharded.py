"""Sharded metric features: 8 devices == 1 device, 2 processes == 1 process (FID statistics)."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from unidiffuser_jax import eval_features, fid, sharding

DIM = 12
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_net(images, params):
  """A cheap stand-in for the Inception: [B, 6, 6, 3] -> [B, DIM], elementwise only, so its
  float32 values do not depend on the batch's shape or split (a matmul's rounding does, at
  ~1e-7 relative, which would hide what is tested here: the statistics' combination)."""
  x = images.reshape(images.shape[0], -1)[:, :3 * DIM].reshape(-1, DIM, 3)
  w = params["w"]
  return jax.numpy.tanh(x[..., 0] * w[0] + x[..., 1] * w[1] + x[..., 2] * w[2]) * 3.0 + params["b"]


def toy_params():
  r = np.random.default_rng(1)
  return {"w": r.standard_normal((3, DIM)).astype(np.float32),
          "b": r.standard_normal((DIM,)).astype(np.float32)}


def toy_images(n: int) -> np.ndarray:
  return np.random.default_rng(2).uniform(0, 1, (n, 6, 6, 3)).astype(np.float32)


def _stats_over(mesh, images, local_batch):
  net = eval_features.ShardedFeatures(toy_net, toy_params(), mesh, local_batch)
  share = eval_features.process_share(len(images))
  stats = eval_features.feature_stats(net, (images[i] for i in share),
                                      eval_features.num_batches(len(images), local_batch), DIM)
  return eval_features.allreduce_stats(stats)


def _numpy_stats(images):
  x = images.reshape(len(images), -1)[:, :3 * DIM].reshape(-1, DIM, 3).astype(np.float64)
  p = toy_params()
  feats = np.tanh((x * p["w"].T[None].astype(np.float64)).sum(-1)) * 3.0 + p["b"]
  return feats.mean(0), np.cov(feats, rowvar=False)


def test_eight_devices_equal_one_device_and_numpy():
  images = toy_images(37)   # not a multiple of the batch: the last batch is padded and masked
  one = _stats_over(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1)),
                    images, 8)
  eight = _stats_over(sharding.make_mesh(dict(data=8, fsdp=1, tensor=1, num_devices=8)),
                      images, 8)
  assert one.n == eight.n == 37
  np.testing.assert_allclose(eight.mean(), one.mean(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(eight.cov(), one.cov(), rtol=1e-6, atol=1e-9)
  mu, cov = _numpy_stats(images)
  np.testing.assert_allclose(one.mean(), mu, rtol=1e-5, atol=1e-5)   # float32 network
  np.testing.assert_allclose(one.cov(), cov, rtol=1e-4, atol=1e-5)
  ref_mu, ref_cov = _numpy_stats(toy_images(50)[::-1])
  f1 = fid.frechet_distance(one.mean(), one.cov(), ref_mu, ref_cov)
  f8 = fid.frechet_distance(eight.mean(), eight.cov(), ref_mu, ref_cov)
  assert abs(f1 - f8) <= 1e-6 * abs(f1)


def test_padded_batches_and_shares():
  got = list(eval_features.padded_batches(iter(np.arange(5)[:, None]), 2, 4))
  assert [m.tolist() for _, m in got] == [[True, True], [True, True], [True, False],
                                          [False, False]]
  assert eval_features.process_share(10) == range(10)   # one process: everything
  assert eval_features.num_batches(10, 4) == 3


_WORKER = r"""
import os, sys
import jax
jax.distributed.initialize("127.0.0.1:%(port)d", num_processes=2, process_id=int(sys.argv[1]),
                           initialization_timeout=120)
import numpy as np
sys.path.insert(0, %(root)r)
from tests import test_eval_sharded as t
from unidiffuser_jax import eval_features, sharding
assert jax.process_count() == 2 and len(jax.devices()) == 8, (jax.process_count(), jax.devices())
mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1, num_devices=0))
stats = t._stats_over(mesh, t.toy_images(37), 4)
sums = eval_features.allreduce_sums({"a": 0.5 + jax.process_index(), "n": 1.0})
np.savez(sys.argv[2], n=stats.n, mu=stats.mean(), cov=stats.cov(), a=sums["a"], count=sums["n"])
"""


@pytest.mark.multiprocess
def test_two_processes_equal_one_process(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER % dict(port=port, root=_ROOT))
  # The parent's XLA flags (conftest's compile options change float32 rounding) but 4 devices.
  flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": flags}
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(tmp_path / f"{i}.npz")],
                            cwd=_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  single = _stats_over(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1)),
                       toy_images(37), 8)
  for i in range(2):
    got = np.load(tmp_path / f"{i}.npz")
    assert int(got["n"]) == 37
    np.testing.assert_allclose(got["mu"], single.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["cov"], single.cov(), rtol=1e-6, atol=1e-9)
    assert float(got["a"]) == 2.0 and float(got["count"]) == 2.0
