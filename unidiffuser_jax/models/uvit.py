"""The multimodal post-LN U-ViT that predicts the noise of image and text at once.

One transformer sees every modality as tokens, in this order:
  [t_img, t_text, data_type (v1 only), text (L), clip_img (1), image patches (N)]
and returns noise predictions for the image latent, the CLIP image embedding and
the text latent. Blocks are post-LayerNorm; in-block outputs are kept on a stack
and consumed last-in first-out by the out-blocks (U-Net style long skips).

Parameter names follow the released thu-ml checkpoints (patch_embed, in_blocks_0,
mid_block, out_blocks_0, norm, decoder_pred, ...) so weights/uvit.py maps them
one to one. Layout is NHWC; see docs/INTERFACES.md.

Precision: parameters are float32; with dtype=bfloat16 the matmuls (Dense, Conv,
attention products) run in bfloat16 while LayerNorms, the residual stream between
them, attention logits and softmax stay float32 (what torch autocast gives the
reference model). Outputs are float32.
"""
from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unidiffuser_jax import errors
from unidiffuser_jax.diffusion import schedule
from unidiffuser_jax.models import layers

LN_EPS = 1e-5
REMAT_POLICIES = ('none', 'block', 'dots_saveable', 'dots_with_no_batch_dims_saveable')


# ----------------------------------------------------------------------------- initialisers

def _torch_trunc_normal(std: float = 0.02):
  """torch's trunc_normal_(std=s): N(0, s) clipped at +-2 in absolute units.

  flax's truncated_normal truncates at +-2 *standard deviations*, a different
  distribution; with s = 0.02 torch's bound is 100 sigma away, i.e. a plain normal.
  """
  def init(key, shape, dtype=jnp.float32):
    return jnp.clip(std * jax.random.normal(key, shape, dtype), -2.0, 2.0)
  return init


