"""The demo runbook (configs/demo.py sets config.runbook = "demo"): its stages, chained here.

  python -m unidiffuser_jax.main --config=configs/demo.py --workdir=DIR

  make data  config.demo.set: a generated set (data_pipelines/demo_sets.py) written once to
             DIR/demo_data, train shards + held-out shards + word-level tokenizer; "" = your
             own config.data.shards and config.data.tokenizer
  stage 0    the CLIP pair fitted contrastively to the set (clip_train) -> DIR/clip, when
             config.clip_fit.train.steps > 0 and config.encoders.weights names no CLIP part
  stage 1    the caption decoder (captioner_train) -> DIR/captioner, on stage 0's text
             encoder; skipped when config.encoders.weights.captioner already names weights
  stage 2    the U-ViT (train.train) -> DIR, naming stage 1's weights by path, judged on the
             held-out set every config.train.eval_every steps (samples/curve.json, .png)
  sample     t2i for the held-out prompts and i2t for the held-out images, or config.sample's
             own prompts/images when it names some (sample.run) -> DIR/samples/<task>/
  judge      the generated set's judge reads colour, shape, ... off the pixels and the
             captions -> DIR/samples/<task>/scores.json

`--mode=eval` (evaluate below) makes the data (once), then runs unidiffuser_jax/evaluate.py on
the held-out shards with the judge as an extra score: DIR/eval/eval.json holds the judge's
scores per task and the held-out loss.

Every stage is a generic job given paths by this function, and every stage resumes, so
re-running the command continues. The paths it fills in are written to DIR/demo.flags:
`--mode=sample --flagfile=DIR/demo.flags` samples the trained run again with new inputs.
"""
import json
import os

import numpy as np

from data_pipelines import demo_sets, shards
from unidiffuser_jax import captioner_train, clip_train, evaluate as evaluate_lib, sample, train
from unidiffuser_jax import vocab
from unidiffuser_jax.errors import ConfigError

JUDGED = ("t2i", "i2t")  # the tasks a generated set's judge scores


def run(config, workdir: str) -> dict:
  """All stages; `config` is mutable (jobs.run's copy). Returns {task: result} of the sampling."""
  heldout = make_data(config, workdir)
  vocab.derive(config)
  fit_clip, fit_captioner = _fits_clip(config), not config.encoders.weights.captioner
  _use_stage_outputs(config, workdir)
  if fit_clip:
    clip_train.train_clip(config, os.path.join(workdir, "clip"))
  if fit_captioner:
    captioner_train.train_captioner(config, config.encoders.weights.captioner)
  _write_flags(config, workdir)
  judge = Judge(config.demo.set, heldout) if heldout else None
  evaluate = None
  if judge is not None and int(config.train.eval_every) > 0:
    tasks = [t for t in config.sample.tasks if t in JUDGED]
    evaluate = sample.Evaluator(config, workdir, heldout, judge.score, tasks=tasks,
                                prefix="judge")
  train.train(config, workdir, evaluate=evaluate)

  own = sample.config_inputs(config)
  if own["prompts"] or own["images"]:
    judge, inputs = None, own   # the user's inputs: nothing to judge them against
  elif heldout:
    inputs = heldout
  else:
    print("no prompts or images to sample from (config.sample.prompts / prompt_file / images): "
          "skipping the final sampling; run --mode=sample with them", flush=True)
    return {}
  results = sample.run(config, workdir, inputs)
  if judge is not None:
    for task, result in results.items():
      if task in JUDGED:
        host, _ = sample.task_inputs(task, inputs, config)
        result["scores"] = judge.score(task, host, result["records"])
        with open(os.path.join(result["dir"], "scores.json"), "w") as f:
          json.dump(result["scores"], f, indent=1)
        print(f"{task} judge: {_fmt_scores(result['scores'])}", flush=True)
  return results


def evaluate(config, workdir: str) -> dict:
  """--mode=eval on a demo run: the generic evaluation on the held-out shards + the judge."""
  if not config.demo.set:
    return evaluate_lib.run(config, workdir)
  open_run(config, workdir)
  demo_set = demo_sets.get(config.demo.set)
  truth = read_heldout(demo_set, shards.expand_shards(config.eval.path), -1)
  return evaluate_lib.run(config, workdir, score=Judge(config.demo.set, truth).score)


def open_run(config, workdir: str) -> dict | None:
  """A demo run's workdir, ready to sample from (--mode=eval, the benchmarks' probes): the set
  (make_data), the vocabulary sizes and the run's fitted encoders and caption decoder filled
  into `config`; returns make_data's held-out inputs."""
  heldout = make_data(config, workdir)
  vocab.derive(config)
  _use_stage_outputs(config, workdir)
  return heldout


