"""Shard entries -> examples: metadata and caption filters, decoding, transforms, tokens.

RecordProcessor turns one entry of shards.iter_entries into an example dict
(`key`, `caption`, and `image`, `clip_image`, `tokens` as configured) or a skip
marker {'skip': reason}. Every skip is logged at debug level with shard and
key; the first few per reason (per process) also as warnings, so bad data is
visible without flooding the log.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
from typing import Any

from data_pipelines import filters
from data_pipelines import shards as shards_lib
from data_pipelines import transforms

_WARN_FIRST = 5
_warned = collections.Counter()
_warn_lock = threading.Lock()


def _log_skip(reason: str, shard: str, key: str, detail: str = ''):
  with _warn_lock:
    _warned[reason] += 1
    n = _warned[reason]
  if n <= _WARN_FIRST:
    logging.warning('skipping record %r of shard %s: %s %s%s', key, shard,
                    reason, detail,
                    ' (further ones at debug level)' if n == _WARN_FIRST else '')
  else:
    logging.debug('skipping record %r of shard %s: %s %s', key, shard, reason,
                  detail)


def _skip(reason: str) -> dict[str, Any]:
  return {'skip': reason}


class RecordProcessor:
  """Entry (shards.iter_entries) -> example dict, or {'skip': reason}.

  Checks cheapest first: metadata and caption filters run before any pixel
  is decoded.
  """

  def __init__(self, cfg, tokenizer=None, *, transform_images=True):
    self.cfg = cfg  # config.data (configs/common.py's data() declares its keys)
    self.tokenizer = tokenizer
    self.transform_images = transform_images

  def __call__(self, entry: dict[str, Any]) -> dict[str, Any]:
    try:
      return self._process(entry)
    except transforms.SkipRecord as e:
      _log_skip(e.reason, entry.get('shard', '?'), entry.get('key', '?'),
                e.detail)
      return _skip(e.reason)

  def _process(self, entry):
    cfg = self.cfg
    if 'skip' in entry:
      raise transforms.SkipRecord(entry['skip'])
    files = entry['files']
    img_ext = next((e for e in shards_lib.IMAGE_EXTS if e in files), None)
    if img_ext is None:
      raise transforms.SkipRecord('no_image')
    meta = {}
    if 'json' in files:
      try:
        meta = json.loads(files['json'].decode('utf-8'))
      except UnicodeDecodeError:
        raise transforms.SkipRecord('bad_utf8', 'json') from None
      except ValueError as e:
        raise transforms.SkipRecord('bad_metadata', str(e)) from None
      if not isinstance(meta, dict):
        raise transforms.SkipRecord('bad_metadata', 'not an object')
    reason = filters.metadata_reason(meta, cfg)
    if reason:
      raise transforms.SkipRecord(reason)
    raw = files.get('txt')
    if raw is None:
      raise transforms.SkipRecord('no_caption', 'no .txt')
    try:
      caption = raw.decode('utf-8')
    except UnicodeDecodeError:
      raise transforms.SkipRecord('bad_utf8', 'txt') from None
    if not caption.strip():
      raise transforms.SkipRecord('no_caption', 'blank')
    caption = transforms.clean_caption(caption)
    reason = filters.caption_reason(caption, cfg)
    if reason:
      raise transforms.SkipRecord(reason)
    img, (w, h) = transforms.decode_image(
        files[img_ext], max_pixels=cfg.max_image_pixels,
        min_side=max(cfg.resolution, cfg.clip_resolution))
    if filters.original_size(meta) is None:
      reason = filters.size_reason(w, h, cfg)  # no metadata: the header's
      if reason:
        raise transforms.SkipRecord(reason)
    out = {'key': entry['key'], 'caption': caption}
    if self.transform_images:
      out['image'] = transforms.image_to_array(img, cfg.resolution)
      out['clip_image'] = transforms.clip_image(img, cfg.clip_resolution)
    if self.tokenizer is not None:
      out['tokens'] = transforms.tokenize(self.tokenizer, caption,
                                          cfg.max_length)[0]
    return out
