"""Preemption: a SIGTERM becomes a checkpoint at a step every process agrees on, then exit 0.

With jax.distributed initialised (every multi-process run, and --multihost), jax's own
preemption service catches SIGTERM on any one process, tells the others, and
`multihost_utils.reached_preemption_sync_point(step)` returns True on every process at the
same step (the maximum step any process had reached, plus one). Every process must call
`Notice.reached` after every step. In a single process without jax.distributed a Python
SIGTERM handler sets a flag that `reached` reads (no device sync either way).

A second SIGTERM while the checkpoint is being written is absorbed by the same handlers (jax's
notifier, or the flag already set), so it cannot interrupt the save; only the hard kill that
follows the grace can, and then the interrupted save is an orbax tmp dir that the next start
ignores (checkpoints.py). train.preemption_grace_s is the notice's length: the stop line says
how long the save took and warns when it exceeded the grace.
"""
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils



class Preempted(Exception):
  """Raised after the preemption checkpoint is complete; main prints it and exits 0."""


class Notice:
  """Installs the SIGTERM handling for one training loop; `close` restores the old handler."""

  def __init__(self, grace_s: float):
    self.grace_s = float(grace_s)
    self.noticed_at: float | None = None
    self._distributed = jax.distributed.is_initialized()
    self._previous = None
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self.noticed_at is None:
      self.noticed_at = time.monotonic()

  def reached(self, step: int) -> bool:
    """True at the step where every process saves and stops (call it after every step)."""
    if self._distributed:
      hit = multihost_utils.reached_preemption_sync_point(step)
      if hit and self.noticed_at is None:
        self.noticed_at = time.monotonic()
      return hit
    return self.noticed_at is not None

  def stopped(self, step: int, workdir: str) -> Preempted:
    """The one line a preempted run ends with (after its checkpoint is complete)."""
    took = time.monotonic() - (self.noticed_at or time.monotonic())
    late = (f"; WARNING: longer than the {self.grace_s:g} s grace "
            f"(train.preemption_grace_s), a hard kill may have come first") if took > self.grace_s else ""
    return Preempted(f"preempted: stopped at step {step} with a complete checkpoint in "
                     f"{workdir}/checkpoints/{step} ({took:.1f} s after the notice{late}); "
                     f"re-run the same command to resume")

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
