"""The other benchmark scripts still run, at their quick sizes, in subprocesses (as
test_benchmark_scripts.py does for bench_train, step_floor and the probes): bench_sample.py had
stopped importing diffusers' AutoencoderKL (torchvision's ops under a CPU-only torch) with no
test to notice. The checks are on what each script prints, not on its timings.
"""
import re

import pytest

from tests import benchmark_runs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _run(script: str, *args: str) -> str:
  return benchmark_runs.run(script, *args).stdout


def test_bench_sample_quick_matches_diffusers_and_times_every_mode():
  out = _run("bench_sample.py", "--quick")
  diff = re.search(r"one forward max abs diff ours vs diffusers: ([\d.e+-]+)", out)
  assert diff and float(diff[1]) < 1e-4, out
  loop = re.search(r"timed diffusers loop vs a real pipeline call .*max abs diff ([\d.e+-]+)", out)
  assert loop and float(loop[1]) < 1e-5, out
  modes = re.findall(r"^  (\w+): ours [\d.]+ s \(compile [\d.]+ s\), diffusers [\d.]+ s", out, re.M)
  assert sorted(modes) == sorted(["t2i", "i2t", "joint", "i", "t"]), out


def test_bench_serve_quick_batches_requests_and_keeps_seeds():
  out = _run("bench_serve.py", "--quick")
  assert "requests by the number of requests in their batch: {4: 16}" in out, out
  assert re.search(r"seed-deterministic: 16/16 images byte-identical alone vs in a batch; "
                   r"16 distinct images", out), out
  assert re.search(r"^speed-up: [\d.]+x images/s", out, re.M), out


def test_bench_lora_quick_trains_fewer_params_and_reports_the_ratio():
  out = _run("bench_lora.py", "--quick")
  trained = dict(re.findall(r"^ (full|lora): compile [\d.]+ s, trained params ([\d,]+)", out, re.M))
  assert set(trained) == {"full", "lora"}, out
  full, lora = (int(trained[k].replace(",", "")) for k in ("full", "lora"))
  assert 0 < lora < full, trained
  assert re.search(r"^LoRA / full step time: [\d.]+$", out, re.M), out


def test_bench_data_quick_reads_records_and_times_the_training_run():
  out = _run("bench_data.py", "--quick")
  rows = re.findall(r"^ +\d+ (plain|plain\+clip|pipeline) +([\d.]+) +([\d.]+)$", out, re.M)
  assert [r[0] for r in rows] == ["plain", "plain+clip", "pipeline"], out
  assert all(float(r[1]) > 0 for r in rows), rows
  workers = re.findall(r"^ +(\d+) +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+%$", out, re.M)
  assert len(workers) >= 2, out
