"""The held-out loss (fixed timesteps and noise) in --mode=eval with the demo's judge, and every
train.eval_every steps during training."""
import json

import jax
import numpy as np
import pytest

from data_pipelines import demo_data, demo_sets
from unidiffuser_jax import demo, encoders as encoders_lib, eval_data, evaluate, heldout, jobs
from unidiffuser_jax import sample, train, weight_jobs
from tests import events


@pytest.fixture(scope="module")
def shapes_heldout(tmp_path_factory):
  paths = demo_data.build_demo(str(tmp_path_factory.mktemp("demo_data")), n_train=8,
                               n_heldout=8, size=16, seed=0)
  return ",".join(paths["heldout_shards"])


def _config(tiny_sampler, shards):
  config, _, _, _ = tiny_sampler
  config = config.copy_and_resolve_references()
  config.eval.update(source="shards", path=shards, num=8, tasks=("t2i", "i2t"),
                     metrics=("loss",), loss_examples=8, save_samples=4,
                     loss_timesteps=(200, 800))
  config.sample.batch_size = 8
  return config


@pytest.mark.slow
def test_eval_reports_judge_and_deterministic_heldout_loss(tiny_sampler, shapes_heldout, tmp_path):
  config = _config(tiny_sampler, shapes_heldout)
  truth = demo.read_heldout(demo_sets.get("shapes"), shapes_heldout.split(","), -1)
  out = evaluate.run(config, str(tmp_path), score=demo.Judge("shapes", truth).score)
  rows = {r["task"]: r for r in out["rows"]}
  assert set(rows) == {"t2i", "i2t"}
  for task in ("t2i", "i2t"):
    judged = {k for k in rows[task] if k.startswith("judge_")}
    assert {"judge_colour", "judge_shape", "judge_position"} <= judged, rows[task]
  assert set(out["heldout"]) == {"heldout/loss_t200", "heldout/loss_t800", "heldout/loss",
                                 "seconds"}
  assert out["heldout"]["heldout/loss"] == pytest.approx(
      (out["heldout"]["heldout/loss_t200"] + out["heldout"]["heldout/loss_t800"]) / 2)
  on_disk = json.load(open(tmp_path / "eval" / "eval.json"))
  assert on_disk["rows"] == json.loads(json.dumps(out["rows"]))
  # the same weights give the same held-out loss, to the bit; other weights another one
  sampler = sample.load_sampler(config, str(tmp_path))
  loss = heldout.HeldoutLoss(config, sampler["model"], sampler["encoders"],
                             sampler["enc_params"], sampler["mesh"],
                             heldout.heldout_batch(config, eval_data.load(config.eval)))
  a, b = loss(sampler["params"]), loss(sampler["params"])
  assert a == b
  assert a["heldout/loss"] == out["heldout"]["heldout/loss"]
  shifted = jax.tree.map(lambda x: x * 0.5, sampler["params"])
  assert loss(shifted)["heldout/loss"] != a["heldout/loss"]


@pytest.mark.slow
def test_training_logs_heldout_loss_every_eval_every(tiny_sampler, shapes_heldout, tmp_path):
  config = _config(tiny_sampler, shapes_heldout)
  config.train.update(steps=4, eval_every=2, checkpoint_every=4)
  config.data.update(source="shards", shards=shapes_heldout, num_workers=0)
  train.train(config, str(tmp_path))
  scalars = events.scalars(str(tmp_path))
  steps = [s for s, _ in scalars["heldout/loss"]]
  assert steps == [2, 4]
  assert [s for s, _ in scalars["eval_time_s"]] == [2, 4]
  assert all(np.isfinite(v) for _, v in scalars["heldout/loss_t800"])


@pytest.mark.slow
def test_demo_runbook_eval_mode(tiny_sampler, tmp_path):
  """--mode=eval on a demo-runbook config: makes its data, judges both tasks, held-out loss."""
  config, _, _, root = tiny_sampler
  config = config.copy_and_resolve_references()
  config.runbook = "demo"
  config.demo.update(set="shapes", n_train=8, n_heldout=8)
  config.eval.update(source="", num=8, metrics=("loss",), loss_examples=8, save_samples=2,
                     loss_timesteps=(500,))
  config.sample.batch_size = 8
  enc = encoders_lib.build(config.encoders)
  captioner = tmp_path / "captioner_params"
  weight_jobs.save_params(str(captioner),
                          enc._init_part("captioner", jax.random.key(0)))  # noqa: SLF001
  config.encoders.weights.captioner = str(captioner)
  workdir = tmp_path / "run"
  jobs.run("eval", config, str(workdir))
  out = json.load(open(workdir / "eval" / "eval.json"))
  assert {r["task"] for r in out["rows"]} == {"t2i", "i2t"}
  for r in out["rows"]:
    assert "judge_colour" in r and "judge_shape" in r and r["num"] == 8
  assert np.isfinite(out["heldout"]["heldout/loss_t500"])
  assert out["protocol"]["source"] == "shards" and "heldout" in out["protocol"]["path"]
