"""Stage 0 of the demo runbook: the CLIP pair fitted contrastively (unidiffuser_jax/clip_train.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import demo
from data_pipelines import demo_data
from unidiffuser_jax import checkpoints, clip_train, encoders as encoders_lib, input_pipeline
from unidiffuser_jax import vocab
from unidiffuser_jax.errors import ConfigError


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
  img[2] = 3 * txt[2]   # one pair aligned, so the accuracy is not trivially 0 or 1
  log_scale = 1.3
  loss, acc = clip_train.contrastive_loss(jnp.asarray(img, jnp.float32),
                                          jnp.asarray(txt, jnp.float32), log_scale)
  ti, tt = F.normalize(torch.tensor(img), dim=-1), F.normalize(torch.tensor(txt), dim=-1)
  logits = np.exp(log_scale) * ti @ tt.T
  labels = torch.arange(6)
  want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert float(acc) == pytest.approx(float((logits.argmax(1) == labels).double().mean()))


@pytest.mark.slow
def test_stage_fits_the_pair_and_exports_the_embedding_at_its_scale(tmp_path):
  paths = demo_data.build_demo(str(tmp_path / "demo_data"), n_train=64, n_heldout=2, size=16,
                               shard_size=32)
  c = demo.get_config("tiny")
  c.data.update(source="shards", shards=",".join(paths["train_shards"]),
                tokenizer=paths["tokenizer"])
  c.mesh.num_devices = 2
  c.clip_fit.update(embed_std=0.1, std_examples=64)
  c.clip_fit.train.update(steps=150, batch_size=16, lr=1e-3, warmup_steps=5, log_every=50,
                          checkpoint_every=150)
  config = vocab.derive(c)
  out = clip_train.train_clip(config, str(tmp_path / "clip"))

  encoders = encoders_lib.build(config.encoders)
  fitted = {p: checkpoints.load_params(f"{out}/{p}") for p in clip_train.PARTS}
  initial = jax.device_get(nn.unbox(clip_train.clip_task(encoders, config).init_params()))
  for part in clip_train.PARTS:   # the parts config.encoders.weights reads, shapes unchanged
    checkpoints.check_params(fitted[part], initial[part], part, "config.encoders")

  batch = next(input_pipeline.make_train_iterator(config, config.clip_fit.train, 0, 1))
  image, tokens = jnp.asarray(batch["clip_image"]), jnp.asarray(batch["tokens"])
  state = checkpoints.load_params(str(tmp_path / "clip"))   # the stage's own head and scale

  pair = clip_train.contrastive_pair(encoders, config)

  def pair_loss(params):
    img, txt, log_scale = pair.apply({"params": params}, image, tokens)
    return float(clip_train.contrastive_loss(img, txt, log_scale)[0])
  before, after = pair_loss(initial), pair_loss(state)
  assert before > np.log(16) - 0.1 and after < 0.6 * np.log(16), (before, after)   # chance: ln 16

  # The exported image encoder puts the embedding at embed_std per dimension over the
  # std_examples training images (the stream's first 64), the text encoder as trained.
  it = input_pipeline.make_train_iterator(config, config.clip_fit.train, 0, 1)
  images = np.concatenate([next(it)["clip_image"] for _ in range(4)])
  emb = encoders.clip_image.apply({"params": fitted["clip_image"]}, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(emb).std(0).mean(), 0.1, rtol=1e-4)
  jax.tree.map(np.testing.assert_array_equal, fitted["clip_text"], jax.device_get(state["clip_text"]))


def test_parts_names_encoders_only():
  c = demo.get_config("tiny")
  assert clip_train.parts(c) == tuple(c.clip_fit.parts)
  c.clip_fit.parts = ("clip_vision",)
  with pytest.raises(ConfigError, match=r"config.clip_fit.parts=\('clip_vision',\)"):
    clip_train.parts(c)
