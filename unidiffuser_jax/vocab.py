"""The token-id facts the encoders need, read from the tokenizers (no config sets them by hand).

  config.encoders.clip_text.vocab_size  len(data.tokenizer)
  config.encoders.captioner.vocab_size  len(caption tokenizer), with <|EOS|>
  config.encoders.captioner.eos_id      the caption tokenizer's <|EOS|> id

The caption tokenizer is config.captioner.tokenizer, or data.tokenizer when that is "".
A GPT-2 tokenizer without <|EOS|> (the hub's "gpt2") gets it added right after its base
vocabulary, as the caption decoder expects (transforms.load_tokenizer). Synthetic data
without a tokenizer uses data.synthetic_vocab_size, its last id standing for <|EOS|>.
Weights named in config.encoders.weights must have the same vocabulary: a mismatch stops
with one line, it never resizes anything.
"""
from etils import epath
import orbax.checkpoint as ocp

from data_pipelines import transforms
from unidiffuser_jax.errors import ConfigError

# Where each part's token embedding lives in its params tree (models/clip.py, models/gpt2.py).
_EMBEDDING = {"clip_text": ("token_embedding", "embedding"), "captioner": ("wte", "embedding")}


def derive(config):
  """Fills the three fields above into `config` (mutable) from its tokenizers; returns it."""
  data = config.data
  synthetic = data.source == "synthetic" and not data.tokenizer
  if synthetic:
    text_vocab = cap_vocab = int(data.synthetic_vocab_size)
    eos = cap_vocab - 1
  else:
    text_vocab = len(_load(data.tokenizer, "config.data.tokenizer"))
    cap_spec = config.captioner.tokenizer or data.tokenizer
    flag = "config.captioner.tokenizer" if config.captioner.tokenizer else "config.data.tokenizer"
    cap_tok = _caption_tokenizer(cap_spec, flag)
    cap_vocab, eos = len(cap_tok), cap_tok.convert_tokens_to_ids(transforms.EOS_TOKEN)
  config.encoders.clip_text.vocab_size = text_vocab
  config.encoders.captioner.vocab_size = cap_vocab
  config.encoders.captioner.eos_id = eos
  for part, vocab in (("clip_text", text_vocab), ("captioner", cap_vocab)):
    check_weights(part, config.encoders.weights[part], vocab)
  return config


def check_weights(part: str, path: str, vocab: int) -> None:
  """Stops when the params at `path` (config.encoders.weights.<part>) hold another vocabulary."""
  if not path:
    return
  rows = embedding_rows(path, part)
  if rows is not None and rows != vocab:
    raise ConfigError(
        f"config.encoders.weights.{part}={path} has a {rows}-token vocabulary but its tokenizer "
        f"has {vocab}; use the tokenizer these weights were trained with")


def embedding_rows(path: str, part: str) -> int | None:
  """Rows of the token embedding in a params dir (metadata only), or None if not found."""
  p = epath.Path(path)
  if (p / "checkpoints").exists():   # a workdir: its newest step's EMA params
    steps = sorted(int(s.name) for s in (p / "checkpoints").iterdir() if s.name.isdigit())
    if not steps:
      return None
    p = p / "checkpoints" / str(steps[-1]) / "state"
  if not p.exists():
    raise ConfigError(f"config.encoders.weights.{part}={path} does not exist")
  meta = ocp.StandardCheckpointer().metadata(p.resolve())
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if isinstance(tree, dict) and "ema_params" in tree:
    tree = tree["ema_params"]
  for names, leaf in _leaves(tree):
    if tuple(names[-2:]) == _EMBEDDING[part]:
      return int(leaf.shape[0])
  return None


def _leaves(tree, names=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, names + (str(k),))
  elif hasattr(tree, "shape"):
    yield names, tree


def _load(spec: str, flag: str):
  if not spec:
    raise ConfigError(f"{flag} is empty: the encoders' vocabulary comes from a tokenizer; give "
                      f"its directory")
  try:
    return transforms.load_tokenizer(spec)
  except (ValueError, OSError) as e:
    raise ConfigError(f"{flag}: {e}") from None


def _caption_tokenizer(spec: str, flag: str):
  tok = _load(spec, flag)
  if transforms.EOS_TOKEN in tok.get_vocab():   # the loader adds it to a GPT-2 tokenizer
    return tok
  raise ConfigError(f"{flag}={spec} has no {transforms.EOS_TOKEN} token, which the caption "
                    f"decoder needs; build one with python -m data_pipelines.make_tokenizer, or "
                    f"set config.captioner.tokenizer")
