"""Third demo set, of real images: handwritten digits, and their judge.

Nobody here drew these: they are the 1,797 handwritten digits (8x8 grey, 0-16 ink, 43
writers; the UCI "optical recognition of handwritten digits" test set) that scikit-learn ships
as `sklearn.datasets.load_digits`, so the set exists offline. Each image is shown as a user's
scan would be, dark ink on white paper, resized to `size` px (bilinear) in RGB; captions name
the digit in several phrasings ("a handwritten seven", "the digit seven", ...). One attribute,
digit (chance 1/10); a set of another kind than the generated shapes and glyphs, for checking
that the demo recipe learns real images ("your own images" in README).

Splits: one seeded permutation of the 1,797 images; the first n_heldout are held out and the
train split takes the next n_train (at most the rest: no held-out image is ever trained on).

Judge: t2i images by k-nearest neighbours (k = 5, cosine similarity of
mean-centred grey images) among the 1,597 images outside the seed-0 permutation's first 200
at the image's size; i2t captions
by the first digit word. Nothing is fitted to model outputs; on the held-out real images the
judge is right for about 97% (test_handwriting_data).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import demo_data, make_tokenizer

ATTRIBUTES = ('digit',)
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
CHANCE = {'digit': 1 / len(DIGITS), 'all': 1 / len(DIGITS)}
_TEMPLATES = (
    'a handwritten {d}',
    'the digit {d}',
    'a drawing of the number {d}',
    'the number {d} written by hand',
    'handwritten digit {d}',
    'a scan of a handwritten {d}',
)
_K = 5
_JUDGE_HELDOUT = 200


def words() -> list[str]:
  out: list[str] = list(DIGITS)
  for t in _TEMPLATES:
    out += [w for w in t.replace('{d}', '').split() if w]
  return sorted(set(out))


def caption_for(digit: int, rng: np.random.Generator) -> str:
  return _TEMPLATES[rng.integers(len(_TEMPLATES))].format(d=DIGITS[digit])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
  """(ink [N, 8, 8] in [0, 1], labels [N]) from scikit-learn's bundled copy (no download)."""
  from sklearn.datasets import load_digits  # local: only this set needs scikit-learn
  d = load_digits()
  return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def render(index: int, size: int) -> np.ndarray:
  """Image `index` as dark ink on white paper, uint8 [size, size, 3]."""
  ink, _ = _digits()
  paper = Image.fromarray(np.round((1.0 - ink[index]) * 255).astype(np.uint8))
  return np.asarray(paper.resize((size, size), Image.Resampling.BILINEAR).convert('RGB'))


def split_indices(n_train: int, n_heldout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices into the 1,797 images: disjoint, from one seeded permutation."""
  _, labels = _digits()
  if n_heldout >= len(labels):
    raise ValueError(f'n_heldout={n_heldout}: the set has {len(labels)} images')
  perm = np.random.default_rng([seed, 7]).permutation(len(labels))
  return perm[n_heldout:n_heldout + n_train], perm[:n_heldout]


def _grey_rows(images) -> np.ndarray:
  """Mean-centred, unit-norm grey rows [N, H*W] (the judge's features)."""
  x = np.asarray(images, np.float32)
  if x.ndim == 4:
    x = x[..., :3].mean(-1)
  x = x.reshape(len(x), -1)
  x = x - x.mean(1, keepdims=True)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


@functools.lru_cache(maxsize=4)
def _references(size: int) -> tuple[np.ndarray, np.ndarray]:
  """The judge's neighbours: the 1,597 images outside the first 200 of the seed-0
  permutation (so never a held-out image of a build with seed 0 and n_heldout <= 200)."""
  _, labels = _digits()
  train, _ = split_indices(len(labels), _JUDGE_HELDOUT, 0)
  return _grey_rows([render(i, size) for i in train]), labels[train]


def judge_images(images) -> list[dict[str, Any]]:
  """{digit} for each uint8 [H, W, 3] image: majority of its 5 nearest training images."""
  images = [np.asarray(im) for im in images]
  if not images:
    return []
  refs, labels = _references(images[0].shape[0])
  sims = _grey_rows(images) @ refs.T
  out = []
  for row in sims:
    votes = np.bincount(labels[np.argsort(-row)[:_K]], minlength=len(DIGITS))
    out.append({'digit': DIGITS[int(np.argmax(votes))]})
  return out


def judge_image(img: np.ndarray) -> dict[str, Any]:
  return judge_images([img])[0]


def parse_caption(text: str) -> dict[str, str | None]:
  """The first digit word of a caption (None if there is none)."""
  ws = ''.join(c if c.isalnum() else ' ' for c in text.lower()).split()
  return {'digit': next((w for w in ws if w in DIGITS), None)}


def build_tokenizer(out_dir: str) -> str:
  """Word-level tokenizer covering every caption word (make_tokenizer.build_word_tokenizer)."""
  return make_tokenizer.build_word_tokenizer(words(), out_dir)


def build_demo(out_dir: str, n_train: int = 2000, n_heldout: int = 200,
               size: int = 16, seed: int = 0, shard_size: int = 500) -> dict[str, Any]:
  """Writes the set (idempotent; demo_data.write_set's layout and return value). n_train is
  capped at the images left after the held-out split (1,797 - n_heldout)."""
  train, heldout = split_indices(n_train, n_heldout, seed)
  params = dict(set='handwriting', n_train=len(train), n_heldout=n_heldout, size=size,
                seed=seed, shard_size=shard_size, version=1)
  _, labels = _digits()
  order = {'train': iter(train), 'heldout': iter(heldout)}

  def example(rng, split):
    i = int(next(order[split]))
    d = int(labels[i])
    return {'digit': DIGITS[d], 'source_index': i}, render(i, size), caption_for(d, rng)

  return demo_data.write_set(out_dir, params, build_tokenizer, example, url='handwriting')
