"""solvers.sample reproduces UniDiffuser's reference sampler algorithm.

The reference (thu-ml/unidiffuser, dpm_solver_pp.py, DPM_Solver.sample with
predict_x0=True, solver_type 'dpm_solver', T = 1, eps = 1 / N, no final
denoising) is re-derived below in plain numpy float64, written from the
algorithm's description and independently of unidiffuser_jax: its own SD
schedule (betas -> log alpha, piecewise linear in t at t_n = n / 1000), its own
lambda and inverse, and one update function per step kind in the reference's
own structure (state after each step, r1 / r2 from the grid's lambdas for
'fast', fixed 1/2 and 1/3, 2/3 fractions for 'singlestep', a history list for
'multistep'). The problem is analytic: data ~ N(mu, diag(s^2)), whose exact
data prediction E[x0 | x_t] is closed form, so both sides run the same exact
model and every difference is the solver's.
"""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, laion
from unidiffuser_jax.diffusion import modes, solvers

# --- the SD schedule, from its definition (REFERENCE.md) ---------------------
N_TRAIN = 1000
_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN, dtype=np.float64) ** 2
_T_KNOTS = np.arange(1, N_TRAIN + 1, dtype=np.float64) / N_TRAIN       # t_n = n / N
_LOG_ALPHA = 0.5 * np.cumsum(np.log1p(-_BETAS))                         # log sqrt(alpha_bar_n)


def log_alpha(t):
  t = np.asarray(t, dtype=np.float64)
  # Every time the samplers visit lies in [1/N, 1], where np.interp needs no extrapolation.
  assert np.all((t >= _T_KNOTS[0] - 1e-15) & (t <= 1.0 + 1e-15)), t
  return np.interp(t, _T_KNOTS, _LOG_ALPHA)


def alpha(t):
  return np.exp(log_alpha(t))


def sigma(t):
  return np.sqrt(1.0 - np.exp(2.0 * log_alpha(t)))


def lam(t):
  la = log_alpha(t)
  return la - 0.5 * np.log(1.0 - np.exp(2.0 * la))


def inv_lam(l):
  la = -0.5 * np.log1p(np.exp(-2.0 * np.asarray(l, dtype=np.float64)))
  return np.interp(la, _LOG_ALPHA[::-1], _T_KNOTS[::-1])  # log alpha falls with t


# --- the analytic problem -----------------------------------------------------
DIM = 6
MU = np.linspace(-1.2, 1.5, DIM)
SD = np.linspace(0.3, 1.4, DIM)


def x0_exact(x, t):
  a, s = alpha(t), sigma(t)
  return MU + SD**2 * a * (x - a * MU) / (a**2 * SD**2 + s**2)


