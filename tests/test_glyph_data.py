"""Glyph demo set: same interface as demo_data, a judge that reads 16 px digits,
captions that parse back, and shards the pipeline reads."""
import inspect
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_pipelines import demo_data, demo_sets, glyph_data as glyph


def test_same_public_interface_as_shapes():
  for name in ('build_demo', 'build_tokenizer', 'parse_caption', 'judge_image'):
    # what demo.py and demo_sets call (demo_data's judge_image also takes an optional palette)
    required = lambda f: [p for p in inspect.signature(f).parameters.values()
                          if p.default is inspect.Parameter.empty]
    assert ([p.name for p in required(getattr(glyph, name))] ==
            [p.name for p in required(getattr(demo_data, name))]), name
  for mod in (glyph, demo_data):
    assert set(mod.CHANCE) == set(mod.ATTRIBUTES) | {'all'}
    assert mod.CHANCE['all'] == pytest.approx(
        np.prod([mod.CHANCE[a] for a in mod.ATTRIBUTES]))
  assert glyph.CHANCE == pytest.approx(
      {'digit': 0.1, 'colour': 0.25, 'background': 0.5, 'all': 0.0125})
  # Another palette than the shapes', every glyph colour far from both backgrounds.
  assert not set(glyph.COLOURS) & set(demo_data.COLOURS)
  for c, b in itertools.product(glyph.COLOURS.values(), glyph.BACKGROUNDS.values()):
    assert np.linalg.norm(np.subtract(c, b)) > 120


def _fresh(size, n, seed):
  rng = np.random.default_rng(seed)
  truth, imgs, prompts = [], [], []
  for _ in range(n):
    a = glyph.sample_attrs(rng)
    imgs.append(glyph.render(a['digit'], a['colour'], a['background'], size, rng))
    prompts.append(glyph.caption_for(a['digit'], a['colour'], a['background'], rng))
    truth.append(a)
  return np.stack(imgs), prompts, truth


@pytest.mark.slow
@pytest.mark.parametrize('size', [16, 32])
def test_judge_on_fresh_renders_and_shuffled_pairs(size):
  imgs, prompts, truth = _fresh(size, 300, seed=7 + size)
  r = demo_sets.score_t2i(glyph, imgs, prompts)
  print(f'\nsize {size}: judge on 300 fresh renders: ' +
        ', '.join(f'{a} {r[a]:.3f}' for a in glyph.ATTRIBUTES + ('all',)))
  assert r['n'] == 300 and r['chance'] == glyph.CHANCE
  for a in glyph.ATTRIBUTES:
    assert r[a] >= 0.95, (a, r[a])
  # Every digit, colour and background occurs, so the scores cover them all.
  for a, values in (('digit', range(10)), ('colour', glyph.COLOURS),
                    ('background', glyph.BACKGROUNDS)):
    assert {t[a] for t in truth} == set(values)
  # Prompts of other images: about chance.
  perm = np.random.default_rng(size).permutation(300)
  s = demo_sets.score_t2i(glyph, imgs, [prompts[i] for i in perm])
  print(f'size {size}: shuffled pairs: ' +
        ', '.join(f'{a} {s[a]:.3f} (chance {glyph.CHANCE[a]:.3f})'
                  for a in glyph.ATTRIBUTES + ('all',)))
  for a in glyph.ATTRIBUTES:
    assert abs(s[a] - glyph.CHANCE[a]) < 0.09, (a, s[a])
  assert s['all'] < 0.05


def test_judge_tolerates_noise_and_blur():
  """Samples from a model are not clean renders: grain and blur on top."""
  imgs, prompts, _ = _fresh(16, 200, seed=99)
  rng = np.random.default_rng(1)
  bad = [np.asarray(Image.fromarray(np.clip(im + rng.normal(0, 10, im.shape), 0, 255)
                                    .astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)))
         for im in imgs]
  r = demo_sets.score_t2i(glyph, np.stack(bad), prompts)
  print('\nsize 16, noise 10 + blur 0.6: ' +
        ', '.join(f'{a} {r[a]:.3f}' for a in glyph.ATTRIBUTES + ('all',)))
  for a in glyph.ATTRIBUTES:
    assert r[a] >= 0.9, (a, r[a])


