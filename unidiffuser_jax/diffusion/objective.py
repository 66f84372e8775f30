"""The UniDiffuser training objective.

Each sample draws its own image timestep and text timestep, independently and
uniformly from {1..1000}. The image part (VAE latent and CLIP image embedding)
is noised with t_img, the text latent with t_text, and the network regresses
the concatenated noise. The total loss is the mean squared error over that
concatenation (so each part weighs by its number of elements, as in the
reference); the per-part means are reported alongside.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from unidiffuser_jax.diffusion import schedule

NNet = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def sample_timesteps(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
  """Independent t_img, t_text ~ U{1..1000} per sample (int32 [B] each)."""
  k_img, k_text = jax.random.split(key)
  hi = schedule.NUM_TIMESTEPS + 1
  return (jax.random.randint(k_img, (batch,), 1, hi, dtype=jnp.int32),
          jax.random.randint(k_text, (batch,), 1, hi, dtype=jnp.int32))


def noise_to(x0: jax.Array, eps: jax.Array, n_b: jax.Array) -> jax.Array:
  """x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps, n per sample in 1..1000."""
  alpha_bar = jnp.asarray(schedule.alphas_cumprod(), jnp.float32)[n_b - 1]
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return (jnp.sqrt(alpha_bar).reshape(shape) * x0
          + jnp.sqrt(1.0 - alpha_bar).reshape(shape) * eps)


def loss_fn(nnet: NNet, z0_bhwc: jax.Array, clip0_b1d: jax.Array, text0_bld: jax.Array,
            data_type_b: jax.Array | None, key: jax.Array) -> tuple[jax.Array, dict]:
  """Returns (total loss, {loss_img, loss_clip, loss_text, t_img, t_text})."""
  batch = z0_bhwc.shape[0]
  k_t, k_z, k_c, k_y = jax.random.split(key, 4)
  t_img, t_text = sample_timesteps(k_t, batch)
  eps_z = jax.random.normal(k_z, z0_bhwc.shape, jnp.float32)
  eps_c = jax.random.normal(k_c, clip0_b1d.shape, jnp.float32)
  eps_y = jax.random.normal(k_y, text0_bld.shape, jnp.float32)
  z_t = noise_to(z0_bhwc, eps_z, t_img)
  clip_t = noise_to(clip0_b1d, eps_c, t_img)
  text_t = noise_to(text0_bld, eps_y, t_text)
  pred_z, pred_c, pred_y = nnet(z_t, clip_t, text_t, t_img.astype(jnp.float32),
                                t_text.astype(jnp.float32), data_type_b)
  sq = lambda a, b: jnp.square(a.astype(jnp.float32) - b)
  se_z, se_c, se_y = sq(pred_z, eps_z), sq(pred_c, eps_c), sq(pred_y, eps_y)
  n_z, n_c, n_y = se_z[0].size, se_c[0].size, se_y[0].size
  total = (se_z.sum() + se_c.sum() + se_y.sum()) / (batch * (n_z + n_c + n_y))
  parts = dict(loss_img=se_z.mean(), loss_clip=se_c.mean(), loss_text=se_y.mean(),
               t_img=t_img, t_text=t_text)
  return total, parts
