"""Scan shards with the training pipeline's decoding and filters; print counts.

  python -m data_pipelines.check 'data/train/*.tar' --min_side 256 \\
      --max_watermark 0.5

The flags are config.data's filter and image keys (configs/common.py's data()
documents them); each filter is off unless given ('none' turns one off), the
pixel limit is PIL's own unless --max_image_pixels is given. Images are decoded
and checked but not resized unless --transform (with --resolution and
--clip_resolution) also runs the crops and CLIP preprocessing, i.e. everything
the pipeline does except tokenising. Prints one line per skip reason, and as
the last line `records: N ok, M skipped`.
"""
from __future__ import annotations

import argparse
import collections
import sys
import types

from PIL import Image
from tqdm import tqdm

from data_pipelines import records
from data_pipelines import shards as shards_lib
from data_pipelines.filters import SKIP_REASONS


def number_or_none(text: str) -> int | float | None:
  if text.lower() in ('none', 'null', ''):
    return None
  try:
    return int(text)
  except ValueError:
    return float(text)


# The config.data keys RecordProcessor reads without a tokenizer -> (default, type): the filters
# off, PIL's own pixel limit, no resizing.
FLAGS = {
    **{k: (None, number_or_none) for k in ('max_aspect', 'max_watermark', 'max_unsafe',
                                            'min_aesthetic', 'max_caption_chars')},
    'min_side': (0, number_or_none), 'min_caption_chars': (0, number_or_none),
    'max_image_pixels': (Image.MAX_IMAGE_PIXELS, int), 'resolution': (0, int),
    'clip_resolution': (0, int),
}


def scan(paths, cfg, *, transform=False, progress=True):
  """Counts per outcome: {'ok': n, reason: n, ...} over all entries."""
  proc = records.RecordProcessor(cfg, None, transform_images=transform)
  counts = collections.Counter()
  with tqdm(desc='check', unit='rec', file=sys.stderr,
            disable=not progress) as bar:
    for path in paths:
      for entry in shards_lib.iter_entries(path):
        out = proc(entry)
        counts[out.get('skip', 'ok')] += 1
        bar.update(1)
  return counts


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('paths', nargs='+', help='shard files, dirs, globs')
  ap.add_argument('--transform', action='store_true')
  ap.add_argument('--no-progress', action='store_true')
  for name, (default, kind) in FLAGS.items():
    ap.add_argument(f'--{name}', type=kind, default=default, metavar='V')
  a = ap.parse_args(argv)
  cfg = types.SimpleNamespace(**{name: getattr(a, name) for name in FLAGS})
  if a.transform and not (cfg.resolution and cfg.clip_resolution):
    ap.error('--transform needs --resolution and --clip_resolution')
  paths = shards_lib.expand_shards(','.join(a.paths))
  counts = scan(paths, cfg, transform=a.transform,
                progress=not a.no_progress)
  ok = counts.pop('ok', 0)
  print(f'shards: {len(paths)}')
  for r in SKIP_REASONS:
    print(f'  {r:<16} {counts.get(r, 0)}')
  print(f'records: {ok} ok, {sum(counts.values())} skipped')


if __name__ == '__main__':
  main()
