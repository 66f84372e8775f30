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
per wall second.

The second part (--what wait) is the fraction of step time spent waiting for
data in a demo training run: configs/demo.py as it is (its generated shards,
its model and batch), the train loop's own pieces (train.build,
input_pipeline.make_train_iterator), iterated as run_loop does
(next batch -> to_global -> async step). After --warmup steps (compilation,
worker start-up, prefetch fill) it times --steps steps with
iterators.DataWaitTimer: wait = time blocked in next(data_iterator), total =
wall time of those steps (the device is synchronised at the end; with --sync
after every step, so no data time hides behind device time). Reported for
--workers (default 0 and 2 grain worker processes).

  python benchmarks/bench_data.py --what wait --steps 30 --warmup 5
  python benchmarks/bench_data.py --quick     # a few seconds per part: does it run?
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

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import iterators  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import make_shards  # pylint: disable=g-import-not-at-top,wrong-import-position
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
  # LAION's filters but min_side (the generated images are --src sized), no tokenizer.
  cfg = common.data(shards=shard_dir, tokenizer='', resolution=res, num_workers=0, prefetch=0,
                    drop_remainder=False, shuffle_buffer=1000, interleave_cycle=4, min_side=0)
  it = iterators.make_iterator(cfg, global_batch_size=8, process_index=0,
                              process_count=1, seed=0, num_epochs=1)
  n = sum(b['image'].shape[0] for b in it if 'image' in b)
  it.close()
  return n


def timed(fn, *args):
  w0, c0 = time.perf_counter(), time.process_time()
  n = fn(*args)
  return n, time.perf_counter() - w0, time.process_time() - c0


# ---------------------------------------------------------------------------
# The share of step time spent waiting for data in a demo training run.


def demo_config(quick: bool):
  """configs/demo.py; with quick, configs/demo.py:tiny (16x16 images, a depth-2 U-ViT)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("tiny" if quick else None)
  c.runbook = ""   # the U-ViT training job alone, on the shards data_wait builds
  c.data.source = "shards"
  if quick:
    c.data.shuffle_buffer = 16
  return c.copy_and_resolve_references()


def data_wait(config, shard_dir, n_train, workers, steps, warmup, sync):
  """Rows (workers, timer summary, step seconds) for each grain worker count."""
  import jax  # pylint: disable=g-import-not-at-top
  from data_pipelines import demo_data  # pylint: disable=g-import-not-at-top
  from unidiffuser_jax import input_pipeline, sharding, train, vocab  # pylint: disable=g-import-not-at-top

  paths = demo_data.build_demo(shard_dir, n_train=n_train, n_heldout=2,
                               size=config.data.resolution, seed=0,
                               shard_size=max(1, n_train // 8))
  config.data.shards = ','.join(paths['train_shards'])
  config.data.tokenizer = paths['tokenizer']
  vocab.derive(config)  # as jobs.py does before every job

  mesh = sharding.make_mesh(config.mesh)
  train.check_config(config, config.train, mesh)
  built = train.build(config, mesh)  # the trainer's state, frozen encoders and step
  state, frozen, step_fn = built.state, built.frozen, built.step

  rows = []
  for nw in workers:
    config.data.num_workers = nw
    it = input_pipeline.make_train_iterator(config, config.train, 0, 1)
    timer = None
    for i in range(warmup + steps):
      if i == warmup:
        jax.block_until_ready(state)
        timer = iterators.DataWaitTimer()
      batch = dict(timer.next(it) if timer else next(it))
      batch.pop('skipped', None)
      state, m = step_fn(state, frozen, sharding.to_global(batch, mesh))
      if sync or i == warmup + steps - 1:
        jax.block_until_ready(m)
    summary = timer.summary()
    rows.append((nw, summary, summary['total_s'] / max(1, summary['batches'])))
    if hasattr(it, 'close'):
      it.close()
  return rows


def run_wait(a):
  config = demo_config(a.quick)
  workers = [int(w) for w in a.workers.split(',')]
  with tempfile.TemporaryDirectory() as d:
    rows = data_wait(config, d, a.demo_n, workers, a.steps, a.warmup, a.sync)
  print(f'demo training run ({"quick, tiny model" if a.quick else "configs/demo.py"}): '
        f'batch {config.train.batch_size}, {config.data.resolution}px, '
        f'{a.steps} timed steps after {a.warmup}, '
        f'{"sync every step" if a.sync else "async steps as in run_loop"}')
  print(f'{"workers":>7} {"wait s":>8} {"total s":>8} {"step ms":>8} '
        f'{"wait %":>7}')
  for nw, s, step_s in rows:
    print(f'{nw:>7} {s["wait_s"]:>8.3f} {s["total_s"]:>8.3f} '
          f'{1000 * step_s:>8.1f} {100 * s["wait_fraction"]:>6.1f}%')


def run_throughput(a):
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--what', default='throughput,wait',
                  help='comma list of parts: throughput, wait')
  ap.add_argument('--quick', action='store_true',
                  help='tiny sizes and few steps: checks that it runs')
  ap.add_argument('--n', type=int, default=300)
  ap.add_argument('--src', default='640x480')
  ap.add_argument('--res', default='256,512')
  ap.add_argument('--workers', default='0,2')
  ap.add_argument('--steps', type=int, default=30)
  ap.add_argument('--warmup', type=int, default=5)
  ap.add_argument('--demo-n', type=int, default=1024,
                  help='demo training images generated for the wait part')
  ap.add_argument('--sync', action='store_true',
                  help='wait for the device after every step')
  a = ap.parse_args(argv)
  if a.quick:
    a.n, a.src, a.res = 24, '96x64', '32'
    a.steps, a.warmup, a.demo_n = 4, 2, 64
  parts = [p.strip() for p in a.what.split(',') if p.strip()]
  unknown = set(parts) - {'throughput', 'wait'}
  if unknown:
    ap.error(f'--what: unknown parts {sorted(unknown)}')
  if 'throughput' in parts:
    run_throughput(a)
  if 'wait' in parts:
    run_wait(a)


if __name__ == '__main__':
  main()
