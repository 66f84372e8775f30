"""The one place the train loop gets its data from: shards, feature shards or synthetic.

config.data.source picks the reader (data_pipelines: iterators, features,
synthetic); everything after it (global arrays, checkpointed iterator state,
skip counters) is the same for all three.
"""
import glob
import json
import os

import numpy as np

from data_pipelines import features
from data_pipelines import iterators
from data_pipelines import synthetic
from data_pipelines.filters import SKIP_REASONS
from unidiffuser_jax import extract

SOURCES = ("shards", "features", "synthetic")


def make_train_iterator(config, train_cfg, process_index: int, process_count: int):
  data = config.data
  host_batch = train_cfg.batch_size // process_count
  if data.source == "synthetic":
    return synthetic.make_iterator(
        resolution=data.resolution, clip_resolution=data.clip_resolution,
        max_length=data.max_length, vocab_size=data.synthetic_vocab_size,
        host_batch=host_batch, seed=config.seed, num_examples=data.synthetic_examples,
        data_type=data.data_type, num_skip_reasons=len(SKIP_REASONS),
        process_index=process_index, process_count=process_count)
  if data.source == "features" and data.with_text:
    # Feature records hold no caption strings; a trainer that asks for them
    # (stage 1, the caption decoder) reads the raw shards the features came from.
    if not data.shards:
      raise ValueError("config.data.source='features' holds no captions, and this trainer needs "
                       "them (data.with_text); set config.data.shards to the raw shards too")
    return iterators.make_iterator(
        data, global_batch_size=train_cfg.batch_size, process_index=process_index,
        process_count=process_count, seed=config.seed)
  if data.source == "features":
    check_features_match(config)
    return features.make_feature_iterator(
        data, global_batch_size=train_cfg.batch_size, process_index=process_index,
        process_count=process_count, seed=config.seed)
  if data.source == "shards":
    return iterators.make_iterator(
        data, global_batch_size=train_cfg.batch_size, process_index=process_index,
        process_count=process_count, seed=config.seed)
  raise ValueError(f"config.data.source={data.source!r}; use one of {SOURCES}")


def skip_metrics(skipped_total) -> dict[str, float]:
  """Cumulative skipped-record counts per reason (this host) as metric scalars."""
  if skipped_total is None:
    return {}
  counts = np.asarray(skipped_total)
  return {f"data/skipped_{r}": float(c) for r, c in zip(SKIP_REASONS, counts)}


def check_features_match(config) -> None:
  """Stops early if the feature shards were extracted with other encoders or sizes.

  --mode=extract writes extract-*.json next to the shards, recording what the
  features depend on ('made_with'); features from elsewhere (no such file)
  are not checked.
  """
  spec = config.data.features
  folder = spec if isinstance(spec, str) and os.path.isdir(spec) else None
  if folder is None:
    return
  want = extract.made_with(config)
  for path in sorted(glob.glob(os.path.join(folder, "extract-*.json"))):
    with open(path) as f:
      got = json.load(f).get("made_with")
    if got is None:
      continue
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if diff:
      raise ValueError(
          f"the feature shards in {folder} were extracted with other settings ({', '.join(diff)} "
          f"differ from this config; see {path}); re-run --mode=extract with this config")
