"""Evaluation during training (eval_training.py): FID / CLIP score of a small fixed set where the
metric networks' weights are present, the held-out loss alone (and one line saying why) where
they are not; the numbers equal --mode=eval's on the same weights."""
import os
import types

import numpy as np
import pytest
import torch

from data_pipelines import demo_data
from unidiffuser_jax import errors, eval_training, evaluate, fid, train
from unidiffuser_jax.weights import inception as inception_weights
from tests import events
from tests.test_evaluate import tiny_clip
from tests.test_fid import _random_state_dict


def _no_weights(config):
  config = config.copy_and_resolve_references()
  config.eval.update(source="", tasks=("t2i",), metrics=("fid", "clip_score", "loss"),
                     inception="", ref_stats="", clip="", train_num=3)
  config.train.eval_every = 2
  return config


def test_absent_weights_say_why_in_one_line(tiny_sampler, tmp_path, capsys):
  config = _no_weights(tiny_sampler[0])
  assert eval_training.metric_networks(config) == ((), [
      "FID: no FID Inception weights (config.eval.inception='')",
      "CLIP score: no CLIP model '' (config.eval.clip is empty)"])
  mine = lambda step, state: {"mine": 1.0}
  # no set for the held-out loss and no metric networks: the runbook's evaluate alone
  assert eval_training.training_evaluate(config, str(tmp_path), None, None, None, None,
                                         mine) is mine
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1 and out[0].startswith("evaluation every 2 steps: nothing of config.eval")
  assert "FID: no FID Inception weights" in out[0] and "CLIP score" in out[0]
  # the Inception file present but no statistics: still named
  config.eval.inception = __file__
  config.eval.ref_stats = str(tmp_path / "missing.npz")
  assert "FID: no reference statistics" in eval_training.metric_networks(config)[1][0]
  # a statistics file that is there but wrong stops the run at the start, in one line
  fid.save_stats(tmp_path / "small.npz", np.zeros(4), np.eye(4))
  config.eval.ref_stats = str(tmp_path / "small.npz")
  with pytest.raises(errors.ConfigError, match="4-d, expected 2048-d") as e:
    eval_training.metric_networks(config)
  assert "\n" not in str(e.value)
  config.train.eval_every = 0   # no evaluation at all: nothing is checked or said
  assert eval_training.training_evaluate(config, str(tmp_path), None, None, None, None,
                                         None) is None


def test_clip_score_during_training_equals_eval_mode(tiny_sampler, tmp_path, capsys):
  """The training-time CLIP score of given EMA weights is --mode=eval's on the same weights
  (same prompts, keys, compiled sampler and CLIP towers), and it names the wall time."""
  config, _, params, _ = tiny_sampler
  config = _no_weights(config)
  config.eval.update(clip=tiny_clip(config, tmp_path / "clip"), metrics=("fid", "clip_score"),
                     feature_batch_size=8, num=3)
  config.sample.batch_size = 8
  sampler = evaluate.sample.load_sampler(config, str(tmp_path))
  fn = eval_training.training_evaluate(config, str(tmp_path), sampler["model"],
                                       sampler["encoders"], sampler["enc_params"],
                                       sampler["mesh"], None)
  line = capsys.readouterr().out.strip().splitlines()
  assert line == ["evaluation every 2 steps: clip_score of 3 samples (not FID: no FID Inception "
                  "weights (config.eval.inception=''))"]
  state = types.SimpleNamespace(ema_params=params)
  got = fn(2, state)
  assert set(got) == {"eval/t2i_clip_score", "eval/t2i_seconds"}, got
  assert fn(4, state)["eval/t2i_clip_score"] == got["eval/t2i_clip_score"]   # fixed set, keys
  eval_mode = config.copy_and_resolve_references()
  eval_mode.eval.metrics = ("clip_score",)
  want = evaluate.run(eval_mode, str(tmp_path / "eval_mode"))
  assert want["rows"][0]["clip_score"] == got["eval/t2i_clip_score"]
  assert np.isfinite(got["eval/t2i_clip_score"]) and got["eval/t2i_seconds"] > 0


@pytest.mark.slow
def test_training_logs_fid_and_clip_score_every_eval_every(tiny_sampler, tmp_path_factory):
  """train.train with a random-weight FID Inception file, reference statistics and a tiny
  CLIP: FID, CLIP scores, BLEU/CIDEr-D and the held-out loss at steps 2 and 4, with the
  evaluation's wall time; step 4's FID is --mode=eval's on the saved EMA weights."""
  config, _, _, _ = tiny_sampler
  config = config.copy_and_resolve_references()
  d = tmp_path_factory.mktemp("train_eval")
  shards = ",".join(demo_data.build_demo(str(d / "data"), n_train=8, n_heldout=8, size=16,
                                         seed=0)["heldout_shards"])
  pth = d / inception_weights.FID_WEIGHTS_FILE
  torch.save(_random_state_dict(0), pth)
  fid.save_stats(d / "ref.npz", np.zeros(2048), np.eye(2048))
  config.eval.update(source="shards", path=shards, tasks=("t2i", "i2t"), num=8, train_num=8,
                     metrics=("fid", "clip_score", "captions", "loss"), inception=str(pth),
                     ref_stats=str(d / "ref.npz"), clip=tiny_clip(config, d / "clip"),
                     feature_batch_size=8, loss_examples=8, loss_timesteps=(500,))
  config.sample.batch_size = 8
  config.train.update(steps=4, eval_every=2, checkpoint_every=4)
  config.data.update(source="shards", shards=shards, num_workers=0)
  workdir = str(d / "run")
  train.train(config, workdir)
  scalars = events.scalars(workdir)
  for tag in ("eval/t2i_fid", "eval/t2i_clip_score", "eval/i2t_clip_score", "eval/i2t_bleu4",
              "eval/i2t_cider_d", "eval/t2i_seconds", "heldout/loss", "eval_time_s"):
    assert [s for s, _ in scalars[tag]] == [2, 4], (tag, scalars.get(tag))
    assert all(np.isfinite(v) for _, v in scalars[tag]), tag
  assert os.path.isfile(os.path.join(workdir, "eval", "train_prompts.jsonl"))
  # --mode=eval on the saved step-4 EMA weights: the same FID and CLIP scores
  config.sample.checkpoint = ""
  want = {r["task"]: r for r in evaluate.run(config, workdir)["rows"]}
  got = dict(scalars["eval/t2i_fid"])[4]
  assert got == pytest.approx(want["t2i"]["fid"], rel=1e-6)
  assert dict(scalars["eval/i2t_clip_score"])[4] == pytest.approx(want["i2t"]["clip_score"],
                                                                  rel=1e-6)
