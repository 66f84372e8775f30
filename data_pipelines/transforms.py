"""Per-record transforms: image decoding, crops, CLIP preprocessing, captions, tokens.

Everything here runs on the host in numpy/PIL and is deterministic. The CLIP
image preprocessing and constants here are the only ones in the repo (models/clip.py's
on-device variant uses the same constants); load_tokenizer is the only tokenizer loader.
"""
from __future__ import annotations

import html
import io
import os
import re
import warnings

import ftfy
import numpy as np
from PIL import Image

from data_pipelines import hub_cache

# CLIP's image normalisation (openai/clip, also HF CLIPImageProcessor).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class SkipRecord(Exception):
  """A record that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}' if detail else reason)
    self.reason = reason
    self.detail = detail


# ---------------------------------------------------------------------------
# Images.


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 0
                 ) -> tuple[Image.Image, tuple[int, int]]:
  """Decodes image bytes -> (RGB PIL image, (width, height) from the header).

  The pixel count is checked from the header (Image.open reads only the
  header) BEFORE any pixel is decoded, so decompression bombs cost nothing.
  `min_side` lets JPEG decoding use DCT scaling (draft) down to, but never
  below, that short side.

  Raises SkipRecord('empty_image' | 'image_too_large' | 'corrupt_image').
  """
  if not data:
    raise SkipRecord('empty_image', '0 bytes')
  try:
    with warnings.catch_warnings():
      # PIL's own bomb warning; we check the size ourselves right below.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise SkipRecord('image_too_large', str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    raise SkipRecord('corrupt_image', f'{type(e).__name__}: {e}') from None
  w, h = img.size
  if w <= 0 or h <= 0:
    raise SkipRecord('empty_image', f'size {w}x{h}')
  if w * h > max_pixels:
    raise SkipRecord('image_too_large', f'{w}x{h} > {max_pixels} pixels')
  try:
    if img.format == 'JPEG' and min_side > 0:
      # Keep the short side >= min_side; only the pixels we need get decoded.
      short = min(w, h)
      scale = max(1, short // min_side)
      img.draft('RGB', (max(1, w // scale), max(1, h // scale)))
    img.load()
    return to_rgb(img), (w, h)
  except Exception as e:  # pylint: disable=broad-except  # truncated etc.
    raise SkipRecord('corrupt_image', f'{type(e).__name__}: {e}') from None


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB; transparent pixels are composited over white (not black)."""
  if img.mode == 'RGB':
    return img
  if img.mode in ('RGBA', 'LA', 'PA') or (
      img.mode == 'P' and 'transparency' in img.info):
    rgba = img.convert('RGBA')
    bg = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert('RGB')
  return img.convert('RGB')


def center_square(img: Image.Image) -> Image.Image:
  w, h = img.size
  s = min(w, h)
  left, top = (w - s) // 2, (h - s) // 2
  return img.crop((left, top, left + s, top + s))


def image_to_array(img: Image.Image, resolution: int) -> np.ndarray:
  """Centre square crop, LANCZOS resize -> float32 [res, res, 3] in [-1, 1]."""
  sq = center_square(img)
  if sq.size != (resolution, resolution):
    sq = sq.resize((resolution, resolution), Image.Resampling.LANCZOS)
  x = np.asarray(sq, np.float32)
  return x / 127.5 - 1.0


def clip_image(img: Image.Image, size: int) -> np.ndarray:
  """CLIP input for one RGB image -> float32 [size, size, 3].

  The host CLIP preprocessing (training, extraction and sampling all use it):
  as transformers' CLIPImageProcessor (PIL backend), bicubic resize of the
  short side to `size` (long side int(size * long / short)), centre crop
  size x size, /255, CLIP_MEAN / CLIP_STD; channels last.
  """
  w, h = img.size
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  if (nw, nh) != (w, h):
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  img = img.crop((left, top, left + size, top + size))
  x = np.asarray(img, np.float32) / 255.0
  return (x - CLIP_MEAN) / CLIP_STD


def clip_preprocess_np(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 [B, H, W, 3] -> float32 [B, size, size, 3]: clip_image of each image."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f'expected uint8 images [B, H, W, 3], got {images.dtype} '
                     f'{images.shape}')
  out = np.empty((images.shape[0], size, size, 3), np.float32)
  for i, im in enumerate(images):
    out[i] = clip_image(Image.fromarray(im), size)
  return out


# ---------------------------------------------------------------------------
# Captions.

_URL = re.compile(r'(?:\b(?:https?|ftp)://|\bwww\.)\S+', re.I)
_BARE_DOMAIN = re.compile(
    r'\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|io|co|uk|de|ru|jp|cn|fr|'
    r'info|biz)(?:/\S*)?\b', re.I)
_EMAIL = re.compile(r'\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b')
_TAG = re.compile(r'<[^<>]*>')
_BRACKETS = (re.compile(r'\([^()]*\)'), re.compile(r'\[[^\[\]]*\]'),
             re.compile(r'\{[^{}]*\}'))
_QUOTE_CHARS = '"\'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u00ab\u00bb\u2039\u203a'
_POSSESSIVE = re.compile(r"(\w)['\u2019]s\b")
_SYMBOLS = re.compile(r"[^\w\s,.?!\x00]|_")
_SPACES = re.compile(r'\s+')
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.?!])')


