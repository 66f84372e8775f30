"""Input pipeline throughput: our grain pipeline vs a plain tarfile + PIL loop.

  python benchmarks/bench_data.py [--n 300] [--src 640x480] [--res 256,512]

Generates JPEG shards (smooth random images of --src size, q=90), then for
each output resolution measures records/s of
  plain      : tarfile iteration, group by key, PIL decode, centre crop,
               LANCZOS resize, [-1, 1] float32 (what a minimal webdataset
               loop does);
  plain+clip : the same plus CLIP preprocessing at 224;
  pipeline   : make_iterator(num_workers=0, prefetch=0): our reader, window
               shuffle, filters, both transforms, batching (no tokenizer).
"per core" = records / CPU seconds of this process (all threads), so it is
comparable between machines with different core counts; "wall" is records
per wall second. For the share of step time spent waiting for data in a
training run, wrap next(data_iter) with pipeline.DataWaitTimer.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from data_pipelines import make_shards  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import transforms  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_data(out_dir, n, w, h, seed=0):
  rng = np.random.default_rng(seed)
  with make_shards.ShardWriter(out_dir, shard_size=100) as wr:
    for i in range(n):
      small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
      img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
      buf = io.BytesIO()
      img.save(buf, 'JPEG', quality=90)
      wr.write(buf.getvalue(), 'jpg', f'a test image number {i}',
               {'width': w, 'height': h})
  return wr.paths


def plain_loop(paths, res, with_clip):
  n = 0
  for p in paths:
    with tarfile.open(p) as tf:
      rec = {}
      key = None
      for m in tf:
        k, ext = m.name.split('.', 1)
        if key is not None and k != key:
          n += _plain_record(rec, res, with_clip)
          rec = {}
        key = k
        rec[ext] = tf.extractfile(m).read()
      if rec:
        n += _plain_record(rec, res, with_clip)
  return n


def _plain_record(rec, res, with_clip):
  img = Image.open(io.BytesIO(rec['jpg'])).convert('RGB')
  rec['txt'].decode('utf-8')
  w, h = img.size
  s = min(w, h)
  sq = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  x = np.asarray(sq.resize((res, res), Image.Resampling.LANCZOS),
                 np.float32) / 127.5 - 1
  if with_clip:
    transforms.clip_preprocess_np(np.asarray(img)[None], 224)
  return int(x.size > 0)


def pipeline_loop(shard_dir, res):
  cfg = pipeline.default_data_config()
  cfg.shards = shard_dir
  cfg.resolution = res
  cfg.num_workers = 0
  cfg.prefetch = 0
  cfg.drop_remainder = False
  it = pipeline.make_iterator(cfg, global_batch_size=8, process_index=0,
                              process_count=1, seed=0, num_epochs=1)
  n = sum(b['image'].shape[0] for b in it if 'image' in b)
  it.close()
  return n


def timed(fn, *args):
  w0, c0 = time.perf_counter(), time.process_time()
  n = fn(*args)
  return n, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--n', type=int, default=300)
  ap.add_argument('--src', default='640x480')
  ap.add_argument('--res', default='256,512')
  a = ap.parse_args(argv)
  w, h = map(int, a.src.split('x'))
  with tempfile.TemporaryDirectory() as d:
    paths = make_data(d, a.n, w, h)
    rows = []
    pipeline_loop(d, 256)  # warm-up: imports, first-use costs
    for res in [int(r) for r in a.res.split(',')]:
      for name, fn, args in [('plain', plain_loop, (paths, res, False)),
                             ('plain+clip', plain_loop, (paths, res, True)),
                             ('pipeline', pipeline_loop, (d, res))]:
        n, wall, cpu = timed(fn, *args)
        assert n == a.n, (name, n)
        rows.append((res, name, n / cpu, n / wall))
  print(f'{a.n} JPEG records of {w}x{h}, {os.cpu_count()} cores visible')
  print(f'{"res":>5} {"loader":<11} {"rec/s/core":>11} {"rec/s wall":>11}')
  for res, name, per_core, wall in rows:
    print(f'{res:>5} {name:<11} {per_core:>11.1f} {wall:>11.1f}')


if __name__ == '__main__':
  main()
