"""--mode=extract: feature shards hold exactly the encoders' outputs, once per record,
and training from them is the same objective as training from the raw shards."""
import glob
import json
import os

import grain
import jax
import numpy as np
import pytest

from configs import demo
from data_pipelines import demo_data, features, iterators, make_shards
from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax import checkpoints, extract, input_pipeline, jobs, rng, sharding, train, vocab
from unidiffuser_jax.models import uvit

pytestmark = pytest.mark.slow  # trains / extracts end to end: minutes on 2 cores

N_TRAIN = 21   # not a multiple of the batch (8): the last batch is padded


def tiny_config(data_paths, bad_shards=()):
  c = demo.get_config("tiny")
  c.data.update(source="shards", shuffle_buffer=4)
  c.data.shards = ",".join(list(data_paths["train_shards"]) + list(bad_shards))
  c.data.tokenizer = data_paths["tokenizer"]
  c.train.update(steps=3, warmup_steps=1)
  c.extract.update(text="both", shard_size=8)
  c.mesh.update(data=2, fsdp=2, tensor=2)   # the batch split over data x fsdp
  return vocab.derive(c)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
  root = tmp_path_factory.mktemp("extract")
  paths = demo_data.build_demo(str(root / "demo"), n_train=N_TRAIN, n_heldout=2, size=16,
                               shard_size=8)
  # Two bad inputs the pipeline must skip and count: a file that is not a tar,
  # and a shard whose one record has undecodable image bytes.
  (root / "not_a_tar.tar").write_bytes(b"this is not a tar file" * 40)
  make_shards.write_tar(str(root / "corrupt.tar"),
                        [("000000777.png", b"\x89PNG broken"), ("000000777.txt", b"a red circle")])
  config = tiny_config(paths, [str(root / "not_a_tar.tar"), str(root / "corrupt.tar")])
  workdir = str(root / "work")
  jobs.run("extract", config, workdir)
  return config, workdir


def _raw_records(config):
  """Every record the pipeline yields from the raw shards, by key (one ordered pass)."""
  it = iterators.make_iterator(extract._reader_config(config), global_batch_size=8,
                              process_index=0, process_count=1, seed=0, num_epochs=1)
  recs = {}
  for batch in it:
    for i, key in enumerate(batch.get("key", [])):
      assert str(key) not in recs
      recs[str(key)] = {k: batch[k][i] for k in ("image", "clip_image", "tokens")}
  return recs


@pytest.fixture(scope="module")
def single(extracted):
  """The encoders and a U-ViT loss on one device: the reference side of the comparisons."""
  config, _ = extracted
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  enc = encoders_lib.build(config.encoders)
  params, _ = train.build_frozen(config, mesh, enc)
  return enc, params


def _expected_features(enc, params, recs):
  keys = sorted(recs)
  stack = lambda name: np.stack([recs[k][name] for k in keys])

  @jax.jit
  def apply(image, clip_image, tokens):
    return (enc.image_moments(params, image), enc.clip_embedding(params, clip_image),
            enc.text_hidden(params, tokens))

  moments, clip_img, hidden = jax.device_get(apply(stack("image"), stack("clip_image"),
                                                   stack("tokens")))
  return {k: {"moments": moments[i], "clip_img": clip_img[i], "text_hidden": hidden[i],
              "tokens": recs[k]["tokens"]} for i, k in enumerate(keys)}


