"""The training options of the small-data recipe (configs/demo.py) do what they say.

clean_prob (one modality left clean), loss_weight / min_snr_gamma (per-timestep weights),
fit_latent_stats (latent normalisation measured on the training data), pos_init
('sincos'), prediction ('v'), text_weight, the word-level tokenizer built from captions, and
the learning-curve plot.
"""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from configs import demo
from data_pipelines import demo_data, synthetic
from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax import latent_stats, sample, sharding, vocab
from unidiffuser_jax.diffusion import objective, schedule
from unidiffuser_jax.errors import ConfigError
from unidiffuser_jax.models import uvit


def test_clean_prob_timestep_histogram():
  n = 200_000
  t_img, t_text = map(np.asarray, objective.sample_timesteps(jax.random.key(0), n, 0.5))
  clean_text, clean_img = (t_text == 0).mean(), (t_img == 0).mean()
  assert abs(clean_text - 0.25) < 0.005 and abs(clean_img - 0.25) < 0.005
  assert not np.any((t_text == 0) & (t_img == 0))   # never both clean
  for t in (t_img[t_img > 0], t_text[t_text > 0]):  # the rest stays U{1..1000}
    assert t.min() == 1 and t.max() == 1000
    counts = np.bincount((t - 1) // 100, minlength=10)
    expected = len(t) / 10
    assert ((counts - expected) ** 2 / expected).sum() < 30   # chi-square, 9 dof
  t_img0, t_text0 = map(np.asarray, objective.sample_timesteps(jax.random.key(0), n, 0.0))
  assert t_img0.min() == 1 and t_text0.min() == 1   # the paper's objective: never clean


@pytest.mark.slow
def test_clean_part_is_left_out_of_the_loss():
  """With a network that predicts zeros the loss is the mean of eps^2 over the noised parts only."""
  b = 64
  z0, c0, y0 = jnp.ones((b, 4, 4, 3)), jnp.ones((b, 1, 5)), jnp.ones((b, 6, 7))
  nnet = lambda z, c, y, *_: (jnp.zeros_like(z), jnp.zeros_like(c), jnp.zeros_like(y))
  key = jax.random.key(3)
  total, parts = objective.loss_fn(nnet, z0, c0, y0, None, key, clean_prob=1.0)
  # The same draws as loss_fn makes (its key split), recomputed in numpy.
  _, k_z, k_c, k_y = jax.random.split(key, 4)
  ez = np.asarray(jax.random.normal(k_z, z0.shape)).reshape(b, -1)
  ec = np.asarray(jax.random.normal(k_c, c0.shape)).reshape(b, -1)
  ey = np.asarray(jax.random.normal(k_y, y0.shape)).reshape(b, -1)
  img_on = np.asarray(parts["t_img"]) > 0
  text_on = np.asarray(parts["t_text"]) > 0
  assert img_on.any() and text_on.any() and not (img_on & text_on).any()
  num = (ez[img_on] ** 2).sum() + (ec[img_on] ** 2).sum() + (ey[text_on] ** 2).sum()
  den = img_on.sum() * (ez.shape[1] + ec.shape[1]) + text_on.sum() * ey.shape[1]
  np.testing.assert_allclose(float(total), num / den, rtol=1e-5)
  np.testing.assert_allclose(float(parts["loss_text"]), (ey[text_on] ** 2).mean(), rtol=1e-5)


def test_text_weight_weighs_each_text_element():
  """train.text_weight: the loss is the mean over the noised elements with each text element
  counted text_weight times (1: the paper's pooled mean); the per-part means are unchanged."""
  b = 32
  z0, c0, y0 = jnp.ones((b, 4, 4, 3)), jnp.ones((b, 1, 5)), jnp.ones((b, 6, 7))
  nnet = lambda z, c, y, *_: (jnp.zeros_like(z), jnp.zeros_like(c), jnp.zeros_like(y))
  key = jax.random.key(5)
  _, k_z, k_c, k_y = jax.random.split(key, 4)   # loss_fn's own split
  sq = lambda k, x: (np.asarray(jax.random.normal(k, x.shape)).reshape(b, -1) ** 2)
  ez, ec, ey = sq(k_z, z0), sq(k_c, c0), sq(k_y, y0)
  out = {}
  for w in (1.0, 4.0):
    total, parts = objective.loss_fn(nnet, z0, c0, y0, None, key, clean_prob=0.5, text_weight=w)
    total, loss_text = float(total), float(parts["loss_text"])
    img_on, text_on = np.asarray(parts["t_img"]) > 0, np.asarray(parts["t_text"]) > 0
    num = ez[img_on].sum() + ec[img_on].sum() + w * ey[text_on].sum()
    den = img_on.sum() * (ez.shape[1] + ec.shape[1]) + w * text_on.sum() * ey.shape[1]
    np.testing.assert_allclose(total, num / den, rtol=1e-5)
    out[w] = (total, loss_text)
  assert out[1.0][0] != out[4.0][0] and out[1.0][1] == out[4.0][1]


def test_unknown_loss_weight_is_a_config_error():
  cfg = demo.get_config("tiny")
  cfg.train.loss_weight = "snr"
  with pytest.raises(ConfigError, match=r"config.train.loss_weight='snr'; use one of"):
    objective.config_kwargs(cfg.train)


def test_loss_weight_tables():
  ab = schedule.alphas_cumprod()
  eps = objective.loss_weight_table("eps", 0.0)
  assert eps[0] == 0 and np.all(eps[1:] == 1)
  v = objective.loss_weight_table("v", 0.0)[1:]
  np.testing.assert_allclose(v, (1 / ab) / (1 / ab).mean(), rtol=1e-12)
  assert v[-1] > 50 * v[0]   # the high-noise end carries weight
  snr = ab / (1 - ab)
  m = objective.loss_weight_table("eps", 5.0)[1:]
  np.testing.assert_allclose(m, np.minimum(snr, 5.0) / snr, rtol=1e-12)
  assert m[0] < 0.2 and m[-1] == 1.0
  with pytest.raises(ValueError, match="loss_weight"):
    objective.loss_weight_table("x0", 0.0)


@pytest.mark.slow
def test_latent_stats_fit_and_apply(tmp_path):
  """Fitted shift = per-channel mean, scale = 1 / overall std (numpy on the same examples);
  applying them gives unit-scale latents, and decode/caption_prefix undo them exactly."""
  config = vocab.derive(demo.get_config("tiny"))
  config.encoders.fit_latent_stats = 64
  mesh = sharding.make_mesh(config.mesh)
  enc = encoders_lib.build(config.encoders)
  params, _ = enc.load_params(config.encoders.weights, mesh, 0, config.sharding.rules)
  make_it = lambda: synthetic.make_iterator(
      resolution=16, clip_resolution=16, max_length=config.data.max_length, vocab_size=64,
      host_batch=32, seed=0, num_examples=1 << 20, data_type=1, num_skip_reasons=1)
  fitted = latent_stats.fit_or_load(config, enc, params, make_it, mesh, str(tmp_path))
  stats = json.load(open(tmp_path / latent_stats.FILE))
  assert stats["examples"] == 64
  it = make_it()
  batches = [dict(next(it)) for _ in range(2)]
  img = np.concatenate([b["image"] for b in batches])
  z_raw = np.asarray(enc.image_moments(params, jnp.asarray(img)))[..., :12].reshape(-1, 12)
  np.testing.assert_allclose(stats["latent_shift"], z_raw.mean(0), atol=1e-3)
  np.testing.assert_allclose(stats["latent_scale"], 1 / (z_raw - z_raw.mean(0)).std(), rtol=1e-2)
  toks = np.concatenate([b["tokens"] for b in batches])
  t_raw = np.asarray(dataclasses_raw_text(enc, params, toks)).reshape(-1, enc.captioner.prefix_hidden_dim)
  np.testing.assert_allclose(stats["text_shift"], t_raw.mean(0), atol=1e-3)
  z = np.asarray(fitted.latent_from_moments(enc.image_moments(params, jnp.asarray(img)),
                                            jax.random.key(0)))
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
  np.testing.assert_allclose(np.asarray(fitted.decode_latent(params, jnp.asarray(z))), img, atol=2e-2)
  text = fitted.text_latent(params, jnp.asarray(toks))
  np.testing.assert_allclose(np.asarray(fitted.caption_prefix(text)),
                             t_raw.reshape(text.shape), rtol=1e-4, atol=1e-5)
  # A second start reads the file instead of measuring again.
  again = latent_stats.fit_or_load(config, enc, params, lambda: None, mesh, str(tmp_path))
  assert again.latent_scale == fitted.latent_scale


def dataclasses_raw_text(enc, params, tokens):
  return enc.captioner.apply({"params": params["captioner"]}, enc.text_hidden(params, jnp.asarray(tokens)),
                             method=type(enc.captioner).encode_prefix)


def test_sample_needs_the_fitted_stats(tmp_path):
  with pytest.raises(FileNotFoundError, match="fit_latent_stats"):
    latent_stats.load(str(tmp_path))


def test_sincos_positions():
  model = uvit.UViT(version="v1", latent_size=8, latent_channels=12, patch_size=2, width=32,
                    depth=2, num_heads=4, mlp_dim=64, text_dim=8, num_text_tokens=6,
                    clip_img_dim=16, pos_init="sincos")
  params = model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"]
  table = np.asarray(jax.tree.leaves(params["pos_embed"])[0])[0]
  patches = table[3 + 6:]
  assert patches.shape == (16, 32) and np.abs(patches).max() <= 1.0 + 1e-6
  # Row-major 4x4 grid: the first 16 features encode the row, the last 16 the column.
  np.testing.assert_allclose(patches[1, :16], patches[0, :16])     # same row
  np.testing.assert_allclose(patches[4, 16:], patches[0, 16:])     # same column
  assert not np.allclose(patches[1, 16:], patches[0, 16:])
  normal = model.clone(pos_init="normal").init(jax.random.key(0), *uvit.dummy_inputs(model))["params"]
  assert np.asarray(jax.tree.leaves(normal["pos_embed"])[0]).std() < 0.05   # the reference's 0.02


def test_v_prediction_gives_the_noise():
  # eps_from_v inverts v = alpha eps - sigma x0 at x_t = alpha x0 + sigma eps, per sample.
  ab = schedule.alphas_cumprod()
  n = np.array([1, 250, 999, 1000])
  alpha, sigma = np.sqrt(ab[n - 1])[:, None], np.sqrt(1 - ab[n - 1])[:, None]
  x0, eps = np.random.default_rng(0).normal(size=(2, 4, 5))
  v, x_t = alpha * eps - sigma * x0, alpha * x0 + sigma * eps
  got = schedule.eps_from_v(jnp.asarray(v), jnp.asarray(x_t), jnp.asarray(n, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), eps, atol=2e-5)
  # Between steps log alpha is linear (the samplers' discrete schedule); t = 0 is clean.
  mid = schedule.eps_from_v(jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.asarray([499.5]))
  want = np.exp(0.25 * (np.log(ab[498]) + np.log(ab[499])))
  np.testing.assert_allclose(float(mid[0, 0]), want, rtol=1e-5)
  assert float(schedule.eps_from_v(jnp.full((1, 1), 3.0), jnp.ones((1, 1)), jnp.zeros(1))[0, 0]) == 3.0


@pytest.mark.slow
def test_uvit_v_prediction_returns_the_noise():
  # The U-ViT with prediction="v" returns eps_from_v of the same network's raw outputs.
  model = uvit.UViT(version="v1", latent_size=4, latent_channels=4, patch_size=2, width=32,
                    depth=2, num_heads=4, mlp_dim=64, text_dim=8, num_text_tokens=3,
                    clip_img_dim=16)
  z, clip_img, text, _, _, dt = uvit.dummy_inputs(model, batch_size=2)
  z, clip_img, text = (jax.random.normal(jax.random.key(i), x.shape) for i, x in
                       enumerate((z, clip_img, text)))
  t_img, t_text = jnp.asarray([10.0, 900.0]), jnp.asarray([500.0, 0.0])
  params = model.init(jax.random.key(0), z, clip_img, text, t_img, t_text, dt)
  raw = model.apply(params, z, clip_img, text, t_img, t_text, dt)
  out = model.clone(prediction="v").apply(params, z, clip_img, text, t_img, t_text, dt)
  for o, r, x, t in zip(out, raw, (z, clip_img, text), (t_img, t_img, t_text)):
    np.testing.assert_allclose(np.asarray(o), np.asarray(schedule.eps_from_v(r, x, t)), atol=1e-6)
  with pytest.raises(ValueError, match="prediction"):
    model.clone(prediction="x0").init(jax.random.key(0), z, clip_img, text, t_img, t_text, dt)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tokenizer_from_captions(tmp_path):
  paths = demo_data.build_demo(str(tmp_path / "d"), n_train=40, n_heldout=2, size=16, seed=0,
                               shard_size=20)
  out = tmp_path / "tok"
  res = subprocess.run([sys.executable, "-m", "data_pipelines.make_tokenizer",
                        "--shards", paths["train"], "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  tok = AutoTokenizer.from_pretrained(str(out))
  caps = [a["caption"] for a in paths["heldout_attrs"]]
  ids = tok(caps)["input_ids"]
  assert all(tok.unk_token_id not in row for row in ids)
  assert tok.convert_tokens_to_ids("<|EOS|>") == len(tok) - 1
  res = subprocess.run([sys.executable, "-m", "data_pipelines.make_tokenizer", "--shards",
                        str(tmp_path / "tok"), "--out", str(tmp_path / "t2")],
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and res.stderr.startswith("error: "), res.stderr


def test_curve_plot(tmp_path):
  curve = [dict(step=s, **{"judge/t2i_colour": s / 1000, "judge/i2t_shape": 0.5})
           for s in (100, 200, 300)]
  path = tmp_path / "curve.png"
  sample.plot_curve(curve, str(path))
  im = np.asarray(Image.open(path))
  assert im.shape[0] > 100 and im.shape[1] > 300 and im.std() > 10
