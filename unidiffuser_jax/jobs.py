"""The jobs that `--mode` selects. Each is a short runbook over library functions."""
import logging
import os

log = logging.getLogger(__name__)


def run(mode: str, config, workdir: str | None) -> None:
  if mode == "describe":
    from unidiffuser_jax import describe
    print(describe.describe(config), flush=True)
    return
  os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
  config = _unlocked(config)
  if mode == "train":
    train_job(config, workdir)
  elif mode == "train_captioner":
    from unidiffuser_jax import captioner_train
    _prepare_demo(config, workdir)
    captioner_train.train_captioner(config, _captioner_dir(workdir))
  elif mode == "sample":
    from unidiffuser_jax import sample
    _prepare_demo(config, workdir)
    sample.run(config, workdir)
  elif mode == "extract":
    from unidiffuser_jax import extract
    _prepare_demo(config, workdir)
    extract.run(config, workdir)
  elif mode in ("import", "export"):
    from unidiffuser_jax import weight_jobs
    getattr(weight_jobs, f"run_{mode}")(config, workdir)
  else:
    raise ValueError(f"unknown mode {mode!r}")


def train_job(config, workdir: str) -> None:
  """Train the U-ViT; for the demo, first the data and the caption decoder, last the samples."""
  from unidiffuser_jax import train
  _prepare_demo(config, workdir)
  if config.captioner.train_first:
    from unidiffuser_jax import captioner_train
    captioner_train.train_captioner(config, _captioner_dir(workdir))
  evaluate = None
  if config.data.demo and int(config.train.eval_every) > 0:
    from unidiffuser_jax import sample
    evaluate = sample.Evaluator(config, workdir)
  train.train(config, workdir, evaluate=evaluate)
  s = config.sample
  if s.after_train and not (config.data.demo or s.prompts or s.prompt_file or s.images):
    print("no prompts or images to sample from (config.sample.prompts / prompt_file / images): "
          "skipping the final sampling; run --mode=sample with them", flush=True)
  elif s.after_train:
    from unidiffuser_jax import sample
    sample.run(config, workdir)


def _captioner_dir(workdir: str) -> str:
  return os.path.join(workdir, "captioner")


def _prepare_demo(config, workdir: str) -> None:
  """Generates the demo set once (config.data.demo) and points the config at it; then, for
  every config whose caption decoder shares the data tokenizer (captioner.tokenizer = ""),
  reads the vocabulary size and <|EOS|> id from that tokenizer, so nobody sets them by hand."""
  from data_pipelines import demo_sets, transforms
  from unidiffuser_jax.errors import ConfigError
  if config.data.demo:
    try:
      demo_set = demo_sets.get(config.data.demo)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    paths = demo_set.build_demo(
        os.path.join(workdir, "demo_data"), n_train=config.data.demo_train,
        n_heldout=config.data.demo_heldout, size=config.data.resolution, seed=config.seed)
    config.data.shards = config.data.shards or ",".join(paths["train_shards"])
    config.data.tokenizer = config.data.tokenizer or paths["tokenizer"]
    config.data.heldout = ",".join(paths["heldout_shards"])
  if config.data.tokenizer and not config.captioner.tokenizer:
    tok = transforms.load_tokenizer(config.data.tokenizer)
    eos = tok.convert_tokens_to_ids("<|EOS|>")
    if eos is None or eos == tok.unk_token_id:
      raise ConfigError(f"the tokenizer {config.data.tokenizer} has no <|EOS|> token, which the "
                       f"caption decoder needs; build one with python -m data_pipelines.make_tokenizer")
    config.encoders.clip_text.vocab_size = len(tok)
    config.encoders.captioner.vocab_size = len(tok)
    config.encoders.captioner.eos_id = eos
  if config.captioner.train_first and not config.encoders.weights.captioner:
    config.encoders.weights.captioner = _captioner_dir(workdir)


def _unlocked(config):
  """A mutable copy: jobs fill in derived paths (demo data, stage-1 weights)."""
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())  # FieldReferences resolved to values
  return c