class Reference:
  """The reference algorithm; counts and records its model evaluations."""

  def __init__(self):
    self.times = []

  def model(self, x, t):
    self.times.append(float(t))
    return x0_exact(x, t)

  def first(self, x, s, t, m_s=None):
    h = lam(t) - lam(s)
    m_s = self.model(x, s) if m_s is None else m_s
    return sigma(t) / sigma(s) * x + alpha(t) * (1.0 - np.exp(-h)) * m_s

  def second(self, x, s, t, r1=None):
    r1 = 0.5 if r1 is None else r1
    h = lam(t) - lam(s)
    s1 = inv_lam(lam(s) + r1 * h)
    m_s = self.model(x, s)
    x_s1 = sigma(s1) / sigma(s) * x - alpha(s1) * np.expm1(-r1 * h) * m_s
    m_s1 = self.model(x_s1, s1)
    return (sigma(t) / sigma(s) * x - alpha(t) * np.expm1(-h) * m_s
            - 0.5 / r1 * alpha(t) * np.expm1(-h) * (m_s1 - m_s))

  def third(self, x, s, t, r1=None, r2=None):
    r1 = 1.0 / 3.0 if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    h = lam(t) - lam(s)
    s1, s2 = inv_lam(lam(s) + r1 * h), inv_lam(lam(s) + r2 * h)
    e1, e12 = np.expm1(-h), np.expm1(-r2 * h)
    m_s = self.model(x, s)
    x_s1 = sigma(s1) / sigma(s) * x - alpha(s1) * np.expm1(-r1 * h) * m_s
    m_s1 = self.model(x_s1, s1)
    x_s2 = (sigma(s2) / sigma(s) * x - alpha(s2) * e12 * m_s
            + r2 / r1 * alpha(s2) * (e12 / (r2 * h) + 1.0) * (m_s1 - m_s))
    m_s2 = self.model(x_s2, s2)
    return (sigma(t) / sigma(s) * x - alpha(t) * e1 * m_s
            + 1.0 / r2 * alpha(t) * (e1 / h + 1.0) * (m_s2 - m_s))

  def multistep(self, x, ms, ts, t, order):
    """ms, ts: past data predictions and their times, oldest first."""
    h = lam(t) - lam(ts[-1])
    e = np.expm1(-h)
    base = sigma(t) / sigma(ts[-1]) * x - alpha(t) * e * ms[-1]
    if order == 1:
      return base
    r0 = (lam(ts[-1]) - lam(ts[-2])) / h
    d1_0 = (ms[-1] - ms[-2]) / r0
    if order == 2:
      return base - 0.5 * alpha(t) * e * d1_0
    r1 = (lam(ts[-2]) - lam(ts[-3])) / h
    d1_1 = (ms[-2] - ms[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return base + alpha(t) * (e / h + 1.0) * d1 - alpha(t) * ((e + h) / h**2 - 0.5) * d2

  def update(self, x, s, t, order, r1=None, r2=None):
    if order == 1:
      return self.first(x, s, t)
    if order == 2:
      return self.second(x, s, t, r1)
    return self.third(x, s, t, r1, r2)

  def sample(self, x, steps, order, method, t_start=1.0, t_end=1.0 / N_TRAIN):
    if method == "fast":
      if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        orders = [3] * (k - 1 - (steps % 3 == 0)) + tail
      else:
        orders = [2] * (steps // 2) + [1] * (steps % 2)
      grid = np.linspace(t_start, t_end, steps + 1)
      i = 0
      for o in orders:
        h = lam(grid[i + o]) - lam(grid[i])
        r1 = (lam(grid[i + 1]) - lam(grid[i])) / h if o > 1 else None
        r2 = (lam(grid[i + 2]) - lam(grid[i])) / h if o > 2 else None
        x = self.update(x, grid[i], grid[i + o], o, r1, r2)
        i += o
      return x
    if method == "singlestep":
      n = steps // order
      grid = np.linspace(t_start, t_end, n + 1)
      for i in range(n):
        x = self.update(x, grid[i], grid[i + 1], order)
      return x
    assert method == "multistep" and steps >= order
    grid = np.linspace(t_start, t_end, steps + 1)
    ms, ts = [self.model(x, grid[0])], [grid[0]]
    for step in range(1, steps + 1):
      x = self.multistep(x, ms, ts, grid[step], min(order, step))
      ms, ts = (ms + [None])[-order:], (ts + [grid[step]])[-order:]
      if step < steps:
        ms[-1] = self.model(x, grid[step])
    return x


# --- ours, on the same problem ------------------------------------------------


def _eps_model(dtype, record):
  """Exact noise prediction (t traced under jit, so the schedule is in jnp)."""
  knots, table = jnp.asarray(_T_KNOTS, dtype), jnp.asarray(_LOG_ALPHA, dtype)
  mu, sd = jnp.asarray(MU, dtype), jnp.asarray(SD, dtype)

  def model_fn(x, t, key):
    del key
    jax.debug.callback(record, t, ordered=True)
    la = jnp.interp(t, knots, table)[:, None]
    a, s = jnp.exp(la), jnp.sqrt(-jnp.expm1(2.0 * la))
    x0 = mu + sd**2 * a * (x - a * mu) / (a**2 * sd**2 + s**2)
    return (x - a * x0) / s

  return model_fn


def _ours(x_T, steps, order, method, dtype):
  times = []
  model_fn = _eps_model(dtype, lambda t: times.append(float(np.asarray(t)[0])))
  # The reference's multistep never lowers the final orders (diffusers' rule under 15 steps).
  run = jax.jit(functools.partial(solvers.sample, model_fn, steps=steps, order=order,
                                  method=method, lower_order_final=False))
  out = np.asarray(run(jnp.asarray(x_T, dtype), jax.random.key(0)))
  jax.effects_barrier()
  return out, np.array(times)


@pytest.fixture
def x64():
  """float64 for one test. Set globally rather than with the thread-local
  jax.enable_x64 context: the host callbacks that record evaluation times run
  on a runtime thread, which would otherwise hand them float32 copies."""
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


CASES = ([("fast", o, n) for o in (2, 3) for n in (10, 20, 50)]
         + [("singlestep", o, n) for o in (1, 2, 3) for n in (12, 24, 48)]
         + [("multistep", o, n) for o in (2, 3) for n in (10, 20)])


def _x_T():
  return np.random.default_rng(0).normal(size=(3, DIM))


@pytest.mark.parametrize("method,order,steps", CASES)
def test_matches_reference_float64(x64, method, order, steps):
  x_T = _x_T()
  ref = Reference()
  want = ref.sample(x_T.copy(), steps, order, method)
  got, times = _ours(x_T, steps, order, method, jnp.float64)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Same evaluations, at the same times, in the same order.
  assert len(times) == len(ref.times) == solvers.num_model_evals(steps, order, method)
  np.testing.assert_allclose(times, ref.times, rtol=0, atol=1e-12)
  if method != "singlestep":
    assert len(times) == steps
  if method == "fast":  # every evaluation is a point of the one steps-interval grid
    np.testing.assert_allclose(times, np.linspace(1.0, 1e-3, steps + 1)[:-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,order,steps", [("fast", 3, 50), ("fast", 2, 10),
                                                ("singlestep", 3, 24), ("multistep", 3, 20)])
def test_matches_reference_float32(method, order, steps):
  x_T = _x_T()
  want = Reference().sample(x_T.copy(), steps, order, method)
  got, _ = _ours(x_T, steps, order, method, jnp.float32)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_defaults_are_the_reference_sampler(x64):
  """sample()'s defaults: 'fast', order 3, 50 steps, time-uniform, t 1 -> 1e-3."""
  x_T = _x_T()
  want = Reference().sample(x_T.copy(), 50, 3, "fast")
  model_fn = _eps_model(jnp.float64, lambda t: None)
  run = lambda **kw: np.asarray(jax.jit(functools.partial(solvers.sample, model_fn, **kw))(
      jnp.asarray(x_T), jax.random.key(0)))
  np.testing.assert_allclose(run(), want, rtol=0, atol=1e-6)
  # The DPM-Solver paper's lambda-fraction placement (singlestep_ratio) is another sampler.
  assert np.abs(run(method="singlestep_ratio") - want).max() > 1e-3


def test_shipped_defaults_are_the_reference_sampler():
  """configs and the generation modes default to 'fast', order 3, 50 steps, time-uniform."""
  cfg = laion.get_config().sample
  assert (cfg.method, cfg.order, cfg.steps, cfg.skip_type) == ("fast", 3, 50, "time_uniform")
  assert demo.get_config().sample.method == "fast"
  assert solvers.DEFAULT_METHOD == "fast"
  # (i2t2i, t2i2t and gibbs pass their keywords on to these.)
  for name in ("t2i", "i2t", "joint", "image_only", "text_only", "invert_image", "interpolate"):
    params = inspect.signature(getattr(modes, name)).parameters
    assert params["method"].default == "fast", name
    assert (params["order"].default, params["steps"].default) == (3, 50), name
    assert params["skip_type"].default == "time_uniform", name
    assert params["t_end"].default == 1e-3, name

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
