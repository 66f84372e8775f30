"""The FID variant of InceptionV3 (pytorch-fid's network), NHWC, float32, inference only.

This is the network that pytorch-fid builds with ``use_fid_inception=True``:
torchvision's Inception3 layout with 1008 logits and the blocks patched to
match TensorFlow's FID graph:

* ``Mixed_5b/5c/5d`` (InceptionA), ``Mixed_6b..6e`` (InceptionC) and
  ``Mixed_7b`` (InceptionE, first) average-pool their pool branch with 3x3,
  stride 1, padding 1 WITHOUT counting the padded zeros;
* ``Mixed_7c`` (InceptionE, second) max-pools that branch instead.

Every convolution is bias-free and followed by an inference-form BatchNorm
(``(x - mean) / sqrt(var + 0.001) * scale + bias``) and a ReLU.

``FIDInception.__call__`` takes images in [0, 1], [B, H, W, 3], and does what
pytorch-fid's ``InceptionV3.forward`` does first: bilinear resize to 299x299
(``F.interpolate(..., mode="bilinear", align_corners=False)``, no antialias;
see ``resize_bilinear``) and the map to [-1, 1] (``2x - 1``). It returns
``(pool_bd, logits_bk)``: the 2048-d pool3 features used for FID and the
1008 logits of ``fc``.

Parameter names follow torchvision's modules (``Conv2d_1a_3x3/conv/kernel``,
``Mixed_5b/branch1x1/bn/mean`` ...) so that weights/inception.py's key table
is mechanical.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3
# Metric numerics: float32 convolutions on every backend (TPU's default would use bf16 passes).
_PRECISION = jax.lax.Precision.HIGHEST


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bilinear resize with align_corners=False.

  Source coordinate of output i is (i + 0.5) * n_in / n_out - 0.5, clamped
  below at 0; it blends floor and floor+1 (clamped to the last pixel)
  linearly. No antialiasing, also when shrinking. The coordinate is computed
  in float32, as torch does for float32 images, so that the blend weights
  round the same way (float64 coordinates differ by up to ~3e-5 in the
  output when shrinking 512 -> 299).
  """
  f32 = np.float32
  m = np.zeros((n_out, n_in), np.float32)
  scale = f32(n_in) / f32(n_out)
  for i in range(n_out):
    src = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0))
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = min(max(src - f32(i0), f32(0)), f32(1))
    m[i, i0] += f32(1) - frac
    m[i, i1] += frac
  return m


def resize_bilinear(images_bhwc: jax.Array, size: int = FID_SIZE) -> jax.Array:
  """Resizes [B, H, W, C] to [B, size, size, C] as pytorch-fid's F.interpolate call."""
  _, h, w, _ = images_bhwc.shape
  if (h, w) == (size, size):
    return images_bhwc
  mh = jnp.asarray(_bilinear_matrix(h, size), images_bhwc.dtype)
  mw = jnp.asarray(_bilinear_matrix(w, size), images_bhwc.dtype)
  return jnp.einsum("yh,bhwc,xw->byxc", mh, images_bhwc, mw, precision=_PRECISION)


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics; all four tensors are params."""
  features: int
  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x):
    p = lambda name, init: self.param(name, init, (self.features,), jnp.float32)
    scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
    mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
  """Bias-free conv + FrozenBatchNorm + ReLU (torchvision's BasicConv2d)."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_PRECISION,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3(x):
  # TensorFlow's FID graph: padded zeros do not count in the average.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    for i, (k, p) in enumerate((col, row, col), start=2):
      bd = BasicConv(c7, k, padding=p, name=f"branch7x7dbl_{i}")(bd)
    bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """``pool="avg"``: pytorch-fid's FIDInceptionE_1; ``pool="max"``: FIDInceptionE_2."""
  pool: str

  @nn.compact
  def __call__(self, x):
    def split(y, prefix):  # the (1,3) and (3,1) pair whose outputs are concatenated
      a = BasicConv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y)
      b = BasicConv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)
      return jnp.concatenate([a, b], axis=-1)

    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = split(BasicConv(384, (1, 1), name="branch3x3_1")(x), "branch3x3_2")
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = split(BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd),
               "branch3x3dbl_3")
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool={self.pool!r}; use 'avg' or 'max'")
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """Images in [0, 1], [B, H, W, 3] -> (pool3 [B, 2048], logits [B, 1008]), float32."""

  @nn.compact
  def __call__(self, images_bhwc):
    if images_bhwc.ndim != 4 or images_bhwc.shape[-1] != 3:
      raise ValueError(f"FIDInception wants images [B, H, W, 3], got {images_bhwc.shape}")
    x = resize_bilinear(images_bhwc.astype(jnp.float32))
    x = 2.0 * x - 1.0
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool_bd = jnp.mean(x, axis=(1, 2))
    logits_bk = nn.Dense(NUM_LOGITS, precision=_PRECISION, name="fc")(pool_bd)
    return pool_bd, logits_bk
