"""Host input pipeline: tar shards or precomputed features -> per-host batches.

Config (`config.data`, an ml_collections ConfigDict; `default_data_config()`):
  shards             str: shard tars: comma list of files, directories (all
                     *.tar), globs, '{00000..00099}' ranges; any epath path
                     (local, gs://).
  features           str | None: precomputed ArrayRecord feature shards (same
                     syntax, directories mean *.array_record); used by
                     make_feature_iterator.
  resolution         int: image side after centre square crop + LANCZOS (256).
  clip_resolution    int: CLIP image input side (224).
  tokenizer          str: tokenizer directory (AutoTokenizer.from_pretrained)
                     or a hub name present in the local cache; '' = no tokens
                     (batches then carry `caption` strings instead).
  max_length         int: token ids padded/truncated to this length (77).
  shuffle_buffer     int: window-shuffle window in records (0/1 = off).
  interleave_cycle   int: shards read concurrently per host (or per worker).
  num_workers        int: grain worker processes (0 = in-process).
  prefetch           int: batches buffered ahead (per worker with workers).
  data_type          int: value of the `data_type` field (0 web, 1 clean).
  drop_remainder     bool: drop the last partial batch of a finite run.
  with_text          bool: also return `key` and `caption` string arrays.
  min_side           int: minimum original short side (0 = off).
  max_aspect         float | None: maximum long/short side ratio.
  max_watermark      float | None: maximum pwatermark.
  max_unsafe         float | None: maximum punsafe.
  min_aesthetic      float | None: minimum aesthetic score.
  min_caption_chars  int: minimum cleaned caption length.
  max_caption_chars  int | None: maximum cleaned caption length.
  max_image_pixels   int: header pixel limit checked before decoding.

Batches (dicts of numpy, leading axis b = global_batch_size // process_count):
  image float32 [b, H, W, 3] in [-1, 1]; clip_image float32 [b, S, S, 3];
  tokens int32 [b, L]; data_type int32 [b]; skipped int32 [len(SKIP_REASONS)]
  (records skipped, per reason, since the previous batch of the same worker:
  summing it over batches counts every skip exactly once, also across resume).

Order and resumption. Each process reads the shards `shards[i::n]`; they are
shuffled with `seed` (differently every epoch), `interleave_cycle` of them are
read at a time, records are window-shuffled with `seed`, decoded, filtered,
transformed and batched; all of it is a grain IterDataset, so the iterator's
state (a small JSON dict: shard cursor + per open shard the number of entries
consumed, window position) restores exactly. With `num_workers > 0` each
worker process takes every num_workers-th shard; outputs are still
deterministic for a fixed num_workers (changing it changes the order).

Saving the state with the train state, in one orbax checkpoint (grain 0.2.18):

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(dir, item_names=('state', 'data'))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=grain.checkpoint.CheckpointSave(data_iter)))
  ...
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  # data_iter (a fresh make_iterator(...) result) now continues where the
  # saved one stopped; restored['data'] is the same object.

Each process writes `process_{i}-of-{n}.json` in the `data` item (the handler
uses jax.process_index()). `data_iter.get_state()` / `set_state()` give the
same dict directly.

Finite runs: with num_epochs set, the last partial batch is dropped when
drop_remainder (its records are neither yielded nor counted: the only
exception to "yielded or counted"). With drop_remainder=False it is yielded
short, and if only skips follow the last example, a final batch holds just
`data_type` int32 [0] and `skipped` (consumers of finite runs should skip
batches without 'image'). Processes can hold different numbers of records,
so multi-host training should use num_epochs=None (infinite).
"""
from __future__ import annotations

import collections
import io
import json
import logging
import threading
import time
from typing import Any

import grain
import ml_collections
import numpy as np

from data_pipelines import filters
from data_pipelines import shards as shards_lib
from data_pipelines import transforms
from data_pipelines.filters import SKIP_REASONS

