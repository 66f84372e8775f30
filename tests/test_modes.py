"""Generation modes feed the network exactly what REFERENCE.md's table says.

A fake network (a fixed smooth function of every input) records each call's
inputs and outputs. The recording tests run the modes eagerly under
jax.disable_jit (scans become Python loops, so the network sees concrete
arrays); a separate test checks that the jitted program gives the same
result. (Host callbacks inside the compiled scans would also work but made
XLA compiles about 5x slower here.)
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unidiffuser_jax.diffusion import modes
from unidiffuser_jax.diffusion import schedule as schedule_lib
from unidiffuser_jax.diffusion import solvers

SHAPES = modes.LatentShapes(z=(4, 4, 2), clip=(1, 8), text=(4, 8))
B = 2
KW = dict(shapes=SHAPES, steps=3, order=3, method="fast")


class Recorder:
  """Fake nnet: outputs depend on every input; every call is recorded."""

  def __init__(self):
    self.calls = []

  def _record(self, *arrays):
    names = ("z", "clip", "text", "t_img", "t_text", "data_type", "z_out", "clip_out", "text_out")
    self.calls.append({n: np.asarray(a) for n, a in zip(names, arrays)})

  def __call__(self, z, clip_img, text, t_img, t_text, data_type):
    m_z = jnp.mean(z, axis=(1, 2, 3))
    m_c = jnp.mean(clip_img, axis=(1, 2))
    m_t = jnp.mean(text, axis=(1, 2))
    s_img, s_txt = t_img / 1000.0, t_text / 1000.0
    dt = data_type.astype(jnp.float32)
    z_out = 0.6 * z + (0.2 * m_t + 0.1 * s_img + 0.05 * s_txt + 0.01 * dt)[:, None, None, None]
    clip_out = 0.6 * clip_img + (0.1 * m_z + 0.2 * m_t + 0.1 * s_img + 0.03 * s_txt)[:, None, None]
    text_out = 0.6 * text + (0.2 * m_z + 0.1 * m_c + 0.1 * s_txt + 0.04 * s_img)[:, None, None]
    if not isinstance(z, jax.core.Tracer):
      self._record(z, clip_img, text, t_img, t_text, data_type, z_out, clip_out, text_out)
    return z_out, clip_out, text_out

  def done(self):
    assert self.calls, "nothing recorded: run the mode under jax.disable_jit()"
    return self.calls


def eager(fn, *args, **kwargs):
  with jax.disable_jit():
    return fn(*args, **kwargs)


def _latents(seed):
  k = jax.random.key(seed)
  z = jax.random.normal(jax.random.fold_in(k, 0), (B,) + SHAPES.z)
  clip = jax.random.normal(jax.random.fold_in(k, 1), (B,) + SHAPES.clip)
  text = jax.random.normal(jax.random.fold_in(k, 2), (B,) + SHAPES.text)
  return z, clip, text


def _first_step_times(steps=3, order=3):
  """Network times the solver evaluates at, in order (from the solver's plan)."""
  sched = schedule_lib.DiscreteVPSchedule()
  return solvers.eval_times(sched, steps, order, "fast", "time_uniform", 1.0, 1e-3) * 1000.0


def _assert_fresh_noise(noises):
  """Each evaluation's noise looks N(0, 1) and differs from every other one."""
  flat = np.stack([n.ravel() for n in noises])
  assert abs(flat.mean()) < 0.2 and 0.8 < flat.std() < 1.2, (flat.mean(), flat.std())
  for i in range(len(flat)):
    for j in range(i + 1, len(flat)):
      assert not np.allclose(flat[i], flat[j])


@pytest.mark.slow
def test_t2i_feeds_table_and_guides():
  net = Recorder()
  _, _, text = _latents(0)
  z, clip = eager(modes.t2i, net, text, jax.random.key(1), guidance_scale=7.0, **KW)
  calls = net.done()
  assert z.shape == (B,) + SHAPES.z and clip.shape == (B,) + SHAPES.clip
  assert len(calls) == solvers.num_model_evals(3, 3, "fast") == 3
  t_expected = _first_step_times()
  for c, t in zip(calls, t_expected):
    assert c["z"].shape[0] == 2 * B  # cond and uncond in one batched call
    np.testing.assert_array_equal(c["z"][:B], c["z"][B:])
    np.testing.assert_array_equal(c["clip"][:B], c["clip"][B:])
    np.testing.assert_array_equal(c["text"][:B], text)               # condition
    np.testing.assert_allclose(c["t_img"], t, rtol=1e-5)               # both halves at t
    np.testing.assert_array_equal(c["t_text"], [0.0] * B + [1000.0] * B)
    np.testing.assert_array_equal(c["data_type"], 1)
  _assert_fresh_noise([c["text"][B:] for c in calls])
  assert not np.allclose(calls[0]["text"][B:], text)


def test_t2i_one_step_equals_guided_first_order_update():
  # One first-order step from t=1 to 1e-3 written out by hand:
  # eps = cond + 7 (cond - uncond); x0 = (x - sigma_s eps) / alpha_s;
  # x_end = (sigma_e / sigma_s) x + alpha_e (1 - exp(-h)) x0.
  net = Recorder()
  _, _, text = _latents(0)
  z, clip = eager(modes.t2i, net, text, jax.random.key(1), shapes=SHAPES, steps=1, order=1,
                      guidance_scale=7.0)
  (c,) = net.done()
  x = np.concatenate([c["z"][:B].reshape(B, -1), c["clip"][:B].reshape(B, -1)], 1)
  out = np.concatenate([c["z_out"].reshape(2 * B, -1), c["clip_out"].reshape(2 * B, -1)], 1)
  eps = out[:B] + 7.0 * (out[:B] - out[B:])
  ac = schedule_lib.alphas_cumprod()
  a_s, a_e = np.sqrt(ac[-1]), np.sqrt(ac[0])
  s_s, s_e = np.sqrt(1 - ac[-1]), np.sqrt(1 - ac[0])
  h = np.log(a_e / s_e) - np.log(a_s / s_s)
  x0 = (x - s_s * eps) / a_s
  expected = (s_e / s_s) * x + a_e * (1 - np.exp(-h)) * x0
  got = np.concatenate([np.asarray(z).reshape(B, -1), np.asarray(clip).reshape(B, -1)], 1)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_t2i_empty_prompt_option_and_no_guidance():
  net = Recorder()
  _, _, text = _latents(0)
  empty = jnp.full((1,) + SHAPES.text, 0.25)
  eager(modes.t2i, net, text, jax.random.key(1), uncond_text=empty, **KW)
  for c in net.done():
    np.testing.assert_array_equal(c["t_text"], 0.0)
    np.testing.assert_allclose(c["text"][B:], 0.25)
  net = Recorder()
  eager(modes.t2i, net, text, jax.random.key(1), guidance_scale=0.0, **KW)
  assert all(c["z"].shape[0] == B for c in net.done())


@pytest.mark.slow
def test_i2t_feeds_table():
  net = Recorder()
  z, clip, _ = _latents(0)
  text = eager(modes.i2t, net, z, clip, jax.random.key(2), data_type=0, **KW)
  calls = net.done()
  assert text.shape == (B,) + SHAPES.text
  assert len(calls) == 3
  for c, t in zip(calls, _first_step_times()):
    np.testing.assert_array_equal(c["z"][:B], z)
    np.testing.assert_array_equal(c["clip"][:B], clip)
    np.testing.assert_array_equal(c["text"][:B], c["text"][B:])
    np.testing.assert_array_equal(c["t_img"], [0.0] * B + [1000.0] * B)
    np.testing.assert_allclose(c["t_text"], t, rtol=1e-5)
    np.testing.assert_array_equal(c["data_type"], 0)
  _assert_fresh_noise([np.concatenate([c["z"][B:].ravel(), c["clip"][B:].ravel()]) for c in calls])


@pytest.mark.slow
def test_joint_three_forwards_per_step():
  net = Recorder()
  z, clip, text = eager(modes.joint, net, jax.random.key(3), batch_size=B, guidance_scale=7.0, **KW)
  calls = net.done()
  assert (z.shape, clip.shape, text.shape) == ((B,) + SHAPES.z, (B,) + SHAPES.clip,
                                               (B,) + SHAPES.text)
  assert len(calls) == 3
  for c, t in zip(calls, _first_step_times()):
    assert c["z"].shape[0] == 3 * B
    g = lambda a, i: a[i * B:(i + 1) * B]
    # cond (z_t, clip_t, y_t, t, t)
    np.testing.assert_allclose(g(c["t_img"], 0), t, rtol=1e-5)
    np.testing.assert_allclose(g(c["t_text"], 0), t, rtol=1e-5)
    # text marginal (noise img, y_t, 1000, t)
    np.testing.assert_array_equal(g(c["text"], 1), g(c["text"], 0))
    np.testing.assert_array_equal(g(c["t_img"], 1), 1000.0)
    np.testing.assert_allclose(g(c["t_text"], 1), t, rtol=1e-5)
    # image marginal (z_t, clip_t, noise text, t, 1000)
    np.testing.assert_array_equal(g(c["z"], 2), g(c["z"], 0))
    np.testing.assert_array_equal(g(c["clip"], 2), g(c["clip"], 0))
    np.testing.assert_allclose(g(c["t_img"], 2), t, rtol=1e-5)
    np.testing.assert_array_equal(g(c["t_text"], 2), 1000.0)
  _assert_fresh_noise([c["z"][B:2 * B] for c in calls])
  _assert_fresh_noise([c["text"][2 * B:] for c in calls])


def test_image_only_and_text_only_one_forward():
  net = Recorder()
  z, clip = eager(modes.image_only, net, jax.random.key(4), batch_size=B, **KW)
  calls = net.done()
  assert len(calls) == 3 and all(c["z"].shape[0] == B for c in calls)
  for c, t in zip(calls, _first_step_times()):
    np.testing.assert_allclose(c["t_img"], t, rtol=1e-5)
    np.testing.assert_array_equal(c["t_text"], 1000.0)
  _assert_fresh_noise([c["text"] for c in calls])
  net = Recorder()
  text = eager(modes.text_only, net, jax.random.key(5), batch_size=B, **KW)
  calls = net.done()
  assert text.shape == (B,) + SHAPES.text
  assert len(calls) == 3 and all(c["z"].shape[0] == B for c in calls)
  for c, t in zip(calls, _first_step_times()):
    np.testing.assert_array_equal(c["t_img"], 1000.0)
    np.testing.assert_allclose(c["t_text"], t, rtol=1e-5)
  _assert_fresh_noise([np.concatenate([c["z"].ravel(), c["clip"].ravel()]) for c in calls])


def test_compositions_condition_on_previous_output():
  net = Recorder()
  z, clip, text = _latents(0)
  text_s, z_s, clip_s = eager(modes.i2t2i, net, z, clip, jax.random.key(6), **KW)
  calls = net.done()
  assert len(calls) == 6
  for c in calls[:3]:  # i2t on the input image
    np.testing.assert_array_equal(c["z"][:B], z)
  for c in calls[3:]:  # t2i on the sampled text latent itself
    np.testing.assert_array_equal(c["text"][:B], text_s)
  net = Recorder()
  z_g, clip_g, text_g = eager(modes.t2i2t, net, text, jax.random.key(7), **KW)
  calls = net.done()
  for c in calls[:3]:
    np.testing.assert_array_equal(c["text"][:B], text)
  for c in calls[3:]:
    np.testing.assert_array_equal(c["z"][:B], z_g)
    np.testing.assert_array_equal(c["clip"][:B], clip_g)
  net = Recorder()
  texts, zs, clips = eager(modes.gibbs, net, z, clip, jax.random.key(8), rounds=2, **KW)
  calls = net.done()
  assert texts.shape == (2, B) + SHAPES.text and zs.shape == (2, B) + SHAPES.z
  assert len(calls) == 12
  np.testing.assert_array_equal(calls[0]["z"][:B], z)
  np.testing.assert_array_equal(calls[3]["text"][:B], texts[0])
  np.testing.assert_array_equal(calls[6]["z"][:B], zs[0])   # round 2 starts from round 1's image
  np.testing.assert_array_equal(calls[9]["text"][:B], texts[1])
  np.testing.assert_array_equal(zs[1], modes.unflatten_image(
      modes.flatten_image(zs[1], clips[1]), SHAPES)[0])


def test_same_seed_same_output_and_jit_matches_eager():
  net = Recorder()
  _, _, text = _latents(0)
  run = functools.partial(modes.t2i, net, **KW)
  run_jit = jax.jit(run)
  a = run_jit(text, jax.random.key(9))
  b = run_jit(text, jax.random.key(9))
  c = run_jit(text, jax.random.key(10))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.allclose(a[0], c[0])
  with jax.disable_jit():
    d = run(text, jax.random.key(9))
  np.testing.assert_allclose(a[0], d[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a[1], d[1], rtol=1e-5, atol=1e-5)


def test_interpolation_endpoints_reconstruct_inputs():
  # With guidance 0 the regeneration runs the same deterministic ODE as the
  # inversion, so w = 0 and w = 1 give back the two inputs (solver error only;
  # measured max error 0.13 / 0.014 / 0.004 at 10 / 25 / 50 multistep steps).
  net = Recorder()
  za, ca, _ = _latents(11)
  zb, cb, _ = _latents(12)
  z, clip, text = jax.jit(functools.partial(
      modes.interpolate, net, num=3, shapes=SHAPES, steps=50, order=2, method="multistep",
      skip_type="logSNR"))(za, ca, zb, cb, jax.random.key(13))
  assert z.shape == (3, B) + SHAPES.z and text.shape == (3, B) + SHAPES.text
  err_a = np.abs(np.asarray(z[0]) - np.asarray(za)).max()
  err_b = np.abs(np.asarray(z[2]) - np.asarray(zb)).max()
  assert err_a < 1.5e-2 and err_b < 1.5e-2, (err_a, err_b)
  np.testing.assert_allclose(clip[0], ca, atol=1.5e-2)
  np.testing.assert_allclose(clip[2], cb, atol=1.5e-2)
  mid = np.asarray(z[1])
  assert np.abs(mid - np.asarray(za)).max() > 0.1 and np.abs(mid - np.asarray(zb)).max() > 0.1


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="text"):
    modes.t2i(Recorder(), jnp.zeros((B, 5, 8)), jax.random.key(0), **KW)
  with pytest.raises(ValueError, match="data_type"):
    modes.t2i(Recorder(), jnp.zeros((B,) + SHAPES.text), jax.random.key(0), data_type=jnp.ones(3),
              **KW)
