"""Training metrics: TensorBoard files (tb_events, process 0), a readable console line, a progress bar.

Metrics stay on device between logging steps (a list of small device arrays);
they are fetched, averaged and written only at logging steps, so the train
loop never waits on the device in between.

Performance telemetry, per logging period, from host clocks only (no extra sync):
  step_time_s            wall time of the period / its steps (exact: the period ends in the sync)
  step_time_p50/p90/max  percentiles of the host's per-step intervals (between consecutive
                         step() calls; they track the device once dispatch waits on it)
  data_wait_frac         share of the period's wall time spent blocked in next(data_iterator)
                         (next_batch)
  tflops_per_device, mfu model FLOPs per step (Task.flops_per_example x batch) / step time,
                         per device and as a fraction of the device's peak (perf.device_peak_flops:
                         the chip table, or on CPU the matmul peak measured once)
"""
import math
import sys
import time

import jax
import numpy as np
import tqdm
from unidiffuser_jax import perf, tb_events


class MetricLogger:
  """Collects per-step device metrics and writes their means every `every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, every: int,
               examples_per_step: int, name: str = "train", flops_per_step: int = 0):
    is_lead = jax.process_index() == 0
    self._writer = tb_events.ScalarWriter(workdir) if is_lead else None
    self._every = max(1, every)
    self._pending: list[dict] = []
    self._examples_per_step = examples_per_step
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self._flops_per_step = flops_per_step
    self._peak = (perf.device_peak_flops(jax.local_devices()[0], jax.local_device_count())[0]
                  if flops_per_step else 0.0)
    self._wait_s = 0.0
    self._intervals: list[float] = []
    self._last_call = None
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                          disable=not is_lead, file=sys.stderr, dynamic_ncols=True,
                          mininterval=1.0)

  def next_batch(self, iterator):
    """next(iterator), its blocking time counted as data wait."""
    t0 = time.perf_counter()
    batch = next(iterator)
    self._wait_s += time.perf_counter() - t0
    return batch

  def step(self, step: int, device_metrics: dict, host_metrics: dict | None = None) -> dict | None:
    """Records the metrics of `step` (1-based count of finished steps); writes when due."""
    now = time.perf_counter()
    if self._last_call is not None:
      self._intervals.append(now - self._last_call)
    self._last_call = now
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
    scalars.update(self._telemetry(scalars["step_time_s"], now - self._last_time))
    self._last_time, self._last_step = now, step
    scalars.update(host_metrics or {})
    if self._writer:
      self._writer.write_scalars(step, scalars)
    self._bar.set_postfix(loss=f"{scalars.get('loss', math.nan):.4f}")
    self._bar.write(console_line(step, scalars))
    return scalars

  def _telemetry(self, step_time: float, period_s: float) -> dict:
    out = {"data_wait_frac": min(1.0, self._wait_s / max(period_s, 1e-9))}
    if self._intervals:
      p50, p90 = np.percentile(self._intervals, [50, 90])
      out.update(step_time_p50=float(p50), step_time_p90=float(p90),
                 step_time_max=float(max(self._intervals)))
    if self._flops_per_step and step_time > 0:
      per_device = self._flops_per_step / step_time / jax.device_count()
      out.update(tflops_per_device=per_device / 1e12, mfu=per_device / self._peak)
    self._wait_s, self._intervals = 0.0, []
    return out

  def write_scalars(self, step: int, scalars: dict) -> None:
    """Scalars outside the per-step average (e.g. a periodic evaluation), with a console line."""
    if self._writer:
      self._writer.write_scalars(step, scalars)
    self._bar.write(console_line(step, scalars))

  def close(self) -> None:
    self._bar.close()
    if self._writer:
      self._writer.close()


def console_line(step: int, scalars: dict) -> str:
  order = ["loss", "loss_img", "loss_clip", "loss_text", "grad_norm", "lr", "step_time_s",
           "step_time_p50", "step_time_p90", "step_time_max", "examples_per_s",
           "tflops_per_device", "mfu", "data_wait_frac"]
  # Counters that are zero (e.g. most skip reasons) stay in TensorBoard but not on the console.
  keys = [k for k in order if k in scalars] + sorted(
      k for k in scalars if k not in order and scalars[k] != 0)
  return f"step {step:>7d} | " + " ".join(f"{k}={_fmt(scalars[k])}" for k in keys)


def _fmt(v: float) -> str:
  if v == 0 or (1e-3 <= abs(v) < 1e5):
    return f"{v:.4g}"
  return f"{v:.3e}"