_R = len(SKIP_REASONS)


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shards = ''
  c.features = ml_collections.FieldReference(None, field_type=str)
  c.resolution = 256
  c.clip_resolution = 224
  c.tokenizer = ''
  c.max_length = 77
  c.shuffle_buffer = 1000
  c.interleave_cycle = 4
  c.num_workers = 0
  c.prefetch = 2
  c.data_type = 0
  c.drop_remainder = True
  c.with_text = False
  c.min_side = 0
  c.max_aspect = ml_collections.FieldReference(None, field_type=float)
  c.max_watermark = ml_collections.FieldReference(None, field_type=float)
  c.max_unsafe = ml_collections.FieldReference(None, field_type=float)
  c.min_aesthetic = ml_collections.FieldReference(None, field_type=float)
  c.min_caption_chars = 1
  c.max_caption_chars = ml_collections.FieldReference(None, field_type=int)
  c.max_image_pixels = 64_000_000
  return c


def with_defaults(data_cfg) -> ml_collections.ConfigDict:
  """data_cfg completed with default_data_config() for fields it lacks.

  Configs may carry extra fields (source, demo, ...); they are kept.
  """
  merged = default_data_config().to_dict()
  merged.update(data_cfg.to_dict() if hasattr(data_cfg, 'to_dict')
                else dict(data_cfg))
  return ml_collections.ConfigDict(merged)


# ---------------------------------------------------------------------------
# Skip logging: every skip is logged at debug level with shard and key; the
# first few per reason (per process) also as warnings, so bad data is visible
# without flooding the log.
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
    self.cfg = with_defaults(cfg)
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


# ---------------------------------------------------------------------------
# grain datasets.


class ShardDataset(grain.IterDataset):
  """The entries of one tar shard, in file order; state = entries consumed."""

  def __init__(self, path: str):
    super().__init__()
    self._path = str(path)

  def __iter__(self):
    return _ShardIterator(self._path)

  def __str__(self):
    return f'ShardDataset({self._path})'


class _ShardIterator(grain.DatasetIterator):

  def __init__(self, path: str):
    super().__init__()
    self._path = path
    self._pos = 0
    self._gen = None

  def __next__(self):
    if self._gen is None:
      self._gen = shards_lib.iter_entries(self._path, start=self._pos)
    entry = next(self._gen)  # StopIteration ends the shard
    self._pos += 1
    return entry

  def get_state(self):
    return {'pos': self._pos}

  def set_state(self, state):
    if self._gen is not None:
      self._gen.close()
    self._pos = int(state['pos'])
    self._gen = None

  def close(self):
    if self._gen is not None:
      self._gen.close()
      self._gen = None


def _make_shard_dataset(path):
  return ShardDataset(path)


