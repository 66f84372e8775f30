"""Building blocks shared by the transformer-style modules (U-ViT, CLIP, GPT-2, VAE, captioner).

* `dense` / `layer_norm`: flax Dense and LayerNorm whose parameters carry logical
  axis names (nn.with_logical_partitioning); config.sharding.rules maps the names
  to mesh axes (sharding.py). They create the same parameters as plain flax
  modules: kernel [in, out], bias [out], scale and bias [features].
* `attention`: the one scaled dot-product attention core. Logits and softmax are
  float32 whatever the compute dtype (post-LN U-ViT was chosen because attention
  overflowed in half precision; the reference models run under torch autocast,
  which does the same).

Layout: q [B, L, H, D], k and v [B, M, H, D], mask [L, M] (True = may attend).
"""
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# 'einsum': explicit float32 logits/softmax (every backend). 'xla' / 'cudnn':
# jax.nn.dot_product_attention with that implementation ('cudnn' = fused flash
# attention on NVIDIA GPUs, bf16/fp16 only); both also keep logits and softmax float32.
# 'splash': the Pallas TPU splash-attention kernel (flash attention: float32 logits and
# softmax in on-chip memory, never written to HBM); elsewhere the same kernel in Pallas'
# interpreter (slow; for tests). No mask.
ATTENTION_IMPLS = ('einsum', 'xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128  # splash's tile along the sequence; sequences are padded to a multiple
# Query / key blocks up to this long: the kernels re-read K and V (forward, dq) or Q and dO
# (dkv) from HBM once per block of the other side, so one block per sequence reads each once
# (the traffic XLA's cost model counts for the custom call). Logits tiles stay SPLASH_BLOCK wide.
SPLASH_MAX_BLOCK = 2048

Initializer = Callable[..., jax.Array]


def dense(features: int, axes: Sequence[str | None], *, kernel_init: Initializer, dtype: Any,
          name: str | None = None, use_bias: bool = True,
          param_dtype: Any = jnp.float32) -> nn.Dense:
  """nn.Dense with kernel axes `axes` = (in, out) and a zero bias on axis (out,).

  Applied to [B, L, D] it stays 3-D: merging B and L into one axis first made
  XLA:CPU's weight-gradient dots ~6% faster on the demo, but under FSDP on TPU it
  raised per-chip temporaries 20% and code size 4x (--mode=compile, v5e-256).
  """
  in_axis, out_axis = axes
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


def layer_norm(epsilon: float, *, dtype: Any, name: str | None = None,
               param_dtype: Any = jnp.float32) -> nn.LayerNorm:
  """nn.LayerNorm (scale 1, bias 0) with both parameters on the logical axis 'norm'."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('norm',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('norm',)),
      name=name)


def attention(q_blhd: jax.Array, k_bmhd: jax.Array, v_bmhd: jax.Array, *,
              mask_lm: jax.Array | None = None, impl: str = 'einsum') -> jax.Array:
  """softmax(q k^T / sqrt(D), masked) v -> [B, L, H, D] in v's dtype.

  `mask_lm` [L, M] bool: key m is visible from query l where True (masked logits
  become float32's minimum, as the reference models do). `impl`: one of ATTENTION_IMPLS.
  """
  if impl == 'splash':
    if mask_lm is not None:
      raise ValueError('attention="splash" takes no mask')
    return splash_attention(q_blhd, k_bmhd, v_bmhd)
  if impl in ('xla', 'cudnn'):
    mask = None if mask_lm is None else mask_lm[None, None]
    out_blhd = jax.nn.dot_product_attention(q_blhd, k_bmhd, v_bmhd, mask=mask, implementation=impl)
    return out_blhd.astype(v_bmhd.dtype)
  if impl != 'einsum':
    raise ValueError(f'attention must be one of {ATTENTION_IMPLS}, got {impl!r}')
  d = q_blhd.shape[-1]
  # Heads-major [B, H, L, D] once, so both products are plain batched matmuls: with the
  # [B, L, H, D] einsums XLA:CPU fused transposes and the softmax into one slow XNNPACK
  # kernel (16 GFLOP/s; the 44.8M U-ViT benchmark forward went 1763 -> 1377 ms with this layout).
  q_bhld, k_bhmd, v_bhmd = (a.transpose(0, 2, 1, 3) for a in (q_blhd, k_bmhd, v_bmhd))
  logits_bhlm = jnp.einsum('bhld,bhmd->bhlm', q_bhld, k_bhmd,
                           preferred_element_type=jnp.float32) * (d ** -0.5)
  if mask_lm is not None:
    logits_bhlm = jnp.where(mask_lm, logits_bhlm, jnp.finfo(jnp.float32).min)
  probs_bhlm = jax.nn.softmax(logits_bhlm.astype(jnp.float32), axis=-1)
  out_bhld = jnp.einsum('bhlm,bhmd->bhld', probs_bhlm.astype(v_bhmd.dtype), v_bhmd,
                        preferred_element_type=jnp.float32)
  return out_bhld.transpose(0, 2, 1, 3).astype(v_bhmd.dtype)


def _splash_block(n: int) -> int:
  """The longest multiple of SPLASH_BLOCK up to SPLASH_MAX_BLOCK that divides `n`."""
  return max(b for b in range(SPLASH_BLOCK, min(n, SPLASH_MAX_BLOCK) + 1, SPLASH_BLOCK)
             if n % b == 0)


def _splash_local(q_bhld: jax.Array, k_bhmd: jax.Array, v_bhmd: jax.Array, m: int) -> jax.Array:
  """Splash attention of one device's shard; keys at padded positions >= m are masked."""
  _, h, lp, _ = q_bhld.shape
  mp = k_bhmd.shape[2]
  mask = np.broadcast_to(np.arange(mp)[None, :] < m, (lp, mp))
  heads = splash.MultiHeadMask([splash.NumpyMask(mask)] * h)
  bq, bkv = _splash_block(lp), _splash_block(mp)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=SPLASH_BLOCK,
                             block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=SPLASH_BLOCK, block_q_dq=bq, block_kv_dq=bkv)

  def kernel(interpret: bool):
    fn = splash.make_splash_mha(heads, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                interpret=interpret)
    return jax.vmap(fn)
  # The compiled kernel where the program is lowered for TPU (also libtpu's compile-only
  # devices), Pallas' interpreter on every other platform.
  return jax.lax.platform_dependent(q_bhld, k_bhmd, v_bhmd, tpu=kernel(False),
                                    default=kernel(True))


def _mesh_size(mesh, axes) -> int:
  """Devices along mesh axis name(s) `axes` (None: 1)."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in names]))


def splash_attention(q_blhd: jax.Array, k_bmhd: jax.Array, v_bmhd: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v by the splash kernel -> [B, L, H, D] in v's dtype.

  Sequences are zero-padded to a multiple of SPLASH_BLOCK (the padded keys masked, the
  padded queries dropped). A Pallas kernel has no sharding rule, so under a mesh (traced in
  sharding.tracing_context) it runs in shard_map: batch over the axes of the logical name
  'act_batch', heads over those of 'heads' (config.sharding.rules), nothing gathered.
  """
  _, l, _, d = q_blhd.shape
  m = k_bmhd.shape[1]

  def heads_major(a, n):
    a = a.transpose(0, 2, 1, 3)
    return jnp.pad(a, ((0, 0), (0, 0), (0, -n % SPLASH_BLOCK), (0, 0)))

  q, k, v = (heads_major(a, n) for a, n in
             ((q_blhd * jnp.asarray(d ** -0.5, q_blhd.dtype), l), (k_bmhd, m), (v_bmhd, m)))
  local = lambda q, k, v: _splash_local(q, k, v.astype(q.dtype), m)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    # An axis that does not divide (e.g. init's batch of one) stays whole on every device.
    axes = [a if n % _mesh_size(mesh, a) == 0 else None
            for a, n in zip(nn.logical_to_mesh_axes(('act_batch', 'heads')), q.shape)]
    spec = jax.sharding.PartitionSpec(*axes, None, None)
    local = jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  out_bhld = local(q, k, v)
  return out_bhld[:, :, :l].transpose(0, 2, 1, 3).astype(v_bmhd.dtype)
