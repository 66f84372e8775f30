"""A parameter-free pixel-space "autoencoder" for the offline demo.

It stands where the Stable Diffusion VAE stands: a flax module with the same
interface as vae.AutoencoderKL (encode -> moments, decode, __call__, in_channels,
latent_channels, downsample_factor), so encoders.py treats both alike and the
demo exercises the real code path without pretrained weights. Encoding is
space-to-depth by `factor`, decoding its inverse; `init` creates no parameters.
The moments carry a tiny constant log-variance so that posterior sampling is a
real (if nearly deterministic) draw, as with the VAE.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

LOGVAR = -12.0  # std ~ 2.5e-3 in [-1, 1] pixel units: invisible, but not zero


class PixelAutoencoder(nn.Module):
  factor: int = 2
  in_channels: int = 3

  @property
  def latent_channels(self) -> int:
    return self.in_channels * self.factor**2

  @property
  def downsample_factor(self) -> int:
    return self.factor

  def encode(self, x_bhwc: jax.Array) -> jax.Array:
    """Images [B, H, W, in] -> float32 moments [B, H/f, W/f, 2 * in f^2] = mean || logvar."""
    if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != self.in_channels:
      raise ValueError(f"encode expects NHWC images with {self.in_channels} channels, "
                       f"got shape {x_bhwc.shape}")
    b, h, w, c = x_bhwc.shape
    f = self.factor
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} is not divisible by the pixel AE factor {f}")
    mean = x_bhwc.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
    mean = mean.reshape(b, h // f, w // f, f * f * c).astype(jnp.float32)
    return jnp.concatenate([mean, jnp.full_like(mean, LOGVAR)], axis=-1)

  def decode(self, z_bhwc: jax.Array) -> jax.Array:
    """Latents [B, h, w, in f^2] -> float32 images [B, f*h, f*w, in]."""
    if z_bhwc.ndim != 4 or z_bhwc.shape[-1] != self.latent_channels:
      raise ValueError(f"decode expects NHWC latents with {self.latent_channels} channels, "
                       f"got shape {z_bhwc.shape}")
    b, h, w, _ = z_bhwc.shape
    f, c = self.factor, self.in_channels
    x = z_bhwc.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * f, w * f, c).astype(jnp.float32)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (also what `init` traces)."""
    mean, _ = jnp.split(self.encode(x_bhwc), 2, axis=-1)
    return self.decode(mean)
