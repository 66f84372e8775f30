"""--mode=eval end to end on a tiny model over TFDS coco_captions (tfds.testing.mock_data):
reference statistics vs pytorch-fid's network on the same preprocessed images, then FID /
CLIP score / BLEU / CIDEr-D / held-out loss over two guidance scales."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import transformers
from PIL import Image
from pytorch_fid import inception as pf_inception

from unidiffuser_jax import errors, eval_data, evaluate, fid, jobs
from unidiffuser_jax.weights import inception as inception_weights
from tests.refs import clip as clip_ref
from tests.test_fid import _random_state_dict

N = 8
pytestmark = pytest.mark.slow   # Inception at 299 on CPU, twice, plus sampling: ~1-2 minutes


def tiny_clip(config, clip_dir) -> str:
  """A tiny random transformers CLIPModel over the data tokenizer's vocabulary, saved with
  that tokenizer in clip_dir (config.eval.clip)."""
  vocab = int(config.encoders.clip_text.vocab_size)
  tok_dir = config.data.tokenizer
  clip_cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=40,
                       num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=16,
                       eos_token_id=2),
      vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, image_size=24, patch_size=8),
      projection_dim=16)
  clip_ref.randomise(transformers.CLIPModel(clip_cfg), 3).save_pretrained(clip_dir)
  for f in os.listdir(tok_dir):
    shutil.copy(os.path.join(tok_dir, f), os.path.join(clip_dir, f))
  return str(clip_dir)


@pytest.fixture(scope="module")
def setup(tiny_sampler, tmp_path_factory):
  config, _, _, root = tiny_sampler
  config = config.copy_and_resolve_references()
  d = tmp_path_factory.mktemp("metric_nets")
  sd = _random_state_dict(0)
  pth = d / inception_weights.FID_WEIGHTS_FILE
  torch.save(sd, pth)
  clip_dir = tiny_clip(config, d / "clip")
  config.eval.update(source="tfds", num=N, tasks=("t2i", "i2t"), guidance_scales=(1.0, 3.0),
                     metrics=evaluate.METRICS,
                     inception=str(pth), clip=str(clip_dir), feature_batch_size=8,
                     loss_examples=8, save_samples=N, tfds_data_dir=str(d / "no_tfds_here"))
  config.sample.batch_size = 8
  return config, sd, root


def _pytorch_fid_stats(sd, images_uint8):
  """pytorch-fid's own network (download patched out) on uint8 images -> (mu, sigma)."""
  mp = pytest.MonkeyPatch()
  mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: dict(sd))
  try:
    net = pf_inception.InceptionV3([3]).eval()
  finally:
    mp.undo()
  x = torch.from_numpy(np.stack(images_uint8).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    feats = net(x)[0].squeeze(-1).squeeze(-1).double().numpy()
  return feats.mean(0), np.cov(feats, rowvar=False)


def test_eval_over_mock_coco(setup, tmp_path):
  config, sd, _ = setup
  workdir = str(tmp_path)
  with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_CODE):
    # 1. reference statistics over the set, U-ViT's preprocessing (centre crop, LANCZOS 256)
    stats_cfg = config.copy_and_resolve_references()
    stats_cfg.eval.stats_only = True
    jobs.run("eval", stats_cfg, workdir)
    ref = os.path.join(workdir, "eval", "ref_stats.npz")
    mu, sigma = fid.load_stats(ref, dim=2048)
    source = tfds.data_source("coco_captions", split=config.eval.split, download=False)
    want = []
    for i in range(len(source)):
      im = Image.fromarray(np.asarray(source[i]["image"]))
      w, h = im.size
      s = min(w, h)
      im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
      want.append(np.asarray(im.resize((256, 256), Image.Resampling.LANCZOS)))
    want_mu, want_sigma = _pytorch_fid_stats(sd, want)
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sigma, want_sigma, rtol=1e-3, atol=1e-4)

    # 2. the evaluation
    config.eval.ref_stats = ref
    result = jobs.run("eval", config, workdir) or json.load(
        open(os.path.join(workdir, "eval", "eval.json")))
  out = json.load(open(os.path.join(workdir, "eval", "eval.json")))
  rows = {(r["task"], r["guidance_scale"]): r for r in out["rows"]}
  assert set(rows) == {("t2i", 1.0), ("t2i", 3.0), ("i2t", 1.0), ("i2t", 3.0)}
  for (task, _), r in rows.items():
    assert r["num"] == N and np.isfinite(r["clip_score"]) and r["clip_score"] >= 0
    if task == "t2i":
      assert np.isfinite(r["fid"]) and r["fid"] > 0
    else:
      assert all(0 <= r[f"bleu{k}"] <= 1 for k in range(1, 5)) and r["cider_d"] >= 0
  heldout = out["heldout"]
  assert set(heldout) >= {"heldout/loss", "heldout/loss_t100", "heldout/loss_t900", "seconds"}
  # FID from the written samples with pytorch-fid's network (the distance's formula is checked
  # against pytorch-fid's calculate_frechet_distance in test_fid.py; its sqrtm costs 14 s here)
  t2i_dir = os.path.join(workdir, "eval", "t2i_g3")
  gen = [np.asarray(Image.open(os.path.join(t2i_dir, f"{i:05d}.png"))) for i in range(N)]
  g_mu, g_sigma = _pytorch_fid_stats(sd, gen)
  want_fid = fid.frechet_distance(g_mu, g_sigma, mu, sigma)
  assert abs(rows[("t2i", 3.0)]["fid"] - want_fid) <= 1e-2 * abs(want_fid)
  prompts = [json.loads(x) for x in open(os.path.join(workdir, "eval", "prompts.jsonl"))]
  assert len(prompts) == N and len({p["index"] for p in prompts}) == N
  caps = open(os.path.join(workdir, "eval", "i2t_g1", "captions.jsonl")).read().splitlines()
  assert len(caps) == N
  assert os.path.isfile(os.path.join(workdir, "eval", "fid_clip.png"))
  assert any(f.startswith("events.out") for f in os.listdir(os.path.join(workdir, "eval")))
  del result


