"""Scan shards with the training pipeline's decoding and filters; print counts.

  python -m data_pipelines.check 'data/train/*.tar' --min_side 256 \\
      --max_watermark 0.5

Every field of data_config.default_data_config() is a flag (--resolution,
--min_side, --max_aspect, ...; 'none' clears a threshold). By default images
are decoded and checked but not resized (--transform also runs the crops and
CLIP preprocessing, i.e. everything the pipeline does except tokenising).
Prints one line per skip reason, and as the last line
`records: N ok, M skipped`.
"""
from __future__ import annotations

import argparse
import collections
import sys

from tqdm import tqdm

from data_pipelines import data_config
from data_pipelines import records
from data_pipelines import shards as shards_lib
from data_pipelines.filters import SKIP_REASONS


def _parse_value(text, default):
  if text.lower() in ('none', 'null', ''):
    return None
  if isinstance(default, bool):
    return text.lower() in ('1', 'true', 'yes')
  if isinstance(default, int):
    return int(text)
  try:
    return int(text)
  except ValueError:
    try:
      return float(text)
    except ValueError:
      return text


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
  defaults = data_config.default_data_config()
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('paths', nargs='+', help='shard files, dirs, globs')
  ap.add_argument('--transform', action='store_true')
  ap.add_argument('--no-progress', action='store_true')
  for name in defaults:
    if name in ('shards', 'features'):
      continue
    ap.add_argument(f'--{name}', default=None, metavar='V')
  a = ap.parse_args(argv)
  cfg = data_config.default_data_config()
  for name in cfg:
    v = getattr(a, name, None)
    if v is not None:
      cfg[name] = _parse_value(v, cfg[name])
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
