"""Fuzz: shards with hundreds of planted bad records of every kind.

The run must finish, the per-reason skip counts must equal what was planted,
and every good record must come out exactly once.
"""
import collections
import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import common
from data_pipelines import check
from data_pipelines import iterators
from data_pipelines import make_shards
from data_pipelines import records
from data_pipelines import shards as shards_lib
from data_pipelines.filters import SKIP_REASONS


def _png(rng, h=24, w=24):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buf, 'PNG')
  return buf.getvalue()


def _bomb_png(width, height):
  """A PNG whose header claims width x height; the pixel data is tiny."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))


GOOD_META = {'width': 300, 'height': 300, 'pwatermark': 0.1, 'punsafe': 0.01,
             'aesthetic': 6.0}


def _record(kind, key, rng):
  """Members [(name, bytes)] for one record of the given kind."""
  img, cap, meta = _png(rng), b'a nice photo of a cat', dict(GOOD_META)
  members = {'png': img, 'txt': cap, 'json': None}
  if kind == 'corrupt_image':
    members['png'] = (rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
                      if rng.random() < 0.5 else img[:len(img) // 2])
  elif kind == 'empty_image':
    members['png'] = b''
  elif kind == 'image_too_large':
    members['png'] = _bomb_png(*((30000, 30000) if rng.random() < 0.5
                                 else (10000, 9000)))
  elif kind == 'no_caption':
    r = rng.random()
    if r < 0.34:
      del members['txt']
    else:
      members['txt'] = b'' if r < 0.67 else b'  \n\t '
  elif kind == 'bad_utf8':
    members['txt'] = b'caption \xff\xfe\xc3( broken'
  elif kind == 'bad_metadata':
    members['json'] = b'{"width": 30' if rng.random() < 0.5 else b'[1, 2]'
  elif kind == 'no_image':
    del members['png']
  elif kind == 'small_image':
    meta.update(width=100, height=400)
  elif kind == 'aspect_ratio':
    meta.update(width=2000, height=300)
  elif kind == 'watermark':
    meta['pwatermark'] = 0.93
  elif kind == 'unsafe':
    meta['punsafe'] = 0.8
  elif kind == 'aesthetic':
    meta['aesthetic'] = 3.5
  elif kind == 'caption_short':
    members['txt'] = b'(only brackets) ab http://x.org/y'
  elif kind == 'caption_long':
    members['txt'] = ('word ' * 80).encode()
  else:
    assert kind == 'good', kind
  if members['json'] is None:
    members['json'] = json.dumps(meta).encode()
  return [(f'{key}.{ext}', data) for ext, data in members.items()]


RECORD_KINDS = [r for r in SKIP_REASONS if r not in ('bad_shard',
                                                    'truncated_shard')]


def _cfg(shards):
  return common.data(
      shards=shards, tokenizer='', resolution=8, clip_resolution=8, with_text=True,
      drop_remainder=False, shuffle_buffer=16, interleave_cycle=3, num_workers=0, prefetch=2,
      min_side=256, max_aspect=3.0, max_watermark=0.5, max_unsafe=0.5, min_aesthetic=5.0,
      min_caption_chars=3, max_caption_chars=200, max_image_pixels=64_000_000)


@pytest.fixture(scope='module')
def fuzz(tmp_path_factory):
  root = tmp_path_factory.mktemp('fuzz')
  rng = np.random.default_rng(1234)
  planted = collections.Counter()
  good = set()
  paths = []
  for s in range(4):
    members = []
    for i in range(110):
      key = f'{s:05d}{i:04d}'
      kind = ('good' if rng.random() < 0.4 else
              RECORD_KINDS[rng.integers(len(RECORD_KINDS))])
      members += _record(kind, key, rng)
      if kind == 'good':
        good.add(key)
      else:
        planted[kind] += 1
    path = str(root / f'{s:05d}.tar')
    make_shards.write_tar(path, members)
    paths.append(path)
  # A shard cut in the middle of record 6's image: records 0..5 survive,
  # record 6 is counted as truncated, what followed is gone from the file.
  members = []
  for i in range(10):
    members += _record('good', f'00004{i:04d}', rng)
  path = str(root / '00004.tar')
  make_shards.write_tar(path, members)
  data = open(path, 'rb').read()
  cut = data.index(b'000040006.png') + 512 + 40  # inside the PNG bytes
  with open(path, 'wb') as f:
    f.write(data[:cut])
  good.update(f'00004{i:04d}' for i in range(6))
  planted['truncated_shard'] += 1
  paths.append(path)
  # Shards that cannot be read at all.
  with open(root / '00005.tar', 'wb') as f:
    f.write(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
  open(root / '00006.tar', 'wb').close()
  paths += [str(root / '00005.tar'), str(root / '00006.tar'),
            str(root / '00007.tar')]  # the last does not exist
  planted['bad_shard'] += 3
  assert all(planted[k] > 3 for k in RECORD_KINDS)
  return paths, planted, good


@pytest.mark.slow
def test_fuzz_counts_and_no_good_record_lost(fuzz, caplog):
  paths, planted, good = fuzz
  records._warned.clear()
  caplog.set_level(logging.WARNING)
  it = iterators.make_iterator(_cfg(','.join(paths)), global_batch_size=5,
                              process_index=0, process_count=1, seed=0,
                              num_epochs=1)
  keys, skipped = [], np.zeros(len(SKIP_REASONS), np.int64)
  for b in it:
    skipped += b['skipped']
    if 'image' in b:  # the last batch may hold only trailing skip counts
      keys += b['key'].tolist()
      assert np.isfinite(b['image']).all()
  it.close()
  assert len(keys) == len(set(keys)) and set(keys) == good
  got = {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n}
  assert got == dict(planted)
  # Skips are logged with shard and key.
  msgs = '\n'.join(r.getMessage() for r in caplog.records)
  assert 'corrupt_image' in msgs and '00000.tar' in msgs


def test_check_tool_counts_match(fuzz, capsys):
  paths, planted, good = fuzz
  flags = ['--no-progress', '--min_side', '256', '--max_aspect', '3',
           '--max_watermark', '0.5', '--max_unsafe', '0.5', '--min_aesthetic',
           '5', '--min_caption_chars', '3', '--max_caption_chars', '200',
           '--max_image_pixels', '64000000']
  check.main(paths + flags)
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == (f'records: {len(good)} ok, '
                     f'{sum(planted.values())} skipped')
  for r in SKIP_REASONS:
    assert f'  {r:<16} {planted.get(r, 0)}' in out


def test_truncated_shard_resume_skips_exactly(fuzz):
  """Entries after `start` are the same as those of a full read."""
  paths, _, _ = fuzz
  for p in paths[3:6]:
    full = [(e['key'], e.get('skip')) for e in shards_lib.iter_entries(p)]
    for start in range(len(full) + 1):
      part = [(e['key'], e.get('skip'))
              for e in shards_lib.iter_entries(p, start)]
      assert part == full[start:]


def test_expand_shards(tmp_path):
  for i in range(3):
    (tmp_path / f'{i:05d}.tar').write_bytes(b'')
  (tmp_path / 'x.parquet').write_bytes(b'')
  d = str(tmp_path)
  want = [os.path.join(d, f'{i:05d}.tar') for i in range(3)]
  assert shards_lib.expand_shards(d) == want
  assert shards_lib.expand_shards(f'{d}/*.tar') == want
  assert shards_lib.expand_shards(f'{d}/{{00001..00002}}.tar') == want[1:]
  assert shards_lib.expand_shards(f'{want[2]},{want[0]}') == [want[2], want[0]]
  with pytest.raises(ValueError, match='no shards'):
    shards_lib.expand_shards(f'{d}/*.nothing')
  # A missing file among existing ones is a 'bad_shard' skip later (the fuzz set).
  assert shards_lib.expand_shards(f'{want[0]},{d}/gone.tar') == [want[0], f'{d}/gone.tar']


@pytest.mark.parametrize('spec', ['missing_dir', 'missing_dir/*.tar',
                                  'missing_dir/{00000..00002}.tar', 'a.tar,b.tar'])
def test_missing_shards_fail_at_once_with_one_line(tmp_path, spec):
  """Shards that all do not exist used to make an endless reader count 'bad_shard'
  skips forever; now building the iterator stops with one line naming the spec."""
  spec = ','.join(str(tmp_path / s) for s in spec.split(','))
  with pytest.raises(ValueError, match='no shards') as e:
    shards_lib.expand_shards(spec)
  assert '\n' not in str(e.value) and repr(spec) in str(e.value)
  with pytest.raises(ValueError, match='no shards'):  # raises before any batch is read
    iterators.make_iterator(_cfg(spec), global_batch_size=2, process_index=0,
                            process_count=1, seed=0)


@pytest.mark.slow
def test_fuzz_counts_survive_resume(fuzz):
  """Skip counts summed before a checkpoint and after restoring it add up."""
  paths, planted, good = fuzz
  mk = lambda: iterators.make_iterator(_cfg(','.join(paths)),
                                      global_batch_size=6, process_index=0,
                                      process_count=1, seed=9, num_epochs=1)
  it = mk()
  skipped = np.zeros(len(SKIP_REASONS), np.int64)
  keys = []
  for _ in range(10):
    b = next(it)
    skipped += b['skipped']
    keys += b['key'].tolist()
  state = it.get_state()
  it.close()
  it = mk()
  it.set_state(state)
  for b in it:
    skipped += b['skipped']
    keys += b.get('key', np.array([])).tolist()
  it.close()
  assert sorted(keys) == sorted(good)
  assert {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n} == planted


def test_every_cut_point(tmp_path):
  """A shard cut at any byte: no exception, a prefix of the records survives,
  at most one entry is counted as truncated, and resuming at any entry index
  gives the tail of the full read."""
  rng = np.random.default_rng(7)
  members = []
  for i in range(4):
    members += _record('good', f'k{i}', rng)
  path = str(tmp_path / 'full.tar')
  make_shards.write_tar(path, members)
  data = open(path, 'rb').read()
  full_keys = [f'k{i}' for i in range(4)]
  cut_path = str(tmp_path / 'cut.tar')
  for cut in list(range(0, len(data), 131)) + [len(data) - 1024]:
    with open(cut_path, 'wb') as f:
      f.write(data[:cut])
    entries = [(e['key'], e.get('skip'))
               for e in shards_lib.iter_entries(cut_path)]
    good = [k for k, s in entries if s is None]
    skips = [s for _, s in entries if s is not None]
    assert good == full_keys[:len(good)], cut
    assert len(skips) <= 1 and len(entries) <= 4, (cut, entries)
    if cut < 512:
      assert skips == ['bad_shard'], cut
    for start in range(len(entries) + 1):
      assert [(e['key'], e.get('skip')) for e in
              shards_lib.iter_entries(cut_path, start)] == entries[start:]
