"""The benchmark scripts still run: each in a subprocess at its quick size (they are scripts, never
imported by the tests; their numbers live in benchmarks/README.md, not here).

bench_train.py builds our step through train.build_task; when it passed a hand-made config, a new
field the trainer reads went unnoticed there until the next full measurement failed.
"""
import csv
import json
import os
import re

import pytest

from tests import benchmark_runs

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_bench_train_quick_runs_both_sides_and_reports_a_ratio():
  out = benchmark_runs.run("bench_train.py", "--quick", "--warmup", "1", "--steps", "3",
                           "--block", "2", "--peak_gflops", "100").stdout
  counts = re.search(r"^params: ours ([\d,]+), torch ([\d,]+)$", out, re.M)
  assert counts, out
  ours, torch = (int(g.replace(",", "")) for g in counts.groups())
  assert ours == torch > 0, counts.group(0)
  assert "ratio ours/torch (time): train step" in out, out
  times = re.search(r"^step times \(s\): ours ([\d. ]+) \| torch ([\d. ]+)$", out, re.M)
  assert times and [len(t.split()) for t in times.groups()] == [3, 3], out   # blocks of 2, 1


def test_probe_glyph_classifier_reports_held_out_accuracy():
  proc = benchmark_runs.run("probe_glyph_classifier.py", "--steps", "20", "--every", "10",
                            "--n_train", "64", "--backgrounds", "dark")
  acc = [float(a) for a in re.findall(r"^step +\d+: ([\d.]+) ", proc.stdout, re.M)]
  assert len(acc) == 2 and all(0 <= a <= 1 for a in acc), proc.stdout
  bad = benchmark_runs.run("probe_glyph_classifier.py", "--backgrounds", "grey", ok=False,
                           timeout=120)
  assert bad.returncode == 2 and "--backgrounds" in bad.stderr, bad.stderr[-500:]


def test_own_images_check_makes_the_folder_and_judges_true_outputs_as_right(tmp_path):
  """make writes README's inputs; judge, given the held-out scans themselves as the t2i images and
  their own captions as the i2t output, scores them as right (the judge's ~97%) and a wrong
  caption as wrong."""
  run = lambda *a: benchmark_runs.run("own_images_check.py", *a)
  run("make", f"--dir={tmp_path}")
  assert len(os.listdir(tmp_path / "my_images")) == 1600
  held = sorted(os.listdir(tmp_path / "held_out"))
  with open(tmp_path / "held_out.csv") as f:
    rows = list(csv.reader(f))[1:]
  assert len(held) == len(rows) == 197
  assert (tmp_path / "prompts.txt").read_text().splitlines() == [c for _, c in rows]
  w = tmp_path / "run"
  (w / "samples" / "t2i").mkdir(parents=True)
  (w / "samples" / "i2t").mkdir(parents=True)
  with open(w / "samples" / "i2t" / "captions.jsonl", "w") as f:
    for i, (name, caption) in enumerate(rows):
      os.link(tmp_path / "held_out" / name, w / "samples" / "t2i" / f"{i:09d}.png")
      caption = caption if i else "a handwritten nothing"   # one wrong caption
      f.write(json.dumps({"index": i, "image": str(tmp_path / "held_out" / name),
                          "caption": caption}) + "\n")
  proc = run("judge", f"--dir={tmp_path}", f"--workdir={w}")
  m = re.search(r"t2i digit ([\d.]+) \(197 images\), i2t digit ([\d.]+) \(197 captions\)",
                proc.stdout)
  assert m, proc.stdout
  assert float(m.group(1)) > 0.9 and float(m.group(2)) == pytest.approx(196 / 197, abs=1e-3)


def test_step_floor_finds_every_dot_of_the_step_and_reports_each_target():
  """step_floor reads the compiled step's dots from its HLO: their FLOPs add up to the analytic
  count (less the patch embedding, a convolution), and it checks each torch einsum against XLA's
  dot before timing it."""
  out = benchmark_runs.run("step_floor.py", "--quick", "--peak_gflops", "100").stdout
  m = re.search(r"analytic step ([\d.e+-]+) GFLOP; the step's (\d+) dots \((\d+) distinct\): "
                r"([\d.e+-]+) GFLOP", out)
  assert m, out
  analytic, n, distinct, found = float(m[1]), int(m[2]), int(m[3]), float(m[4])
  assert 0.95 * analytic < found <= analytic and n > distinct > 10, m.group(0)
  rows = re.findall(r"^\[[\d, ]+\] x \[[\d, ]+\] c.* \| +(\d+) \|", out, re.M)
  assert len(rows) == distinct and sum(int(c) for c in rows) == n, out
  targets = re.findall(r"^target .*: step <= [\d.]+ ms: (within reach|below the floor)", out, re.M)
  assert len(targets) == 3, out