class SkipCountingBatchDataset(grain.IterDataset):
  """Batches examples and counts skip markers into `skipped` [R]."""

  def __init__(self, parent, batch_size: int, *, drop_remainder: bool,
               data_type: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._data_type = data_type

  def __iter__(self):
    return _SkipCountingBatchIterator(
        self._parent.__iter__(), self._batch_size, self._drop_remainder,
        self._data_type)

  def __str__(self):
    return f'SkipCountingBatchDataset(batch_size={self._batch_size})'


def stack_examples(examples, skipped, data_type):
  batch = {}
  for k in examples[0]:
    vals = [e[k] for e in examples]
    if isinstance(vals[0], str):
      batch[k] = np.array(vals)
    else:
      batch[k] = np.stack(vals)
  batch['data_type'] = np.full((len(examples),), data_type, np.int32)
  batch['skipped'] = skipped
  return batch


class _SkipCountingBatchIterator(grain.DatasetIterator):
  # The iterator holds nothing between calls to __next__, so its state is
  # exactly its parent's.

  def __init__(self, parent, batch_size, drop_remainder, data_type):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._data_type = data_type

  def __next__(self):
    examples = []
    skipped = np.zeros((_R,), np.int32)
    while len(examples) < self._batch_size:
      try:
        ex = next(self._parent)
      except StopIteration:
        if not self._drop_remainder and (examples or skipped.any()):
          break  # a last, short batch (maybe of 0 examples: see below)
        raise
      if 'skip' in ex:
        skipped[filters.REASON_INDEX[ex['skip']]] += 1
      else:
        examples.append(ex)
    if not examples:
      # End of a finite run whose last records were all skipped: a batch of
      # zero examples carries their counts (only with drop_remainder=False).
      return {'data_type': np.zeros((0,), np.int32), 'skipped': skipped}
    return stack_examples(examples, skipped, self._data_type)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def _per_host(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by process_count {process_count}')
  return global_batch_size // process_count


def _check_process(process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, '
                     f'{process_count})')


def make_record_dataset(data_cfg, *, process_index: int, process_count: int,
                        seed: int, tokenizer=None, num_epochs=None,
                        transform_images=True) -> grain.IterDataset:
  """Unbatched grain IterDataset of examples and {'skip': reason} markers."""
  _check_process(process_index, process_count)
  data_cfg = with_defaults(data_cfg)
  paths = shards_lib.expand_shards(data_cfg.shards)
  mine = paths[process_index::process_count]
  if not mine:
    raise ValueError(f'{len(paths)} shards cannot feed {process_count} '
                     f'processes: process {process_index} gets none')
  if tokenizer is None and data_cfg.tokenizer:
    tokenizer = transforms.load_tokenizer(data_cfg.tokenizer)
  ds = grain.MapDataset.source(mine).shuffle(seed=seed % 2**32)
  ds = ds.repeat(num_epochs).map(_make_shard_dataset)
  ds = grain.experimental.InterleaveIterDataset(
      ds, cycle_length=max(1, data_cfg.interleave_cycle))
  if data_cfg.shuffle_buffer and data_cfg.shuffle_buffer > 1:
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=data_cfg.shuffle_buffer, seed=seed % 2**32)
  return ds.map(RecordProcessor(data_cfg, tokenizer,
                                transform_images=transform_images))


def make_iterator(data_cfg, *, global_batch_size: int, process_index: int,
                  process_count: int, seed: int, tokenizer=None,
                  num_epochs=None) -> grain.DatasetIterator:
  """The per-host batch iterator over tar shards (see the module doc)."""
  b = _per_host(global_batch_size, process_count)
  data_cfg = with_defaults(data_cfg)
  ds = make_record_dataset(data_cfg, process_index=process_index,
                           process_count=process_count, seed=seed,
                           tokenizer=tokenizer, num_epochs=num_epochs)
  ds = SkipCountingBatchDataset(ds, b, drop_remainder=data_cfg.drop_remainder,
                                data_type=data_cfg.data_type)
  if not data_cfg.with_text:
    ds = ds.map(_drop_text)
  return _prefetch(ds, data_cfg)


def _drop_text(batch):
  batch.pop('key', None)
  if 'tokens' in batch:
    batch.pop('caption', None)
  return batch


def _ensure_absl_flags():
  # grain's worker processes read absl flags; outside absl.app (tests,
  # notebooks) they are unparsed, so take the defaults.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _prefetch(ds, data_cfg):
  if data_cfg.num_workers > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers,
        per_worker_buffer_size=max(1, data_cfg.prefetch)))
  elif data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds)


# ---------------------------------------------------------------------------
# Precomputed features (ArrayRecord).
#
# Record format: the bytes of an uncompressed numpy .npz (np.savez) holding
# float arrays `moments` [h, w, 2C] and `clip_img` [1, D], and `tokens` int32
# [L] and/or `text_hidden` float [L, E]; any further arrays are passed
# through. Read back with np.load(io.BytesIO(b), allow_pickle=False).


def serialize_features(features: dict[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in features.items()})
  return buf.getvalue()


