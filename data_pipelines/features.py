"""Precomputed feature shards (ArrayRecord): the record format, the writer, the batch iterator.

One record is the bytes of an uncompressed numpy .npz (np.savez) holding float
arrays `moments` [h, w, 2C] and `clip_img` [1, D], and `tokens` int32 [L]
and/or `text_hidden` float [L, E]; any further arrays are passed through.
--mode=extract writes them (unidiffuser_jax/extract.py) with FeatureWriter;
make_feature_iterator reads them back as per-host batches.
"""
from __future__ import annotations

import io
import threading

from array_record.python import array_record_module
from etils import epath
import grain
import numpy as np

from data_pipelines import iterators
from data_pipelines import shards as shards_lib
from data_pipelines.filters import SKIP_REASONS

_R = len(SKIP_REASONS)


def serialize_features(features: dict[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in features.items()})
  return buf.getvalue()


# numpy parses each .npy header with ast.literal_eval, which CPython 3.11 (the
# version CI runs) cannot run in two threads at once: its AST constructor keeps
# a recursion depth shared between threads and raises "SystemError: AST
# constructor recursion depth mismatch" (cpython gh-106905 and its reports).
# The batch function runs in grain's reader threads, so records are read one
# at a time.
_NPZ_LOCK = threading.Lock()


def deserialize_features(data: bytes) -> dict[str, np.ndarray]:
  with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


class FeatureWriter:
  """Writes feature records into ArrayRecord shards of `shard_size` records.

  Files: {out_dir}/{prefix}-00000.array_record, ...; write(features) adds
  one record, close() (or leaving the `with` block) finishes the last file
  and returns the paths.
  """

  def __init__(self, out_dir, *, shard_size: int = 10000,
               prefix: str = 'features'):
    self._dir = epath.Path(out_dir)
    self._dir.mkdir(parents=True, exist_ok=True)
    self._shard_size = shard_size
    self._prefix = prefix
    self._writer = None
    self._count = 0
    self.paths = []

  def write(self, features: dict[str, np.ndarray]):
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
    return iterators.stack_examples(examples, np.zeros((_R,), np.int32), self.data_type)


def make_feature_iterator(data_cfg, *, global_batch_size: int,
                          process_index: int, process_count: int, seed: int,
                          num_epochs=None) -> grain.DatasetIterator:
  """Per-host batches of precomputed features, globally shuffled.

  Batches: the record's arrays stacked (moments [b,h,w,2C], clip_img
  [b,1,D], tokens [b,L] and/or text_hidden [b,L,E]) plus data_type [b] and
  skipped [R] (zeros). Each process owns records i::n of the concatenated
  shards and reshuffles them every epoch with `seed`.
  """
  iterators.check_process(process_index, process_count)
  b = iterators.per_host_batch(global_batch_size, process_count)
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
    iterators.ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers,
        per_worker_buffer_size=max(1, data_cfg.prefetch)))
  return iter(ds)