def _fits_clip(config) -> bool:
  w = config.encoders.weights
  return int(config.clip_fit.train.steps) > 0 and not any(w[p] for p in clip_train.PARTS)


def _use_stage_outputs(config, workdir: str) -> None:
  """Points config.encoders.weights at the stages' outputs in `workdir` (stage 0's CLIP pair,
  stage 1's caption decoder), leaving any part the config names itself."""
  w = config.encoders.weights
  if _fits_clip(config):
    for part in clip_train.parts(config):
      w[part] = os.path.join(workdir, "clip", clip_train.ENCODERS_DIR, part)
  if not w.captioner:
    w.captioner = os.path.join(workdir, "captioner")


def make_data(config, workdir: str) -> dict | None:
  """Builds config.demo.set under DIR/demo_data (once) and points config.data at it; returns
  the held-out inputs {'prompts', 'images', 'image_names', 'truth'} (the first
  config.sample.num held-out records), or None for your own data (config.demo.set = "")."""
  name = config.demo.set
  if not name:
    return None
  try:
    demo_set = demo_sets.get(name)
  except ValueError:
    raise ConfigError(f"config.demo.set={name!r}; use one of {sorted(demo_sets.SETS)}, or '' "
                      f"for your own config.data.shards and config.data.tokenizer") from None
  paths = demo_set.build_demo(
      os.path.join(workdir, "demo_data"), n_train=int(config.demo.n_train),
      n_heldout=int(config.demo.n_heldout), size=int(config.data.resolution),
      seed=int(config.seed))
  config.data.shards = config.data.shards or ",".join(paths["train_shards"])
  config.data.tokenizer = config.data.tokenizer or paths["tokenizer"]
  if not config.eval.source:  # the held-out loss (training and --mode=eval) reads these
    config.eval.source, config.eval.path = "shards", ",".join(paths["heldout_shards"])
  return read_heldout(demo_set, paths["heldout_shards"], int(config.sample.num))


def read_heldout(demo_set, shard_paths, n: int) -> dict:
  """The first n records of a generated set's shards (n < 0: all of them) as sample inputs,
  with the attributes their captions name."""
  out = {"prompts": [], "images": [], "image_names": [], "truth": []}
  for path in shard_paths:
    for e in shards.iter_entries(path):
      if "files" not in e:
        continue
      ext = next(x for x in shards.IMAGE_EXTS if x in e["files"])
      caption = e["files"]["txt"].decode()
      out["prompts"].append(caption)
      out["images"].append(e["files"][ext])
      out["image_names"].append(f"{e['key']}.{ext}")
      out["truth"].append(demo_set.parse_caption(caption))
      if n >= 0 and len(out["prompts"]) == n:
        return out
  return out


class Judge:
  """A generated set's judge over sample records: t2i pixels against their prompts, i2t
  captions against the attributes of their input images (records name their input index)."""

  def __init__(self, set_name: str, heldout: dict):
    self._set, self._truth = demo_sets.get(set_name), heldout["truth"]

  def score(self, task: str, host: dict, records: list[dict]) -> dict:
    del host  # the records carry their prompts and input indices
    if task == "t2i":
      return demo_sets.score_t2i(self._set, np.stack([r["pixels"] for r in records]),
                                 [r["prompt"] for r in records])
    if task == "i2t":
      # r["item"]: the input's index in the evaluation set (evaluate.py), else its own index.
      return demo_sets.score_i2t(self._set, [r["caption"] for r in records],
                                 [self._truth[r.get("item", r["index"])] for r in records])
    return {}


def _write_flags(config, workdir: str) -> None:
  """DIR/demo.flags: the paths the stages filled in, for later --mode=sample/export runs."""
  weights = config.encoders.weights
  flags = [f"--config.data.shards={config.data.shards}",
           f"--config.data.tokenizer={config.data.tokenizer}"]
  flags += [f"--config.encoders.weights.{part}={weights[part]}"
            for part in (*clip_train.PARTS, "captioner") if weights[part]]
  with open(os.path.join(workdir, "demo.flags"), "w") as f:
    f.write("\n".join(flags) + "\n")


def _fmt_scores(scores) -> str:
  chance = scores.get("chance", {})
  return ", ".join(f"{a} {scores[a]:.2f} (chance {chance[a]:.2f})" for a in chance if a in scores)
