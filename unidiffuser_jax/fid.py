"""Fréchet Inception Distance on the host, in float64 numpy, as pytorch-fid computes it.

* ``FeatureStats``: a streaming accumulator of (n, sum x, sum x x^T) in
  float64. Batches can be added in any order and accumulators from different
  hosts/shards combined with ``merge`` (sums add, so the result does not
  depend on how the data was split, up to float64 rounding). ``mean()`` and
  ``cov()`` give what ``np.mean(x, 0)`` and ``np.cov(x, rowvar=False)`` give
  on all rows (n - 1 denominator).
* ``frechet_distance(mu1, sigma1, mu2, sigma2)``:
  ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``,
  pytorch-fid's ``calculate_frechet_distance``. Only the trace of the square
  root is needed, and for covariances (symmetric, positive semi-definite) the
  eigenvalues of ``sigma1 sigma2`` are those of the symmetric
  ``r sigma2 r`` with ``r = sigma1^(1/2)``, so it is the sum of their square
  roots: two symmetric eigenproblems instead of ``scipy.linalg.sqrtm``'s Schur
  form (1.6 s instead of 14 s at 2048 dimensions on a 2-core Xeon), real by
  construction, and defined for the singular covariances of fewer samples than
  dimensions, where sqrtm needs pytorch-fid's ``eps * I`` retry. It agrees
  with pytorch-fid to ~1e-7 relative then, to ~1e-14 otherwise
  (tests/test_fid.py).
* ``save_stats`` / ``load_stats``: pytorch-fid's reference-statistics ``.npz``
  files (arrays ``mu`` [D] and ``sigma`` [D, D]).

Features come from models/inception.py's ``FIDInception`` (pool3, 2048-d).
"""
import os
import zipfile

import numpy as np


class StatsFileError(ValueError):
  """A FID statistics file is unreadable or does not hold mu [D] / sigma [D, D]."""


class FeatureStats:
  """Running (n, sum x, sum x x^T) of D-dimensional features, float64."""

  def __init__(self, dim: int):
    self.dim = int(dim)
    self.n = 0
    self.sum = np.zeros((self.dim,), np.float64)
    self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

  def add(self, features_bd) -> "FeatureStats":
    """Adds a batch of features [B, D] (any float dtype; summed in float64)."""
    x = np.asarray(features_bd, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"FeatureStats({self.dim}) got features of shape {x.shape}; "
                       f"expected [batch, {self.dim}]")
    self.n += x.shape[0]
    self.sum += x.sum(axis=0)
    self.sum_outer += x.T @ x
    return self

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Adds another accumulator's data into this one (in place)."""
    if other.dim != self.dim:
      raise ValueError(f"cannot merge FeatureStats of dims {self.dim} and {other.dim}")
    self.n += other.n
    self.sum += other.sum
    self.sum_outer += other.sum_outer
    return self

  def mean(self) -> np.ndarray:
    if self.n < 1:
      raise ValueError("FeatureStats.mean: no features were added")
    return self.sum / self.n

  def cov(self) -> np.ndarray:
    """Unbiased covariance (n - 1 denominator), like np.cov(x, rowvar=False)."""
    if self.n < 2:
      raise ValueError(f"FeatureStats.cov needs at least 2 features, has {self.n}")
    mu = self.mean()
    c = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return (c + c.T) / 2  # exactly symmetric despite rounding


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """FID between N(mu1, sigma1) and N(mu2, sigma2), float64 (see module docs)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"FID means differ in shape: {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"FID covariances must be [{d}, {d}]: got {sigma1.shape} and "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * _trace_sqrt_product(sigma1, sigma2))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr(sqrtm(sigma1 sigma2)) for symmetric positive semi-definite matrices; rounding's tiny
  negative eigenvalues count as 0."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = root1 @ sigma2 @ root1
  lam = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(lam, 0, None)).sum())


def save_stats(path: str, mu, sigma) -> None:
  """Writes a pytorch-fid statistics file (``mu``, ``sigma``; float64)."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_stats(mu, sigma, os.fspath(path))
  np.savez(path, mu=mu, sigma=sigma)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise StatsFileError(f"{where}: FID statistics need mu [D] and sigma [D, D]; got "
                         f"mu {mu.shape} and sigma {sigma.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise StatsFileError(f"{where}: FID statistics contain NaN or inf")


def load_stats(path: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 from a pytorch-fid ``.npz``; `dim` checks the feature width."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("mu", "sigma") if k not in f.files]
      if missing:
        raise StatsFileError(f"{path}: not a FID statistics file: no array(s) {missing} "
                             f"(has {sorted(f.files)})")
      mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  except StatsFileError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # missing/not npz/pickles
    raise StatsFileError(f"{path}: cannot read FID statistics: {str(e).splitlines()[0]}"
                         ) from None
  _check_stats(mu, sigma, path)
  if dim is not None and mu.shape[0] != dim:
    raise StatsFileError(f"{path}: FID statistics are {mu.shape[0]}-d, expected {dim}-d "
                         f"(pool3 features of the FID Inception are 2048-d)")
  return mu, sigma
