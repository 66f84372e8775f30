"""The two real tokenizers, from local files only (never downloading), and CLIP's from its BPE file.

* CLIP text tokenizer (``openai/clip-vit-large-patch14`` layout: byte-level BPE
  with ``</w>`` word ends, ``<|startoftext|>`` ... ``<|endoftext|>``, padded with
  ``<|endoftext|>`` to 77 tokens): what the U-ViT's text condition is built from.
  ``write_clip_tokenizer`` makes that directory from the merges file CLIP ships
  (``bpe_simple_vocab_16e6.txt.gz``, also inside the ``open-clip-torch`` wheel),
  so no hub is needed; ``--mode=import --config.weights.clip_tokenizer=FILE``
  runs it. The text cleaning CLIP applies before BPE is
  ``data_pipelines.transforms.clip_text_clean`` (``transforms.tokenize`` applies it).
* GPT-2 tokenizer plus one added special token ``"<|EOS|>"`` for the caption
  decoder; it gets the id right after the base vocabulary (50257 for ``gpt2``),
  the row the caption decoder's embedding adds.

A name is a local directory holding ``vocab.json`` and ``merges.txt`` (or a
``tokenizer.json``), or a hub repo id found in the local Hugging Face cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
"""
import glob
import gzip
import json
import os
import tempfile

from etils import epath

CLIP_TEXT_REPO = "openai/clip-vit-large-patch14"
GPT2_REPO = "gpt2"
EOS_TOKEN = "<|EOS|>"
MAX_LENGTH = 77
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's BPE file holds ~262K merges after a '#version' line; CLIP uses the first
# 49152 - 256 - 2 of them, so that the vocabulary (256 byte symbols, the same with
# '</w>', one token per merge, 2 specials) has 49408 entries.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 2 * 256 + CLIP_NUM_MERGES + 2

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


def read_clip_merges(path: str) -> list[tuple[str, str]]:
  """The BPE merges CLIP's tokenizer uses, from its merges file (gzip or plain text, local or
  remote): the CLIP_NUM_MERGES lines after the '#version' header, each 'left right'."""
  data = epath.Path(path).read_bytes()
  try:
    text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not a readable BPE merges file ({e})") from None
  lines = text.rstrip().split("\n")
  if "#version" not in lines[0]:
    raise ValueError(f"{path} is not a BPE merges file: its first line is {lines[0][:60]!r}, not a "
                     f"'#version' header (CLIP's is bpe_simple_vocab_16e6.txt.gz)")
  body = lines[1:1 + CLIP_NUM_MERGES]
  merges = [tuple(line.split()) for line in body]
  bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
  if len(merges) < CLIP_NUM_MERGES or bad is not None:
    where = f"it has {len(merges)}" if bad is None else f"line {bad + 2} is {body[bad]!r}"
    raise ValueError(f"{path}: CLIP needs {CLIP_NUM_MERGES} merges of two symbols after the "
                     f"header; {where}")
  return merges


def clip_vocab(merges: list[tuple[str, str]]) -> list[str]:
  """CLIP's vocabulary in id order: the 256 byte symbols (GPT-2's byte-to-unicode order), the
  same with '</w>', one token per merge (its two halves joined), <|startoftext|>, <|endoftext|>.

  Raises ValueError if a merge joins a symbol that no earlier entry made (not a BPE merges
  list over this byte alphabet) or a token repeats."""
  # transformers' own byte-to-unicode table: the one its ByteLevel pre-tokenizer uses.
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # heavy; only for the converter
  chars = list(bytes_to_unicode().values())
  vocab = chars + [c + "</w>" for c in chars]
  known = set(vocab)
  for i, (left, right) in enumerate(merges):
    if left not in known or right not in known:
      raise ValueError(f"merge {i + 1} ({left} {right}) joins a symbol no earlier merge made")
    vocab.append(left + right)
    known.add(left + right)
  vocab += [CLIP_SOT, CLIP_EOT]
  if len(known) + 2 != len(vocab):
    raise ValueError(f"the merges make {len(vocab) - len(known) - 2} duplicate tokens")
  return vocab


def write_clip_tokenizer(bpe_path: str, out_dir: str) -> str:
  """CLIP's BPE merges file -> a transformers CLIPTokenizer directory at `out_dir` (local or
  remote): vocab.json, merges.txt, tokenizer.json, tokenizer_config.json (max length 77, pads
  with <|endoftext|>) and special_tokens_map.json. Returns out_dir.

  The vocabulary and ids are the OpenAI/open_clip tokenizer's (49408 tokens; 49406/49407 the
  start/end tokens); transformers' CLIPTokenizer adds NFC, whitespace folding and lower-casing.
  """
  from transformers import CLIPTokenizer  # heavy; only where a tokenizer is built
  merges = read_clip_merges(bpe_path)
  vocab = clip_vocab(merges)
  ids = {t: i for i, t in enumerate(vocab)}
  tok = CLIPTokenizer(vocab=ids, merges=merges, bos_token=CLIP_SOT, eos_token=CLIP_EOT,
                      unk_token=CLIP_EOT, pad_token=CLIP_EOT, model_max_length=MAX_LENGTH)
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes local files only
    for name in tok.save_pretrained(tmp):
      (out / os.path.basename(name)).write_bytes(epath.Path(name).read_bytes())
  merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
  specials = {"bos_token": CLIP_SOT, "eos_token": CLIP_EOT, "unk_token": CLIP_EOT,
              "pad_token": CLIP_EOT}
  for name, text in (("vocab.json", json.dumps(ids, ensure_ascii=False)),
                     ("merges.txt", merges_txt),
                     ("special_tokens_map.json", json.dumps(specials, indent=1))):
    (out / name).write_bytes(text.encode("utf-8"))
  return str(out_dir)


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
