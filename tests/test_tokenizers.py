"""transforms.load_tokenizer on CLIP / GPT-2 tokenizers: tiny BPE files written here, loaded
from a directory or a fake hub cache, never downloaded."""
import json
import os

import numpy as np
import pytest

from data_pipelines import transforms


def _byte_chars() -> list[str]:
  """GPT-2 / CLIP's printable stand-in for each of the 256 bytes (its documented mapping)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return [out[b] for b in range(256)]


def _write(directory, vocab: list[str], merges: list[str], tokenizer_class: str):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": tokenizer_class}, f)
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return str(directory)


def _clip_files(directory):
  """CLIP layout: bytes, bytes + '</w>', merged words ending in '</w>', then the two specials."""
  chars = _byte_chars()
  merges = ["c a", "ca t</w>", "d o", "do g</w>"]
  merged = ["ca", "cat</w>", "do", "dog</w>"]
  vocab = chars + [c + "</w>" for c in chars] + merged + ["<|startoftext|>", "<|endoftext|>"]
  return _write(directory, vocab, merges, "CLIPTokenizer"), {t: i for i, t in enumerate(vocab)}


def _gpt2_files(directory):
  """GPT-2 layout: bytes, merges with the 'Ġ' space marker, then <|endoftext|> last."""
  chars = _byte_chars()
  merges = ["Ġ c", "Ġc a", "Ġca t", "c a", "ca t", "Ġ d", "Ġd o", "Ġdo g", "d o", "do g"]
  merged = ["Ġc", "Ġca", "Ġcat", "ca", "cat", "Ġd", "Ġdo", "Ġdog", "do", "dog"]
  vocab = chars + merged + ["<|endoftext|>"]
  return _write(directory, vocab, merges, "GPT2Tokenizer"), {t: i for i, t in enumerate(vocab)}


def test_clip_tokenizer_ids_and_padding(tmp_path):
  path, vocab = _clip_files(tmp_path / "clip")
  tok = transforms.load_tokenizer(path)
  ids = transforms.tokenize(tok, ["A cat", "dog  CAT dog"], 77)
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  want0 = [sot, vocab["a</w>"], vocab["cat</w>"], eot]
  want1 = [sot, vocab["dog</w>"], vocab["cat</w>"], vocab["dog</w>"], eot]
  np.testing.assert_array_equal(ids[0, :4], want0)  # lower-cased, words end in </w>
  np.testing.assert_array_equal(ids[1, :5], want1)
  assert (ids[0, 4:] == eot).all() and (ids[1, 5:] == eot).all()  # padded with <|endoftext|>
  # Truncation keeps 77 tokens and still ends with <|endoftext|>.
  long = transforms.tokenize(tok, "cat " * 200, 77)
  assert long.shape == (1, 77) and long[0, -1] == eot and long[0, 1] == vocab["cat</w>"]
  # An unmerged word falls back to its characters ('x' then 'y</w>').
  xy = transforms.tokenize(tok, "xy", 77)[0, :4]
  np.testing.assert_array_equal(xy, [sot, vocab["x"], vocab["y</w>"], eot])


def test_gpt2_tokenizer_adds_eos_after_base_vocab(tmp_path):
  path, vocab = _gpt2_files(tmp_path / "gpt2")
  tok = transforms.load_tokenizer(path)
  base = len(vocab)
  assert tok.convert_tokens_to_ids(transforms.EOS_TOKEN) == base  # right after <|endoftext|> (50257 for real GPT-2)
  assert len(tok) == base + 1
  ids = tok("cat dog", add_special_tokens=False)["input_ids"]
  assert ids == [vocab["cat"], vocab["Ġdog"]]  # byte-level: the space joins the next word
  both = tok("a dog" + transforms.EOS_TOKEN)["input_ids"]
  assert both[-1] == base and both[:-1] == [vocab["a"], vocab["Ġdog"]]
  assert tok.decode([vocab["cat"], vocab["Ġdog"], base], skip_special_tokens=True) == "cat dog"
  # A directory that already has <|EOS|> (e.g. a saved caption tokenizer) keeps its id.
  tok.save_pretrained(tmp_path / "saved")
  again = transforms.load_tokenizer(str(tmp_path / "saved"))
  assert again.convert_tokens_to_ids(transforms.EOS_TOKEN) == base and len(again) == base + 1


def test_hub_cache_lookup_is_local(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  snap = cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
  _, vocab = _clip_files(snap)
  (cache / "models--openai--clip-vit-large-patch14" / "refs").mkdir()
  (cache / "models--openai--clip-vit-large-patch14" / "refs" / "main").write_text("abc123")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  (cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "old").mkdir()  # not refs/main
  tok = transforms.load_tokenizer("openai/clip-vit-large-patch14")  # found in the cache
  assert transforms.tokenize(tok, "cat", 77)[0, 1] == vocab["cat</w>"]


def test_gpt2_found_under_its_new_hub_name(tmp_path, monkeypatch):
  cache = tmp_path / "hub"
  _, vocab = _gpt2_files(cache / "models--openai-community--gpt2" / "snapshots" / "x")
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  tok = transforms.load_tokenizer("gpt2")
  assert tok.convert_tokens_to_ids(transforms.EOS_TOKEN) == len(vocab)


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="nor in the local hub cache.*nothing is downloaded"):
    transforms.load_tokenizer("gpt2")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(ValueError, match=r"no vocab\.json.*nothing is downloaded"):
    transforms.load_tokenizer(str(tmp_path / "nothing"))
  with pytest.raises(ValueError, match="empty"):
    transforms.load_tokenizer("")
