"""UniDiffuser generation modes as pure, jittable functions.

Every mode is a choice of (t_img, t_text) per modality for one network
`nnet(z [B,h,w,C], clip_img [B,1,D], text [B,L,Dt], t_img [B], t_text [B],
data_type [B]) -> (z, clip_img, text)` that predicts the noise of both
modalities (t values are the raw network inputs 0..1000):

  t2i    cond (z_t, clip_t, c, t, 0); uncond: text = fresh N(0, I), t_text = 1000
         (or a given empty-prompt latent at t_text = 0)
  i2t    cond (z_0, clip_0, y_t, 0, t); uncond: image and clip fresh noise, t_img = 1000
  joint  cond (z_t, clip_t, y_t, t, t); text uncond from (noise, noise, y_t, 1000, t);
         image uncond from (z_t, clip_t, noise text, t, 1000)
  i      (z_t, clip_t, noise text, t, 1000), no guidance
  t      (noise z, noise clip, y_t, 1000, t), no guidance

Guidance is out = cond + s * (cond - uncond); cond and uncond rows go through
the network in ONE batched call (concatenated along the batch). The
unconditional branch draws fresh noise at every model evaluation from the key
the solver hands to that evaluation. guidance_scale == 0 (a Python number)
skips the unconditional rows.

The solver integrates a flat [B, N] vector: the image part is z flattened
followed by clip_img flattened; the text part is text flattened; joint modes
concatenate image then text.

All functions take static keyword arguments (steps, order, method,
skip_type, shapes, ...) and are jittable as a whole, e.g.
`jax.jit(functools.partial(t2i, nnet, shapes=shapes, steps=50))(text, key)`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from unidiffuser_jax.diffusion import schedule as schedule_lib
from unidiffuser_jax.diffusion import solvers

Nnet = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
T_MAX = schedule_lib.NETWORK_TIME_SCALE  # network time of pure noise (t = 1)


@dataclasses.dataclass(frozen=True)
class LatentShapes:
  """Per-sample shapes of the three latents (defaults: the 512 px model)."""
  z: tuple[int, int, int] = (64, 64, 4)    # (h, w, C)
  clip: tuple[int, int] = (1, 512)         # (1, clip_img_dim)
  text: tuple[int, int] = (77, 64)         # (L, text_dim)

  @property
  def z_size(self) -> int:
    return self.z[0] * self.z[1] * self.z[2]

  @property
  def clip_size(self) -> int:
    return self.clip[0] * self.clip[1]

  @property
  def image_size(self) -> int:
    return self.z_size + self.clip_size

  @property
  def text_size(self) -> int:
    return self.text[0] * self.text[1]


# ---------------------------------------------------------------------------
# Flatten / unflatten between the latents and the solver's [B, N] vector.


def flatten_image(z, clip_img):
  b = z.shape[0]
  return jnp.concatenate([z.reshape(b, -1), clip_img.reshape(b, -1)], axis=1)


def unflatten_image(x_bn, shapes: LatentShapes):
  b = x_bn.shape[0]
  z = x_bn[:, :shapes.z_size].reshape((b,) + shapes.z)
  clip_img = x_bn[:, shapes.z_size:shapes.image_size].reshape((b,) + shapes.clip)
  return z, clip_img


def flatten_text(text):
  return text.reshape(text.shape[0], -1)


def unflatten_text(y_bn, shapes: LatentShapes):
  return y_bn.reshape((y_bn.shape[0],) + shapes.text)


def flatten_joint(z, clip_img, text):
  return jnp.concatenate([flatten_image(z, clip_img), flatten_text(text)], axis=1)


def unflatten_joint(x_bn, shapes: LatentShapes):
  z, clip_img = unflatten_image(x_bn[:, :shapes.image_size], shapes)
  return z, clip_img, unflatten_text(x_bn[:, shapes.image_size:], shapes)


# ---------------------------------------------------------------------------
# Helpers.


def guide(cond, uncond, scale):
  """Classifier-free guidance as UniDiffuser writes it: cond + s (cond - uncond)."""
  return cond + scale * (cond - uncond)


def _no_guidance(scale) -> bool:
  return isinstance(scale, (int, float)) and scale == 0


def _data_type(data_type, b):
  dt = jnp.asarray(data_type, dtype=jnp.int32)
  if dt.ndim == 0:
    return jnp.full((b,), dt, jnp.int32)
  if dt.shape != (b,):
    raise ValueError(f"data_type must be a scalar or shape ({b},), got {dt.shape}")
  return dt


def _cat(*xs):
  return jnp.concatenate(xs, axis=0)


def _split(x, n):
  return jnp.split(x, n, axis=0)


def _noise(key, purpose: int, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.fold_in(key, purpose), shape, dtype)


# Purpose ids folded into a key: the initial state and each kind of fresh noise.
_X_T, _NOISE_Z, _NOISE_CLIP, _NOISE_TEXT = 0, 1, 2, 3


def _solve(model_fn, x_T, key, solver_kw):
  return solvers.sample(model_fn, x_T, key, **solver_kw)


def _solver_kw(steps, order, method, skip_type, t_start=1.0, t_end=1e-3, schedule=None):
  return dict(steps=steps, order=order, method=method, skip_type=skip_type, t_start=t_start,
              t_end=t_end, schedule=schedule)


def _check_shapes(name, x, shape):
  if tuple(x.shape[1:]) != tuple(shape):
    raise ValueError(f"{name} must have per-sample shape {tuple(shape)}, got {x.shape}")


# ---------------------------------------------------------------------------
# Single-modality conditional modes.


def t2i_model_fn(nnet: Nnet, text, shapes: LatentShapes, *, guidance_scale=7.0, data_type=1,
                 uncond_text=None):
  """model_fn(x_img [B, N], t [B], key) -> eps_img for text-to-image."""
  b = text.shape[0]
  dt = _data_type(data_type, b)
  zeros = jnp.zeros((b,), jnp.float32)

  def model_fn(x, t, key):
    z, clip_img = unflatten_image(x, shapes)
    t_img = t.astype(jnp.float32) * T_MAX
    if _no_guidance(guidance_scale):
      z_out, clip_out, _ = nnet(z, clip_img, text, t_img, zeros, dt)
      return flatten_image(z_out, clip_out)
    if uncond_text is None:
      text_u = _noise(key, _NOISE_TEXT, text.shape, text.dtype)
      t_text_u = jnp.full((b,), T_MAX, jnp.float32)
    else:
      text_u = jnp.broadcast_to(uncond_text, text.shape).astype(text.dtype)
      t_text_u = zeros
    z_out, clip_out, _ = nnet(_cat(z, z), _cat(clip_img, clip_img), _cat(text, text_u),
                              _cat(t_img, t_img), _cat(zeros, t_text_u), _cat(dt, dt))
    eps_c, eps_u = _split(flatten_image(z_out, clip_out), 2)
    return guide(eps_c, eps_u, guidance_scale)

  return model_fn


def t2i(nnet: Nnet, text, key, *, shapes: LatentShapes, steps=50, order=3,
        method=solvers.DEFAULT_METHOD, skip_type="time_uniform", guidance_scale=7.0, data_type=1,
        uncond_text=None, x_T=None, t_end=1e-3, schedule=None):
  """Text latent [B, L, Dt] -> (z [B, h, w, C], clip_img [B, 1, D]).

  uncond_text: optional [1 or B, L, Dt] latent of the empty prompt, used at
  t_text = 0 in the unconditional branch instead of fresh noise at 1000.
  x_T: optional flat [B, image_size] start noise (used by interpolation).
  """
  _check_shapes("text", text, shapes.text)
  b = text.shape[0]
  if x_T is None:
    x_T = _noise(key, _X_T, (b, shapes.image_size))
  model_fn = t2i_model_fn(nnet, text, shapes, guidance_scale=guidance_scale, data_type=data_type,
                          uncond_text=uncond_text)
  x = _solve(model_fn, x_T, jax.random.fold_in(key, 1 << 20),
             _solver_kw(steps, order, method, skip_type, t_end=t_end, schedule=schedule))
  return unflatten_image(x, shapes)


def i2t(nnet: Nnet, z, clip_img, key, *, shapes: LatentShapes, steps=50, order=3,
        method=solvers.DEFAULT_METHOD, skip_type="time_uniform", guidance_scale=7.0, data_type=1,
        t_end=1e-3, schedule=None):
  """Image latents (z [B, h, w, C], clip_img [B, 1, D]) -> text latent [B, L, Dt]."""
  _check_shapes("z", z, shapes.z)
  _check_shapes("clip_img", clip_img, shapes.clip)
  b = z.shape[0]
  dt = _data_type(data_type, b)
  zeros = jnp.zeros((b,), jnp.float32)
  t_max = jnp.full((b,), T_MAX, jnp.float32)

  def model_fn(y, t, k):
    text = unflatten_text(y, shapes)
    t_text = t.astype(jnp.float32) * T_MAX
    if _no_guidance(guidance_scale):
      return flatten_text(nnet(z, clip_img, text, zeros, t_text, dt)[2])
    z_u = _noise(k, _NOISE_Z, z.shape, z.dtype)
    clip_u = _noise(k, _NOISE_CLIP, clip_img.shape, clip_img.dtype)
    _, _, text_out = nnet(_cat(z, z_u), _cat(clip_img, clip_u), _cat(text, text),
                          _cat(zeros, t_max), _cat(t_text, t_text), _cat(dt, dt))
    eps_c, eps_u = _split(flatten_text(text_out), 2)
    return guide(eps_c, eps_u, guidance_scale)

  y_T = _noise(key, _X_T, (b, shapes.text_size))
  y = _solve(model_fn, y_T, jax.random.fold_in(key, 1 << 20),
             _solver_kw(steps, order, method, skip_type, t_end=t_end, schedule=schedule))
  return unflatten_text(y, shapes)


# ---------------------------------------------------------------------------
# Unconditional modes.


def joint(nnet: Nnet, key, *, batch_size: int, shapes: LatentShapes, steps=50, order=3,
          method=solvers.DEFAULT_METHOD, skip_type="time_uniform", guidance_scale=7.0, data_type=1,
          t_end=1e-3, schedule=None):
  """Samples image and text together -> (z, clip_img, text). 3 forwards per step."""
  b = batch_size
  dt = _data_type(data_type, b)
  t_max = jnp.full((b,), T_MAX, jnp.float32)

  def model_fn(x, t, k):
    z, clip_img, text = unflatten_joint(x, shapes)
    tt = t.astype(jnp.float32) * T_MAX
    if _no_guidance(guidance_scale):
      return flatten_joint(*nnet(z, clip_img, text, tt, tt, dt))
    z_n = _noise(k, _NOISE_Z, z.shape, z.dtype)
    clip_n = _noise(k, _NOISE_CLIP, clip_img.shape, clip_img.dtype)
    text_n = _noise(k, _NOISE_TEXT, text.shape, text.dtype)
    # Rows: [conditional | text-marginal | image-marginal].
    z_out, clip_out, text_out = nnet(
        _cat(z, z_n, z), _cat(clip_img, clip_n, clip_img), _cat(text, text, text_n),
        _cat(tt, t_max, tt), _cat(tt, tt, t_max), _cat(dt, dt, dt))
    z_c, _, z_u = _split(z_out, 3)
    clip_c, _, clip_u = _split(clip_out, 3)
    text_c, text_u, _ = _split(text_out, 3)
    return flatten_joint(guide(z_c, z_u, guidance_scale), guide(clip_c, clip_u, guidance_scale),
                         guide(text_c, text_u, guidance_scale))

  size = shapes.image_size + shapes.text_size
  x = _solve(model_fn, _noise(key, _X_T, (b, size)), jax.random.fold_in(key, 1 << 20),
             _solver_kw(steps, order, method, skip_type, t_end=t_end, schedule=schedule))
  return unflatten_joint(x, shapes)


def image_only(nnet: Nnet, key, *, batch_size: int, shapes: LatentShapes, steps=50, order=3,
               method=solvers.DEFAULT_METHOD, skip_type="time_uniform", data_type=1, t_end=1e-3,
               schedule=None):
  """Marginal image sampling ('i'): text is fresh noise at t_text = 1000."""
  b = batch_size
  dt = _data_type(data_type, b)
  t_max = jnp.full((b,), T_MAX, jnp.float32)

  def model_fn(x, t, k):
    z, clip_img = unflatten_image(x, shapes)
    text_n = _noise(k, _NOISE_TEXT, (b,) + shapes.text, z.dtype)
    z_out, clip_out, _ = nnet(z, clip_img, text_n, t.astype(jnp.float32) * T_MAX, t_max, dt)
    return flatten_image(z_out, clip_out)

  x = _solve(model_fn, _noise(key, _X_T, (b, shapes.image_size)),
             jax.random.fold_in(key, 1 << 20),
             _solver_kw(steps, order, method, skip_type, t_end=t_end, schedule=schedule))
  return unflatten_image(x, shapes)


def text_only(nnet: Nnet, key, *, batch_size: int, shapes: LatentShapes, steps=50, order=3,
              method=solvers.DEFAULT_METHOD, skip_type="time_uniform", data_type=1, t_end=1e-3,
              schedule=None):
  """Marginal text sampling ('t'): image and clip are fresh noise at t_img = 1000."""
  b = batch_size
  dt = _data_type(data_type, b)
  t_max = jnp.full((b,), T_MAX, jnp.float32)

  def model_fn(y, t, k):
    text = unflatten_text(y, shapes)
    z_n = _noise(k, _NOISE_Z, (b,) + shapes.z, y.dtype)
    clip_n = _noise(k, _NOISE_CLIP, (b,) + shapes.clip, y.dtype)
    return flatten_text(nnet(z_n, clip_n, text, t_max, t.astype(jnp.float32) * T_MAX, dt)[2])

  y = _solve(model_fn, _noise(key, _X_T, (b, shapes.text_size)),
             jax.random.fold_in(key, 1 << 20),
             _solver_kw(steps, order, method, skip_type, t_end=t_end, schedule=schedule))
  return unflatten_text(y, shapes)


# ---------------------------------------------------------------------------
# Compositions.


def i2t2i(nnet: Nnet, z, clip_img, key, **kw):
  """Image variation: i2t, then t2i conditioned directly on the sampled text
  latent (no captioning in between). Returns (text, z, clip_img)."""
  text = i2t(nnet, z, clip_img, jax.random.fold_in(key, 0), **kw)
  z_new, clip_new = t2i(nnet, text, jax.random.fold_in(key, 1), **kw)
  return text, z_new, clip_new


def t2i2t(nnet: Nnet, text, key, **kw):
  """Text variation: t2i, then i2t conditioned on the generated z and clip
  (not re-encoded). Returns (z, clip_img, text)."""
  z, clip_img = t2i(nnet, text, jax.random.fold_in(key, 0), **kw)
  text_new = i2t(nnet, z, clip_img, jax.random.fold_in(key, 1), **kw)
  return z, clip_img, text_new


def gibbs(nnet: Nnet, z, clip_img, key, *, rounds: int, **kw):
  """Blocked Gibbs sampling image -> text -> image -> ... for `rounds` rounds.

  Round r draws text_r ~ i2t(image_{r-1}) then image_r ~ t2i(text_r), with
  image_0 the input. Returns (texts [R, B, L, Dt], zs [R, B, h, w, C],
  clips [R, B, 1, D]). One lax.scan over rounds.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")

  def one_round(carry, r):
    z_r, clip_r = carry
    k = jax.random.fold_in(key, r)
    text = i2t(nnet, z_r, clip_r, jax.random.fold_in(k, 0), **kw)
    z_next, clip_next = t2i(nnet, text, jax.random.fold_in(k, 1), **kw)
    return (z_next, clip_next), (text, z_next, clip_next)

  _, (texts, zs, clips) = jax.lax.scan(one_round, (z, clip_img),
                                       jnp.arange(rounds, dtype=jnp.int32))
  return texts, zs, clips


