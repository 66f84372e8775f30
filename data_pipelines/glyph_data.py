"""Second offline demo set: one coloured digit glyph on a textured tile, and its judge.

A set of another kind than demo_data's shapes, made by another generator
(PIL text rendering), with another caption grammar, for checking that the
demo recipe is not tuned to shapes. Each image (size x size RGB, default 16)
shows one digit 0-9 drawn with Pillow's built-in scalable font (bold-ish
stroke), about 70% of the image high, in a colour from {orange, purple, cyan,
pink}, on a "dark" (navy) or "light" (cream) background with mild smooth
texture and grain. Size, rotation and position are jittered (+-10%, +-10
degrees, +-10% of the side). Captions name the digit (as a word or a numeral),
the colour and the background in several phrasings ("the number seven in
purple on a dark background", "purple 7, dark backdrop", ...).

The public interface is demo_data's, so the demo can swap one module for the
other: ATTRIBUTES, CHANCE, build_demo, build_tokenizer, judge_image, parse_caption
(the attributes here are digit, colour and background: chance 1/10, 1/4, 1/2);
demo_sets.score_t2i / score_i2t score either.

The judge works down to 16 px: background = nearest background colour to the
border median; glyph colour = the palette colour whose line from the
background best explains the clearly-foreground pixels; digit = nearest
neighbours, by normalised correlation of centred coverage maps, among
templates rendered by this generator at the image's size (built once per size
from a fixed seed, deterministic; nothing is fitted to model outputs).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines import demo_data, make_tokenizer

ATTRIBUTES = ('digit', 'colour', 'background')
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
          'eight', 'nine')
COLOURS = {
    'orange': (245, 135, 20),
    'purple': (140, 60, 210),
    'cyan': (20, 200, 215),
    'pink': (240, 80, 160),
}
BACKGROUNDS = {
    'dark': (28, 34, 72),
    'light': (238, 228, 200),
}
CHANCE = {'digit': 1 / len(DIGITS), 'colour': 1 / len(COLOURS),
          'background': 1 / len(BACKGROUNDS)}
CHANCE['all'] = CHANCE['digit'] * CHANCE['colour'] * CHANCE['background']

# {d}: the digit as a word or a numeral; {c}: colour; {b}: background word.
# At most 9 words, so a caption fits the demo's 12 tokens with bos/eos.
_TEMPLATES = (
    'the number {d} in {c} on a {b} background',
    '{c} {d}, {b} backdrop',
    'a {b} tile showing the digit {d} painted {c}',
    'digit {d} written in {c} over {b}',
    '{b} card with a {c} {d}',
    'numeral {d}, colour {c}, background {b}',
)
_SUPERSAMPLE = 4
_HEIGHT = 0.70     # glyph height (with its stroke) as a fraction of the side
_STROKE = 0.035    # extra stroke (bold) as a fraction of the side
_JITTER_SCALE = 0.10
_JITTER_DEG = 10.0
_JITTER_SHIFT = 0.10
_TEXTURE_AMP = 10.0   # smooth background texture, +- in 0..255 units
_GRAIN_STD = 3.0      # per-pixel grain of the background
_TEMPLATES_PER_DIGIT = 60
_TEMPLATE_SEED = 20240611
_NEIGHBOURS = 3


def glyph_words() -> list[str]:
  """Every word a caption can contain (the tokenizer's vocabulary)."""
  words = set()
  for t in _TEMPLATES:
    words.update(w.strip(',') for w in t.split() if not w.startswith('{'))
  words.discard('')
  words.update(DIGITS)
  words.update(str(i) for i in range(len(DIGITS)))
  words.update(COLOURS)
  words.update(BACKGROUNDS)
  return sorted(words) + [',', '.', '!', '?']


def caption_for(digit: int, colour: str, background: str,
                rng: np.random.Generator | None = None) -> str:
  """A caption naming the three attributes; the first template if rng is None."""
  if rng is None:
    return _TEMPLATES[0].format(d=DIGITS[digit], c=colour, b=background)
  t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  d = DIGITS[digit] if rng.integers(2) else str(digit)
  return t.format(d=d, c=colour, b=background)


@functools.lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=px)


