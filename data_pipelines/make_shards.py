"""Images + captions -> img2dataset-style webdataset shards.

  python -m data_pipelines.make_shards --input DIR_OR_FILE \\
      --captions captions.csv|.jsonl --out DIR --shard-size N

--input: a folder of images (searched recursively), one image, or a text file
listing image paths (one a line). --captions: CSV with a header naming the
file column (file|filename|image|path|key) and the caption column
(caption|text), or JSON lines with the same keys. Captions are matched by file
name (with or without extension). Further columns (similarity, punsafe,
pwatermark, aesthetic, url, ...) go into the record's metadata.

Output per shard: 00000.tar holding KEY.jpg|png|webp (the original bytes, not
re-encoded), KEY.txt (caption) and KEY.json (key, url, caption, width, height
= original size, status, extra columns); 00000.parquet with the same
metadata when pyarrow is importable. Keys are 9 digits: shard * 10^4 + index,
as img2dataset names them (so --shard-size must be <= 10000).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import tarfile
from typing import Any, Iterable

from etils import epath
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp')


def add_member(tf: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0  # deterministic bytes
  info.mode = 0o644
  tf.addfile(info, io.BytesIO(data))


def write_tar(path, members: Iterable[tuple[str, bytes]]):
  """Writes a tar with the given (name, bytes) members in order."""
  with epath.Path(path).open('wb') as f:
    with tarfile.open(fileobj=f, mode='w', format=tarfile.PAX_FORMAT) as tf:
      for name, data in members:
        add_member(tf, name, data)


def _write_parquet(path, rows):
  try:
    import pyarrow as pa  # local: optional (not in requirements.txt); no parquet without it
    import pyarrow.parquet as pq  # local: as pyarrow above
  except ImportError:
    return False
  cols = sorted({k for r in rows for k in r})
  table = pa.table({c: [r.get(c) for r in rows] for c in cols})
  with epath.Path(path).open('wb') as f:
    pq.write_table(table, f)
  return True


class ShardWriter:
  """Writes records into {i:05d}.tar (+ .parquet) shards of shard_size each."""

  def __init__(self, out_dir, shard_size: int = 10000, start_shard: int = 0):
    if not 0 < shard_size <= 10000:
      raise ValueError(f'shard_size must be in 1..10000, got {shard_size}')
    self.dir = epath.Path(out_dir)
    self.dir.mkdir(parents=True, exist_ok=True)
    self.shard_size = shard_size
    self.shard = start_shard - 1
    self.count = 0
    self.paths: list[str] = []
    self._f = self._tf = None
    self._rows: list[dict[str, Any]] = []

  def next_key(self) -> str:
    """Key the next write() will use."""
    shard = self.shard + (1 if self._tf is None or
                          self.count % self.shard_size == 0 else 0)
    return f'{shard:05d}{self.count % self.shard_size:04d}'

  def write(self, image: bytes, ext: str, caption: str,
            meta: dict[str, Any] | None = None) -> str:
    if self._tf is None or self.count % self.shard_size == 0:
      self._close_shard()
      self.shard += 1
      path = self.dir / f'{self.shard:05d}.tar'
      self._f = path.open('wb')
      self._tf = tarfile.open(fileobj=self._f, mode='w',
                              format=tarfile.PAX_FORMAT)
      self.paths.append(str(path))
    key = f'{self.shard:05d}{self.count % self.shard_size:04d}'
    ext = 'jpg' if ext.lower().lstrip('.') == 'jpeg' else ext.lower().lstrip('.')
    m = dict(meta or {})
    m.setdefault('status', 'success')
    m['key'] = key
    m['caption'] = caption
    add_member(self._tf, f'{key}.{ext}', image)
    add_member(self._tf, f'{key}.txt', caption.encode('utf-8'))
    add_member(self._tf, f'{key}.json', json.dumps(m).encode('utf-8'))
    self._rows.append(m)
    self.count += 1
    return key

  def _close_shard(self):
    if self._tf is not None:
      self._tf.close()
      self._f.close()
      _write_parquet(self.dir / f'{self.shard:05d}.parquet', self._rows)
    self._tf = self._f = None
    self._rows = []

  def close(self) -> list[str]:
    self._close_shard()
    return self.paths

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------
# CLI.

_FILE_COLS = ('file', 'filename', 'image', 'path', 'key', 'file_name')
_CAPTION_COLS = ('caption', 'text', 'prompt')


def _coerce(v):
  if not isinstance(v, str):
    return v
  for t in (int, float):
    try:
      return t(v)
    except ValueError:
      pass
  return v


def read_captions(path: str) -> dict[str, dict[str, Any]]:
  """file name -> {'caption': ..., other columns}; also indexed by stem."""
  rows = []
  with open(path, encoding='utf-8') as f:
    if path.endswith(('.jsonl', '.json')):
      for i, line in enumerate(f):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except ValueError as e:
            raise ValueError(f'{path}:{i + 1}: not JSON: {e}') from None
    else:
      rows = list(csv.DictReader(f))
  out = {}
  for i, row in enumerate(rows):
    fcol = next((c for c in _FILE_COLS if c in row), None)
    ccol = next((c for c in _CAPTION_COLS if c in row), None)
    if fcol is None or ccol is None:
      raise ValueError(f'{path} row {i + 1}: need a file column {_FILE_COLS} '
                       f'and a caption column {_CAPTION_COLS}, got {list(row)}')
    name = os.path.basename(str(row[fcol]))
    rec = {k: _coerce(v) for k, v in row.items() if k not in (fcol, ccol)}
    rec['caption'] = str(row[ccol])
    out[name] = rec
    out.setdefault(os.path.splitext(name)[0], rec)
  return out


def list_images(inp: str) -> list[str]:
  if os.path.isdir(inp):
    found = []
    for root, _, names in os.walk(inp):
      found.extend(os.path.join(root, n) for n in names
                   if n.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found)
  if inp.lower().endswith(IMAGE_SUFFIXES):
    return [inp]
  with open(inp, encoding='utf-8') as f:
    return [l.strip() for l in f if l.strip()]


def make_shards(inp: str, captions: str, out: str, shard_size: int = 10000,
                progress: bool = True) -> dict[str, Any]:
  """Library form of the CLI; returns {'shards': [...], 'written', 'missing_caption', 'unreadable'}."""
  caps = read_captions(captions)
  images = list_images(inp)
  stats = {'written': 0, 'missing_caption': 0, 'unreadable': 0}
  with ShardWriter(out, shard_size) as w:
    for p in tqdm(images, desc='make_shards', file=sys.stderr,
                  disable=not progress):
      name = os.path.basename(p)
      rec = caps.get(name) or caps.get(os.path.splitext(name)[0])
      if rec is None:
        stats['missing_caption'] += 1
        logging.warning('no caption for %s; not written', p)
        continue
      with open(p, 'rb') as f:
        data = f.read()
      try:
        with Image.open(io.BytesIO(data)) as im:  # header only
          width, height = im.size
      except Exception as e:  # pylint: disable=broad-except
        stats['unreadable'] += 1
        logging.warning('cannot read image %s (%s); not written', p, e)
        continue
      meta = {k: v for k, v in rec.items() if k != 'caption'}
      meta.setdefault('url', os.path.abspath(p))
      meta.update(width=width, height=height)
      w.write(data, os.path.splitext(name)[1], rec['caption'], meta)
      stats['written'] += 1
  stats['shards'] = w.paths
  return stats


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--input', required=True)
  ap.add_argument('--captions', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--shard-size', type=int, default=10000)
  a = ap.parse_args(argv)
  s = make_shards(a.input, a.captions, a.out, a.shard_size)
  print(f"shards: {len(s['shards'])}, written: {s['written']}, "
        f"missing caption: {s['missing_caption']}, unreadable: "
        f"{s['unreadable']}")


if __name__ == '__main__':
  main()
