"""The UniDiffuser training objective.

Each sample draws its own image timestep and text timestep, independently and
uniformly from {1..1000}. The image part (VAE latent and CLIP image embedding)
is noised with t_img, the text latent with t_text, and the network regresses
the concatenated noise. The total loss is the mean squared error over that
concatenation (so each part weighs by its number of elements, as in the
reference); the per-part means are reported alongside.

`clean_prob` (0 in the paper's recipe) leaves one modality clean for that
fraction of the samples, half of them text (t_text = 0: the pair the text ->
image sampler evaluates) and half image (t_img = 0: image -> text). With
independent uniform timesteps a sample whose condition is nearly clean is rare
(t <= 10 for 1% of them), so the conditionals are learned from a small part of
each batch; a clean modality carries no noise to predict, so its part of that
sample's loss is left out.

`loss_weight` and `min_snr_gamma` weight each part's squared error by a
function of its own timestep (the network still predicts the noise):
  "eps" (the paper's): 1.
  "v": 1 / alpha_bar_t, i.e. the error of the velocity v = sqrt(ab) eps -
      sqrt(1 - ab) x0 implied by the noise prediction (Salimans & Ho 2022; EDM's
      weighting at unit data variance). The plain noise error is tiny at high noise
      although the data prediction x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) that the
      sampler starts from amplifies it up to 15x there: this weighting lets those
      timesteps, where the image's layout is decided, carry their share of the
      gradient. Normalised to mean 1 over t = 1..1000.
  min_snr_gamma > 0 multiplies by min(SNR_t, gamma) / SNR_t (Hang et al. 2023):
      down-weights the low-noise timesteps.

`text_weight` (1 in the paper's) weighs each text element that many times in the mean. The
paper's pooling gives the text latent its share of the elements (here 192 of 992 per sample),
so with clean_prob an image -> text sample (text noised alone) moves the loss ~4x less than a
text -> image one; text_weight = n_image_elements / n_text_elements evens them out.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unidiffuser_jax.diffusion import schedule
from unidiffuser_jax.errors import ConfigError

NNet = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]

# alpha_bar_n at index n for n = 0..1000 (n = 0: clean data).
_ALPHA_BAR = np.concatenate([[1.0], schedule.alphas_cumprod()])


LOSS_WEIGHTS = ("eps", "v")


def loss_weight_table(kind: str, min_snr_gamma: float) -> np.ndarray:
  """Weight of timestep n = 0..1000 (n = 0, a clean part, weighs 0); see the module doc."""
  ab = _ALPHA_BAR[1:]
  if kind == "eps":
    w = np.ones_like(ab)
  elif kind == "v":
    w = 1.0 / ab
    w = w / w.mean()
  else:
    raise ValueError(f"loss_weight={kind!r}; use one of {LOSS_WEIGHTS}")
  if min_snr_gamma > 0:
    snr = ab / (1.0 - ab)
    w = w * np.minimum(snr, min_snr_gamma) / snr
  return np.concatenate([[0.0], w])


def sample_timesteps(key: jax.Array, batch: int, clean_prob: float = 0.0
                     ) -> tuple[jax.Array, jax.Array]:
  """t_img, t_text (int32 [B] each): independent U{1..1000}; with probability
  clean_prob one of them (text or image, equally likely) is set to 0."""
  k_img, k_text, k_clean = jax.random.split(key, 3)
  hi = schedule.NUM_TIMESTEPS + 1
  t_img = jax.random.randint(k_img, (batch,), 1, hi, dtype=jnp.int32)
  t_text = jax.random.randint(k_text, (batch,), 1, hi, dtype=jnp.int32)
  if clean_prob > 0:
    u = jax.random.uniform(k_clean, (batch,))
    t_text = jnp.where(u < clean_prob / 2, 0, t_text)
    t_img = jnp.where((u >= clean_prob / 2) & (u < clean_prob), 0, t_img)
  return t_img, t_text


def noise_to(x0: jax.Array, eps: jax.Array, n_b: jax.Array) -> jax.Array:
  """x_n = sqrt(alpha_bar_n) x0 + sqrt(1 - alpha_bar_n) eps, n per sample in 0..1000."""
  alpha_bar = jnp.asarray(_ALPHA_BAR, jnp.float32)[n_b]
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return (jnp.sqrt(alpha_bar).reshape(shape) * x0
          + jnp.sqrt(1.0 - alpha_bar).reshape(shape) * eps)


def config_kwargs(train_cfg) -> dict:
  """loss_fn's options from config.train (common.train declares them); ConfigError, one line,
  for a loss_weight it does not know."""
  if train_cfg.loss_weight not in LOSS_WEIGHTS:
    raise ConfigError(f"config.train.loss_weight={train_cfg.loss_weight!r}; use one of {LOSS_WEIGHTS}")
  return dict(clean_prob=float(train_cfg.clean_prob), loss_weight=str(train_cfg.loss_weight),
              min_snr_gamma=float(train_cfg.min_snr_gamma),
              text_weight=float(train_cfg.text_weight))


def loss_fn(nnet: NNet, z0_bhwc: jax.Array, clip0_b1d: jax.Array, text0_bld: jax.Array,
            data_type_b: jax.Array | None, key: jax.Array, clean_prob: float = 0.0,
            loss_weight: str = "eps", min_snr_gamma: float = 0.0, text_weight: float = 1.0,
            timesteps: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """Returns (total loss, {loss_img, loss_clip, loss_text, t_img, t_text}).

  timesteps: given (t_img [B], t_text [B] int32), they replace the drawn ones (the held-out
  loss at fixed timesteps, unidiffuser_jax/heldout.py)."""
  batch = z0_bhwc.shape[0]
  k_t, k_z, k_c, k_y = jax.random.split(key, 4)
  t_img, t_text = sample_timesteps(k_t, batch, clean_prob) if timesteps is None else timesteps
  eps_z = jax.random.normal(k_z, z0_bhwc.shape, jnp.float32)
  eps_c = jax.random.normal(k_c, clip0_b1d.shape, jnp.float32)
  eps_y = jax.random.normal(k_y, text0_bld.shape, jnp.float32)
  z_t = noise_to(z0_bhwc, eps_z, t_img)
  clip_t = noise_to(clip0_b1d, eps_c, t_img)
  text_t = noise_to(text0_bld, eps_y, t_text)
  pred_z, pred_c, pred_y = nnet(z_t, clip_t, text_t, t_img.astype(jnp.float32),
                                t_text.astype(jnp.float32), data_type_b)
  # Per-sample sums of squared errors; a clean part (t = 0) is weighted 0.
  sse = lambda a, b: jnp.square(a.astype(jnp.float32) - b).reshape(batch, -1).sum(-1)
  se_z, se_c, se_y = sse(pred_z, eps_z), sse(pred_c, eps_c), sse(pred_y, eps_y)
  n_z, n_c, n_y = eps_z[0].size, eps_c[0].size, eps_y[0].size
  w_img = (t_img > 0).astype(jnp.float32)
  w_text = (t_text > 0).astype(jnp.float32)
  table = jnp.asarray(loss_weight_table(loss_weight, min_snr_gamma), jnp.float32)
  lw_img, lw_text = table[t_img], table[t_text] * text_weight
  total = ((lw_img * (se_z + se_c) + lw_text * se_y).sum()
           / jnp.maximum((w_img * (n_z + n_c) + text_weight * w_text * n_y).sum(), 1.0))
  n_img, n_text = jnp.maximum(w_img.sum(), 1.0), jnp.maximum(w_text.sum(), 1.0)
  parts = dict(loss_img=(w_img * se_z).sum() / (n_img * n_z),
               loss_clip=(w_img * se_c).sum() / (n_img * n_c),
               loss_text=(w_text * se_y).sum() / (n_text * n_y),
               t_img=t_img, t_text=t_text)
  return total, parts