def _coverage(digit: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """float64 [size, size] fraction of each pixel the jittered glyph covers."""
  big = size * _SUPERSAMPLE
  height = big * _HEIGHT * (1 + rng.uniform(-_JITTER_SCALE, _JITTER_SCALE))
  stroke = max(0, int(round(_STROKE * big)))
  # The stroke adds to the ink on every side: height is the stroked glyph's.
  font = _font(max(4, int(round((height - 2 * stroke) / _digit_height_ratio()))))
  cx = big * (0.5 + rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT))
  cy = big * (0.5 + rng.uniform(-_JITTER_SHIFT, _JITTER_SHIFT))
  angle = rng.uniform(-_JITTER_DEG, _JITTER_DEG)
  mask = Image.new('L', (big, big), 0)
  d = ImageDraw.Draw(mask)
  x0, y0, x1, y1 = d.textbbox((0, 0), str(digit), font=font, anchor='lt',
                              stroke_width=stroke)
  d.text((cx - (x0 + x1) / 2, cy - (y0 + y1) / 2), str(digit), fill=255,
         font=font, anchor='lt', stroke_width=stroke, stroke_fill=255)
  mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, center=(cx, cy))
  m = np.asarray(mask, np.float64) / 255.0
  return m.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


@functools.lru_cache(maxsize=None)
def _digit_height_ratio() -> float:
  """Ink height of a digit per font pixel (the font's digits share a height)."""
  ref = 200
  _, top, _, bottom = _font(ref).getbbox('0', anchor='lt')
  return (bottom - top) / ref


def _texture(background: str, size: int, rng: np.random.Generator
             ) -> np.ndarray:
  """float64 [size, size, 3]: the background colour with smooth texture and grain."""
  grid = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
  smooth = np.asarray(Image.fromarray(grid, 'F').resize(
      (size, size), Image.Resampling.BICUBIC), np.float64)
  tint = rng.uniform(0.7, 1.0, 3)  # a slightly coloured texture
  base = np.asarray(BACKGROUNDS[background], np.float64)
  return (base + _TEXTURE_AMP * smooth[..., None] * tint
          + rng.normal(0, _GRAIN_STD, (size, size, 3)))


def render(digit: int, colour: str, background: str, size: int = 16,
           rng: np.random.Generator | None = None) -> np.ndarray:
  """uint8 [size, size, 3] image of one jittered digit on a textured tile."""
  if digit not in range(len(DIGITS)):
    raise ValueError(f'digit must be 0..9, got {digit!r}')
  if colour not in COLOURS or background not in BACKGROUNDS:
    raise ValueError(f'unknown colour/background {colour!r}/{background!r}')
  rng = rng if rng is not None else np.random.default_rng(0)
  a = _coverage(digit, size, rng)[..., None]
  x = (1 - a) * _texture(background, size, rng) + a * np.asarray(
      COLOURS[colour], np.float64)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def sample_attrs(rng: np.random.Generator) -> dict[str, Any]:
  return {'digit': int(rng.integers(len(DIGITS))),
          'colour': list(COLOURS)[rng.integers(len(COLOURS))],
          'background': list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]}


# ---------------------------------------------------------------------------
# The judge.


def _nearest(table: dict[str, tuple], x: np.ndarray) -> str:
  names = list(table)
  pal = np.array([table[n] for n in names], np.float64)
  return names[int(np.argmin(np.linalg.norm(pal - x, axis=-1)))]


def _centred(a: np.ndarray) -> np.ndarray:
  """A coverage map shifted (bilinear) so its centroid is the map's centre,
  zero-mean and unit-norm (for normalised correlation)."""
  h, w = a.shape
  s = a.sum()
  if s <= 0:
    return np.zeros(h * w)
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  dy = (ys * a).sum() / s - (h - 1) / 2
  dx = (xs * a).sum() / s - (w - 1) / 2
  # Sample a at (y + dy, x + dx), zero outside.
  yy, xx = ys + dy, xs + dx
  y0, x0 = np.floor(yy).astype(int), np.floor(xx).astype(int)
  fy, fx = yy - y0, xx - x0
  pad = np.pad(a, 1)

  def at(y, x):
    return pad[np.clip(y + 1, 0, h + 1), np.clip(x + 1, 0, w + 1)]

  out = ((1 - fy) * (1 - fx) * at(y0, x0) + (1 - fy) * fx * at(y0, x0 + 1)
         + fy * (1 - fx) * at(y0 + 1, x0) + fy * fx * at(y0 + 1, x0 + 1))
  v = out.ravel() - out.mean()
  n = np.linalg.norm(v)
  return v / n if n > 0 else v


