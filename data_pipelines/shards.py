"""Reading img2dataset/webdataset tar shards, robustly and resumably.

A shard is a POSIX tar file whose members are named `KEY.EXT`; the members
that share a KEY (and follow each other, as webdataset writers emit them) form
one record, e.g. `000000017.jpg`, `000000017.txt`, `000000017.json`.

We parse the tar headers ourselves instead of using `tarfile` because we need
to tell a cleanly ended shard from a truncated one (tarfile silently stops at
the first short read) and because resuming must be able to skip records by
seeking over their data without reading it.

A shard is read as a stream of *entries*. An entry is either a record

  {'shard': path, 'key': key, 'files': {ext: bytes}}

or a skip marker for something that could not be read

  {'shard': path, 'key': key or '', 'skip': reason}

with reason 'bad_shard' (cannot be opened, or not a tar at all: one entry per
shard) or 'truncated_shard' (the record at the cut or at a corrupt header; the
records before it are kept). The sequence of entries depends only on the
file's bytes, so "the first n entries have been consumed" is an exact, tiny
checkpoint state: `iter_entries(path, start=n)` skips the first n entries by
walking headers and seeking over the data. Any path `etils.epath` supports
(local, gs://, ...) works; that is the same file-system layer orbax uses.
"""
from __future__ import annotations

import logging
import re
import tarfile
from typing import Any, Iterator

from etils import epath

_BLOCK = 512
# Only these members are read; anything else in a shard is skipped unread.
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
WANTED_EXTS = IMAGE_EXTS + ('txt', 'json')

Entry = dict[str, Any]


class _ShardCut(Exception):
  """The shard ends (or is corrupt) in the middle of the archive.

  `member` names the member whose data was cut, None if a header was.
  """

  def __init__(self, msg, member=None):
    super().__init__(msg)
    self.member = member


def split_key(name: str) -> tuple[str, str]:
  """'dir/000123.jpg' -> ('dir/000123', 'jpg') (webdataset: first dot of the basename)."""
  slash = name.rfind('/')
  dot = name.find('.', slash + 1)
  if dot < 0:
    return name, ''
  return name[:dot], name[dot + 1:].lower()


def _read_exact(f, n: int) -> bytes:
  """Reads n bytes or raises _ShardCut (file-like objects may return short reads)."""
  chunks, got = [], 0
  while got < n:
    b = f.read(n - got)
    if not b:
      raise _ShardCut(f'short read: wanted {n} bytes, got {got}')
    chunks.append(b)
    got += len(b)
  return b''.join(chunks)


def _skip_bytes(f, n: int) -> None:
  if n <= 0:
    return
  try:
    f.seek(n, 1)
  except (OSError, ValueError, AttributeError):  # unseekable stream
    _read_exact(f, n)


def _pax_path(data: bytes) -> str | None:
  """Extracts 'path' from a pax extended header ('%d path=value\\n' records)."""
  pos = 0
  path = None
  while pos < len(data):
    m = re.match(rb'(\d+) ', data[pos:])
    if not m:
      break
    length = int(m.group(1))
    if length <= 0:
      break
    rec = data[pos + m.end():pos + length - 1]
    k, _, v = rec.partition(b'=')
    if k == b'path':
      path = v.decode('utf-8', 'surrogateescape')
    pos += length
  return path


def iter_members(f, read_data) -> Iterator[tuple[str, int, bytes | None]]:
  """Yields (name, size, data or None) for each regular file member.

  read_data(name) says whether to read the member's bytes (else they are
  seeked over). Raises _ShardCut when the archive does not end cleanly.
  """
  long_name = None
  first = True
  while True:
    header = f.read(_BLOCK)
    if not header:
      if first:
        raise tarfile.ReadError('empty file')
      raise _ShardCut('no end-of-archive marker')
    if len(header) < _BLOCK:
      try:
        header += _read_exact(f, _BLOCK - len(header))
      except _ShardCut:
        if first:
          raise tarfile.ReadError('shorter than one tar header') from None
        raise
    if header == b'\0' * _BLOCK:
      return  # End-of-archive marker: a clean end.
    try:
      info = tarfile.TarInfo.frombuf(header, 'utf-8', 'surrogateescape')
    except tarfile.HeaderError as e:
      if first:
        raise tarfile.ReadError(f'not a tar file: {e}') from None
      raise _ShardCut(f'corrupt tar header: {e}') from None
    first = False
    size = info.size
    padded = -size % _BLOCK
    if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
      data = _read_exact(f, size)
      _skip_bytes(f, padded)
      if info.type == tarfile.XHDTYPE:
        long_name = _pax_path(data) or long_name
      else:
        long_name = data.rstrip(b'\0').decode('utf-8', 'surrogateescape')
      continue
    name = long_name if long_name is not None else info.name
    long_name = None
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
      _skip_bytes(f, size + padded)
      continue
    try:
      if read_data(name):
        data = _read_exact(f, size)
        _skip_bytes(f, padded)
      else:
        data = None
        _skip_bytes(f, size + padded)
    except _ShardCut as e:
      raise _ShardCut(str(e), name) from None
    yield name, size, data


