"""The Stable Diffusion "scaled linear" noise schedule that UniDiffuser uses.

Discrete timesteps n = 1..1000; alpha_bar[n-1] is the cumulative product up to n.
Computed in float64 numpy once, then handed to jax as float32 tables.
"""
import numpy as np

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """Scaled-linear betas: linspace of square roots, squared (float64)."""
  return np.linspace(BETA_START**0.5, BETA_END**0.5, num_timesteps, dtype=np.float64) ** 2


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """alpha_bar_n for n = 1..num_timesteps, stored at index n - 1 (float64)."""
  return np.cumprod(1.0 - betas(num_timesteps))
