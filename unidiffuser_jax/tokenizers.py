"""CLIP's text tokenizer from its BPE merges file, with no hub.

``write_clip_tokenizer`` turns the merges file CLIP ships (``bpe_simple_vocab_16e6.txt.gz``,
also inside the ``open-clip-torch`` wheel) into a transformers CLIPTokenizer directory with the
``openai/clip-vit-large-patch14`` layout (byte-level BPE with ``</w>`` word ends,
``<|startoftext|>`` ... ``<|endoftext|>``, padded with ``<|endoftext|>`` to 77 tokens): what the
U-ViT's text condition is built from. ``--mode=import --config.weights.clip_tokenizer=FILE``
runs it. Loading any tokenizer (this directory, a hub id in the local cache) is
``data_pipelines.transforms.load_tokenizer``; the text cleaning CLIP applies before BPE is
``transforms.clip_text_clean`` (``transforms.tokenize`` applies it).
"""
import gzip
import json
import os
import tempfile

from etils import epath

MAX_LENGTH = 77
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's BPE file holds ~262K merges after a '#version' line; CLIP uses the first
# 49152 - 256 - 2 of them, so that the vocabulary (256 byte symbols, the same with
# '</w>', one token per merge, 2 specials) has 49408 entries.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 2 * 256 + CLIP_NUM_MERGES + 2


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
  from transformers.convert_slow_tokenizer import bytes_to_unicode  # local: ~2 s import
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
  from transformers import CLIPTokenizer  # local: transformers takes ~2 s to import
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
