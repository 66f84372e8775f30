"""CLIP encoders in Flax: the text tower (ViT-L/14's) and the vision tower (ViT-B/32's).

Both compute what Hugging Face transformers' CLIP does:

* ``CLIPTextEncoder``: token embedding + learned positions, pre-LN transformer
  layers with a causal mask, final LayerNorm; returns ``last_hidden_state``
  ``[B, L, width]`` (UniDiffuser uses all 77 positions, no pooling, no
  projection). No padding mask is applied, as in the reference, which calls
  the encoder with token ids only.
* ``CLIPTextProjection``: end-of-text pooling + bias-free ``text_projection``
  on top of CLIPTextEncoder's output -> ``[B, proj_dim]`` (CLIP score only).
* ``CLIPVisionEncoder``: bias-free patch conv, class token, positions,
  ``pre_layrnorm``, transformer (no mask), ``post_layernorm`` on the class
  token, bias-free ``visual_projection`` -> ``[B, proj_dim]``. NOT normalised.

Preprocessing: ``clip_preprocess`` (on device, jax.image.resize), close to but not
bit-equal with the host one, ``data_pipelines.transforms.clip_image`` (equal to
transformers' CLIPImageProcessor), whose mean/std it uses.

Parameter names mirror transformers' so the key table stays readable:
layers_{i}/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1, fc2}}.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from data_pipelines import transforms
from unidiffuser_jax.models import layers

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _dense(features: int, names, dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return layers.dense(features, names, kernel_init=nn.initializers.normal(0.02), dtype=dtype,
                      name=name, use_bias=use_bias)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  return layers.layer_norm(eps, dtype=dtype, name=name)


class CLIPAttention(nn.Module):
  width: int
  num_heads: int
  causal: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bld):
    b, l, _ = x_bld.shape
    h = self.num_heads
    d = self.width // h

    def heads(name):
      return _dense(self.width, ("embed", "heads"), self.dtype, name)(x_bld).reshape(b, l, h, d)

    q_blhd, k_blhd, v_blhd = heads("q_proj"), heads("k_proj"), heads("v_proj")
    mask_lm = jnp.tril(jnp.ones((l, l), bool)) if self.causal else None
    out_blhd = layers.attention(q_blhd, k_blhd, v_blhd, mask_lm=mask_lm)
    return _dense(self.width, ("heads", "embed"), self.dtype, "out_proj")(
        out_blhd.reshape(b, l, self.width))


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))."""
  width: int
  num_heads: int
  mlp_dim: int
  causal: bool
  layer_norm_eps: float
  hidden_act: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bld):
    act = _ACTIVATIONS[self.hidden_act]
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x_bld)
    x_bld = x_bld + CLIPAttention(self.width, self.num_heads, self.causal, self.dtype,
                                  name="self_attn")(h)
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x_bld)
    h = _dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(h)
    h = _dense(self.width, ("mlp", "embed"), self.dtype, "fc2")(act(h))
    return x_bld + h


def _check_act(hidden_act: str):
  if hidden_act not in _ACTIVATIONS:
    raise ValueError(f"hidden_act {hidden_act!r} unsupported; expected one of {list(_ACTIVATIONS)}")


class CLIPTextEncoder(nn.Module):
  """Token ids [B, L] (L <= max_positions) -> last_hidden_state float32 [B, L, width].

  Defaults are openai/clip-vit-large-patch14's text tower.
  """
  vocab_size: int = 49408
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_bl):
    _check_act(self.hidden_act)
    if tokens_bl.ndim != 2 or tokens_bl.shape[1] > self.max_positions:
      raise ValueError(f"expected token ids [B, L<={self.max_positions}], got {tokens_bl.shape}")
    l = tokens_bl.shape[1]
    tok = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                   embedding_init=nn.with_logical_partitioning(
                       nn.initializers.normal(0.02), ("vocab", "embed")),
                   name="token_embedding")
    pos_pd = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ("pos", "embed")), (self.max_positions, self.width),
                        jnp.float32)
    x_bld = tok(tokens_bl.astype(jnp.int32)) + pos_pd[None, :l].astype(self.dtype)
    for i in range(self.num_layers):
      x_bld = CLIPEncoderLayer(self.width, self.num_heads, self.mlp_dim, True,
                               self.layer_norm_eps, self.hidden_act, self.dtype,
                               name=f"layers_{i}")(x_bld)
    x_bld = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x_bld)
    return x_bld.astype(jnp.float32)