def test_missing_metric_weights_name_the_import(setup, tmp_path):
  config, _, _ = setup
  config = config.copy_and_resolve_references()
  config.eval.update(inception="", source="", metrics=("fid",), tasks=("t2i",))
  with pytest.raises(errors.ConfigError) as e:
    evaluate.check(config, None)
  msg = str(e.value)
  assert "\n" not in msg and inception_weights.FID_WEIGHTS_FILE in msg
  assert "--mode=import --config.weights.inception=" in msg
  config.eval.update(inception=__file__, ref_stats=str(tmp_path / "missing.npz"))
  with pytest.raises(errors.ConfigError, match="ref_stats.*missing.npz"):
    evaluate.check(config, None)


def test_folder_source_and_protocol(tmp_path):
  for i in range(5):
    Image.fromarray(np.full((8, 12, 3), i * 40, np.uint8)).save(tmp_path / f"{i}.png")
  with open(tmp_path / "captions.jsonl", "w") as f:
    for i in range(5):
      f.write(json.dumps({"file": f"{i}.png", "captions": [f"a {i}", f"b {i}", f"c {i}"]}) + "\n")
  cfg = type("C", (), dict(source="folder", path=str(tmp_path)))()
  s = eval_data.load(cfg)
  sel = eval_data.select(s, 3, seed=7, out_path=str(tmp_path / "out" / "prompts.jsonl"))
  again = eval_data.select(s, 3, seed=7)
  assert sel.order == again.order and sel.prompts == again.prompts   # seeded
  assert len(set(sel.order)) == 3
  for i, p, refs in zip(sel.order, sel.prompts, sel.references):
    assert p in refs and refs == [f"a {i}", f"b {i}", f"c {i}"]
  img = evaluate.reference_image(s.items[0]["image"], "center", 4, "lanczos")
  assert img.shape == (4, 4, 3) and img.dtype == np.uint8
