"""Metric-network features over the mesh, and their statistics combined exactly across hosts.

Each process feeds ITS OWN images (its share of a set, or its rows of a generated batch) in
fixed-size local batches; the network (the FID Inception, a CLIP tower) runs once per global
batch, data-parallel over the mesh's (data, fsdp) axes, weights replicated. Each process then
takes back the features of its own rows (padding rows masked out) and adds them into a
host-side float64 accumulator (fid.FeatureStats: n, sum x, sum x x^T).

Across processes the accumulators are combined exactly (`allreduce_stats`): every process's
(n, sum x, sum x x^T) is all-gathered in float64 (jax.enable_x64 for the transfer; 33 MB per
process for 2048-d features) and added on each host in process order, so every host holds the
same, split-independent statistics. Per-host covariances are never averaged (that would drop
the between-host term).

Every process must call `local_features` / `feature_stats` the same number of times (a
collective program): `num_batches` says how many local batches each takes part in.
"""
from collections.abc import Callable, Iterable
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from unidiffuser_jax import checkpoints, fid, sharding
from unidiffuser_jax.errors import ConfigError
from unidiffuser_jax.models.inception import POOL_DIM, FIDInception
from unidiffuser_jax.weights import inception as winception


def load_inception(path: str) -> dict:
  """FID Inception params: --mode=import's params dir, or pytorch-fid's .pth/.safetensors."""
  if not path:
    raise ConfigError(
        f"FID needs pytorch-fid's {winception.FID_WEIGHTS_FILE} (nothing is downloaded): "
        f"python -m unidiffuser_jax.main --mode=import --config.weights.inception="
        f"{winception.FID_WEIGHTS_FILE} --workdir=DIR, then --config.eval.inception=DIR/weights/"
        f"inception")
  if os.path.isdir(path):
    return checkpoints.load_params(path)
  try:
    return winception.load_inception_params(path)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.eval.inception: {str(e).splitlines()[0]}") from None


def inception_fn(images01_bhwc, params):
  """Pool3 features [B, 2048] of images in [0, 1]."""
  return FIDInception().apply({"params": params}, images01_bhwc)[0]


class ShardedFeatures:
  """fn(images, params) -> [B, D] run data-parallel over `mesh` on local batches.

  local_batch: rows each process feeds per call; the global batch is local_batch *
  process_count and must divide over the mesh's data-parallel axes."""

  def __init__(self, fn: Callable, params, mesh, local_batch: int):
    self.mesh, self.local_batch = mesh, int(local_batch)
    sharding.check_batch_divisible(self.local_batch * jax.process_count(), mesh,
                                   what="config.eval.feature_batch_size")
    self._params = jax.device_put(params, NamedSharding(mesh, P()))
    self._fn = jax.jit(fn)

  def __call__(self, local_images: np.ndarray) -> np.ndarray:
    """Local rows [local_batch, ...] -> their features [local_batch, D] (float32, host)."""
    x = np.asarray(local_images)
    if x.shape[0] != self.local_batch:
      raise ValueError(f"ShardedFeatures wants {self.local_batch} local rows, got {x.shape[0]}")
    spec = P(sharding.BATCH_AXES)
    glob = jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, x.ndim), x)
    out = self._fn(glob, self._params)
    local = multihost_utils.global_array_to_host_local_array(out, self.mesh, spec)
    return np.asarray(local)


def padded_batches(images: Iterable[np.ndarray], local_batch: int, num_batches: int):
  """(rows [local_batch, ...], mask [local_batch]) exactly num_batches times: the images in
  order, the last batch padded by repeating a row, then all-padding batches (mask False)."""
  it = iter(images)
  blank = None
  for _ in range(num_batches):
    rows = []
    for x in it:
      rows.append(np.asarray(x))
      if len(rows) == local_batch:
        break
    if rows:
      blank = rows[0]
    if blank is None:
      raise ValueError("padded_batches: no images at all on this process")
    mask = np.arange(local_batch) < len(rows)
    rows += [blank] * (local_batch - len(rows))
    yield np.stack(rows), mask


def num_batches(total: int, local_batch: int) -> int:
  """Local batches each process runs when `total` items are split over processes by
  `process_share` (the largest share decides; smaller shares pad)."""
  per = math.ceil(total / jax.process_count())
  return max(1, math.ceil(per / local_batch))


def process_share(total: int) -> range:
  """The indices of `total` items this process handles (contiguous blocks)."""
  per = math.ceil(total / jax.process_count())
  start = min(total, jax.process_index() * per)
  return range(start, min(total, start + per))


def feature_stats(features: ShardedFeatures, local_images: Iterable[np.ndarray], nbatches: int,
                  dim: int = POOL_DIM, progress: Callable | None = None) -> fid.FeatureStats:
  """This process's images -> its FeatureStats (not yet combined across processes)."""
  stats = fid.FeatureStats(dim)
  for rows, mask in padded_batches(local_images, features.local_batch, nbatches):
    feats = features(rows)
    stats.add(feats[mask])
    if progress is not None:
      progress(int(mask.sum()))
  return stats


def allreduce_stats(stats: fid.FeatureStats) -> fid.FeatureStats:
  """The accumulators of all processes added together (float64; equal on every host)."""
  if jax.process_count() == 1:
    return stats
  flat = np.concatenate([[float(stats.n)], stats.sum, stats.sum_outer.ravel()])
  with jax.enable_x64(True):
    gathered = np.asarray(multihost_utils.process_allgather(flat), np.float64)
  total = fid.FeatureStats(stats.dim)
  d = stats.dim
  for row in gathered:  # process order: the same sum on every host
    part = fid.FeatureStats(d)
    part.n = int(round(row[0]))
    part.sum = row[1:1 + d].copy()
    part.sum_outer = row[1 + d:].reshape(d, d).copy()
    total.merge(part)
  return total


def allreduce_sums(values: dict[str, float]) -> dict[str, float]:
  """Scalar sums (CLIP score totals, counts) added over processes in float64."""
  if jax.process_count() == 1:
    return dict(values)
  keys = sorted(values)
  with jax.enable_x64(True):
    gathered = np.asarray(multihost_utils.process_allgather(
        np.asarray([values[k] for k in keys], np.float64)), np.float64)
  return {k: float(v) for k, v in zip(keys, gathered.sum(axis=0))}


def to_unit(pixels_uint8: np.ndarray) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 in [0, 1], as pytorch-fid's ToTensor."""
  return np.asarray(pixels_uint8, np.float32) / 255.0
