"""The demo config trains through the grain pipeline from its generated shards, and its
checkpoints carry the data iterator's position."""
import json
import os

import numpy as np
import pytest

from configs import demo
from data_pipelines import demo_data
from unidiffuser_jax import train, vocab

pytestmark = pytest.mark.slow  # trains / extracts end to end: minutes on 2 cores


def tiny_demo_config(paths):
  """configs/demo.py:tiny on the generated shards, measuring its latent scale."""
  c = demo.get_config("tiny")
  c.data.update(source="shards")
  c.data.shards = ",".join(paths["train_shards"])
  c.data.tokenizer = paths["tokenizer"]
  c.encoders.fit_latent_stats = 16   # the demo measures its latent scale: 2 batches here
  c.mesh.num_devices = 2     # sharded (fsdp=2), cheaper to compile than all 8
  c.train.update(steps=4, warmup_steps=1, checkpoint_every=2)
  return vocab.derive(c)   # vocabulary and <|EOS|> from the generated set's tokenizer


def test_demo_config_trains_from_generated_shards(tmp_path):
  paths = demo_data.build_demo(str(tmp_path / "demo_data"), n_train=40, n_heldout=2, size=16,
                               shard_size=16)
  assert len(paths["train_shards"]) == 3
  config = tiny_demo_config(paths)
  workdir = tmp_path / "run"
  last = train.train(config, str(workdir))

  assert last, "no metrics were logged"
  for k in ("loss", "loss_img", "loss_clip", "loss_text", "grad_norm"):
    assert np.isfinite(last[k]), (k, last[k])
  assert last["data/skipped_corrupt_image"] == 0     # the pipeline's counters reached the logs

  positions = []
  for step in (2, 4):
    ckpt = workdir / "checkpoints" / str(step)
    assert (ckpt / "state").is_dir() and (ckpt / "config").is_dir(), sorted(os.listdir(ckpt))
    data_file = ckpt / "data" / "process_0-of-1.json"
    assert data_file.is_file(), sorted(os.listdir(ckpt / "data"))
    positions.append(json.loads(data_file.read_text()))
  # The saved state is a real reading position: it moved on between the two checkpoints.
  assert positions[0] != positions[1]
