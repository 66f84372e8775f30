"""A parameter-free pixel-space "autoencoder" for the offline demo.

It stands where the Stable Diffusion VAE stands (same encode/decode/moments
interface), so the demo exercises the real code path without pretrained
weights: encoding is space-to-depth by `factor`, decoding its inverse. The
moments carry a tiny constant log-variance so that posterior sampling is a
real (if nearly deterministic) draw, as with the VAE.
"""
import dataclasses

import jax
import jax.numpy as jnp

LOGVAR = -12.0  # std ~ 2.5e-3 in [-1, 1] pixel units: invisible, but not zero


@dataclasses.dataclass(frozen=True)
class PixelAutoencoder:
  factor: int = 2
  in_channels: int = 3

  @property
  def latent_channels(self) -> int:
    return self.in_channels * self.factor**2

  def encode(self, x_bhwc: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> moments [B, H/f, W/f, 2 * 3 f^2] (mean || logvar)."""
    b, h, w, c = x_bhwc.shape
    f = self.factor
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} is not divisible by the pixel AE factor {f}")
    mean = x_bhwc.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    mean = mean.reshape(b, h // f, w // f, f * f * c).astype(jnp.float32)
    return jnp.concatenate([mean, jnp.full_like(mean, LOGVAR)], axis=-1)

  def decode(self, z_bhwc: jax.Array) -> jax.Array:
    b, h, w, _ = z_bhwc.shape
    f, c = self.factor, self.in_channels
    x = z_bhwc.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c)
