"""Offline demo data set: one coloured shape on a light background, and its judge.

Each image (size x size RGB, default 32) shows one shape of a colour in
{red, green, blue, yellow}, a shape in {circle, square, triangle}, placed at
{left, right, top, bottom} with a little jitter in size and position, on a
plain light background. Captions name the three attributes in a few phrasings
("a red circle on the left", "there is a blue square at the top", ...).

`build_demo(out_dir, ...)` writes train and held-out webdataset shards (with
the ShardWriter of make_shards; the attributes are also in each record's
metadata) and a word-level tokenizer directory. `judge_image` recovers the
attributes from pixels and `parse_caption` from text, so samples from a model
trained on the demo can be scored (demo_sets.score_t2i / score_i2t: per-attribute
accuracy next to CHANCE, 1/4, 1/3, 1/4).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import make_shards, make_tokenizer

COLOURS = {
    'red': (215, 40, 40),
    'green': (40, 160, 60),
    'blue': (40, 70, 215),
    'yellow': (225, 190, 20),
}
SHAPES = ('circle', 'square', 'triangle')
POSITIONS = ('left', 'right', 'top', 'bottom')
ATTRIBUTES = ('colour', 'shape', 'position')  # what the judge scores
BACKGROUND = (238, 236, 230)
CHANCE = {'colour': 1 / len(COLOURS), 'shape': 1 / len(SHAPES),
          'position': 1 / len(POSITIONS)}
CHANCE['all'] = CHANCE['colour'] * CHANCE['shape'] * CHANCE['position']

_POSITION_PHRASES = {
    'left': ('on the left', 'at the left', 'on the left side'),
    'right': ('on the right', 'at the right', 'on the right side'),
    'top': ('at the top', 'on the top', 'near the top'),
    'bottom': ('at the bottom', 'on the bottom', 'near the bottom'),
}
_TEMPLATES = ('a {c} {s} {p}', '{c} {s} {p}', 'there is a {c} {s} {p}',
              'a picture of a {c} {s} {p}')
# Centre of the shape as a fraction of the side, per position.
_CENTRES = {'left': (0.27, 0.5), 'right': (0.73, 0.5), 'top': (0.5, 0.27),
            'bottom': (0.5, 0.73)}
_SUPERSAMPLE = 4
# Shape radius as a fraction of the side: large enough that the shape is ~1/5 of the
# pixels (at 0.17 it was ~1/11, and a small model learned the text<->image link
# far more slowly: the MSE objective weighs the attribute-bearing pixels by area).
_RADIUS = 0.24
TOKENIZER_SPECIALS = ('<|endoftext|>', '<|EOS|>', '[UNK]')


def demo_words() -> list[str]:
  words = set()
  for t in _TEMPLATES:
    words.update(w for w in t.split() if not w.startswith('{'))
  for ps in _POSITION_PHRASES.values():
    for p in ps:
      words.update(p.split())
  words.update(COLOURS)
  words.update(SHAPES)
  return sorted(words) + [',', '.', '!', '?']


def caption_for(colour: str, shape: str, position: str,
                rng: np.random.Generator | None = None) -> str:
  if rng is None:
    return f'a {colour} {shape} {_POSITION_PHRASES[position][0]}'
  t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  p = _POSITION_PHRASES[position][rng.integers(3)]
  return t.format(c=colour, s=shape, p=p)


def render(colour: str, shape: str, position: str, size: int = 32,
           rng: np.random.Generator | None = None, fill=None) -> np.ndarray:
  """uint8 [size, size, 3] image of one shape (antialiased by supersampling); `fill`: an RGB
  for a colour outside COLOURS."""
  rng = rng if rng is not None else np.random.default_rng(0)
  big = size * _SUPERSAMPLE
  img = Image.new('RGB', (big, big), BACKGROUND)
  d = ImageDraw.Draw(img)
  r = big * _RADIUS * (1 + rng.uniform(-0.1, 0.1))
  cx, cy = _CENTRES[position]
  cx = (cx + rng.uniform(-0.03, 0.03)) * big
  cy = (cy + rng.uniform(-0.03, 0.03)) * big
  fill = COLOURS[colour] if fill is None else tuple(fill)
  if shape == 'circle':
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == 'square':
    h = r * 0.9
    d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
  elif shape == 'triangle':
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return np.asarray(img.resize((size, size), Image.Resampling.BOX), np.uint8)


def sample_attrs(rng: np.random.Generator) -> dict[str, str]:
  return {'colour': list(COLOURS)[rng.integers(len(COLOURS))],
          'shape': SHAPES[rng.integers(len(SHAPES))],
          'position': POSITIONS[rng.integers(len(POSITIONS))]}


# ---------------------------------------------------------------------------
# The judge.


def judge_image(img: np.ndarray, palette: dict | None = None) -> dict[str, Any]:
  """Attributes from pixels: uint8 [H, W, 3] -> {colour, shape, position}.

  Background = median of the border pixels; foreground = pixels whose
  distance from it is more than half the largest distance (a half-covered
  edge pixel counts half the time, keeping areas unbiased). Colour: mean of
  the clearly-foreground pixels -> nearest palette colour. Position: centroid
  offset from the centre, larger axis wins. Shape: coverage-weighted moments
  (see _shape_from_moments). Values are None when no foreground is found. `palette`:
  {name: RGB} to name colours from (default COLOURS).
  """
  x = np.asarray(img)
  if x.dtype != np.uint8:
    x = np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)
  x = x[..., :3].astype(np.float32)
  h, w = x.shape[:2]
  border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
  bg = np.median(border, axis=0)
  dist = np.linalg.norm(x - bg, axis=-1)
  peak = dist.max()
  if peak < 30:  # nothing but background
    return {'colour': None, 'shape': None, 'position': None}
  mask = dist > 0.5 * peak
  core = dist > 0.75 * peak
  mean = x[core].mean(axis=0)
  palette = COLOURS if palette is None else palette
  names = list(palette)
  pal = np.array([palette[n] for n in names], np.float32)
  colour = names[int(np.argmin(np.linalg.norm(pal - mean, axis=-1)))]
  ys, xs = np.nonzero(mask)
  dx = xs.mean() + 0.5 - w / 2
  dy = ys.mean() + 0.5 - h / 2
  if abs(dx) >= abs(dy):
    position = 'left' if dx < 0 else 'right'
  else:
    position = 'top' if dy < 0 else 'bottom'
  shape, feats = _shape_from_moments(x, dist, peak)
  return {'colour': colour, 'shape': shape, 'position': position, **feats}


def _shape_from_moments(x, dist, peak):
  """Shape from coverage-weighted moments (robust to pixel quantisation).

  A triangle's mass is skewed along one axis (|skewness| ~0.57, zero for the
  symmetric shapes). A square's projection is uniform along its axes
  (kurtosis 1.8) but triangular along the diagonals (2.4); a disc's is the
  same in every direction (2.0). So: skewed -> triangle; diagonal minus axis
  kurtosis > 0.22 -> square; else circle.
  """
  h, w = x.shape[:2]
  core = dist[dist > 0.75 * peak]
  cov = np.clip(dist / np.median(core), 0.0, 1.0)
  cov[dist < 0.25 * peak] = 0.0
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  wsum = cov.sum()

  def moments(u):
    m = (cov * u).sum() / wsum
    d = u - m
    var = (cov * d * d).sum() / wsum + 1e-9
    skew = (cov * d ** 3).sum() / wsum / var ** 1.5
    kurt = (cov * d ** 4).sum() / wsum / var ** 2
    return skew, kurt

  sx, kx = moments(xs)
  sy, ky = moments(ys)
  _, kd1 = moments((xs + ys) / np.sqrt(2))
  _, kd2 = moments((xs - ys) / np.sqrt(2))
  skew = max(abs(sx), abs(sy))
  kdiff = (kd1 + kd2) / 2 - (kx + ky) / 2
  if skew > 0.3:
    shape = 'triangle'
  elif kdiff > 0.22:
    shape = 'square'
  else:
    shape = 'circle'
  return shape, {'skew': float(skew), 'kurt_diff': float(kdiff)}


def parse_caption(text: str) -> dict[str, str | None]:
  """The first colour, shape and position word in a caption (None if absent)."""
  words = ''.join(c if c.isalnum() else ' ' for c in text.lower()).split()
  def first(vocab):
    return next((w for w in words if w in vocab), None)
  return {'colour': first(COLOURS), 'shape': first(SHAPES),
          'position': first(POSITIONS)}


# ---------------------------------------------------------------------------
# Tokenizer and build.


def build_tokenizer(out_dir: str) -> str:
  """Word-level tokenizer covering every caption word (make_tokenizer.build_word_tokenizer).
  Load with AutoTokenizer.from_pretrained(out_dir)."""
  return make_tokenizer.build_word_tokenizer(demo_words(), out_dir)


def build_demo(out_dir: str, n_train: int = 2000, n_heldout: int = 200,
               size: int = 32, seed: int = 0, shard_size: int = 500
               ) -> dict[str, Any]:
  """Writes the demo set (idempotent); returns its paths.

  Returns {'train': dir, 'heldout': dir, 'tokenizer': dir, 'train_shards':
  [...], 'heldout_shards': [...], 'heldout_attrs': [...] } where heldout_attrs
  lists the held-out records' {key, caption, colour, shape, position}.
  Skips all work if out_dir/demo.json records the same parameters.
  """
  params = dict(n_train=n_train, n_heldout=n_heldout, size=size, seed=seed,
                shard_size=shard_size, version=2)

  def example(rng, split):  # pylint: disable=unused-argument
    a = sample_attrs(rng)
    img = render(a['colour'], a['shape'], a['position'], size, rng)
    return a, img, caption_for(a['colour'], a['shape'], a['position'], rng)

  return write_set(out_dir, params, build_tokenizer, example, url='demo')


def write_set(out_dir: str, params: dict, build_tok, example, url: str) -> dict[str, Any]:
  """The build every generated set shares (idempotent on `params`): a tokenizer from
  build_tok(dir), train and held-out shards of example(rng, split) -> (attrs, uint8 image,
  caption), the held-out attributes, and a manifest out_dir/demo.json."""
  manifest = os.path.join(out_dir, 'demo.json')
  if os.path.exists(manifest):
    with open(manifest) as f:
      m = json.load(f)
    if m.get('params') == params:
      return m['paths']
  os.makedirs(out_dir, exist_ok=True)
  paths: dict[str, Any] = {
      'train': os.path.join(out_dir, 'train'),
      'heldout': os.path.join(out_dir, 'heldout'),
      'tokenizer': build_tok(os.path.join(out_dir, 'tokenizer')),
  }
  for split, n, split_seed in (('train', params['n_train'], 0),
                               ('heldout', params['n_heldout'], 1)):
    rng = np.random.default_rng([params['seed'], split_seed])
    # Remove shards of an earlier build with other parameters.
    if os.path.isdir(paths[split]):
      for name in os.listdir(paths[split]):
        if name.endswith(('.tar', '.parquet')):
          os.remove(os.path.join(paths[split], name))
    attrs_list = []
    with make_shards.ShardWriter(paths[split], params['shard_size']) as w:
      for _ in range(n):
        a, img, cap = example(rng, split)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, 'PNG')
        key = w.write(buf.getvalue(), 'png', cap,
                      dict(a, width=img.shape[1], height=img.shape[0], url=f'{url}://{split}'))
        attrs_list.append(dict(a, key=key, caption=cap))
    paths[f'{split}_shards'] = w.paths
    if split == 'heldout':
      paths['heldout_attrs'] = attrs_list
  with open(manifest + '.tmp', 'w') as f:
    json.dump({'params': params, 'paths': paths}, f)
  os.replace(manifest + '.tmp', manifest)
  return paths
