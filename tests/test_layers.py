"""The shared model building blocks (models/layers.py) against a float64 numpy reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from unidiffuser_jax import sharding
from unidiffuser_jax.models import layers


def _reference(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v per head, float64; q [B, L, H, D], k/v [B, M, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhlm,bmhd->blhd", p, v)


def _qkv(l=5, m=7, h=3, d=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 3)
  return tuple(2.0 * jax.random.normal(kk, (2, n, h, d)).astype(dtype)
               for kk, n in zip(ks, (l, m, m)))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(impl, masked):
  q, k, v = _qkv()
  # Query l sits at position l + 2 of the 7 keys (a KV cache two steps in): causal over positions.
  mask = (np.arange(7)[None, :] <= np.arange(5)[:, None] + 2) if masked else None
  got = layers.attention(q, k, v, mask_lm=None if mask is None else jnp.asarray(mask), impl=impl)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), atol=2e-5, rtol=0)


@pytest.mark.parametrize("l,m", [(5, 7), (300, 260)])
def test_splash_attention_matches_reference_and_its_gradient(l, m):
  # Pallas' interpreter runs the TPU kernel here. 5 queries and 7 keys are padded to one block
  # of 128; 300 and 260 to 384: one block of 384, its logits in tiles of 128.
  q, k, v = _qkv(l=l, m=m)
  got = layers.attention(q, k, v, impl="splash")
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v), atol=2e-5, rtol=0)
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(layers.attention(q, k, v, impl=impl)))
  want = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=0)


def test_splash_attention_under_a_mesh_runs_per_shard():
  # Batch over (data, fsdp), heads over tensor (the default rules): shard_map, no gather.
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, num_devices=8))
  q, k, v = _qkv(l=9, m=9, h=4)
  q, k, v = (jnp.concatenate([a, a + 1.0]) for a in (q, k, v))  # batch 4
  fn = jax.jit(lambda q, k, v: layers.attention(q, k, v, impl="splash"))
  with sharding.tracing_context(mesh, common.sharding().rules):
    lowered = fn.lower(q, k, v)
    got = fn(q, k, v)
  assert "sdy.manual_computation" in lowered.as_text()  # the shard_map
  compiled = lowered.compile().as_text()
  assert "all-gather" not in compiled and "all-to-all" not in compiled
  # A batch the mesh does not divide (init traces one example) runs whole on every device.
  with sharding.tracing_context(mesh, common.sharding().rules):
    one = fn(q[:1], k[:1], v[:1])
  np.testing.assert_allclose(np.asarray(one), _reference(q[:1], k[:1], v[:1]), atol=2e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got), _reference(q, k, v), atol=2e-5, rtol=0)


def test_attention_bf16_keeps_softmax_float32_and_returns_v_dtype():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  got = layers.attention(q, k, v)
  assert got.dtype == jnp.bfloat16
  # The only bf16 roundings are the inputs (taken as exact here) and the output.
  np.testing.assert_allclose(np.asarray(got, np.float32), _reference(q, k, v), atol=2e-2, rtol=1e-2)


def test_attention_rejects_unknown_impl():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="attention must be one of"):
    layers.attention(q, k, v, impl="flash")


def test_dense_and_layer_norm_name_their_axes():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = layers.dense(6, ("embed", "mlp"), kernel_init=nn.initializers.normal(0.02),
                       dtype=jnp.bfloat16, name="fc")(x)
      return layers.layer_norm(1e-5, dtype=jnp.float32, name="ln")(x)

  variables = Net().init(jax.random.key(0), jnp.ones((2, 3, 4)))
  boxed = variables["params"]
  assert boxed["fc"]["kernel"].names == ("embed", "mlp")
  assert boxed["fc"]["bias"].names == ("mlp",)
  assert boxed["ln"]["scale"].names == ("norm",) and boxed["ln"]["bias"].names == ("norm",)
  params = nn.meta.unbox(variables)["params"]
  assert params["fc"]["kernel"].shape == (4, 6) and params["fc"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(params["ln"]["scale"], np.ones(6))
  out = Net().apply(nn.meta.unbox(variables), jnp.ones((2, 3, 4)))
  assert out.dtype == jnp.float32
