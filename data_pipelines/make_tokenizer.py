"""A word-level tokenizer from the captions of a set of shards (or from a word list).

  python -m data_pipelines.make_tokenizer --shards DIR[,DIR...] --out TOKDIR [--min-count N]

For small captioned sets trained from scratch (the demo sets, your own folder of
images; see README "Your own images on a CPU"). Ids: '<|endoftext|>' 0 (bos, eos and
pad, as CLIP and GPT-2 use it), '[UNK]' 1, the words by first appearance in sorted
order, then '<|EOS|>' (the caption decoder's end marker). Lower-cases; splits on white
space and punctuation. The jobs read the vocabulary size and the <|EOS|> id from the
saved directory (AutoTokenizer.from_pretrained(TOKDIR)); nothing is set by hand.
"""
from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from data_pipelines import shards as shards_lib
from data_pipelines import transforms

SPECIALS = ("<|endoftext|>", "[UNK]")


def split_words(text: str) -> list[str]:
  """The words the tokenizer sees: its own normaliser and pre-tokenizer."""
  return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def build_word_tokenizer(words: Iterable[str], out_dir: str) -> str:
  """Saves a word-level tokenizer over `words` (in the given order) to out_dir."""
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  for w in words:
    vocab.setdefault(w, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|endoftext|>",
      eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]")
  fast.add_tokens([transforms.EOS_TOKEN], special_tokens=True)
  fast.save_pretrained(out_dir)
  return out_dir


def caption_words(shard_spec: str, min_count: int = 1) -> tuple[list[str], int, int]:
  """(sorted words seen >= min_count times, captions read, longest caption in words)."""
  counts, n, longest = collections.Counter(), 0, 0
  for path in shards_lib.expand_shards(shard_spec):
    for e in shards_lib.iter_entries(path):
      txt = e.get("files", {}).get("txt")
      if txt is None:
        continue
      words = split_words(txt.decode("utf-8", "replace"))
      counts.update(words)
      n, longest = n + 1, max(longest, len(words))
  return sorted(w for w, c in counts.items() if c >= min_count), n, longest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shards", required=True, help="shard files or directories, comma separated")
  p.add_argument("--out", required=True, help="tokenizer directory to write")
  p.add_argument("--min-count", type=int, default=1, help="drop rarer words (they become [UNK])")
  a = p.parse_args(argv)
  try:
    words, n, longest = caption_words(a.shards, a.min_count)
  except ValueError as e:   # no shard matches the spec
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not n:
    print(f"error: no captions found in {a.shards}", file=sys.stderr)
    return 2
  build_word_tokenizer(words, a.out)
  print(f"{a.out}: {len(words) + len(SPECIALS) + 1} tokens from {n} captions; the longest has "
        f"{longest} words, so --config.data.max_length must be >= {longest + 2}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