def _torch_conv_default(fan_in: int):
  """torch Conv2d's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); thu-ml never re-inits the conv."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _sincos_1d(pos_n: np.ndarray, dim: int) -> np.ndarray:
  """[N] positions -> [N, dim]: sin of dim/2 frequencies, then cos (MAE/DiT layout)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
  angles = pos_n.astype(np.float64)[:, None] * omega[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def _pos_table_init(kind: str, num_text: int, grid: int):
  """Initialiser of pos_embed [1, 2 + num_text + 1 + grid^2, D].

  'normal': torch's trunc_normal_(std=0.02) everywhere, as the reference U-ViT.
  'sincos': the text rows get 1-D and the patch rows 2-D sine-cosine positions
  (half the features per image axis; values in [-1, 1]), the time and CLIP rows
  stay 'normal'. Still trained. With std 0.02 the positions are ~3% of a token's
  content at the start, and a short run learns what is where only slowly.
  """
  normal = _torch_trunc_normal(0.02)
  if kind == 'normal':
    return normal
  if kind != 'sincos':
    raise ValueError(f"pos_init must be 'normal' or 'sincos', got {kind!r}")

  def init(key, shape, dtype=jnp.float32):
    d = shape[-1]
    if d % 4:
      raise ValueError(f"pos_init='sincos' needs a width divisible by 4, got {d}")
    gy, gx = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
    patches = np.concatenate(
        [_sincos_1d(gy.reshape(-1), d // 2), _sincos_1d(gx.reshape(-1), d // 2)], axis=1)
    table = normal(key, shape, jnp.float32)
    table = table.at[0, 2:2 + num_text].set(jnp.asarray(_sincos_1d(np.arange(num_text), d), jnp.float32))
    table = table.at[0, 3 + num_text:].set(jnp.asarray(patches, jnp.float32))
    return table.astype(dtype)
  return init


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _dense(features: int, in_name, out_name, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return layers.dense(features, (in_name, out_name), kernel_init=_torch_trunc_normal(0.02),
                      dtype=dtype, name=name, use_bias=use_bias)


ACT_AXES = ('act_batch', 'act_length', 'act_embed')


def constrain_activation(x_btd: jax.Array) -> jax.Array:
  """Pins the residual stream's layout by logical names (a no-op unless traced inside
  sharding.tracing_context, which supplies the mesh and the axis rules).

  Under FSDP, XLA's partitioner may otherwise all-gather activations over the
  whole global batch instead of gathering the sharded weights: for the laion
  config on v5e-256 that is 58 GiB of temporaries per chip instead of 5.6
  (--mode=compile). The rules in config.sharding.rules map act_batch to
  the data-parallel axes.
  """
  return nn.with_logical_constraint(x_btd, ACT_AXES)


def _layer_norm(name: str) -> nn.LayerNorm:
  # Always float32, like torch autocast: the residual stream between LayerNorms then
  # stays float32 and only the matmuls run in the compute dtype.
  return layers.layer_norm(LN_EPS, dtype=jnp.float32, name=name)


# ----------------------------------------------------------------------------- pure helpers

def timestep_embedding(t_b: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of raw (possibly fractional) timesteps: [B] -> [B, dim], [cos, sin]."""
  half = dim // 2
  freqs_h = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args_bh = t_b.astype(jnp.float32)[:, None] * freqs_h[None]
  emb_bd = jnp.concatenate([jnp.cos(args_bh), jnp.sin(args_bh)], axis=-1)
  if dim % 2:
    emb_bd = jnp.pad(emb_bd, ((0, 0), (0, 1)))
  return emb_bd


def _as_hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def interpolate_patch_pos(pos_1nd: jax.Array, old_grid, new_grid) -> jax.Array:
  """Bilinear resize of a patch position table [1, gh*gw, D] (half-pixel centres, no antialias).

  Matches torch F.interpolate(mode='bilinear', align_corners=False), the resize the
  reference applies at other resolutions.
  """
  (oh, ow), (nh, nw) = _as_hw(old_grid), _as_hw(new_grid)
  if (oh, ow) == (nh, nw):
    return pos_1nd
  d = pos_1nd.shape[-1]
  grid_hwd = pos_1nd.reshape(oh, ow, d).astype(jnp.float32)
  resized = jax.image.resize(grid_hwd, (nh, nw, d), method='bilinear', antialias=False)
  return resized.reshape(1, nh * nw, d).astype(pos_1nd.dtype)


# ----------------------------------------------------------------------------- layers

class Attention(nn.Module):
  width: int
  num_heads: int
  dtype: Any = jnp.float32
  impl: str = 'einsum'

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    b, l, _ = x_bld.shape
    h = self.num_heads
    dh = self.width // h
    qkv = _dense(3 * self.width, 'embed', 'heads', self.dtype, 'qkv', use_bias=False)(x_bld)
    # Our qkv features are ordered (heads, 3, head_dim) so that splitting the 'heads'
    # axis for tensor parallelism keeps each head's q, k, v on one device. The
    # released checkpoints use (3, heads, head_dim); weights/uvit.py permutes.
    qkv_blh3d = qkv.reshape(b, l, h, 3, dh)
    q_blhd, k_blhd, v_blhd = (qkv_blh3d[:, :, :, i] for i in range(3))
    out_blhd = layers.attention(q_blhd, k_blhd, v_blhd, impl=self.impl)
    return _dense(self.width, 'heads', 'embed', self.dtype, 'proj')(out_blhd.reshape(b, l, self.width))


class Mlp(nn.Module):
  width: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    h_blf = _dense(self.mlp_dim, 'embed', 'mlp', self.dtype, 'fc1')(x_bld)
    h_blf = nn.gelu(h_blf, approximate=False)  # exact erf GELU, as torch nn.GELU()
    return _dense(self.width, 'mlp', 'embed', self.dtype, 'fc2')(h_blf)


class Block(nn.Module):
  """Post-LN block; `skip` blocks first fuse the long skip: LN(Linear(concat[x, skip]))."""
  width: int
  num_heads: int
  mlp_dim: int
  skip: bool = False
  dtype: Any = jnp.float32
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, x_bld: jax.Array, skip_bld: jax.Array | None = None) -> jax.Array:
    if self.skip:
      if skip_bld is None:
        raise ValueError('a skip block needs the skip activation')
      x_bld = _dense(self.width, 'mlp', 'embed', self.dtype, 'skip_linear')(
          jnp.concatenate([x_bld, skip_bld], axis=-1))
      x_bld = constrain_activation(_layer_norm('norm1')(x_bld))
    x_bld = x_bld + Attention(self.width, self.num_heads, self.dtype, self.attention, name='attn')(x_bld)
    x_bld = constrain_activation(_layer_norm('norm2')(x_bld))
    x_bld = x_bld + Mlp(self.width, self.mlp_dim, self.dtype, name='mlp')(x_bld)
    return constrain_activation(_layer_norm('norm3')(x_bld))


def _block_class(remat: str):
  if remat == 'none':
    return Block
  if remat == 'block':
    return nn.remat(Block)  # saves nothing inside a block: recompute it all
  if remat in REMAT_POLICIES:
    return nn.remat(Block, policy=getattr(jax.checkpoint_policies, remat))
  raise ValueError(f'remat must be one of {REMAT_POLICIES}, got {remat!r}')


# ----------------------------------------------------------------------------- the model

class UViT(nn.Module):
  """UniDiffuser's joint noise-prediction network (docs/INTERFACES.md)."""
  version: str
  latent_size: int
  latent_channels: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  text_dim: int
  num_text_tokens: int
  clip_img_dim: int
  num_data_types: int = 2
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention: str = 'einsum'  # see layers.ATTENTION_IMPLS
  pos_init: str = 'normal'   # see _pos_table_init; only affects a fresh initialisation
  # 'eps' (the released models): the outputs are the noise; 'v': the network's outputs are
  # velocities, turned into the noise here (schedule.eps_from_v), so every caller sees eps.
  prediction: str = 'eps'

  @property
  def grid_size(self) -> int:
    return self.latent_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the image patches: times, data type (v1), text, clip_img."""
    return 2 + (1 if self.version == 'v1' else 0) + self.num_text_tokens + 1

  @property
  def num_tokens(self) -> int:
    return self.num_prefix_tokens + self.num_patches

  def _check_config(self):
    if self.version not in ('v0', 'v1'):
      raise ValueError(f"version must be 'v0' or 'v1', got {self.version!r}")
    if self.latent_size % self.patch_size:
      raise ValueError(f'latent_size {self.latent_size} is not a multiple of patch_size {self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')
    if self.prediction not in schedule.PREDICTIONS:
      raise ValueError(f'prediction must be one of {schedule.PREDICTIONS}, got {self.prediction!r}')

  @nn.compact
  def __call__(self, z, clip_img, text, t_img, t_text, data_type=None):
    """z [B,h,w,C], clip_img [B,1,Dc], text [B,L,Dt], t_img/t_text [B] raw 0..1000,
    data_type int [B] (v1; None = 1) -> (z_out, clip_img_out, text_out), shapes as inputs."""
    self._check_config()
    p, w_ = self.patch_size, self.width
    b, zh, zw, zc = z.shape
    if zc != self.latent_channels or zh % p or zw % p:
      raise ValueError(f'z has shape {z.shape}; expected [B, h, w, {self.latent_channels}] '
                       f'with h, w multiples of {p}')
    if clip_img.shape != (b, 1, self.clip_img_dim):
      raise ValueError(f'clip_img has shape {clip_img.shape}, expected {(b, 1, self.clip_img_dim)}')
    if text.shape != (b, self.num_text_tokens, self.text_dim):
      raise ValueError(f'text has shape {text.shape}, expected {(b, self.num_text_tokens, self.text_dim)}')
    t_img = jnp.broadcast_to(jnp.asarray(t_img, jnp.float32), (b,))
    t_text = jnp.broadcast_to(jnp.asarray(t_text, jnp.float32), (b,))

    # Inputs -> tokens.
    patches_bhwd = nn.Conv(
        w_, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_part(_torch_conv_default(zc * p * p), (None, None, 'io', 'embed')),
        bias_init=_part(_torch_conv_default(zc * p * p), ('embed',)),
        name='patch_embed')(z.astype(self.dtype))
    gh, gw = zh // p, zw // p
    img_bnd = patches_bhwd.reshape(b, gh * gw, w_)
    text_bld = _dense(w_, 'io', 'embed', self.dtype, 'text_embed')(text.astype(self.dtype))
    clip_b1d = _dense(w_, 'io', 'embed', self.dtype, 'clip_img_embed')(clip_img.astype(self.dtype))
    t_img_b1d = timestep_embedding(t_img, w_)[:, None]  # float32, no weights
    t_text_b1d = timestep_embedding(t_text, w_)[:, None]

    prefix = [t_img_b1d, t_text_b1d]
    pos_table = self.param(
        'pos_embed', _part(_pos_table_init(self.pos_init, self.num_text_tokens, self.grid_size),
                           (None, 'pos', 'pos_width')),
        (1, 2 + self.num_text_tokens + 1 + self.num_patches, w_), jnp.float32)
    pos_parts = [pos_table[:, :2]]
    if self.version == 'v1':
      if data_type is None:
        data_type = jnp.ones((b,), jnp.int32)
      data_type = jnp.broadcast_to(jnp.asarray(data_type, jnp.int32), (b,))
      type_b1d = nn.Embed(
          self.num_data_types, w_, dtype=self.dtype, param_dtype=jnp.float32,
          embedding_init=_part(nn.initializers.normal(1.0), (None, 'embed')),  # torch Embedding default
          name='token_embedding')(data_type)[:, None]
      prefix.append(type_b1d)
      pos_parts.append(self.param(
          'pos_embed_token', _part(nn.initializers.zeros_init(), (None, None, 'pos_width')),
          (1, 1, w_), jnp.float32))
    pos_parts.append(pos_table[:, 2:2 + self.num_text_tokens + 1])
    pos_parts.append(interpolate_patch_pos(
        pos_table[:, 2 + self.num_text_tokens + 1:], self.grid_size, (gh, gw)))
    pos_1td = jnp.concatenate(pos_parts, axis=1)
    tokens = prefix + [text_bld, clip_b1d, img_bnd]
    x_btd = jnp.concatenate([t.astype(jnp.float32) for t in tokens], axis=1) + pos_1td
    x_btd = constrain_activation(x_btd)

    # U-shaped stack of post-LN blocks.
    block_cls = _block_class(self.remat)
    kw = dict(width=w_, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
              attention=self.attention)
    skips = []
    for i in range(self.depth // 2):
      x_btd = block_cls(**kw, name=f'in_blocks_{i}')(x_btd)
      skips.append(x_btd)
    x_btd = block_cls(**kw, name='mid_block')(x_btd)
    for i in range(self.depth // 2):
      x_btd = block_cls(**kw, skip=True, name=f'out_blocks_{i}')(x_btd, skips.pop())
    x_btd = constrain_activation(_layer_norm('norm')(x_btd))

    # Tokens -> outputs (time and data-type tokens are dropped).
    n_pre = x_btd.shape[1] - gh * gw
    text_out = x_btd[:, n_pre - 1 - self.num_text_tokens:n_pre - 1]
    clip_out = x_btd[:, n_pre - 1:n_pre]
    img_out = x_btd[:, n_pre:]
    patch_bnq = _dense(p * p * zc, 'embed', 'io', self.dtype, 'decoder_pred')(img_out)
    # 'B (h w) (p1 p2 C) -> B (h p1) (w p2) C'
    z_out = patch_bnq.reshape(b, gh, gw, p, p, zc).transpose(0, 1, 3, 2, 4, 5).reshape(b, zh, zw, zc)
    clip_out = _dense(self.clip_img_dim, 'embed', 'io', self.dtype, 'clip_img_out')(clip_out)
    text_out = _dense(self.text_dim, 'embed', 'io', self.dtype, 'text_out')(text_out)
    if self.prediction == 'v':
      return (schedule.eps_from_v(z_out, z, t_img), schedule.eps_from_v(clip_out, clip_img, t_img),
              schedule.eps_from_v(text_out, text, t_text))
    return (z_out.astype(jnp.float32), clip_out.astype(jnp.float32), text_out.astype(jnp.float32))


# ----------------------------------------------------------------------------- utilities

def dummy_inputs(model: UViT, batch_size: int = 1, dtype=jnp.float32) -> tuple:
  """Zero inputs of the right shapes, for init / eval_shape."""
  b = batch_size
  return (jnp.zeros((b, model.latent_size, model.latent_size, model.latent_channels), dtype),
          jnp.zeros((b, 1, model.clip_img_dim), dtype),
          jnp.zeros((b, model.num_text_tokens, model.text_dim), dtype),
          jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.float32),
          jnp.ones((b,), jnp.int32) if model.version == 'v1' else None)


def from_config(model_cfg: Mapping) -> UViT:
  """UViT from a config.model block (dtype named by a string); a bad field is a ConfigError."""
  cfg = dict(model_cfg)
  cfg["dtype"] = jnp.dtype(cfg["dtype"])
  try:
    model = UViT(**cfg)
    model._check_config()  # pylint: disable=protected-access
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"config.model: {e}") from None
  return model


def abstract_variables(model: UViT) -> dict:
  """Boxed (logically partitioned) variable shapes from jax.eval_shape: nothing allocated."""
  # Attention kernel and remat do not change the parameters; the plain path traces anywhere.
  plain = model.clone(attention='einsum', remat='none', parent=None)
  return jax.eval_shape(lambda key: plain.init(key, *dummy_inputs(plain)), jax.random.key(0))


def count_params(model_cfg: Mapping) -> int:
  """Number of parameters of UViT(**model_cfg), computed without allocating them."""
  variables = nn.meta.unbox(abstract_variables(UViT(**model_cfg)))
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables['params'])))


def resize_pos_embed(params: Mapping, old_latent_size, new_latent_size, patch_size: int) -> dict:
  """Returns params whose `pos_embed` suits `new_latent_size`: only the patch part is resized.

  `params` may be the 'params' collection or the variables dict holding it, boxed
  (nn.LogicallyPartitioned leaves) or not. Build the new model with
  latent_size=new_latent_size to use the result.
  """
  if 'params' in params and 'pos_embed' not in params:
    return {**params, 'params': resize_pos_embed(params['params'], old_latent_size,
                                                 new_latent_size, patch_size)}
  boxed = params['pos_embed']
  table = boxed.unbox() if isinstance(boxed, nn.meta.AxisMetadata) else boxed
  old_hw, new_hw = _as_hw(old_latent_size), _as_hw(new_latent_size)
  old_grid = (old_hw[0] // patch_size, old_hw[1] // patch_size)
  new_grid = (new_hw[0] // patch_size, new_hw[1] // patch_size)
  n_old = old_grid[0] * old_grid[1]
  if table.shape[1] <= n_old:
    raise ValueError(f'pos_embed {table.shape} is too short for a {old_grid} patch grid')
  others, patch = table[:, :-n_old], table[:, -n_old:]
  new_table = jnp.concatenate(
      [jnp.asarray(others), interpolate_patch_pos(jnp.asarray(patch), old_grid, new_grid)], axis=1)
  new_leaf = boxed.replace_boxed(new_table) if isinstance(boxed, nn.meta.AxisMetadata) else new_table
  return {**params, 'pos_embed': new_leaf}
