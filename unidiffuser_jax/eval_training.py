"""Evaluation during training: every config.train.eval_every steps, a small fixed evaluation.

train.train wraps a runbook's evaluate(step, state) (or none) with `training_evaluate`; run_loop
calls it every config.train.eval_every steps and at the last step, and logs its scalars to
TensorBoard with `eval_time_s`, the wall time the whole evaluation cost. It scores the EMA
weights (a LoRA run's adapters merged into their base) with:

  held-out loss   heldout.py, when config.eval names a set (source) and "loss" is among
                  config.eval.metrics: 'heldout/loss', 'heldout/loss_t<t>'.
  FID, CLIP score --mode=eval's pieces (evaluate.evaluate_task: the compiled samplers, the
                  sharded metric networks, exact cross-host statistics) on the first
                  config.eval.train_num inputs of the protocol's seeded selection (or of
                  config.sample's prompts/images without a set), at config.sample's guidance
                  scale for each task. Inputs and sample keys are the same at every evaluation,
                  so the curve follows the weights alone. Scalars 'eval/<task>_fid',
                  'eval/<task>_clip_score' (+ BLEU/CIDEr-D of i2t when "captions" is among the
                  metrics and the set has references) and 'eval/<task>_seconds'.

The metric networks run only where their weights are present: FID (t2i) needs the files
config.eval.inception and config.eval.ref_stats, the CLIP score (t2i, i2t) the model
config.eval.clip. What is missing is said in one log line at the start and the evaluation
goes on without it (the held-out loss alone when nothing is there); a statistics file that is
present but unreadable or of the wrong width stops the run at the start (one line).
FID over a few hundred samples is biased upward: compare it along training, not to the paper.
"""
from collections.abc import Callable
import os

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from unidiffuser_jax import errors, eval_data, evaluate, fid, heldout, lora, sample
from unidiffuser_jax.models.inception import POOL_DIM
from unidiffuser_jax.weights import clip as wclip


def metric_networks(config) -> tuple[tuple[str, ...], list[str]]:
  """(the metrics of config.eval.metrics whose networks' weights are present, among "fid" and
  "clip_score"; one reason for each that is asked for but missing)."""
  ecfg = config.eval
  have, missing = [], []
  if "fid" in ecfg.metrics and "t2i" in ecfg.tasks:
    if not ecfg.inception or not os.path.exists(ecfg.inception):
      missing.append(f"FID: no FID Inception weights (config.eval.inception={ecfg.inception!r})")
    elif not ecfg.ref_stats or not os.path.exists(ecfg.ref_stats):
      missing.append(f"FID: no reference statistics (config.eval.ref_stats={ecfg.ref_stats!r})")
    else:
      try:
        fid.load_stats(ecfg.ref_stats, dim=POOL_DIM)
      except fid.StatsFileError as e:
        raise errors.ConfigError(f"config.eval.ref_stats: {e}") from None
      have.append("fid")
  if "clip_score" in ecfg.metrics:
    try:
      if not ecfg.clip:
        raise FileNotFoundError("config.eval.clip is empty")
      wclip.find_model_dir(ecfg.clip)
      have.append("clip_score")
    except FileNotFoundError as e:
      missing.append(f"CLIP score: no CLIP model {ecfg.clip!r} ({str(e).splitlines()[0]})")
  return tuple(have), missing


def _tasks(config, have) -> list[str]:
  """The tasks the metric networks score: t2i for FID or the CLIP score, i2t for the latter."""
  wanted = {"t2i": bool(have), "i2t": "clip_score" in have}
  return [t for t in config.eval.tasks if wanted.get(t)]


class MetricEvaluation:
  """FID / CLIP score of the EMA weights on a small fixed set (module docs). The inputs, the
  sampler's tokenizers and the metric networks are set up here, at the start of training, so
  that a bad setting stops the run before its first step, not at its first evaluation."""

  def __init__(self, config, workdir: str, model, encoders, enc_params, mesh, eval_set,
               have: tuple[str, ...]):
    self._config, self._have = config, have
    self._tasks = _tasks(config, have)
    self._num = int(config.eval.train_num)
    if self._num < 2:
      raise errors.ConfigError(f"config.eval.train_num={self._num}: the training-time FID / "
                               f"CLIP score needs at least 2 samples")
    self._inputs = evaluate.select_inputs(
        config, eval_set, self._num, os.path.join(workdir, "eval", "train_prompts.jsonl"))
    for task in self._tasks:
      key = "prompts" if task == "t2i" else "images"
      if len(self._inputs[key]) < 2:
        raise errors.ConfigError(
            f"config.eval: the training-time {task} evaluation has {len(self._inputs[key])} "
            f"{key}; name a set (config.eval.source) or config.sample.{key}, or leave {task} "
            f"out of config.eval.tasks")
    self._ctx = sample.context(config, mesh, model, encoders, enc_params)
    self._nets = {}
    if "fid" in have:
      self._nets["fid"] = evaluate.InceptionStats(config, mesh)
    if "clip_score" in have:
      self._nets["clip"] = evaluate.ClipScorer(config, mesh)

  def __call__(self, params) -> dict:
    """params: the U-ViT params to sample with (replicated) -> scalars."""
    sampler = dict(self._ctx, params=params)
    scalars = {}
    for task in self._tasks:
      row = evaluate.evaluate_task(task, sample.guidance_scale(self._config.sample, task),
                                   self._config, self._inputs, sampler, self._nets, None)
      scalars.update({f"eval/{task}_{k}": float(v) for k, v in row.items()
                      if isinstance(v, float) and k != "guidance_scale"})
    return scalars


def training_evaluate(config, workdir: str, model, encoders, enc_params, mesh,
                      evaluate_fn: Callable | None) -> Callable | None:
  """run_loop's evaluate(step, state): the held-out loss and the metric networks' scores of
  the EMA weights (module docs), then `evaluate_fn`'s scalars; `evaluate_fn` itself when
  config.train.eval_every is 0 or there is nothing to evaluate."""
  ecfg = config.get("eval")
  if ecfg is None or int(config.train.eval_every) <= 0:
    return evaluate_fn
  loss = "loss" in ecfg.metrics and bool(ecfg.source)
  have, missing = metric_networks(config)
  parts = (["held-out loss"] if loss else []) + (
      [f"{' and '.join(have)} of {int(ecfg.train_num)} samples"] if have else [])
  if (parts or missing) and jax.process_index() == 0:
    print(f"evaluation every {int(config.train.eval_every)} steps: "
          f"{', '.join(parts) or 'nothing of config.eval'}"
          + (f" (not {'; '.join(missing)})" if missing else ""), flush=True)
  if not parts:
    return evaluate_fn
  eval_set = eval_data.load(ecfg)
  metrics = (MetricEvaluation(config, workdir, model, encoders, enc_params, mesh, eval_set, have)
             if have else None)
  replicated = NamedSharding(mesh, P())
  held, cache = {}, {}

  def run(step, state):
    params = lora.eval_params(config, jax.device_put(state.ema_params, replicated), cache)
    scalars = {}
    if loss:
      if "loss" not in held:  # built at the first evaluation: no cost when it never comes
        held["loss"] = heldout.HeldoutLoss(config, model, encoders, enc_params, mesh,
                                           heldout.heldout_batch(config, eval_set))
      scalars.update(held["loss"](params))
    if metrics is not None:
      scalars.update(metrics(params))
    if evaluate_fn is not None:
      scalars.update(evaluate_fn(step, state))
    return scalars

  return run
