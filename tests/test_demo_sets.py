"""Both generated sets through the same build -> grain pipeline -> judge round trip."""
import os

import numpy as np
import pytest

from configs import common
from data_pipelines import demo_data, demo_sets, iterators

UNK = 1  # the word-level tokenizers' [UNK] id (make_tokenizer)


@pytest.mark.parametrize("name, size", [("shapes", 32), ("glyphs", 16)])
def test_build_round_trip(tmp_path, name, size):
  demo_set = demo_sets.get(name)
  out = str(tmp_path / name)
  if name != "shapes":   # another set's build in the same directory is not mistaken for it
    demo_data.build_demo(out, n_train=4, n_heldout=2, size=size, seed=0, shard_size=16)
  p = demo_set.build_demo(out, n_train=40, n_heldout=12, size=size, seed=0, shard_size=16)
  assert len(p["train_shards"]) == 3 and len(p["heldout_shards"]) == 1
  assert set(p["heldout_attrs"][0]) == {"key", "caption", *demo_set.ATTRIBUTES}
  mtime = os.path.getmtime(p["train_shards"][0])
  assert demo_set.build_demo(out, n_train=40, n_heldout=12, size=size, seed=0,
                             shard_size=16) == p  # idempotent: nothing rewritten
  assert os.path.getmtime(p["train_shards"][0]) == mtime
  cfg = common.data(
      shards=p["heldout"], resolution=size, clip_resolution=16, tokenizer=p["tokenizer"],
      with_text=True, drop_remainder=False, shuffle_buffer=1000, interleave_cycle=4,
      num_workers=0, prefetch=2, min_side=0, max_aspect=None, max_watermark=None,
      max_unsafe=None, min_aesthetic=None, min_caption_chars=1, max_caption_chars=None)
  it = iterators.make_iterator(cfg, global_batch_size=12, process_index=0,
                              process_count=1, seed=0, num_epochs=1)
  b = next(it)
  it.close()
  assert b["skipped"].sum() == 0 and b["tokens"].shape == (12, 77)
  assert not (b["tokens"] == UNK).any()   # every caption word is in the tokenizer
  # The pipeline's [-1, 1] images still judge correctly (size unchanged).
  imgs = np.round((b["image"] + 1) * 127.5).astype(np.uint8)
  by_key = {a["key"]: a for a in p["heldout_attrs"]}
  truth = [by_key[k] for k in b["key"]]
  assert demo_sets.score_i2t(demo_set, list(b["caption"]), truth)["all"] == 1.0
  assert demo_sets.score_t2i(demo_set, imgs, [t["caption"] for t in truth])["all"] == 1.0


def test_accuracy_counts_none_as_wrong_and_checks_lengths():
  truth = [{"colour": "red", "shape": "circle", "position": "left"}] * 2
  pred = [dict(truth[0]), {"colour": None, "shape": "circle", "position": "left"}]
  r = demo_sets.accuracy(demo_data, pred, truth)
  assert (r["colour"], r["shape"], r["all"], r["n"]) == (0.5, 1.0, 0.5, 2)
  assert r["chance"] == demo_data.CHANCE
  with pytest.raises(ValueError, match="1 predictions vs 2 truths"):
    demo_sets.accuracy(demo_data, pred[:1], truth)
