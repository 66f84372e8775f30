"""--mode=extract: run the frozen encoders once over raw shards, write feature shards.

  python -m unidiffuser_jax.main --config=configs/demo.py --mode=extract --workdir=DIR

Reads config.data.shards with the training pipeline (same decoding, filters and
transforms; one pass, no record shuffle), runs the autoencoder and the CLIP
encoders on the mesh (batch split over (data, fsdp), one jitted step) and
writes ArrayRecord feature shards (data_pipelines.features.FeatureWriter)
into config.data.features, or DIR/features when that is empty. One record:

  moments      float32 [h, w, 2C]   autoencoder posterior (mean || logvar)
  clip_img     float32 [1, D]       CLIP image embedding (projected)
  tokens       int32   [L]          text-encoder ids        (text: tokens | both)
  text_hidden  float32 [L, E]       CLIP text hidden states (text: hidden | both)

The posterior *sample* is not stored: training draws it from the moments with
its own key, so a run from features sees the same distribution as a run from
raw shards. The text latent is not stored either (it depends on the caption
decoder's prefix layers, which stage 1 may still change); text_hidden spares
the CLIP text encoder. Train from the features with
--config.data.source=features --config.data.features=<dir>.

Options (`config.extract`, all optional): text ('tokens' | 'hidden' | 'both',
default 'tokens'), shard_size (records per file, 10000), batch_size (global;
0 = config.train.batch_size).

Files, per process i of n (every process writes only its own):
  features-p{i:05d}-of-{n:05d}-{k:05d}.array_record   the records
  keys-p{i:05d}-of-{n:05d}.txt      the source record key of each record, in order
  extract-p{i:05d}-of-{n:05d}.json  counts: records, skipped records per reason
"""
from __future__ import annotations

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import features
from data_pipelines import iterators
from data_pipelines.filters import SKIP_REASONS
from unidiffuser_jax import encoders as encoders_lib, errors, sharding

log = logging.getLogger(__name__)
TEXT_MODES = ("tokens", "hidden", "both")


def extract_options(config) -> dict:
  """config.extract (configs/common.extract) as a dict; rejects unknown text modes."""
  opts = dict(config.extract)
  if opts["text"] not in TEXT_MODES:
    raise errors.ConfigError(f"config.extract.text={opts['text']!r}; use one of {TEXT_MODES}")
  if int(opts["shard_size"]) < 1:
    raise errors.ConfigError(f"config.extract.shard_size={opts['shard_size']}; use >= 1")
  return opts


def output_dir(config, workdir: str) -> str:
  return config.data.features or os.path.join(workdir, "features")


def made_with(config) -> dict:
  """What the features depend on; training from them checks it against its own config
  (input_pipeline.check_features_match), so stale features stop with a clear message."""
  encoders = {k: v for k, v in config.encoders.to_dict().items() if k != "captioner"}
  encoders["weights"] = {k: v for k, v in encoders["weights"].items() if k != "captioner"}
  made = {
      "encoders": encoders,
      "seed": int(config.seed),   # random-init encoders (the demo's) are drawn from it
      "resolution": int(config.data.resolution),
      "clip_resolution": int(config.data.clip_resolution),
      "max_length": int(config.data.max_length),
  }
  return json.loads(json.dumps(made))   # as it reads back from the JSON file


def file_tag(process_index: int, process_count: int) -> str:
  return f"p{process_index:05d}-of-{process_count:05d}"


def make_encode_step(encoders, text_mode: str, mesh, encoder_shardings):
  """Jitted (encoder params, global raw batch) -> {feature name: batch-sharded array}."""
  def step(params, batch):
    out = {
        "moments": encoders.image_moments(params, batch["image"]).astype(jnp.float32),
        "clip_img": encoders.clip_embedding(params, batch["clip_image"]),
    }
    if text_mode in ("hidden", "both"):
      out["text_hidden"] = encoders.text_hidden(params, batch["tokens"]).astype(jnp.float32)
    return out

  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  return jax.jit(step, in_shardings=(encoder_shardings, None), out_shardings=rows)


def _reader_config(config):
  """config.data for one ordered pass: no record shuffle, keys kept, short last batch."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.shuffle_buffer = 0
  data.drop_remainder = False
  data.with_text = True       # keeps `key` (provenance); captions are dropped below
  return data


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x [n, ...] -> [rows, ...] by repeating the last row (or zeros if n == 0)."""
  n = x.shape[0]
  if n == rows:
    return x
  if n == 0:
    return np.zeros((rows,) + x.shape[1:], x.dtype)
  return np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)], axis=0)


def _empty_inputs(config, b: int) -> dict:
  d = config.data
  return {
      "image": np.zeros((b, d.resolution, d.resolution, 3), np.float32),
      "clip_image": np.zeros((b, d.clip_resolution, d.clip_resolution, 3), np.float32),
      "tokens": np.zeros((b, d.max_length), np.int32),
  }


