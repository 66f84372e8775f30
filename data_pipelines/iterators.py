"""grain datasets over tar shards -> per-host batches, with exact resumption.

Batches (dicts of numpy, leading axis b = global_batch_size // process_count):
  image float32 [b, H, W, 3] in [-1, 1]; clip_image float32 [b, S, S, 3];
  tokens int32 [b, L]; data_type int32 [b]; skipped int32 [len(SKIP_REASONS)]
  (records skipped, per reason, since the previous batch of the same worker:
  summing it over batches counts every skip exactly once, also across resume).
data_cfg is config.data: configs/common.py's data() declares and documents its keys.

Order and resumption. Each process reads the shards `shards[i::n]`; they are
shuffled with `seed` (differently every epoch), `interleave_cycle` of them are
read at a time, records are window-shuffled with `seed`, decoded, filtered,
transformed and batched (records.RecordProcessor); all of it is a grain
IterDataset, so the iterator's state (a small JSON dict: shard cursor + per
open shard the number of entries consumed, window position) restores exactly,
e.g. through grain.checkpoint.CheckpointSave / CheckpointRestore as an orbax
item next to the train state (checkpoints.py; docs/INTERFACES.md). With
`num_workers > 0` each worker process takes every num_workers-th shard; outputs
are still deterministic for a fixed num_workers (changing it changes the order).

Finite runs: with num_epochs set, the last partial batch is dropped when
drop_remainder (its records are neither yielded nor counted: the only
exception to "yielded or counted"). With drop_remainder=False it is yielded
short, and if only skips follow the last example, a final batch holds just
`data_type` int32 [0] and `skipped` (consumers of finite runs should skip
batches without 'image'). Processes can hold different numbers of records,
so multi-host training should use num_epochs=None (infinite).

DataWaitTimer measures how long a loop waits in next(data_iter).
"""
from __future__ import annotations

import time

from absl import flags
import grain
import numpy as np

from data_pipelines import filters
from data_pipelines import records
from data_pipelines import shards as shards_lib
from data_pipelines import transforms
from data_pipelines.filters import SKIP_REASONS

_R = len(SKIP_REASONS)


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


def per_host_batch(global_batch_size: int, process_count: int) -> int:
  """This host's share of the global batch; raises if it does not divide."""
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by process_count {process_count}')
  return global_batch_size // process_count


def check_process(process_index, process_count):
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, '
                     f'{process_count})')


def make_record_dataset(data_cfg, *, process_index: int, process_count: int,
                        seed: int, tokenizer=None, num_epochs=None,
                        transform_images=True) -> grain.IterDataset:
  """Unbatched grain IterDataset of examples and {'skip': reason} markers."""
  check_process(process_index, process_count)
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
  return ds.map(records.RecordProcessor(data_cfg, tokenizer,
                                        transform_images=transform_images))


def make_iterator(data_cfg, *, global_batch_size: int, process_index: int,
                  process_count: int, seed: int, tokenizer=None,
                  num_epochs=None) -> grain.DatasetIterator:
  """The per-host batch iterator over tar shards (see the module doc)."""
  b = per_host_batch(global_batch_size, process_count)
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


def ensure_absl_flags():
  """Marks absl flags parsed if they are not (grain's worker processes read them).

  Outside absl.app (tests, notebooks) they are unparsed; take the defaults.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _prefetch(ds, data_cfg):
  if data_cfg.num_workers > 0:
    ensure_absl_flags()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers,
        per_worker_buffer_size=max(1, data_cfg.prefetch)))
  elif data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=data_cfg.prefetch)
  return iter(ds)


class DataWaitTimer:
  """Measures the time a loop spends waiting in next(data_iter).

  `next(it)` replaces next(it); summary() gives wait_s, total_s (since the
  first call), wait_fraction and batches. Block on the step's result before
  the next call if the step runs asynchronously.
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
