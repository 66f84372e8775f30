"""Transforms: caption cleaning, image crops, CLIP preprocessing, tokens, filters."""
import io
import struct
import time
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common
from data_pipelines import filters
from data_pipelines import transforms


@pytest.mark.parametrize('raw, want', [
    ('A cat  on a mat', 'A cat on a mat'),
    ('Photo by John (c) 2020 [stock] {x}', 'Photo by John 2020'),
    ('nested (a (b) c) brackets', 'nested brackets'),
    ('visit https://example.com/a?b=1 or www.shop.net now', 'visit or now'),
    ('see example.org/page for more', 'see for more'),
    ('mail me: john.doe+x@mail.co.uk!', 'mail me!'),
    ('<b>bold</b> &amp; <a href="x">link</a>', 'bold link'),
    ('the dog\'s "favourite" \'toy\'', "the dog's favourite toy"),
    ('it\u2019s Mary\u2019s hat', "it's Mary's hat"),
    ('price: $5 #sale @home ~ * / |', 'price 5 sale home'),
    ('Hello , world . Why ? Yes !', 'Hello, world. Why? Yes!'),
    ('snake_case & under__score', 'snake case under score'),
    ('Straße in München, 東京', 'Straße in München, 東京'),
    ('  \n\t ', ''),
])
def test_clean_caption(raw, want):
  assert transforms.clean_caption(raw) == want


def test_clip_preprocess_matches_transformers():
  from transformers.models.clip.image_processing_pil_clip import (
      CLIPImageProcessorPil)
  rng = np.random.default_rng(0)
  proc = CLIPImageProcessorPil(size={'shortest_edge': 24},
                               crop_size={'height': 24, 'width': 24})
  for h, w in [(50, 70), (70, 41), (24, 24), (17, 30), (37, 61), (80, 29), (13, 18),
               (25, 24)]:
    x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = proc(images=x, return_tensors='np')['pixel_values']  # [1, 3, S, S]
    ours = transforms.clip_preprocess_np(x[None], 24)
    assert ours.shape == (1, 24, 24, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-5)
    ours1 = transforms.clip_image(Image.fromarray(x), 24)
    np.testing.assert_allclose(ours1, ref[0].transpose(1, 2, 0), atol=1e-5)


def test_image_to_array_centre_crop_and_range():
  # Wide image: left quarter red, middle green, right quarter blue.
  x = np.zeros((40, 80, 3), np.uint8)
  x[:, :20] = (255, 0, 0)
  x[:, 20:60] = (0, 255, 0)
  x[:, 60:] = (0, 0, 255)
  out = transforms.image_to_array(Image.fromarray(x), 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 1], 1.0, atol=1e-6)  # only green kept
  np.testing.assert_allclose(out[..., 0], -1.0, atol=1e-6)
  # Exact values at the resolution itself: no resampling.
  y = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  np.testing.assert_allclose(transforms.image_to_array(Image.fromarray(y), 8),
                             y / 127.5 - 1, atol=1e-6)


def _png_header(w, h):
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  return (b'\x89PNG\r\n\x1a\n' +
          chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) +
          chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))


def test_decode_image_guards():
  t = time.perf_counter()
  for w, h in [(30000, 30000), (9000, 9000)]:
    with pytest.raises(transforms.SkipRecord) as e:
      transforms.decode_image(_png_header(w, h), max_pixels=64_000_000)
    assert e.value.reason == 'image_too_large'
  assert time.perf_counter() - t < 1.0  # nothing was decoded
  for data, reason in [(b'', 'empty_image'), (b'not an image', 'corrupt_image')]:
    with pytest.raises(transforms.SkipRecord) as e:
      transforms.decode_image(data, max_pixels=10**8)
    assert e.value.reason == reason
  # RGBA over white; JPEG draft keeps the short side >= min_side.
  rgba = np.zeros((10, 10, 4), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgba).save(buf, 'PNG')
  img, size = transforms.decode_image(buf.getvalue(), max_pixels=10**6)
  assert size == (10, 10) and np.asarray(img).min() == 255
  buf = io.BytesIO()
  Image.new('RGB', (400, 300), (10, 200, 30)).save(buf, 'JPEG')
  img, size = transforms.decode_image(buf.getvalue(), max_pixels=10**6,
                                      min_side=64)
  assert size == (400, 300) and min(img.size) >= 64 and img.size[0] < 400
  buf.seek(0)
  truncated = buf.getvalue()[:300]
  with pytest.raises(transforms.SkipRecord) as e:
    transforms.decode_image(truncated, max_pixels=10**6)
  assert e.value.reason == 'corrupt_image'


def test_tokenize_with_demo_tokenizer(tmp_path):
  from data_pipelines import demo_data
  tok = transforms.load_tokenizer(
      demo_data.build_tokenizer(str(tmp_path / 'tok')))
  ids = transforms.tokenize(tok, ['A red circle on the left', 'blue ' * 20],
                            max_length=6)
  assert ids.shape == (2, 6) and ids.dtype == np.int32
  vocab = tok.get_vocab()
  want = [vocab[w] for w in ['a', 'red', 'circle', 'on', 'the', 'left']]
  assert ids[0].tolist() == want
  assert (ids[1] == vocab['blue']).all()  # truncated to max_length
  short = transforms.tokenize(tok, 'a square', max_length=5)[0]
  assert short.tolist()[2:] == [tok.pad_token_id] * 3
  assert tok.convert_tokens_to_ids('<|EOS|>') not in (None, tok.unk_token_id)
  with pytest.raises(ValueError, match='neither a local directory'):
    transforms.load_tokenizer(str(tmp_path / 'missing-tokenizer'))


def test_filters_thresholds_and_missing_fields():
  off = common.data(min_side=0, max_aspect=None, max_watermark=None, max_unsafe=None,
                    min_aesthetic=None)
  bad = {'width': 10, 'height': 900, 'pwatermark': 1.0, 'punsafe': 1.0, 'aesthetic': 0.0}
  assert filters.metadata_reason(bad, off) is None  # None (min_side 0) turns a filter off
  cfg = common.data(min_side=512, max_aspect=2.0, max_watermark=0.5, max_unsafe=0.5,
                    min_aesthetic=5.0)
  ok = {'width': 600, 'height': 800, 'pwatermark': 0.4, 'punsafe': 0.1,
        'aesthetic': 5.5}
  assert filters.metadata_reason(ok, cfg) is None
  assert filters.metadata_reason({}, cfg) is None  # absent fields never filter
  for change, reason in [({'height': 500}, 'small_image'),
                         ({'original_width': 100, 'original_height': 900},
                          'small_image'),
                         ({'width': 1700}, 'aspect_ratio'),
                         ({'pwatermark': 0.6}, 'watermark'),
                         ({'punsafe': 0.9}, 'unsafe'),
                         ({'aesthetic': 4.9}, 'aesthetic')]:
    assert filters.metadata_reason(dict(ok, **change), cfg) == reason
  cfg.min_caption_chars = 3
  cfg.max_caption_chars = 10
  assert filters.caption_reason('ab', cfg) == 'caption_short'
  assert filters.caption_reason('abcdefghijk', cfg) == 'caption_long'
  assert filters.caption_reason('abcde', cfg) is None
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert len(set(filters.SKIP_REASONS)) == len(filters.SKIP_REASONS)
