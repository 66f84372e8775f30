"""The jobs that `--mode` selects. Each is a short runbook over library functions.

--mode=train runs config.runbook: "" is the plain U-ViT training job; a name picks a module
whose run(config, workdir) chains several stages (RUNBOOKS; configs/demo.py's "demo":
make data -> caption decoder -> U-ViT -> sample -> judge, in unidiffuser_jax/demo.py).
--mode=eval runs the runbook module's evaluate(config, workdir) when it has one (the demo's
adds its judge), else unidiffuser_jax/evaluate.run.
Every job that builds the encoders first reads their vocabulary sizes and the caption
decoder's end token from the tokenizers (vocab.derive).
"""
import importlib
import logging
import os

import ml_collections

from unidiffuser_jax import captioner_train, describe, evaluate, extract, sample, train, vocab
from unidiffuser_jax import compile as compile_plan
from unidiffuser_jax import profiling, weight_jobs
from unidiffuser_jax.errors import ConfigError

log = logging.getLogger(__name__)

RUNBOOKS = {"demo": "unidiffuser_jax.demo"}   # config.runbook -> module with run(config, workdir)


def run(mode: str, config, workdir: str | None) -> None:
  if mode == "describe":   # the U-ViT only: no tokenizer, no device
    print(describe.describe(config), flush=True)
    return
  os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
  config = _unlocked(config)
  if mode in ("train", "train_captioner", "sample", "compile", "eval"):
    profiling.enable_compilation_cache(str(config.compile.cache_dir), workdir)
  if mode == "train" and config.runbook:
    if config.runbook not in RUNBOOKS:
      raise ConfigError(f"config.runbook={config.runbook!r}; use one of {sorted(RUNBOOKS)} or '' "
                        f"(the U-ViT training job)")
    importlib.import_module(RUNBOOKS[config.runbook]).run(config, workdir)
    return
  if mode == "eval" and config.runbook in RUNBOOKS:
    runbook = importlib.import_module(RUNBOOKS[config.runbook])
    if hasattr(runbook, "evaluate"):
      runbook.evaluate(config, workdir)
      return
  if (mode in ("train", "train_captioner", "sample", "serve", "extract", "export", "eval")
      or _imports_text(config)):
    vocab.derive(config)
  if mode == "train":
    train.train(config, workdir)
  elif mode == "train_captioner":
    captioner_train.train_captioner(config, os.path.join(workdir, "captioner"))
  elif mode == "sample":
    with profiling.trace(workdir, bool(config.sample.profile)):
      sample.run(config, workdir)
  elif mode == "compile":
    compile_plan.run(config, workdir)
  elif mode == "eval":
    evaluate.run(config, workdir)
  elif mode == "extract":
    extract.run(config, workdir)
  elif mode == "serve":
    try:
      from unidiffuser_jax import serve  # local: gradio, an optional extra (requirements-serve.txt)
    except ModuleNotFoundError as e:
      raise ConfigError(f"--mode=serve needs {e.name}: "
                        f"pip install -r requirements-serve.txt") from None
    serve.run(config, workdir)
  elif mode in ("import", "export"):
    getattr(weight_jobs, f"run_{mode}")(config, workdir)
  else:
    raise ValueError(f"unknown mode {mode!r}")


def _imports_text(config) -> bool:
  """An import of the CLIP text encoder or the caption decoder checks their vocabulary."""
  return bool(config.weights.clip_text or config.weights.captioner)


def _unlocked(config):
  """A mutable copy: jobs fill in derived values (vocabulary sizes, a runbook's paths)."""
  c = ml_collections.ConfigDict(config.to_dict())  # FieldReferences resolved to values
  return c