def open_shard(path: str):
  return epath.Path(path).open('rb')


def iter_entries(path: str, start: int = 0) -> Iterator[Entry]:
  """Yields the entries of one shard, skipping the first `start` cheaply.

  Never raises for bad data: problems become skip entries (see module doc).
  """
  path = str(path)
  index = 0  # index of the next entry
  try:
    f = open_shard(path)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('cannot open shard %s: %s', path, e)
    if start <= 0:
      yield {'shard': path, 'key': '', 'skip': 'bad_shard'}
    return
  with f:
    key, files = None, {}

    def want(name):
      # Called before the member is grouped: a new key opens entry index + 1.
      k, ext = split_key(name)
      idx = index + (1 if key is not None and k != key else 0)
      return idx >= start and ext in WANTED_EXTS

    try:
      for name, _, data in iter_members(f, want):
        k, ext = split_key(name)
        if k != key:
          if key is not None:
            if index >= start:
              yield {'shard': path, 'key': key, 'files': files}
            index += 1
          key, files = k, {}
        if data is not None:
          files[ext] = data
      if key is not None and index >= start:
        yield {'shard': path, 'key': key, 'files': files}
    except tarfile.ReadError as e:
      logging.warning('shard %s is not a readable tar: %s', path, e)
      if start <= 0:
        yield {'shard': path, 'key': '', 'skip': 'bad_shard'}
    except _ShardCut as e:
      if e.member is not None and split_key(e.member)[0] != key:
        # The cut is in the first member of a new record: the previous
        # record (if any) is complete.
        if key is not None:
          if index >= start:
            yield {'shard': path, 'key': key, 'files': files}
          index += 1
        key = split_key(e.member)[0]
      logging.warning('shard %s is truncated or corrupt at key %r: %s',
                      path, key, e)
      if index >= start:
        yield {'shard': path, 'key': key or '', 'skip': 'truncated_shard'}
    except Exception as e:  # pylint: disable=broad-except  # I/O errors
      logging.warning('error reading shard %s at key %r: %s', path, key, e)
      if index >= start:
        yield {'shard': path, 'key': key or '', 'skip': 'truncated_shard'}


# ---------------------------------------------------------------------------
# Shard lists.


def _brace_expand(pattern: str) -> list[str]:
  """Expands webdataset-style numeric ranges: 'a/{00000..00003}.tar'."""
  m = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
  if not m:
    return [pattern]
  lo, hi = m.group(1), m.group(2)
  width = len(lo)
  out = []
  for i in range(int(lo), int(hi) + 1):
    out.extend(_brace_expand(pattern[:m.start()] + str(i).zfill(width) +
                             pattern[m.end():]))
  return out


def expand_shards(spec) -> list[str]:
  """Shard paths from a comma list / list of files, directories, globs, ranges.

  A directory means all `*.tar` in it. Globs are resolved with epath (works
  for gs://). Order: sorted within each item, items in the given order, no
  duplicates. Raises ValueError, naming the spec, if nothing matches or none
  of the paths exists (some missing ones are 'bad_shard' skips).
  """
  if spec is None:
    raise ValueError('no shards given (data.shards is empty)')
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  out: list[str] = []
  for item in items:
    item = str(item).strip()
    if not item:
      continue
    for pat in _brace_expand(item):
      if any(c in pat for c in '*?['):
        parts = pat.split('/')
        i = next(j for j, p in enumerate(parts) if any(c in p for c in '*?['))
        root = '/'.join(parts[:i]) or '.'
        rest = '/'.join(parts[i:])
        out.extend(sorted(str(p) for p in epath.Path(root).glob(rest)))
      else:
        p = epath.Path(pat)
        if p.is_dir():
          out.extend(sorted(str(q) for q in p.glob('*.tar')))
        else:
          out.append(pat)  # A missing file becomes a 'bad_shard' skip later...
  seen, uniq = set(), []
  for p in out:
    if p not in seen:
      seen.add(p)
      uniq.append(p)
  if not uniq:
    raise ValueError(f'no shards match {spec!r}')
  # ...but if none exists (a missing directory, a typo), an endless reader
  # would only count skips. Stops at the first shard that exists.
  if not any(epath.Path(p).exists() for p in uniq):
    raise ValueError(f'no shards found: {spec!r} names {len(uniq)} path(s), none of '
                     f'which exists (first: {uniq[0]})')
  return uniq