def slerp(a_bn, b_bn, w):
  """Spherical interpolation per row; falls back to lerp for parallel rows."""
  a_n = a_bn / jnp.linalg.norm(a_bn, axis=-1, keepdims=True)
  b_n = b_bn / jnp.linalg.norm(b_bn, axis=-1, keepdims=True)
  cos = jnp.clip(jnp.sum(a_n * b_n, axis=-1, keepdims=True), -1.0, 1.0)
  theta = jnp.arccos(cos)
  sin = jnp.sin(theta)
  safe = sin > 1e-6
  sin_safe = jnp.where(safe, sin, 1.0)
  wa = jnp.where(safe, jnp.sin((1.0 - w) * theta) / sin_safe, 1.0 - w)
  wb = jnp.where(safe, jnp.sin(w * theta) / sin_safe, w)
  return wa * a_bn + wb * b_bn


def invert_image(nnet: Nnet, z, clip_img, text, *, shapes: LatentShapes, steps=50, order=3,
                 method=solvers.DEFAULT_METHOD, skip_type="time_uniform", data_type=1, t_end=1e-3,
                 schedule=None):
  """Deterministic ODE inversion of image latents to t = 1 given a text latent.

  Integrates the probability-flow ODE of the text-conditional image model
  (t2i without guidance, so no random branch) forwards from t_end to 1.
  Running t2i with guidance_scale=0 from the result reproduces the input up
  to solver error. Returns the flat [B, image_size] noise.
  """
  model_fn = t2i_model_fn(nnet, text, shapes, guidance_scale=0.0, data_type=data_type)
  x0 = flatten_image(z, clip_img).astype(jnp.float32)
  return solvers.sample(model_fn, x0, jax.random.key(0), steps=steps, order=order, method=method,
                        skip_type=skip_type, t_start=t_end, t_end=1.0, schedule=schedule)


