"""Deterministic random batches in the raw-batch format, for tests and benchmarks.

Example i is a pure function of (seed, i), and the iterator is a grain
DatasetIterator, so its position is checkpointed exactly like the real data's.
With several processes, process p's k-th host batch holds examples
k * global + p * host_batch ... + host_batch - 1 of the global batch k, so the global
batches (host batches joined in process order) are those of one process.
`num_examples` repeats a fixed set (e.g. one batch, to check that a model can
overfit it).
"""
import grain
import numpy as np


def make_iterator(*, resolution: int, clip_resolution: int, max_length: int, vocab_size: int,
                  host_batch: int, seed: int, num_examples: int = 1 << 30, data_type: int = 0,
                  num_skip_reasons: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  def example(i: int) -> dict:
    rng = np.random.default_rng((seed, int(i) % num_examples))
    ex = {
        "image": rng.uniform(-1, 1, (resolution, resolution, 3)).astype(np.float32),
        "clip_image": rng.standard_normal((clip_resolution, clip_resolution, 3)).astype(np.float32),
        "tokens": rng.integers(0, vocab_size, (max_length,)).astype(np.int32),
        "data_type": np.int32(data_type),
    }
    if num_skip_reasons:
      ex["skipped"] = np.zeros((num_skip_reasons,), np.int32)
    return ex

  offset, global_batch = process_index * host_batch, process_count * host_batch
  ds = (grain.MapDataset.range(1 << 40)
        .map(lambda i: (i // host_batch) * global_batch + offset + i % host_batch)
        .map(example).batch(host_batch, drop_remainder=True))
  if num_skip_reasons:
    # Batching stacks the per-example counters; the loop wants one vector per batch.
    ds = ds.map(lambda b: {**b, "skipped": b["skipped"].sum(0)})
  return iter(ds.to_iter_dataset())
