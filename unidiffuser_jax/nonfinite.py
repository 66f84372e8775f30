"""Non-finite steps: a step whose loss or gradient norm is NaN/Inf changes nothing but the step count.

`guard(step)` wraps a train step (state, frozen, batch) -> (state, metrics) in-graph: when
metrics["loss"] or metrics["grad_norm"] is not finite, the returned state keeps the old
params, EMA and optimizer state (a select, no host sync) and only `step` advances (the batch
was consumed; the next step draws the next step's keys). metrics["nonfinite"] is 1.0 for such
a step, so the logged mean is the fraction of skipped steps in the logging period.

`Watch` keeps each step's metrics["nonfinite"] (a device scalar: no dispatch, no sync) and
reads them only where the loop already waits: at logging steps and before a checkpoint is
saved. `Watch.check` raises NonFiniteError once train.max_nonfinite_steps steps in a row
were skipped, before anything is saved, so the newest checkpoint holds the last good weights.
With log_every > max_nonfinite_steps the run may take up to log_every further (skipped, harmless)
steps before it stops: the price of not syncing every step.

`poison_steps` (config.debug.poison_steps) makes the listed steps (1-based) non-finite on
purpose: every floating input of the batch becomes NaN (so the gradients really are NaN) and the
loss is forced to NaN. Tests and users trigger the guard with it deterministically.
"""
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from unidiffuser_jax import errors


class NonFiniteError(errors.StopError):
  """Too many consecutive non-finite steps; the message says which and what to do."""


def guard(step: Callable, poison_steps: Sequence[int] = ()) -> Callable:
  poison = tuple(int(s) for s in poison_steps)

  def guarded(state, frozen, batch):
    poisoned = jnp.isin(state.step + 1, jnp.asarray(poison, jnp.int32)) if poison else None
    if poison:
      batch = jax.tree.map(
          lambda x: jnp.where(poisoned, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating)
          else x, batch)
    new_state, metrics = step(state, frozen, batch)
    if poison:
      metrics = {**metrics, "loss": jnp.where(poisoned, jnp.nan, metrics["loss"])}
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    kept = kept.replace(step=new_state.step)
    return kept, {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

  return guarded


class Watch:
  """Consecutive and total skipped steps; `check` reads the steps recorded since the last one."""

  def __init__(self, max_consecutive: int):
    self.max_consecutive = int(max_consecutive)
    self._pending = []   # metrics["nonfinite"] of the steps not yet read, oldest first
    self._streak = self._total = 0

  def record(self, metrics: dict) -> None:
    self._pending.append(metrics["nonfinite"])

  def check(self, step: int) -> int:
    """Returns the total skipped steps so far; raises NonFiniteError after too many in a row."""
    for bad in jax.device_get(self._pending):
      self._streak = self._streak + 1 if bad > 0 else 0
      self._total += int(bad > 0)
    self._pending = []
    streak, total = self._streak, self._total
    if self.max_consecutive > 0 and streak >= self.max_consecutive:
      raise NonFiniteError(
          f"stopped at step {step}: the last {streak} steps had a non-finite loss or gradient "
          f"norm ({total} in this run), so their updates were skipped; train.max_nonfinite_steps="
          f"{self.max_consecutive}. The newest checkpoint holds the last good weights: lower "
          f"train.lr, check the data, or raise train.max_nonfinite_steps")
    return total
