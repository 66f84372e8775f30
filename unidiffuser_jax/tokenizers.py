"""The two real tokenizers, from local files only (never downloading).

* CLIP text tokenizer (``openai/clip-vit-large-patch14`` layout: byte-level BPE
  with ``</w>`` word ends, ``<|startoftext|>`` ... ``<|endoftext|>``, padded with
  ``<|endoftext|>`` to 77 tokens): what the U-ViT's text condition is built from.
* GPT-2 tokenizer plus one added special token ``"<|EOS|>"`` for the caption
  decoder; it gets the id right after the base vocabulary (50257 for ``gpt2``),
  the row the caption decoder's embedding adds.

A name is a local directory holding ``vocab.json`` and ``merges.txt`` (or a
``tokenizer.json``), or a hub repo id found in the local Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
"""
import glob
import os

import numpy as np

CLIP_TEXT_REPO = "openai/clip-vit-large-patch14"
GPT2_REPO = "gpt2"
EOS_TOKEN = "<|EOS|>"
MAX_LENGTH = 77

# Hub ids that moved (the cache may hold either name).
_HUB_ALIASES = {"gpt2": ("openai-community/gpt2",)}
_FILE_SETS = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def _has_tokenizer_files(directory: str) -> bool:
  return any(all(os.path.isfile(os.path.join(directory, f)) for f in files)
             for files in _FILE_SETS)


def _hub_cache_dir() -> str:
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  if os.environ.get("HF_HOME"):
    return os.path.join(os.environ["HF_HOME"], "hub")
  return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def find_tokenizer_dir(name_or_path: str) -> str:
  """A local directory with tokenizer files for a path or a hub repo id (local cache only).

  For a repo id, the snapshot that refs/main names is preferred, then any other
  snapshot; a ``tokenizer/`` subfolder (diffusers pipelines) is accepted too.
  """
  name_or_path = os.fspath(name_or_path)
  candidates = []
  if os.path.isdir(name_or_path):
    candidates = [name_or_path, os.path.join(name_or_path, "tokenizer")]
  else:
    for repo_id in (name_or_path,) + _HUB_ALIASES.get(name_or_path, ()):
      repo = os.path.join(_hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
      ref = os.path.join(repo, "refs", "main")
      if os.path.isfile(ref):
        with open(ref) as f:
          candidates.append(os.path.join(repo, "snapshots", f.read().strip()))
      candidates += sorted(glob.glob(os.path.join(repo, "snapshots", "*")))
  for c in candidates:
    if os.path.isdir(c) and _has_tokenizer_files(c):
      return c
  where = (f"the directory {name_or_path}" if os.path.isdir(name_or_path) else
           f"the local Hugging Face cache ({_hub_cache_dir()}/models--"
           f"{name_or_path.replace('/', '--')}/snapshots/*)")
  raise FileNotFoundError(
      f"tokenizer {name_or_path!r}: no vocab.json + merges.txt (or tokenizer.json) in {where}. "
      f"Nothing is downloaded: fetch it first (e.g. `huggingface-cli download {name_or_path}`) "
      f"or pass a local directory.")


def clip_tokenizer(name_or_path: str = CLIP_TEXT_REPO, max_length: int = MAX_LENGTH):
  """transformers.CLIPTokenizer from local files; pads with <|endoftext|> to `max_length`."""
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer.from_pretrained(find_tokenizer_dir(name_or_path), local_files_only=True)
  tok.model_max_length = max_length
  if tok.pad_token is None:  # a bare vocab.json/merges.txt: CLIP pads with the end token
    tok.pad_token = tok.eos_token
  return tok


def clip_token_ids(tok, texts, max_length: int = MAX_LENGTH) -> np.ndarray:
  """int32 [n, max_length]: <|startoftext|> text <|endoftext|> padding, truncated to fit."""
  if isinstance(texts, str):
    texts = [texts]
  ids = tok(list(texts), padding="max_length", truncation=True, max_length=max_length)["input_ids"]
  return np.asarray(ids, np.int32).reshape(len(texts), max_length)


def gpt2_tokenizer(name_or_path: str = GPT2_REPO):
  """transformers.GPT2Tokenizer from local files with "<|EOS|>" added right after the base
  vocabulary (also set as the pad token), as the caption decoder expects."""
  from transformers import GPT2Tokenizer
  tok = GPT2Tokenizer.from_pretrained(find_tokenizer_dir(name_or_path), local_files_only=True)
  base = tok.vocab_size  # the BPE vocabulary without added tokens
  if EOS_TOKEN not in tok.get_vocab():
    tok.add_special_tokens({"pad_token": EOS_TOKEN})
  elif tok.pad_token is None:
    tok.pad_token = EOS_TOKEN
  got = tok.convert_tokens_to_ids(EOS_TOKEN)
  if got != base:
    raise ValueError(
        f"tokenizer {name_or_path!r}: {EOS_TOKEN} has id {got}, but the caption decoder needs it "
        f"right after the {base}-token base vocabulary (id {base}); other added tokens come first")
  return tok


def eos_id(tok) -> int:
  """The caption decoder's stop token id in `tok`."""
  return int(tok.convert_tokens_to_ids(EOS_TOKEN))