def deserialize_features(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


class FeatureWriter:
  """Writes feature records into ArrayRecord shards of `shard_size` records.

    with FeatureWriter(out_dir, shard_size=10000) as w:
      w.write({'moments': m, 'clip_img': c, 'tokens': t})
  Files: {prefix}-00000.array_record, ... Returns the paths from close().
  """

  def __init__(self, out_dir, *, shard_size: int = 10000,
               prefix: str = 'features'):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self._dir = epath.Path(out_dir)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._shard_size = shard_size
    self._prefix = prefix
    self._writer = None
    self._count = 0
    self.paths = []

  def write(self, features: dict[str, np.ndarray]):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    if self._writer is None or self._count % self._shard_size == 0:
      self._close_shard()
      path = str(self._dir / f'{self._prefix}-{len(self.paths):05d}.array_record')
      # group_size:1 keeps random access (the global shuffle) cheap.
      self._writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
      self.paths.append(path)
    self._writer.write(serialize_features(features))
    self._count += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self):
    self._close_shard()
    return self.paths

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def expand_feature_shards(spec) -> list[str]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  out = []
  for item in items:
    item = item.strip()
    if item and epath.Path(item).is_dir():
      out.extend(sorted(str(p) for p in epath.Path(item).glob('*.array_record')))
    elif item:
      out.extend(shards_lib.expand_shards(item))
  if not out:
    raise ValueError(f'no feature shards match {spec!r}')
  return out


class _FeatureBatch:
  """Stacks feature records and adds data_type and an all-zero `skipped`."""

  def __init__(self, data_type):
    self.data_type = data_type

  def __call__(self, records):
    examples = [deserialize_features(r) for r in records]
    return stack_examples(examples, np.zeros((_R,), np.int32), self.data_type)


def make_feature_iterator(data_cfg, *, global_batch_size: int,
                          process_index: int, process_count: int, seed: int,
                          num_epochs=None) -> grain.DatasetIterator:
  """Per-host batches of precomputed features, globally shuffled.

  Batches: the record's arrays stacked (moments [b,h,w,2C], clip_img
  [b,1,D], tokens [b,L] and/or text_hidden [b,L,E]) plus data_type [b] and
  skipped [R] (zeros). Each process owns records i::n of the concatenated
  shards and reshuffles them every epoch with `seed`.
  """
  _check_process(process_index, process_count)
  b = _per_host(global_batch_size, process_count)
  data_cfg = with_defaults(data_cfg)
  if not data_cfg.features:
    raise ValueError('data.features is empty')
  src = grain.sources.ArrayRecordDataSource(
      expand_feature_shards(data_cfg.features))
  ds = grain.MapDataset.source(src)[process_index::process_count]
  if len(ds) < b:
    raise ValueError(f'{len(ds)} feature records per process < batch {b}')
  ds = ds.shuffle(seed=seed % 2**32).repeat(num_epochs)
  ds = ds.batch(b, drop_remainder=True, batch_fn=_FeatureBatch(
      data_cfg.data_type))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, data_cfg.interleave_cycle), prefetch_buffer_size=max(
          1, data_cfg.prefetch)))
  if data_cfg.num_workers > 0:
    _ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers,
        per_worker_buffer_size=max(1, data_cfg.prefetch)))
  return iter(ds)


# ---------------------------------------------------------------------------
# Hook for the train loop: how long does the step wait for data?


class DataWaitTimer:
  """Measures the time spent waiting in next(data_iter).

    timer = DataWaitTimer()
    for step in ...:
      batch = timer.next(data_iter)
      ...  # train step (block_until_ready before timing ends, if async)
    print(timer.summary())  # {'wait_s', 'total_s', 'wait_fraction', 'batches'}
  """

  def __init__(self):
    self.wait_s = 0.0
    self.batches = 0
    self._t0 = None

  def next(self, it):
    t = time.perf_counter()
    if self._t0 is None:
      self._t0 = t
    batch = next(it)
    self.wait_s += time.perf_counter() - t
    self.batches += 1
    return batch

  def summary(self) -> dict[str, float]:
    total = (time.perf_counter() - self._t0) if self._t0 is not None else 0.0
    return {'wait_s': self.wait_s, 'total_s': total, 'batches': self.batches,
            'wait_fraction': self.wait_s / total if total > 0 else 0.0}
