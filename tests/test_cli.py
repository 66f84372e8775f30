"""The entry point as a user runs it: describe, bad configs, and a short demo run."""
import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import glyph_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test here runs the command line in a subprocess.
pytestmark = pytest.mark.multiprocess


def run_main(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS: set by conftest.py
  return subprocess.run([sys.executable, "-m", "unidiffuser_jax.main", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("arg,count", [("configs/laion.py", 952_509_520),
                                       ("configs/laion.py:v0", 952_504_912)])
def test_describe_counts_released_params(arg, count):
  res = run_main(f"--config={arg}", "--mode=describe")
  assert res.returncode == 0, res.stderr[-2000:]
  lines = res.stdout.splitlines()
  assert f"params: {count}" in lines
  assert any(line.startswith("mesh: ") for line in lines)
  assert any("per-device bytes" in line for line in lines)


@pytest.mark.slow
def test_describe_plans_for_a_pod_without_devices():
  res = run_main("--config=configs/laion.py", "--mode=describe", "--config.mesh.num_devices=256",
                 "--config.mesh.fsdp=-1", "--config.mesh.tensor=4", "--config.train.batch_size=2112")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "mesh: {'data': 1, 'fsdp': 64, 'tensor': 4} (256 devices)" in res.stdout
  line = [l for l in res.stdout.splitlines() if l.startswith("per-device bytes")][0]
  value, unit = line.split("params ")[1].split(",")[0].split()
  per_device = float(value) * {"GiB": 2**30, "MiB": 2**20}[unit]
  full = 952_509_520 * 4
  # Nearly everything is split 256 ways (fsdp x tensor); only norms and biases of
  # tensor-split layers stay larger, and the position tables (1105 x 1536 float32) are
  # replicated (configs/common.py, pos_width): one device holds 1/256 to ~1/200, plus the tables.
  assert full / 256 * 0.99 < per_device < full / 200 + 1105 * 1536 * 4, line


@pytest.mark.parametrize("args,expect", [
    (["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=4"],
     "has 16 devices but 8 are available"),
    (["--config.mesh.data=3"], "not divisible by 3"),
    (["--config.train.batch_size=63"], "use a multiple of 8"),
    (["--config.train.stepz=5"], 'Did you mean "steps"'),
    (["--config.model.width=130", "--config.model.num_heads=4"],
     "config.model: width 130 is not divisible by num_heads 4"),
])
@pytest.mark.slow
def test_bad_config_stops_with_one_clear_line(args, expect):
  res = run_main("--config=configs/demo.py", "--mode=describe", *args)
  assert res.returncode == 2
  errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expect in errors[0], res.stderr[-2000:]
  assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_demo_command_leaves_checkpoint_and_events(tmp_path):
  workdir = tmp_path / "w"
  res = run_main("--config=configs/demo.py", f"--workdir={workdir}", "--config.train.steps=20",
                 # keep the test short: a small demo set, a few caption-decoder steps
                 "--config.demo.n_train=256", "--config.demo.n_heldout=8",
                 "--config.captioner.train.steps=4", "--config.train.log_every=10",
                 # stage 0 (off by default): the CLIP pair fitted to the set, a few steps
                 "--config.clip_fit.train.steps=4", "--config.clip_fit.std_examples=64",
                 "--config.train.eval_every=10",
                 "--config.sample.eval_num=8", "--config.encoders.fit_latent_stats=64",
                 "--config.sample.steps=2", "--config.sample.num_beams=2",
                 "--config.sample.batch_size=8")
  assert res.returncode == 0, res.stderr[-3000:]
  assert os.path.isdir(workdir / "checkpoints" / "20" / "state")
  assert os.path.isfile(workdir / "checkpoints" / "20" / "data" / "process_0-of-1.json")
  assert glob.glob(str(workdir / "events.out.tfevents.*"))
  assert os.path.isdir(workdir / "captioner" / "checkpoints" / "4")
  assert os.path.isdir(workdir / "clip" / "checkpoints" / "4")   # stage 0, the fitted CLIP pair
  assert "step      20 | loss=" in res.stderr + res.stdout
  assert os.path.isfile(workdir / "latent_stats.json")
  curve = json.load(open(workdir / "samples" / "curve.json"))   # the learning curve
  assert [c["step"] for c in curve] == [10, 20] and "judge/t2i_colour" in curve[0]
  assert os.path.isfile(workdir / "samples" / "curve.png")
  # The runbook ends by sampling the 8 held-out inputs and judging them.
  assert len(glob.glob(str(workdir / "samples" / "t2i" / "0*.png"))) == 8
  scores = json.load(open(workdir / "samples" / "i2t" / "scores.json"))
  assert scores["n"] == 8 and 0.0 <= scores["colour"] <= 1.0, scores
  recs = [json.loads(line) for line in open(workdir / "samples" / "i2t" / "captions.jsonl")]
  assert len(recs) == 8 and all(r["image"].endswith(".png") for r in recs), recs[:2]
  assert "t2i judge: colour" in res.stdout
  # The paths the stages filled in, for a later --mode=sample.
  flags = (workdir / "demo.flags").read_text().split()
  assert f"--config.encoders.weights.captioner={workdir / 'captioner'}" in flags
  for part in ("clip_image", "clip_text"):
    assert f"--config.encoders.weights.{part}={workdir / 'clip' / 'encoders' / part}" in flags


@pytest.mark.slow
def test_own_images_recipe_as_readme_documents_it(tmp_path):
  """README "Your own images on a CPU": folder + captions.csv -> shards -> tokenizer -> train ->
  sample prompts and an image folder; tiny sizes and few steps, the commands as written."""
  rng = np.random.default_rng(0)
  (tmp_path / "my_images").mkdir()
  (tmp_path / "held_out").mkdir()
  rows = []
  for i in range(48):
    a = glyph_data.sample_attrs(rng)
    img = glyph_data.render(a["digit"], a["colour"], a["background"], 24, rng)
    folder = "my_images" if i < 40 else "held_out"
    Image.fromarray(img).save(tmp_path / folder / f"img{i:03d}.png")
    rows.append((f"img{i:03d}.png", glyph_data.caption_for(a["digit"], a["colour"], a["background"], rng)))
  with open(tmp_path / "captions.csv", "w", newline="") as f:
    csv.writer(f).writerows([("file", "caption")] + rows[:40])
  (tmp_path / "prompts.txt").write_text("\n".join(c for _, c in rows[40:44]) + "\n")
  py = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, capture_output=True,
                                 text=True, timeout=600)
  res = py("data_pipelines.make_shards", "--input", str(tmp_path / "my_images"), "--captions",
           str(tmp_path / "captions.csv"), "--out", str(tmp_path / "my_shards"))
  assert res.returncode == 0, res.stderr[-2000:]
  res = py("data_pipelines.make_tokenizer", "--shards", str(tmp_path / "my_shards"), "--out",
           str(tmp_path / "my_tokenizer"))
  assert res.returncode == 0, res.stderr[-2000:]
  data = ["--config.demo.set=", f"--config.data.shards={tmp_path / 'my_shards'}",
          f"--config.data.tokenizer={tmp_path / 'my_tokenizer'}"]
  tiny = ["--config.model.width=32", "--config.model.depth=2", "--config.model.mlp_dim=64",
          "--config.encoders.fit_latent_stats=64", "--config.sample.steps=2",
          "--config.sample.num_beams=2", "--config.sample.batch_size=8"]
  workdir = tmp_path / "mine"
  res = run_main("--config=configs/demo.py", f"--workdir={workdir}", *data, *tiny,
                 "--config.clip_fit.train.steps=2", "--config.clip_fit.train.batch_size=8",
                 "--config.clip_fit.std_examples=16",
                 "--config.train.steps=4", "--config.captioner.train.steps=2",
                 "--config.train.eval_every=0")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "skipping the final sampling" in res.stdout
  assert os.path.isfile(workdir / "latent_stats.json")
  assert os.path.isdir(workdir / "clip" / "encoders" / "clip_text")   # stage 0, as step 3 asks
  res = run_main("--config=configs/demo.py", f"--workdir={workdir}", "--mode=sample",
                 f"--flagfile={workdir / 'demo.flags'}", *tiny,
                 f"--config.sample.prompt_file={tmp_path / 'prompts.txt'}",
                 f"--config.sample.images=('{tmp_path / 'held_out'}',)")
  assert res.returncode == 0, res.stderr[-3000:]
  assert len(glob.glob(str(workdir / "samples" / "t2i" / "0*.png"))) == 4
  recs = [json.loads(line) for line in open(workdir / "samples" / "i2t" / "captions.jsonl")]
  assert [r["image"] for r in recs] == [f"img{i:03d}.png" for i in range(40, 48)]  # every input
