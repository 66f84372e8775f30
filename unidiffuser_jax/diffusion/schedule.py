"""The Stable Diffusion "scaled linear" noise schedule that UniDiffuser uses.

Discrete timesteps n = 1..1000; alpha_bar[n-1] is the cumulative product up to n.
Computed in float64 numpy once, then handed to jax as float32 tables.
"""
import jax.numpy as jnp
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


PREDICTIONS = ("eps", "v")  # what the network's outputs are (model.prediction)


def eps_from_v(v: jnp.ndarray, x_t: jnp.ndarray, t_net: jnp.ndarray) -> jnp.ndarray:
  """The noise implied by a velocity prediction v = alpha eps - sigma x0 at x_t: alpha v +
  sigma x_t. t_net [B] is the network's time input (0..1000, float; 0 = clean); log alpha
  is linear between the integer steps, as the samplers' discrete schedule has it."""
  log_alpha_n = np.concatenate([[0.0], 0.5 * np.log(alphas_cumprod())])
  log_alpha = jnp.interp(t_net.astype(jnp.float32), jnp.arange(NUM_TIMESTEPS + 1, dtype=jnp.float32),
                         jnp.asarray(log_alpha_n, jnp.float32))
  shape = (-1,) + (1,) * (v.ndim - 1)
  alpha = jnp.exp(log_alpha).reshape(shape)
  sigma = jnp.sqrt(-jnp.expm1(2.0 * log_alpha)).reshape(shape)
  return alpha * v.astype(jnp.float32) + sigma * x_t.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Continuous-time views (what the DPM-Solver samplers integrate over).
#
# Both classes work on float64 numpy values: the solvers evaluate them once,
# while tracing, to build static coefficient tables, so no schedule arithmetic
# runs inside the compiled loop.

NETWORK_TIME_SCALE = 1000.0  # network input = 1000 * t (no offset)


def _interp_extrapolate(x, xp, yp):
  """Piecewise-linear interpolation through (xp, yp), xp increasing.

  Unlike np.interp, values outside [xp[0], xp[-1]] continue the first / last
  segment instead of being clamped, which keeps lambda(t) strictly monotone
  (the solvers rely on that when they invert it).
  """
  x = np.asarray(x, dtype=np.float64)
  idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
  x0, x1 = xp[idx], xp[idx + 1]
  y0, y1 = yp[idx], yp[idx + 1]
  return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class _VPSchedule:
  """Shared formulas of a variance-preserving schedule.

  Subclasses define marginal_log_mean_coeff(t) = log alpha_t and
  inverse_lambda(lam). Here alpha_t^2 + sigma_t^2 = 1 and
  lambda_t = log(alpha_t / sigma_t) (half the log-SNR).
  """

  T = 1.0

  def marginal_alpha(self, t):
    return np.exp(self.marginal_log_mean_coeff(t))

  def marginal_std(self, t):
    return np.sqrt(-np.expm1(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    log_alpha = self.marginal_log_mean_coeff(t)
    log_sigma = 0.5 * np.log(-np.expm1(2.0 * log_alpha))
    return log_alpha - log_sigma

  @staticmethod
  def _log_alpha_from_lambda(lam):
    # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 * log(1 + exp(-2 lambda)).
    return -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lam, dtype=np.float64))


class DiscreteVPSchedule(_VPSchedule):
  """The 1000-step SD schedule seen in continuous time, as DPM-Solver's
  "discrete" NoiseScheduleVP does it.

  Step n in 1..N sits at t = n / N; log alpha is interpolated linearly in t
  between those knots (and extrapolated linearly outside them). The network
  is fed 1000 * t, so t = n / 1000 feeds exactly the training timestep n.
  """

  def __init__(self, alphas_cumprod_table: np.ndarray | None = None):
    table = alphas_cumprod() if alphas_cumprod_table is None else np.asarray(
        alphas_cumprod_table, dtype=np.float64)
    if table.ndim != 1 or len(table) < 2:
      raise ValueError(f"alphas_cumprod must be a 1-D table, got shape {table.shape}")
    self.total_n = len(table)
    self.t_array = np.linspace(0.0, 1.0, self.total_n + 1, dtype=np.float64)[1:]
    self.log_alpha_array = 0.5 * np.log(table)

  def marginal_log_mean_coeff(self, t):
    return _interp_extrapolate(t, self.t_array, self.log_alpha_array)

  def inverse_lambda(self, lam):
    log_alpha = self._log_alpha_from_lambda(lam)
    # log alpha decreases with t: flip both tables to interpolate in increasing x.
    return _interp_extrapolate(log_alpha, self.log_alpha_array[::-1], self.t_array[::-1])


class LinearVPSchedule(_VPSchedule):
  """Smooth VP schedule with beta(t) linear in t (the VP-SDE of Song et al.).

  log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2. Used by the
  solver tests because every quantity is smooth, so convergence orders show.
  """

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
    if not 0.0 <= beta_min < beta_max:
      raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
    self.beta_0 = float(beta_min)
    self.beta_1 = float(beta_max)

  def marginal_log_mean_coeff(self, t):
    t = np.asarray(t, dtype=np.float64)
    return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def inverse_lambda(self, lam):
    # Solve (b1 - b0) t^2 / 4 + b0 t / 2 = -log alpha(lam) for t >= 0, written
    # in the cancellation-free form t = 4c / (b0 + sqrt(b0^2 + 4 (b1 - b0) c)).
    c = -self._log_alpha_from_lambda(lam)
    db = self.beta_1 - self.beta_0
    return 4.0 * c / (self.beta_0 + np.sqrt(self.beta_0**2 + 4.0 * db * c))
