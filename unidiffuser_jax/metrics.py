"""Training metrics: TensorBoard files through clu, a readable console line, a progress bar.

Metrics stay on device between logging steps (a list of small device arrays);
they are fetched, averaged and written only at logging steps, so the train
loop never waits on the device in between.
"""
import math
import sys
import time

import jax
import numpy as np
import tqdm
from clu import metric_writers


class MetricLogger:
  """Collects per-step device metrics and writes their means every `every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, every: int,
               examples_per_step: int, name: str = "train"):
    is_lead = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_lead, asynchronous=True)
    self._every = max(1, every)
    self._pending: list[dict] = []
    self._examples_per_step = examples_per_step
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                          disable=not is_lead, file=sys.stderr, dynamic_ncols=True,
                          mininterval=1.0)

  def step(self, step: int, device_metrics: dict, host_metrics: dict | None = None) -> dict | None:
    """Records the metrics of `step` (1-based count of finished steps); writes when due."""
    self._pending.append(device_metrics)
    self._bar.update(1)
    if step % self._every:
      return None
    return self.flush(step, host_metrics)

  def flush(self, step: int, host_metrics: dict | None = None) -> dict | None:
    if not self._pending:
      return None
    fetched = jax.device_get(self._pending)  # the one host sync per logging period
    self._pending = []
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    now = time.perf_counter()
    steps = max(1, step - self._last_step)
    scalars["step_time_s"] = (now - self._last_time) / steps
    scalars["examples_per_s"] = self._examples_per_step / max(scalars["step_time_s"], 1e-9)
    self._last_time, self._last_step = now, step
    scalars.update(host_metrics or {})
    self._writer.write_scalars(step, scalars)
    self._bar.set_postfix(loss=f"{scalars.get('loss', math.nan):.4f}")
    self._bar.write(console_line(step, scalars))
    return scalars

  def write_scalars(self, step: int, scalars: dict) -> None:
    """Scalars outside the per-step average (e.g. a periodic evaluation), with a console line."""
    self._writer.write_scalars(step, scalars)
    self._bar.write(console_line(step, scalars))

  def write_text(self, step: int, texts: dict[str, str]) -> None:
    self._writer.write_texts(step, texts)

  def close(self) -> None:
    self._bar.close()
    self._writer.flush()
    self._writer.close()


def console_line(step: int, scalars: dict) -> str:
  order = ["loss", "loss_img", "loss_clip", "loss_text", "grad_norm", "lr", "step_time_s",
           "examples_per_s"]
  # Counters that are zero (e.g. most skip reasons) stay in TensorBoard but not on the console.
  keys = [k for k in order if k in scalars] + sorted(
      k for k in scalars if k not in order and scalars[k] != 0)
  return f"step {step:>7d} | " + " ".join(f"{k}={_fmt(scalars[k])}" for k in keys)


def _fmt(v: float) -> str:
  if v == 0 or (1e-3 <= abs(v) < 1e5):
    return f"{v:.4g}"
  return f"{v:.3e}"