def test_glyph_geometry_and_texture():
  rng = np.random.default_rng(3)
  heights = []
  for d in range(10):
    a = glyph._coverage(d, 64, rng)  # pylint: disable=protected-access
    rows = np.nonzero(a.max(axis=1) > 0.5)[0]
    heights.append((rows[-1] - rows[0] + 1) / 64)
  assert 0.63 < np.median(heights) < 0.77, heights  # about 70% of the side
  # The background is not one flat colour, yet stays near its palette colour.
  for b in glyph.BACKGROUNDS:
    tex = glyph._texture(b, 32, rng)  # pylint: disable=protected-access
    assert 2 < tex.std(axis=(0, 1)).mean() < 15
    assert np.abs(tex.mean(axis=(0, 1)) - glyph.BACKGROUNDS[b]).max() < 15


def test_judge_blank_tile_and_wrong_answers():
  rng = np.random.default_rng(0)
  blank = np.clip(np.round(glyph._texture('dark', 16, rng)), 0, 255).astype(np.uint8)  # pylint: disable=protected-access
  assert glyph.judge_image(blank) == {'digit': None, 'colour': None,
                                      'background': 'dark'}
  img = glyph.render(7, 'purple', 'light', 16, rng)
  r = demo_sets.score_t2i(glyph, [img, img], ['the number seven in purple on a light background',
                                   'orange 3, dark backdrop'])
  assert (r['digit'], r['colour'], r['background'], r['all']) == (.5, .5, .5, .5)
  with pytest.raises(ValueError, match='square'):
    glyph.judge_image(np.zeros((16, 20, 3), np.uint8))


def test_parse_caption_every_template():
  n = 0
  for t in glyph._TEMPLATES:  # pylint: disable=protected-access
    for d, c, b in itertools.product(range(10), glyph.COLOURS, glyph.BACKGROUNDS):
      for dw in (glyph.DIGITS[d], str(d)):
        cap = t.format(d=dw, c=c, b=b)
        assert glyph.parse_caption(cap) == {'digit': d, 'colour': c, 'background': b}, cap
        assert glyph.parse_caption(cap.upper() + '.')['digit'] == d
        n += 1
  assert n == len(glyph._TEMPLATES) * 160  # pylint: disable=protected-access
  # caption_for uses every template and both digit forms.
  rng = np.random.default_rng(0)
  caps = {glyph.caption_for(4, 'cyan', 'dark', rng) for _ in range(300)}
  assert len(caps) == 2 * len(glyph._TEMPLATES)  # pylint: disable=protected-access
  assert glyph.parse_caption('something else') == {
      'digit': None, 'colour': None, 'background': None}
  truth = [{'digit': 4, 'colour': 'cyan', 'background': 'dark'}] * 2
  r = demo_sets.score_i2t(glyph, ['cyan 4, dark backdrop', 'the number five in cyan on a light background'],
                      truth)
  assert (r['digit'], r['colour'], r['background'], r['all']) == (.5, 1, .5, .5)


def test_tokenizer_covers_every_caption(tmp_path):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(glyph.build_tokenizer(str(tmp_path / 'tok')))
  unk = tok.convert_tokens_to_ids('[UNK]')
  longest = 0
  for t in glyph._TEMPLATES:  # pylint: disable=protected-access
    for dw in glyph.DIGITS + tuple('0123456789'):
      for c, b in itertools.product(glyph.COLOURS, glyph.BACKGROUNDS):
        ids = tok(t.format(d=dw, c=c, b=b), add_special_tokens=False)['input_ids']
        assert unk not in ids, t
        longest = max(longest, len(ids))
  assert longest <= 10  # fits the demo's max_length 12 with bos and eos
  assert tok.convert_tokens_to_ids('<|EOS|>') == len(tok) - 1