def clean_caption(text: str) -> str:
  """Caption cleaning as the UniDiffuser paper describes.

  Drops URLs, e-mail addresses, HTML tags (after unescaping entities),
  bracketed content ((), [], {}), quote characters except in the possessive
  's, and every symbol other than , . ? ! ; then collapses white space.
  """
  t = html.unescape(text)
  t = _TAG.sub(' ', t)
  t = _EMAIL.sub(' ', t)  # before URLs: 'a@b.com' is not a domain
  t = _URL.sub(' ', t)
  t = _BARE_DOMAIN.sub(' ', t)
  for pat in _BRACKETS:
    prev = None
    while prev != t:  # nested brackets, innermost first
      prev, t = t, pat.sub(' ', t)
  t = _POSSESSIVE.sub('\\1\x00s', t)  # protect 's
  t = t.translate({ord(c): ' ' for c in _QUOTE_CHARS})
  t = _SYMBOLS.sub(' ', t)
  t = t.replace('\x00', "'")
  t = _SPACES.sub(' ', t).strip()
  return _SPACE_BEFORE_PUNCT.sub('\\1', t)


# ---------------------------------------------------------------------------
# Tokens.


# The caption decoder's end marker: GPT-2's vocabulary plus this one token.
EOS_TOKEN = '<|EOS|>'
_TOKENIZER_FILES = (('vocab.json', 'merges.txt'), ('tokenizer.json',))


def _has_tokenizer_files(directory: str) -> bool:
  return any(all(os.path.isfile(os.path.join(directory, f)) for f in files)
             for files in _TOKENIZER_FILES)


def tokenizer_dir(spec: str) -> str:
  """The local folder with the tokenizer files of a directory or a hub id.

  A hub id is looked up in the local hub cache only (hub_cache.snapshot_dirs);
  in either, a `tokenizer/` subfolder (diffusers pipelines) is accepted too.
  """
  if not spec:
    raise ValueError('the tokenizer is empty: give a tokenizer directory')
  roots = [spec] if os.path.isdir(spec) else hub_cache.snapshot_dirs(spec)
  for root in roots:
    for d in (root, os.path.join(root, 'tokenizer')):
      if os.path.isdir(d) and _has_tokenizer_files(d):
        return d
  hint = (' For CLIP\'s tokenizer without a hub, --mode=import --config.weights.'
          'clip_tokenizer=bpe_simple_vocab_16e6.txt.gz writes a directory.'
          if 'clip' in spec.lower() else '')
  where = (f'the directory {spec} has no vocab.json + merges.txt or tokenizer.json'
           if os.path.isdir(spec) else
           f'{spec!r} is neither a local directory nor in the local hub cache '
           f'({hub_cache.repo_dir(spec)})')
  raise ValueError(f'tokenizer: {where}; nothing is downloaded.{hint}')


def load_tokenizer(spec: str):
  """The one tokenizer loader: a local directory, or a hub id from the local cache.

  AutoTokenizer on tokenizer_dir(spec), never downloading. A CLIP tokenizer
  without a pad token pads with its end token (as CLIP does); a GPT-2
  tokenizer without EOS_TOKEN gets it as the id right after its base
  vocabulary (50257 for `gpt2`), the row the caption decoder adds.
  """
  from transformers import AutoTokenizer  # local: imports torch (and transformers, ~2 s)
  tok = AutoTokenizer.from_pretrained(tokenizer_dir(spec), local_files_only=True)
  if _is_clip(tok) and tok.pad_token is None:
    tok.pad_token = tok.eos_token
  if _is_gpt2(tok) and EOS_TOKEN not in tok.get_vocab():
    base = tok.vocab_size  # the BPE vocabulary without added tokens
    tok.add_special_tokens({'pad_token': EOS_TOKEN})
    if tok.convert_tokens_to_ids(EOS_TOKEN) != base:
      raise ValueError(
          f'tokenizer {spec!r}: {EOS_TOKEN} would get id '
          f'{tok.convert_tokens_to_ids(EOS_TOKEN)}, but the caption decoder needs it '
          f'right after the {base}-token base vocabulary; other added tokens come first')
  return tok


def clip_text_clean(text: str) -> str:
  """What CLIP's tokenizer does to a text before BPE (OpenAI CLIP, open_clip's default
  `clean='lower'`): ftfy.fix_text, HTML entities unescaped twice, whitespace runs made one
  space, trimmed, lower-cased."""
  text = html.unescape(html.unescape(ftfy.fix_text(text)))
  return ' '.join(text.split()).lower()


def _is_clip(tokenizer) -> bool:
  from transformers import CLIPTokenizer  # local: transformers takes ~2 s to import
  return isinstance(tokenizer, CLIPTokenizer)


def _is_gpt2(tokenizer) -> bool:
  from transformers import GPT2Tokenizer  # local: transformers takes ~2 s to import
  return isinstance(tokenizer, GPT2Tokenizer)


def tokenize(tokenizer, texts, max_length: int) -> np.ndarray:
  """Token ids int32 [n, max_length], padded/truncated to max_length.

  A CLIP tokenizer (transformers' CLIPTokenizer: the hub's or the directory that
  `--mode=import --config.weights.clip_tokenizer=...` writes) gets the texts after
  clip_text_clean. The ids are then open_clip.tokenize's (<|startoftext|> ... <|endoftext|>;
  a long text keeps its first max_length - 2 tokens and still ends with <|endoftext|>), except
  that the padding is <|endoftext|> (49407), as in the Hugging Face tokenizer the released
  UniDiffuser was trained with, where open_clip pads with 0; and text spelling a special token
  ('<|endoftext|>') is that token, as in OpenAI CLIP and transformers (open_clip renamed its
  specials, so there it is plain text).
  """
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if _is_clip(tokenizer):
    texts = [clip_text_clean(t) for t in texts]
  ids = tokenizer(texts, padding='max_length', truncation=True,
                  max_length=max_length)['input_ids']
  return np.asarray(ids, np.int32).reshape(len(texts), max_length)