def interpolate(nnet: Nnet, z_a, clip_a, z_b, clip_b, key, *, num: int, shapes: LatentShapes,
                steps=50, order=3, method=solvers.DEFAULT_METHOD, skip_type="time_uniform",
                guidance_scale=0.0, caption_guidance_scale=7.0, data_type=1, t_end=1e-3,
                schedule=None):
  """Interpolates between two real images (pairs a[i], b[i]) in `num` points.

  Method: (1) i2t gives each image a text latent y_a, y_b (with guidance
  caption_guidance_scale); (2) each image is inverted to noise x_a, x_b by
  the deterministic ODE of the text-conditional model (invert_image);
  (3) for w in linspace(0, 1, num), the start noise is slerp(x_a, x_b, w) --
  spherical because Gaussian noise concentrates near a sphere and linear
  mixing would shrink its norm off-distribution -- and the condition is the
  linear mix (1 - w) y_a + w y_b; (4) t2i from that noise. With the default
  guidance_scale = 0 step (4) runs the same deterministic ODE as the
  inversion, so w = 0 and w = 1 reproduce the inputs up to solver error;
  guidance > 0 sharpens the in-betweens at the cost of exact endpoints.

  Returns (z [num, B, h, w, C], clip [num, B, 1, D], text [num, B, L, Dt]).
  """
  if num < 2:
    raise ValueError(f"num must be >= 2, got {num}")
  b = z_a.shape[0]
  solver = dict(shapes=shapes, steps=steps, order=order, method=method, skip_type=skip_type,
                data_type=data_type, t_end=t_end, schedule=schedule)
  z_ab, clip_ab = _cat(z_a, z_b), _cat(clip_a, clip_b)
  text_ab = i2t(nnet, z_ab, clip_ab, jax.random.fold_in(key, 0),
                guidance_scale=caption_guidance_scale, **solver)
  x_ab = invert_image(nnet, z_ab, clip_ab, text_ab, **solver)
  x_a, x_b = _split(x_ab, 2)
  text_a, text_b = _split(text_ab, 2)
  w = jnp.linspace(0.0, 1.0, num, dtype=jnp.float32)
  x_T = jax.vmap(lambda wi: slerp(x_a, x_b, wi))(w).reshape(num * b, -1)
  text = ((1.0 - w)[:, None, None, None] * text_a[None] + w[:, None, None, None] * text_b[None])
  text = text.reshape((num * b,) + shapes.text)
  dt = _data_type(data_type, b)
  z, clip_img = t2i(nnet, text, jax.random.fold_in(key, 1), x_T=x_T,
                    guidance_scale=guidance_scale, data_type=jnp.tile(dt, num),
                    **{k: v for k, v in solver.items() if k != "data_type"})
  return (z.reshape((num, b) + shapes.z), clip_img.reshape((num, b) + shapes.clip),
          text.reshape((num, b) + shapes.text))
