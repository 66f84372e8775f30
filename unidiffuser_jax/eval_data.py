"""Evaluation sets for --mode=eval: images with reference captions, and the prompts drawn from them.

config.eval.source picks the reader; every reader gives an EvalSet: a random-access list of
items {'name', 'image' (encoded bytes or a uint8 [H, W, 3] array), 'captions' [str, ...]}
read lazily (a 30K-image set is never held in memory).

  "tfds"    tfds.data_source(config.eval.tfds_name, split, data_dir=config.eval.tfds_data_dir,
            download=False) wrapped in a grain MapDataset: COCO 2014 in TFDS `coco_captions`
            (Karpathy splits; "val+test+restval" is all of val2014). Prepared data only.
  "shards"  img2dataset tar shards (config.eval.path, data_pipelines.shards syntax): one caption
            per image (its .txt).
  "folder"  a folder with captions.jsonl: lines {"file": "x.jpg", "caption": "..."} or
            {"file": ..., "captions": [...]}, images next to it.

The protocol (COCO-30K, `select`): the set's images in an order drawn from caption_seed, the
first `num` of them, and for each one of its captions chosen with the same seed as the t2i
prompt. The choice is written to <workdir>/eval/prompts.jsonl.
"""
from collections.abc import Sequence
import dataclasses
import json
import os

import grain
import numpy as np

from data_pipelines import shards
from unidiffuser_jax.errors import ConfigError

SOURCES = ("", "tfds", "shards", "folder")


@dataclasses.dataclass
class EvalSet:
  """A random-access image set: items[i] -> {'name', 'image', 'captions'}."""
  items: Sequence

  def __len__(self) -> int:
    return len(self.items)


class LazyImages(Sequence):
  """The images of selected set items, read when indexed (sample.generate's host['images'])."""

  def __init__(self, items: Sequence, order: Sequence[int]):
    self._items, self._order = items, list(order)

  def __len__(self) -> int:
    return len(self._order)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return LazyImages(self._items, self._order[i])
    return self._items[self._order[i]]["image"]


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _tfds_item(ex: dict) -> dict:
  return {"name": _text(ex.get("image/filename", ex.get("image/id", ""))),
          "image": np.asarray(ex["image"], np.uint8),
          "captions": [_text(t) for t in np.atleast_1d(ex["captions"]["text"])]}


def _tfds(ecfg) -> Sequence:
  import tensorflow_datasets as tfds  # local: only this source needs it (and it is heavy)
  try:
    source = tfds.data_source(ecfg.tfds_name, split=ecfg.split,
                              data_dir=ecfg.tfds_data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError, bad split...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(
        f"config.eval.source=tfds: cannot open {ecfg.tfds_name} split {ecfg.split!r} in "
        f"{ecfg.tfds_data_dir or 'the default TFDS data dir'} ({first}); prepare it first "
        f"(tfds build {ecfg.tfds_name} --manual_dir=... ; nothing is downloaded here) and pass "
        f"--config.eval.tfds_data_dir") from None
  return grain.MapDataset.source(source).map(_tfds_item)


def _shards(path: str) -> list[dict]:
  items = []
  for shard in shards.expand_shards(path):
    for e in shards.iter_entries(shard):
      files = e.get("files", {})
      ext = next((x for x in shards.IMAGE_EXTS if x in files), None)
      if ext is None or "txt" not in files:
        continue
      items.append({"name": f"{e['key']}.{ext}", "image": files[ext],
                    "captions": [files["txt"].decode()]})
  return items


class _FolderItems(Sequence):
  def __init__(self, folder: str, rows: list[dict]):
    self._folder, self._rows = folder, rows

  def __len__(self):
    return len(self._rows)

  def __getitem__(self, i):
    row = self._rows[i]
    with open(os.path.join(self._folder, row["file"]), "rb") as f:
      image = f.read()
    return {"name": row["file"], "image": image, "captions": row["captions"]}


def _folder(folder: str) -> Sequence:
  index = os.path.join(folder, "captions.jsonl")
  if not os.path.isfile(index):
    raise ConfigError(f"config.eval.path={folder}: no captions.jsonl there (lines "
                      f'{{"file": "x.jpg", "caption": "..."}})')
  rows = []
  with open(index) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      caps = row.get("captions", [row["caption"]] if "caption" in row else None)
      if "file" not in row or not caps:
        raise ConfigError(f"{index}:{n}: needs 'file' and 'caption' or 'captions'")
      rows.append({"file": row["file"], "captions": [str(c) for c in caps]})
  return _FolderItems(folder, rows)


def load(ecfg) -> EvalSet | None:
  """The set config.eval names (None for source "": config.sample's inputs are used)."""
  if ecfg.source not in SOURCES:
    raise ConfigError(f"config.eval.source={ecfg.source!r}; use one of {SOURCES}")
  if ecfg.source == "":
    return None
  if ecfg.source == "tfds":
    items = _tfds(ecfg)
  else:
    if not ecfg.path:
      raise ConfigError(f"config.eval.source={ecfg.source} needs --config.eval.path")
    items = _shards(ecfg.path) if ecfg.source == "shards" else _folder(ecfg.path)
  if len(items) == 0:
    raise ConfigError(f"config.eval: the {ecfg.source} set is empty")
  return EvalSet(items)


@dataclasses.dataclass
class Selection:
  """The protocol's choice: set indices, their prompts (one caption each), all captions."""
  order: list[int]
  prompts: list[str]
  references: list[list[str]]
  names: list[str]


def select(eval_set: EvalSet, num: int, seed: int, out_path: str | None = None) -> Selection:
  """The first `num` images in a seeded order, each with one seeded caption (COCO-30K).

  Reads the chosen items once for their captions (TFDS decodes each image on the way)."""
  rng = np.random.default_rng(seed)
  order = [int(i) for i in rng.permutation(len(eval_set))[:num]]
  prompts, refs, names = [], [], []
  for i in order:
    item = eval_set.items[i]
    caps = list(item["captions"])
    prompts.append(caps[int(rng.integers(len(caps)))])
    refs.append(caps)
    names.append(item["name"])
  if out_path:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
      for i, name, prompt in zip(order, names, prompts):
        f.write(json.dumps({"index": i, "image": name, "prompt": prompt}) + "\n")
  return Selection(order, prompts, refs, names)