class CLIPTextProjection(nn.Module):
  """CLIPTextEncoder output [B, L, width] + token ids [B, L] -> text embedding [B, proj_dim].

  The part of transformers' ``CLIPModel.get_text_features`` after the text
  tower: pool the hidden state of the end-of-text token, then the bias-free
  ``text_projection``. NOT normalised. The pooled position is the first
  occurrence of `eos_token_id`, or, when the config says ``eos_token_id=2``
  (older CLIP configs), the position of the largest token id -- both
  transformers' rules. Used for CLIP score (clip_score.py); UniDiffuser's
  conditioning uses the unpooled hidden states instead.
  """
  proj_dim: int = 768
  eos_token_id: int = 49407
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_bld, tokens_bl):
    if hidden_bld.ndim != 3 or tokens_bl.shape != hidden_bld.shape[:2]:
      raise ValueError(f"expected hidden [B, L, D] and token ids [B, L], got "
                       f"{hidden_bld.shape} and {tokens_bl.shape}")
    tokens_bl = tokens_bl.astype(jnp.int32)
    if self.eos_token_id == 2:
      pos_b = jnp.argmax(tokens_bl, axis=-1)
    else:
      pos_b = jnp.argmax(tokens_bl == self.eos_token_id, axis=-1)
    pooled_bd = jnp.take_along_axis(hidden_bld, pos_b[:, None, None], axis=1)[:, 0]
    out_bp = _dense(self.proj_dim, ("embed", "io"), self.dtype, "text_projection",
                    use_bias=False)(pooled_bd.astype(self.dtype))
    return out_bp.astype(jnp.float32)


class CLIPVisionEncoder(nn.Module):
  """Preprocessed images [B, S, S, 3] -> projected embedding float32 [B, proj_dim].

  Defaults are openai/clip-vit-base-patch32's vision tower (S = 224).
  """
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  proj_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc):
    _check_act(self.hidden_act)
    s, p = self.image_size, self.patch_size
    if images_bhwc.ndim != 4 or images_bhwc.shape[1:] != (s, s, 3):
      raise ValueError(f"expected preprocessed images [B, {s}, {s}, 3], got {images_bhwc.shape}")
    b = images_bhwc.shape[0]
    n = (s // p) ** 2
    patches = nn.Conv(
        self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 (None, None, "io", "embed")),
        name="patch_embedding")(images_bhwc.astype(self.dtype))
    patches_bnd = patches.reshape(b, n, self.width)  # row-major over (h, w) as torch flatten(2)
    cls_d = self.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (self.width,), jnp.float32)
    pos_pd = self.param("position_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("pos", "embed")), (n + 1, self.width), jnp.float32)
    cls_b1d = jnp.broadcast_to(cls_d.astype(self.dtype), (b, 1, self.width))
    x_bld = jnp.concatenate([cls_b1d, patches_bnd], axis=1) + pos_pd[None].astype(self.dtype)
    x_bld = _layer_norm(self.layer_norm_eps, self.dtype, "pre_layrnorm")(x_bld)
    for i in range(self.num_layers):
      x_bld = CLIPEncoderLayer(self.width, self.num_heads, self.mlp_dim, False,
                               self.layer_norm_eps, self.hidden_act, self.dtype,
                               name=f"layers_{i}")(x_bld)
    pooled_bd = _layer_norm(self.layer_norm_eps, self.dtype, "post_layernorm")(x_bld[:, 0])
    out_bp = _dense(self.proj_dim, ("embed", "io"), self.dtype, "visual_projection",
                    use_bias=False)(pooled_bd)
    return out_bp.astype(jnp.float32)


def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
  """Short side -> size, long side int(size * long / short) (transformers' rule)."""
  if w <= h:
    return int(size * h / w), size
  return size, int(size * w / h)


def clip_preprocess(images_bhwc: jax.Array, size: int = 224) -> jax.Array:
  """Images in [-1, 1] [B, H, W, 3] -> CLIP input [B, size, size, 3], jittable (size static).

  Same geometry as the host transforms.clip_image (short side to `size`, centre crop), but
  the resize is jax.image.resize's antialiased bicubic (Keys a = -0.5, as PIL)
  on floats, with no rounding to uint8 between resize and normalisation. The
  result therefore differs from the host path by about the uint8 quantisation
  step (1/255 before normalisation, ~0.015 after it) plus small edge effects;
  the test states the measured error.
  """
  b, h, w, c = images_bhwc.shape
  if c != 3:
    raise ValueError(f"expected RGB images [B, H, W, 3], got {images_bhwc.shape}")
  x = (images_bhwc.astype(jnp.float32) + 1.0) * 0.5
  nh, nw = _resized_size(h, w, size)
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)
  mean = jnp.asarray(transforms.CLIP_MEAN, jnp.float32)
  std = jnp.asarray(transforms.CLIP_STD, jnp.float32)
  return (x - mean) / std