def _any_process(flag: bool) -> bool:
  """True if `flag` holds on any process (every process must call this in step)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
  return bool(np.asarray(flags).any())


def run(config, workdir: str) -> dict:
  """Extracts features for this process's shards; returns this process's summary."""
  opts = extract_options(config)
  text_mode = opts["text"]
  if not config.data.tokenizer:
    raise errors.ConfigError("extraction needs token ids: set config.data.tokenizer")
  mesh = sharding.make_mesh(config.mesh)
  global_batch = int(opts["batch_size"]) or int(config.train.batch_size)
  sharding.check_batch_divisible(global_batch, mesh, what="the extraction batch size")
  pi, pc = jax.process_index(), jax.process_count()
  b = global_batch // pc

  encoders = encoders_lib.build(config.encoders)
  # The caption decoder is not used here (and may not be trained yet): leave it out of loading.
  weights = dict(config.encoders.weights, captioner="")
  params, param_shardings = encoders.load_params(weights, mesh, int(config.seed),
                                                 config.sharding.rules)
  encode = make_encode_step(encoders, text_mode, mesh, param_shardings)
  rows = P(sharding.BATCH_AXES)

  data_iter = iterators.make_iterator(_reader_config(config), global_batch_size=global_batch,
                                      process_index=pi, process_count=pc, seed=int(config.seed),
                                      num_epochs=1)
  out_dir = output_dir(config, workdir)
  tag = file_tag(pi, pc)
  _remove_own_files(out_dir, tag)
  skipped = np.zeros((len(SKIP_REASONS),), np.int64)
  keys: list[str] = []
  bar = tqdm.tqdm(desc=f"extract {tag}", unit="rec", file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0, disable=pi != 0)
  writer = features.FeatureWriter(out_dir, shard_size=int(opts["shard_size"]),
                                  prefix=f"features-{tag}")
  with mesh, writer:
    while True:
      batch = next(data_iter, None)
      if not _any_process(batch is not None):
        break
      batch = dict(batch) if batch is not None else {}
      if "skipped" in batch:
        skipped += batch.pop("skipped")
      n = int(batch["image"].shape[0]) if "image" in batch else 0
      if n == 0 and pc == 1:
        continue  # only skipped records in this batch: nothing to encode
      inputs = _empty_inputs(config, b) if n == 0 else {
          k: _pad_rows(batch[k], b) for k in ("image", "clip_image", "tokens")}
      out = encode(params, sharding.to_global(inputs, mesh))
      out = multihost_utils.global_array_to_host_local_array(out, mesh, rows)
      out = {k: np.asarray(v)[:n] for k, v in out.items()}   # drop the padding rows
      if text_mode in ("tokens", "both"):
        out["tokens"] = batch["tokens"].astype(np.int32)
      for i in range(n):
        writer.write({k: v[i] for k, v in out.items()})
      keys.extend(str(k) for k in batch.get("key", [""] * n))
      bar.update(n)
  bar.close()
  data_iter_close = getattr(data_iter, "close", None)
  if data_iter_close is not None:
    data_iter_close()

  summary = {
      "records": len(keys),
      "files": [os.path.basename(p) for p in writer.paths],
      "text": text_mode,
      "skipped": {r: int(c) for r, c in zip(SKIP_REASONS, skipped) if c},
      "shards": config.data.shards,
      "made_with": made_with(config),
  }
  _write_text(os.path.join(out_dir, f"keys-{tag}.txt"), "".join(k + "\n" for k in keys))
  _write_text(os.path.join(out_dir, f"extract-{tag}.json"), json.dumps(summary, indent=1))
  _report(summary, out_dir, tag)
  return summary


def _remove_own_files(out_dir: str, tag: str) -> None:
  """A re-run replaces this process's earlier output (a shorter run must leave no stale shard)."""
  if not os.path.isdir(out_dir):
    return
  for name in os.listdir(out_dir):
    if tag in name and name.startswith(("features-", "keys-", "extract-")):
      os.remove(os.path.join(out_dir, name))


def _write_text(path: str, text: str) -> None:
  epath.Path(path).write_text(text)


def _report(summary: dict, out_dir: str, tag: str) -> None:
  lines = [f"extract ({tag}): wrote {summary['records']} feature records in "
           f"{len(summary['files'])} file(s) to {out_dir}"]
  if summary["skipped"]:
    total = sum(summary["skipped"].values())
    lines.append(f"skipped {total} bad or filtered record(s): " + ", ".join(
        f"{r}={c}" for r, c in summary["skipped"].items()))
  else:
    lines.append("skipped no records")
  lines.append("train from the features with:\n  " + _train_command(out_dir))
  print("\n".join(lines), flush=True)


def _train_command(out_dir: str) -> str:
  """This command line with --mode=extract replaced by the features overrides."""
  argv = [a for a in sys.argv[1:] if not a.startswith("--mode")
          and not a.startswith(("--config.data.source", "--config.data.features"))]
  if not any(a.startswith("--config") for a in argv):
    argv = ["--config=<config>", "--workdir=<workdir>"]
  return " ".join(["python -m unidiffuser_jax.main", *argv, "--config.data.source=features",
                   f"--config.data.features={out_dir}"])