def test_extract_writes_every_record_once_with_encoder_outputs(extracted, single):
  config, workdir = extracted
  out = os.path.join(workdir, "features")
  summary = json.load(open(glob.glob(os.path.join(out, "extract-*.json"))[0]))
  assert summary["records"] == N_TRAIN
  assert summary["skipped"] == {"bad_shard": 1, "corrupt_image": 1}
  assert len(glob.glob(os.path.join(out, "features-*.array_record"))) == 3   # 21 = 8 + 8 + 5

  recs = _raw_records(config)
  assert len(recs) == N_TRAIN
  expected = _expected_features(*single, recs)

  # The files in write order, against the keys file: each record is its own source record's.
  keys = open(glob.glob(os.path.join(out, "keys-*.txt"))[0]).read().split()
  assert sorted(keys) == sorted(expected)
  src = grain.sources.ArrayRecordDataSource(features.expand_feature_shards(out))
  assert len(src) == N_TRAIN
  for i, key in enumerate(keys):
    got = features.deserialize_features(src[i])
    assert sorted(got) == ["clip_img", "moments", "text_hidden", "tokens"]
    for name, want in expected[key].items():
      assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
      np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=f"{key} {name}")

  # Read back through the training reader: every record exactly once.
  data = config.data.copy_and_resolve_references()
  data.features = out
  seen = []
  for batch in features.make_feature_iterator(data, global_batch_size=1, process_index=0,
                                              process_count=1, seed=0, num_epochs=1):
    diffs = {k: np.abs(batch["moments"][0] - e["moments"]).max() for k, e in expected.items()}
    key = min(diffs, key=diffs.get)
    assert diffs[key] < 1e-5
    np.testing.assert_array_equal(batch["tokens"][0], expected[key]["tokens"])
    np.testing.assert_allclose(batch["clip_img"][0], expected[key]["clip_img"], atol=1e-5)
    seen.append(key)
  assert sorted(seen) == sorted(expected)


@pytest.fixture(scope="module")
def trained(extracted, tmp_path_factory):
  """train.train for 2 steps with config.data.source='features'."""
  config, workdir = extracted
  config = config.copy_and_resolve_references()
  config.data.source = "features"
  config.data.features = os.path.join(workdir, "features")
  config.mesh = dict(data=1, fsdp=2, tensor=1, num_devices=2)   # sharded, cheaper to compile
  config.train.update(steps=2, checkpoint_every=2)
  run_dir = str(tmp_path_factory.mktemp("run"))
  return run_dir, train.train(config, run_dir)


def test_train_from_features(trained):
  run_dir, last = trained
  assert last and all(np.isfinite(last[k]) for k in ("loss", "loss_img", "loss_clip", "loss_text"))
  assert os.path.isfile(os.path.join(run_dir, "checkpoints", "2", "data", "process_0-of-1.json"))


def test_feature_batch_loss_matches_raw_batch_loss(extracted, single, trained):
  """The training loss (train.uvit_task, the key a train step derives) on 8 raw records and
  on their feature records, with the U-ViT weights trained above: the precomputed path is
  the encoders path."""
  config, workdir = extracted
  enc, enc_params = single
  recs = _raw_records(config)
  keys = open(glob.glob(os.path.join(workdir, "features", "keys-*.txt"))[0]).read().split()[:8]
  src = grain.sources.ArrayRecordDataSource(
      features.expand_feature_shards(os.path.join(workdir, "features")))
  feats = [features.deserialize_features(src[i]) for i in range(8)]
  raw = {k: np.stack([recs[key][k] for key in keys]) for k in ("image", "clip_image", "tokens")}
  feature = {k: np.stack([f[k] for f in feats]) for k in ("moments", "clip_img", "text_hidden")}
  raw["data_type"] = feature["data_type"] = np.zeros((8,), np.int32)

  model = uvit.from_config(config.model)
  task = train.uvit_task(model, enc, int(config.seed))
  params = jax.device_get(checkpoints.load_params(trained[0], key="params"))
  key = rng.key_for(int(config.seed), 2, "train/uvit")   # what make_train_step derives at step 2
  both = jax.jit(lambda p, a, b: (task.loss(p, enc_params, a, key),
                                  task.loss(p, enc_params, b, key)))
  (l_raw, parts_raw), (l_feat, parts_feat) = jax.device_get(both(params, raw, feature))
  assert np.isfinite(l_raw)
  assert l_feat == pytest.approx(l_raw, rel=1e-5)
  for k in parts_raw:
    assert parts_feat[k] == pytest.approx(parts_raw[k], rel=1e-5, abs=1e-7), k


def test_stale_features_stop_with_a_clear_message(extracted):
  config, workdir = extracted
  config = config.copy_and_resolve_references()
  config.data.source = "features"
  config.data.features = os.path.join(workdir, "features")
  config.encoders.clip_image.proj_dim = 16          # other encoders than the extraction's
  with pytest.raises(ValueError, match=r"encoders differ.*re-run --mode=extract"):
    input_pipeline.make_train_iterator(config, config.train, 0, 1)
  config.encoders.clip_image.proj_dim = 32
  config.data.data_type = 1                         # reading options are free to change
  assert "moments" in next(input_pipeline.make_train_iterator(config, config.train, 0, 1))
