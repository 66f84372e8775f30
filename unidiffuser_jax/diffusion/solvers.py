"""Compiled DPM-Solver++ samplers (data-prediction form) for the diffusion ODE.

Every update of DPM-Solver++ is linear in the current state and in the data
predictions x0_k made at the evaluation points:

    x_next = (sigma_next / sigma_s) * x + sum_k c_k * x0_k.

The time grid and therefore every coefficient depend only on static
arguments (steps, order, method, skip type, t range), so they are computed
once while tracing, in float64 numpy, and the compiled loop is a `lax.scan`
over rows of those tables: one scan for the multistep solver, one scan per run
of equal-order segments for the singlestep solvers (at most three). No Python
loop runs around compiled steps, and the schedule is never evaluated on device.

Model evaluation number k (0-based, in the order they happen) receives
`jax.random.fold_in(key, k)`; the model uses it for its fresh noise.

Methods (the first three are the ones of UniDiffuser's released
`dpm_solver_pp.py`, whose update formulas are those of the DPM-Solver /
DPM-Solver++ papers, Lu et al. 2022, in their "dpm_solver" form):

  fast              the reference sampler (UniDiffuser samples with it: order
                    3, 50 steps, time-uniform, t 1 -> 1e-3). ONE grid of
                    steps + 1 points; singlestep segments of orders
                    `fast_orders(steps, order)` (3, 3, ..., then 2 / 1; they
                    sum to steps) over consecutive grid points, whose
                    intermediate evaluations ARE the grid points inside the
                    segment. steps evaluations, all on the grid.
  singlestep        fixed order: steps // order segments of `order` on a grid
                    of steps // order + 1 points, intermediate points at
                    fractions 1/2 (order 2) or 1/3, 2/3 (order 3) of the
                    segment's lambda step; order * (steps // order)
                    evaluations (a remainder of steps is dropped, as in the
                    reference).
  multistep         DPM-Solver++ multistep on a grid of steps + 1 points, with
                    lower-order warm-up; `lower_order_final` (default on) also
                    lowers the last orders when steps < 15, which is diffusers'
                    rule; the reference never lowers them (pass False).
  singlestep_ratio  the "fast" order schedule with the intermediate points at
                    the fixed lambda fractions of `singlestep` (the placement of
                    the DPM-Solver paper's DPM-Solver-fast): segment ends are
                    the steps-point grid at the cumulative orders (a
                    len(orders)-interval logSNR grid for skip_type 'logSNR').
                    Not the reference: it evaluates the model off the grid.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unidiffuser_jax.diffusion import schedule as schedule_lib

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

METHODS = ("fast", "singlestep", "multistep", "singlestep_ratio")
DEFAULT_METHOD = "fast"  # the reference sampler
GRID_METHODS = ("singlestep", "multistep")  # what sample_on_grid runs
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
# diffusers drops to lower orders at the end only for short schedules.
LOWER_ORDER_FINAL_MAX_STEPS = 15
# Intermediate points of the lambda-fraction placement ("singlestep", "singlestep_ratio").
_LAMBDA_FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def default_schedule() -> schedule_lib.DiscreteVPSchedule:
  return _default_schedule()


@functools.lru_cache(maxsize=1)
def _default_schedule():
  return schedule_lib.DiscreteVPSchedule()


# ---------------------------------------------------------------------------
# Time grids and order schedules (static, numpy float64).


def time_grid(schedule, skip_type: str, t_start: float, t_end: float, n: int) -> np.ndarray:
  """n + 1 times from t_start to t_end (either direction) spaced by skip_type.

  time_quadratic is uniform in sqrt(t); the reference snaps those points to a
  10^7-point time grid (a difference below 1e-7 in t).
  """
  if n < 1:
    raise ValueError(f"need at least one interval, got {n}")
  if skip_type == "time_uniform":
    return np.linspace(t_start, t_end, n + 1, dtype=np.float64)
  if skip_type == "logSNR":
    lam = np.linspace(schedule.marginal_lambda(t_start), schedule.marginal_lambda(t_end), n + 1)
    grid = schedule.inverse_lambda(lam)
    grid[0], grid[-1] = t_start, t_end  # exact ends despite round-off in inversion
    return grid
  if skip_type == "time_quadratic":
    return np.linspace(np.sqrt(t_start), np.sqrt(t_end), n + 1, dtype=np.float64) ** 2
  raise ValueError(f"unknown skip_type {skip_type!r}; expected one of {SKIP_TYPES}")


def fast_orders(steps: int, order: int) -> list[int]:
  """Segment orders of the "fast" schedule ("fast", "singlestep_ratio"); they sum to steps.

  Order 3: K = steps // 3 + 1 segments, ending in [2, 1] (steps % 3 == 0), [1]
  (== 1) or [2] (== 2). E.g. 50 steps -> 16 third-order segments + 1 second.
  Order 2: [2] * (steps // 2), plus [1] for odd steps. Order 1: [1] * steps
  (DDIM; the reference's "fast" accepts only orders 2 and 3).
  """
  _check_order(order)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if order == 3:
    k = steps // 3 + 1
    if steps % 3 == 0:
      orders = [3] * (k - 2) + [2, 1]
    elif steps % 3 == 1:
      orders = [3] * (k - 1) + [1]
    else:
      orders = [3] * (k - 1) + [2]
  elif order == 2:
    orders = [2] * (steps // 2) + [1] * (steps % 2)
  else:
    orders = [1] * steps
  return orders


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
  """Order used at each multistep step: warm-up min(order, i + 1); with
  lower_order_final and fewer than 15 steps (diffusers' rule) the last steps
  drop to order steps - i."""
  _check_order(order)
  orders = [min(order, i + 1) for i in range(steps)]
  if lower_order_final and steps < LOWER_ORDER_FINAL_MAX_STEPS:
    orders = [min(o, steps - i) for i, o in enumerate(orders)]
  return orders


def check_args(steps: int, order: int, method: str, skip_type: str = "time_uniform") -> None:
  """Raises ValueError (one line) unless `sample` accepts these static arguments."""
  _check_method(method)
  _check_order(order)
  if skip_type not in SKIP_TYPES:
    raise ValueError(f"unknown skip_type {skip_type!r}; expected one of {SKIP_TYPES}")
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
  if method == "singlestep" and steps < order:
    raise ValueError(f"method 'singlestep' of order {order} needs steps >= {order}, got {steps}")


def num_model_evals(steps: int, order: int, method: str) -> int:
  """Number of model_fn calls `sample` makes: steps, except for "singlestep"
  (order * (steps // order))."""
  check_args(steps, order, method)
  if method == "singlestep":
    return order * (steps // order)
  return steps


def _check_order(order):
  if order not in (1, 2, 3):
    raise ValueError(f"order must be 1, 2 or 3, got {order!r}")


def _check_method(method, allowed=METHODS):
  if method not in allowed:
    raise ValueError(f"unknown method {method!r}; expected one of {allowed}")


# ---------------------------------------------------------------------------
# Coefficients. The update formulas are evaluated on "basis" data predictions
# (rows of an identity matrix), which turns each formula into its vector of
# linear coefficients without writing the algebra out twice.


def _phis(h):
  phi_1 = np.expm1(-h)          # e^{-h} - 1
  phi_2 = phi_1 / h + 1.0
  phi_3 = phi_2 / h - 0.5
  return phi_1, phi_2, phi_3


@dataclasses.dataclass(frozen=True)
class _Segment:
  """One singlestep segment of order p: p evaluations, then the end point.

  eval_t/alpha/sigma [p]: where the data predictions are made (x0_0 at the
  segment start). ratio [p], coef [p, p]: state at point j + 1 (j = 0 ..
  p - 1, the last being the segment end) is ratio[j] * x_start +
  sum_i coef[j, i] * x0_i, where coef[j, i] = 0 for i > j.
  """
  eval_t: np.ndarray
  eval_alpha: np.ndarray
  eval_sigma: np.ndarray
  ratio: np.ndarray
  coef: np.ndarray


def _singlestep_segment(schedule, times: np.ndarray) -> _Segment:
  """DPM-Solver++ singlestep update of order len(times) - 1 through `times`
  (segment start, intermediate evaluation points, segment end)."""
  times = np.asarray(times, dtype=np.float64)
  p = len(times) - 1
  alpha = schedule.marginal_alpha(times)
  sigma = schedule.marginal_std(times)
  lam = schedule.marginal_lambda(times)
  m = np.eye(p)  # m[i] stands for the data prediction x0_i
  h = lam[p] - lam[0]
  ratio = sigma[1:] / sigma[0]
  coef = np.zeros((p, p))
  phi_1, phi_2, _ = _phis(h)
  if p == 1:
    coef[0] = -alpha[1] * phi_1 * m[0]
  elif p == 2:
    r1 = (lam[1] - lam[0]) / h
    coef[0] = -alpha[1] * np.expm1(-r1 * h) * m[0]
    coef[1] = -alpha[2] * phi_1 * m[0] - (0.5 / r1) * alpha[2] * phi_1 * (m[1] - m[0])
  elif p == 3:
    r1 = (lam[1] - lam[0]) / h
    r2 = (lam[2] - lam[0]) / h
    phi_12 = np.expm1(-r2 * h)
    phi_22 = phi_12 / (r2 * h) + 1.0
    coef[0] = -alpha[1] * np.expm1(-r1 * h) * m[0]
    coef[1] = -alpha[2] * phi_12 * m[0] + (r2 / r1) * alpha[2] * phi_22 * (m[1] - m[0])
    coef[2] = -alpha[3] * phi_1 * m[0] + (1.0 / r2) * alpha[3] * phi_2 * (m[2] - m[0])
  else:
    raise ValueError(f"segment order must be 1..3, got {p}")
  return _Segment(times[:p], alpha[:p], sigma[:p], ratio, coef)


def _multistep_coefficients(schedule, grid: np.ndarray, orders: Sequence[int]):
  """Per-step tables for DPM-Solver++ multistep on `grid` [N + 1].

  Step i evaluates x0_i at grid[i] and moves to grid[i + 1] with
  x_{i+1} = ratio[i] * x_i + sum_j coef[i, j] * x0_{i-j} (j < 3).
  """
  alpha = schedule.marginal_alpha(grid)
  sigma = schedule.marginal_std(grid)
  lam = schedule.marginal_lambda(grid)
  n = len(grid) - 1
  ratio = sigma[1:] / sigma[:-1]
  coef = np.zeros((n, 3))
  m0, m1, m2 = np.eye(3)  # newest first
  for i, o in enumerate(orders):
    h = lam[i + 1] - lam[i]
    phi_1, phi_2, phi_3 = _phis(h)
    a_t = alpha[i + 1]
    if o == 1:
      c = -a_t * phi_1 * m0
    elif o == 2:
      r0 = (lam[i] - lam[i - 1]) / h
      d1 = (m0 - m1) / r0
      c = -a_t * phi_1 * m0 - 0.5 * a_t * phi_1 * d1
    else:
      r0 = (lam[i] - lam[i - 1]) / h
      r1 = (lam[i - 1] - lam[i - 2]) / h
      d1_0 = (m0 - m1) / r0
      d1_1 = (m1 - m2) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      c = -a_t * phi_1 * m0 + a_t * phi_2 * d1 - a_t * phi_3 * d2
    coef[i] = c
  return grid[:-1], alpha[:-1], sigma[:-1], ratio, coef


def segments(schedule, steps: int, order: int, method: str, skip_type: str, t_start: float,
             t_end: float) -> list[np.ndarray]:
  """Times of each segment of a singlestep method: start, intermediate
  evaluation points, end (the model is evaluated at all but the end).

  "fast": consecutive points of one steps-interval grid. "singlestep" and
  "singlestep_ratio": intermediate points at lambda_s + r h with r = 1/2
  (order 2) or 1/3, 2/3 (order 3); see the module docstring for their ends.
  """
  check_args(steps, order, method, skip_type)
  if method == "multistep":
    raise ValueError("method 'multistep' has no singlestep segments")
  if method == "fast":
    grid = time_grid(schedule, skip_type, t_start, t_end, steps)
    return grid_segments(grid, fast_orders(steps, order))
  if method == "singlestep":
    n = steps // order
    return _fraction_segments(schedule, time_grid(schedule, skip_type, t_start, t_end, n),
                              [order] * n)
  orders = fast_orders(steps, order)  # singlestep_ratio
  if skip_type == "logSNR":
    ends = time_grid(schedule, skip_type, t_start, t_end, len(orders))
  else:
    ends = time_grid(schedule, skip_type, t_start, t_end, steps)[np.cumsum([0] + orders)]
  return _fraction_segments(schedule, ends, orders)


def eval_times(schedule, steps: int, order: int, method: str, skip_type: str, t_start: float,
               t_end: float) -> np.ndarray:
  """Continuous times of the model evaluations of `sample`, in order."""
  if method == "multistep":
    check_args(steps, order, method, skip_type)
    return time_grid(schedule, skip_type, t_start, t_end, steps)[:-1]
  return np.concatenate([seg[:-1] for seg in
                         segments(schedule, steps, order, method, skip_type, t_start, t_end)])


def _fraction_segments(schedule, ends: np.ndarray, orders: Sequence[int]) -> list[np.ndarray]:
  """Segments between consecutive `ends` with inner points at fixed lambda fractions."""
  out = []
  for k, p in enumerate(orders):
    s, t = ends[k], ends[k + 1]
    lam_s, lam_t = schedule.marginal_lambda(s), schedule.marginal_lambda(t)
    inner = [schedule.inverse_lambda(lam_s + r * (lam_t - lam_s)) for r in _LAMBDA_FRACTIONS[p]]
    out.append(np.array([s, *inner, t], dtype=np.float64))
  return out


def grid_segments(grid: np.ndarray, orders: Sequence[int]) -> list[np.ndarray]:
  """Segments whose intermediate points are the grid points inside them (the
  reference's "fast" placement; also diffusers' DPMSolverSinglestepScheduler)."""
  grid = np.asarray(grid, dtype=np.float64)
  if sum(orders) != len(grid) - 1:
    raise ValueError(f"orders {list(orders)} must sum to the {len(grid) - 1} grid intervals")
  starts = np.cumsum([0] + list(orders))
  return [grid[a:a + p + 1] for a, p in zip(starts[:-1], orders)]


# ---------------------------------------------------------------------------
# The compiled loops.


def _data_prediction(model_fn, x, t, alpha, sigma, key):
  t_b = jnp.full((x.shape[0],), t, dtype=x.dtype)
  eps = model_fn(x, t_b, key).astype(x.dtype)
  return (x - sigma * eps) / alpha


def _run_singlestep(model_fn, x, key, schedule, segments: list[np.ndarray]):
  """Runs segments; consecutive segments of equal order share one lax.scan."""
  dtype = x.dtype
  groups = []  # [(order, [segment, ...])]
  for times in segments:
    p = len(times) - 1
    if groups and groups[-1][0] == p:
      groups[-1][1].append(times)
    else:
      groups.append((p, [times]))
  eval_base = 0
  for p, seg_times in groups:
    segs = [_singlestep_segment(schedule, t) for t in seg_times]
    tables = tuple(
        jnp.asarray(np.stack([getattr(s, f) for s in segs]), dtype=dtype)
        for f in ("eval_t", "eval_alpha", "eval_sigma", "ratio", "coef"))
    n = len(segs)

    def body(x_bn, row, p=p, base=eval_base):
      idx, (ts, alphas, sigmas, ratio, coef) = row
      x0s = []
      x_j = x_bn
      for j in range(p):  # static: p <= 3
        k = base + idx * p + j
        x0s.append(_data_prediction(model_fn, x_j, ts[j], alphas[j], sigmas[j],
                                    jax.random.fold_in(key, k)))
        x_j = ratio[j] * x_bn + sum(coef[j, i] * x0s[i] for i in range(j + 1))
      return x_j, None

    x, _ = jax.lax.scan(body, x, (jnp.arange(n, dtype=jnp.int32), tables))
    eval_base += n * p
  return x


def _run_multistep(model_fn, x, key, schedule, grid: np.ndarray, orders: Sequence[int]):
  """One lax.scan over the steps; the carry holds the last 3 data predictions."""
  dtype = x.dtype
  ts, alphas, sigmas, ratio, coef = (
      jnp.asarray(a, dtype=dtype) for a in _multistep_coefficients(schedule, grid, orders))

  def body(carry, row):
    x_bn, hist = carry  # hist [3, B, N], newest first
    i, t, alpha, sigma, r, c = row
    x0 = _data_prediction(model_fn, x_bn, t, alpha, sigma, jax.random.fold_in(key, i))
    hist = jnp.concatenate([x0[None], hist[:2]], axis=0)
    # Unused history slots (warm-up) have zero coefficients.
    x_next = r * x_bn + c[0] * hist[0] + c[1] * hist[1] + c[2] * hist[2]
    return (x_next, hist), None

  hist0 = jnp.zeros((3,) + x.shape, dtype)
  steps = jnp.arange(len(orders), dtype=jnp.int32)
  (x, _), _ = jax.lax.scan(body, (x, hist0), (steps, ts, alphas, sigmas, ratio, coef))
  return x


def _check_x(x_T):
  if x_T.ndim != 2:
    raise ValueError(f"x_T must be flat [B, N], got shape {x_T.shape}")
  if not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be floating point, got {x_T.dtype}")


def sample(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *, schedule=None, steps: int = 50,
           order: int = 3, method: str = DEFAULT_METHOD, skip_type: str = "time_uniform",
           t_start: float = 1.0, t_end: float = 1e-3, lower_order_final: bool = True) -> jax.Array:
  """Integrates the diffusion ODE from t_start to t_end with DPM-Solver++.

  model_fn(x [B, N], t_continuous [B], key) -> noise prediction [B, N].
  x_T: flat [B, N] state at t_start. The defaults are the reference sampler
  (method "fast", order 3, time-uniform, 50 steps, t: 1 -> 1e-3, no final
  denoising step); `method` is one of METHODS (module docstring).
  lower_order_final applies to "multistep" only. Running with t_start < t_end
  integrates the same ODE forwards (ODE inversion). `schedule` defaults to the
  SD discrete schedule; steps, order, method, skip_type, t_start, t_end are
  static. Jittable.
  """
  _check_x(x_T)
  check_args(steps, order, method, skip_type)
  schedule = default_schedule() if schedule is None else schedule
  if method == "multistep":
    grid = time_grid(schedule, skip_type, t_start, t_end, steps)
    return _run_multistep(model_fn, x_T, key, schedule, grid,
                          multistep_orders(steps, order, lower_order_final))
  return _run_singlestep(model_fn, x_T, key, schedule,
                         segments(schedule, steps, order, method, skip_type, t_start, t_end))


def sample_on_grid(model_fn: ModelFn, x_T: jax.Array, key: jax.Array, *, grid,
                   orders: Sequence[int], method: str, schedule=None) -> jax.Array:
  """Same solvers on an explicit time grid [N + 1] with explicit orders.

  multistep: orders[i] is step i's order (N entries). singlestep: orders are
  segment orders summing to N, and intermediate points are the grid points
  inside each segment -- the placement of `sample`'s "fast" (which is this
  with grid = time_grid(..., steps) and orders = fast_orders(steps, order)),
  not the lambda fractions of its "singlestep"; diffusers'
  DPMSolverSinglestepScheduler places them on its grid the same way.
  """
  _check_x(x_T)
  _check_method(method, GRID_METHODS)
  schedule = default_schedule() if schedule is None else schedule
  grid = np.asarray(grid, dtype=np.float64)
  if method == "multistep":
    if len(orders) != len(grid) - 1:
      raise ValueError(f"{len(orders)} orders for {len(grid) - 1} steps")
    for i, o in enumerate(orders):
      if not 1 <= o <= min(3, i + 1):
        raise ValueError(f"step {i} cannot use order {o} (history has {i + 1} points)")
    return _run_multistep(model_fn, x_T, key, schedule, grid, orders)
  return _run_singlestep(model_fn, x_T, key, schedule, grid_segments(grid, orders))