def _analyse(x: np.ndarray) -> dict[str, Any]:
  """Background, colour and the centred coverage map of a float [H, W, 3] image."""
  border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
  bg = np.median(border, axis=0)
  background = _nearest(BACKGROUNDS, bg)
  dist = np.linalg.norm(x - bg, axis=-1)
  peak = dist.max()
  # Nothing but background: texture and grain reach ~37, a glyph >140.
  if peak < 60:
    return {'background': background, 'colour': None, 'coverage': None}
  # Clearly-foreground pixels: each palette colour c explains a pixel p as
  # bg + t (c - bg); the colour with the smallest residual over them wins
  # (edge pixels, part glyph and part background, fit the right line too).
  fg = x[dist > 0.6 * peak] - bg
  best, colour = np.inf, None
  for name, c in COLOURS.items():
    u = np.asarray(c, np.float64) - bg
    t = np.clip(fg @ u / (u @ u), 0.0, 1.2)
    err = np.linalg.norm(fg - t[:, None] * u, axis=-1).mean()
    err += 0.5 * np.abs(1 - t).mean() * np.linalg.norm(u)  # favour full coverage
    if err < best:
      best, colour = err, name
  u = np.asarray(COLOURS[colour], np.float64) - bg
  cov = np.clip((x - bg) @ u / (u @ u), 0.0, 1.0)
  return {'background': background, 'colour': colour, 'coverage': cov}


@functools.lru_cache(maxsize=8)
def _digit_templates(h: int) -> tuple[np.ndarray, np.ndarray]:
  """Centred coverage maps of rendered digits at size h: ([N, h*h], labels)."""
  rng = np.random.default_rng([_TEMPLATE_SEED, h])
  feats, labels = [], []
  for _ in range(_TEMPLATES_PER_DIGIT):
    for d in range(len(DIGITS)):
      a = sample_attrs(rng)
      img = render(d, a['colour'], a['background'], h, rng)
      feats.append(_centred(_analyse(img.astype(np.float64))['coverage']))
      labels.append(d)
  return np.stack(feats), np.array(labels)


def judge_image(img: np.ndarray) -> dict[str, Any]:
  """Attributes from pixels: uint8 [S, S, 3] -> {digit, colour, background}.

  digit and colour are None when no glyph stands out from the background;
  'digit_score' is the mean correlation of the nearest templates.
  """
  x = np.asarray(img)
  if x.dtype != np.uint8:
    x = np.clip(np.round(np.asarray(x, np.float32)), 0, 255).astype(np.uint8)
  x = x[..., :3].astype(np.float64)
  h, w = x.shape[:2]
  if h != w:
    raise ValueError(f'judge_image expects a square image, got {h}x{w}')
  r = _analyse(x)
  out = {'digit': None, 'colour': r['colour'], 'background': r['background']}
  if r['coverage'] is None:
    return out
  feats, labels = _digit_templates(h)
  sim = feats @ _centred(r['coverage'])
  top = np.argsort(-sim)[:_NEIGHBOURS]
  votes = np.bincount(labels[top], weights=sim[top], minlength=len(DIGITS))
  out['digit'] = int(np.argmax(votes))
  out['digit_score'] = float(sim[top].mean())
  return out


def parse_caption(text: str) -> dict[str, Any]:
  """The first digit (word or numeral, as an int), colour and background word
  in a caption (None if absent)."""
  words = ''.join(c if c.isalnum() else ' ' for c in text.lower()).split()
  digit_of = {w: i for i, w in enumerate(DIGITS)}
  digit_of.update({str(i): i for i in range(len(DIGITS))})

  def first(vocab):
    return next((w for w in words if w in vocab), None)

  d = first(digit_of)
  return {'digit': None if d is None else digit_of[d],
          'colour': first(COLOURS), 'background': first(BACKGROUNDS)}


# ---------------------------------------------------------------------------
# Tokenizer and build (the layout of demo_data's, with this set's words).


def build_tokenizer(out_dir: str) -> str:
  """Word-level tokenizer covering every caption word (make_tokenizer.build_word_tokenizer).
  Load with AutoTokenizer.from_pretrained(out_dir)."""
  return make_tokenizer.build_word_tokenizer(glyph_words(), out_dir)


def build_demo(out_dir: str, n_train: int = 2000, n_heldout: int = 200,
               size: int = 16, seed: int = 0, shard_size: int = 500
               ) -> dict[str, Any]:
  """Writes the glyph set (idempotent); returns its paths.

  Returns {'train': dir, 'heldout': dir, 'tokenizer': dir, 'train_shards':
  [...], 'heldout_shards': [...], 'heldout_attrs': [...] } where heldout_attrs
  lists the held-out records' {key, caption, digit, colour, background}
  (digit an int; the attributes are also in each record's json metadata).
  Skips all work if out_dir/demo.json records the same parameters (and this
  set: a shapes build in the same directory is rebuilt).
  """
  params = dict(set='glyph', n_train=n_train, n_heldout=n_heldout, size=size,
                seed=seed, shard_size=shard_size, version=1)

  def example(rng, split):  # pylint: disable=unused-argument
    a = sample_attrs(rng)
    img = render(a['digit'], a['colour'], a['background'], size, rng)
    return a, img, caption_for(a['digit'], a['colour'], a['background'], rng)

  return demo_data.write_set(out_dir, params, build_tokenizer, example, url='glyph')
