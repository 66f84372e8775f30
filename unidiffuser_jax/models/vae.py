"""The Stable Diffusion KL-f8 autoencoder (first stage) in Flax, NHWC.

Same computation as diffusers' ``AutoencoderKL`` with the SD v1 config: an
encoder of ResNet blocks with stride-2 downsampling (asymmetric (0,1,0,1)
padding), a middle block with one single-head self-attention, a 1x1
``quant_conv`` producing 2C moments (mean || logvar), and a mirrored decoder
with nearest-neighbour upsampling. Every size is a field so tests can build a
tiny one. The 0.18215 latent scale is NOT applied here (the caller does it).

Shapes: images ``x [B, H, W, in_channels]`` in [-1, 1]; moments
``[B, H/f, W/f, 2C]``; latents ``z [B, H/f, W/f, C]`` with
``f = 2 ** (len(block_out_channels) - 1)``.
"""
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unidiffuser_jax.models import layers

_CONV_NAMES = (None, None, "conv_in", "conv_out")


def _conv(features: int, kernel: int, dtype, name: str | None, stride: int = 1,
          padding="SAME_1") -> nn.Conv:
  if padding == "SAME_1":  # torch padding=k//2 for odd k (stride 1)
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_NAMES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
      name=name)


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
  # Statistics are taken in float32 by flax even for bf16 inputs; the exact
  # two-pass variance matches torch's GroupNorm more closely.
  return nn.GroupNorm(
      num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name)


class ResnetBlock(nn.Module):
  """GN -> SiLU -> conv3 -> GN -> SiLU -> conv3, plus a 1x1 shortcut if widths differ."""
  features: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x_bhwc))
    h = _conv(self.features, 3, self.dtype, "conv1")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
    h = _conv(self.features, 3, self.dtype, "conv2")(h)
    if x_bhwc.shape[-1] != self.features:
      x_bhwc = _conv(self.features, 1, self.dtype, "shortcut")(x_bhwc)
    return x_bhwc + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all h*w positions, with a residual."""
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    b, hh, ww, c = x_bhwc.shape

    def dense(name):
      return layers.dense(c, ("conv_in", "conv_out"), kernel_init=nn.initializers.lecun_normal(),
                          dtype=self.dtype, name=name)

    h_bnc = _group_norm(self.groups, self.dtype, "norm")(x_bhwc).reshape(b, hh * ww, c)
    q_bn1c, k_bn1c, v_bn1c = (dense(n)(h_bnc)[:, :, None] for n in ("q", "k", "v"))
    out_bnc = layers.attention(q_bn1c, k_bn1c, v_bn1c)[:, :, 0]
    out_bnc = dense("proj")(out_bnc)
    return x_bhwc + out_bnc.reshape(b, hh, ww, c).astype(x_bhwc.dtype)


class MidBlock(nn.Module):
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    c = x_bhwc.shape[-1]
    x_bhwc = ResnetBlock(c, self.groups, self.dtype, name="res_0")(x_bhwc)
    x_bhwc = SpatialSelfAttention(self.groups, self.dtype, name="attn")(x_bhwc)
    return ResnetBlock(c, self.groups, self.dtype, name="res_1")(x_bhwc)


class Encoder(nn.Module):
  """Image -> 2*latent_channels features at 1/f resolution (before quant_conv)."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    h = _conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x_bhwc.astype(self.dtype))
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = ResnetBlock(ch, self.groups, self.dtype, name=f"down_{i}_res_{j}")(h)
      if i != last:
        # torch pads right/bottom by one, then a VALID stride-2 conv.
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = _conv(ch, 3, self.dtype, f"down_{i}_downsample", stride=2, padding="VALID")(h)
    h = MidBlock(self.groups, self.dtype, name="mid")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm_out")(h))
    return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
  """Latent (after post_quant_conv) -> image. up_{i} counts from the lowest resolution."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z_bhwc):
    chs = tuple(reversed(self.block_out_channels))
    h = _conv(chs[0], 3, self.dtype, "conv_in")(z_bhwc.astype(self.dtype))
    h = MidBlock(self.groups, self.dtype, name="mid")(h)
    for i, ch in enumerate(chs):
      for j in range(self.layers_per_block + 1):
        h = ResnetBlock(ch, self.groups, self.dtype, name=f"up_{i}_res_{j}")(h)
      if i != len(chs) - 1:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
        h = _conv(ch, 3, self.dtype, f"up_{i}_upsample")(h)
    h = nn.silu(_group_norm(self.groups, self.dtype, "norm_out")(h))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """KL autoencoder. Defaults are the SD KL-f8 first stage (z = 4 channels)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    for ch in self.block_out_channels:
      if ch % self.norm_num_groups:
        raise ValueError(
            f"block_out_channels {tuple(self.block_out_channels)} must all be divisible by "
            f"norm_num_groups={self.norm_num_groups}")
    self.encoder = Encoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.latent_channels, self.norm_num_groups, self.dtype)
    self.decoder = Decoder(tuple(self.block_out_channels), self.layers_per_block,
                           self.out_channels, self.norm_num_groups, self.dtype)
    self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, None)
    self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, None)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x_bhwc: jax.Array) -> jax.Array:
    """Images [B, H, W, in] -> float32 moments [B, H/f, W/f, 2C] = mean || logvar."""
    f = self.downsample_factor
    if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != self.in_channels:
      raise ValueError(f"encode expects NHWC images with {self.in_channels} channels, "
                       f"got shape {x_bhwc.shape}")
    if x_bhwc.shape[1] % f or x_bhwc.shape[2] % f:
      raise ValueError(f"image size {x_bhwc.shape[1:3]} must be a multiple of {f}")
    return self.quant_conv(self.encoder(x_bhwc)).astype(jnp.float32)

  def decode(self, z_bhwc: jax.Array) -> jax.Array:
    """Latents [B, h, w, C] (unscaled) -> float32 images [B, f*h, f*w, out]."""
    if z_bhwc.ndim != 4 or z_bhwc.shape[-1] != self.latent_channels:
      raise ValueError(f"decode expects NHWC latents with {self.latent_channels} channels, "
                       f"got shape {z_bhwc.shape}")
    return self.decoder(self.post_quant_conv(z_bhwc.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean (also what `init` traces)."""
    mean, _ = jnp.split(self.encode(x_bhwc), 2, axis=-1)
    return self.decode(mean)


def sample_latent(moments: jax.Array, key: jax.Array) -> jax.Array:
  """Draws z = mean + std * eps from moments [..., 2C]; logvar clamped to [-30, 20]."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
  return mean + std * jax.random.normal(key, mean.shape, jnp.float32)
