"""Train-time performance telemetry (metrics.MetricLogger): data wait, step-time percentiles,
TFLOP/s per device and MFU against the device's peak (on CPU the measured matmul peak)."""
import math

import jax
import numpy as np
import pytest

from configs import demo
from data_pipelines import synthetic
from tests import events
from tools import faults
from unidiffuser_jax import metrics, perf, tb_events, train, vocab
from unidiffuser_jax.models import uvit


def test_data_wait_and_percentiles_from_host_clocks(tmp_path, monkeypatch):
  """On a fake clock: blocked 30 ms per batch, 10 ms of other work per step, so the data wait
  is 3/4 of the time and every step interval is 40 ms."""
  peak, _ = perf.device_peak_flops(jax.local_devices()[0], jax.local_device_count())  # real clock
  now = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])

  def slow_batches():
    while True:
      now[0] += 0.03
      yield {"x": 0}

  flops = 4e9
  logger = metrics.MetricLogger(str(tmp_path), total_steps=8, start_step=0, every=4,
                                examples_per_step=2, flops_per_step=flops)
  it = slow_batches()
  rows = []
  for step in range(1, 9):
    logger.next_batch(it)
    now[0] += 0.01
    rows.append(logger.step(step, {"loss": jax.numpy.float32(step)}))
  logger.close()
  row = rows[-1]
  assert row["data_wait_frac"] == pytest.approx(0.75)
  assert row["step_time_s"] == pytest.approx(0.04)
  assert row["step_time_p50"] == row["step_time_p90"] == row["step_time_max"] == pytest.approx(0.04)
  assert row["tflops_per_device"] == pytest.approx(flops / 0.04 / jax.device_count() / 1e12)
  assert row["mfu"] == pytest.approx(row["tflops_per_device"] * 1e12 / peak)
  written = events.scalars(str(tmp_path))   # TensorFlow's reader on tb_events' files
  assert written["loss"] == [(4, 2.5), (8, 6.5)]
  assert faults.logged(str(tmp_path)) == {4: 2.5, 8: 6.5}   # tensorboard's own reader
  assert written["data_wait_frac"] == [(4, pytest.approx(0.75)), (8, pytest.approx(0.75))]
  line = metrics.console_line(8, row)
  assert "mfu=" in line and "data_wait_frac=" in line and "step_time_p90=" in line


def test_a_second_writer_in_the_same_second_keeps_the_first_file(tmp_path):
  """A run resumed in the same process (tests do) opens a new file, not the first one again."""
  for step in (1, 2):
    writer = tb_events.ScalarWriter(str(tmp_path))
    writer.write_scalars(step, {"loss": float(step)})
    writer.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  assert faults.logged(str(tmp_path)) == {1: 1.0, 2: 2.0}


def test_cpu_peak_is_measured_once_and_plausible():
  peak = perf.matmul_peak_flops()
  assert perf.matmul_peak_flops() == peak            # cached: one measurement per process
  assert 1e8 < peak < 1e13                           # 0.1 GFLOP/s .. 10 TFLOP/s for a CPU
  flops, source = perf.device_peak_flops(jax.local_devices()[0], jax.local_device_count())
  assert source == "measured f32 matmul" and flops == pytest.approx(peak / jax.local_device_count())


@pytest.mark.slow
def test_train_reports_finite_telemetry_and_a_sane_mfu(tmp_path):
  config = vocab.derive(demo.get_config("tiny"))
  config.train.update(steps=6, log_every=3)
  it = synthetic.make_iterator(resolution=16, clip_resolution=16, max_length=6, vocab_size=60,
                               host_batch=config.train.batch_size, seed=5)
  last = train.train(config, str(tmp_path), data_iterator=it)
  for key in ("tflops_per_device", "mfu", "data_wait_frac", "step_time_p50", "step_time_p90"):
    assert math.isfinite(last[key]), (key, last)
  # A real step of the tiny U-ViT on CPU reaches some, never all, of the measured matmul peak.
  assert 1e-5 < last["mfu"] < 1.0, last
  model = uvit.from_config(config.model)
  assert last["tflops_per_device"] == pytest.approx(
      perf.uvit_train_flops(model, config.train.batch_size) / last["step_time_s"]
      / jax.device_count() / 1e12)
  assert 0.0 <= last["data_wait_frac"] <= 1.0
  assert np.isfinite(last["loss"])
