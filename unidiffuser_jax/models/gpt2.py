"""GPT-2 (the Hugging Face "gpt2" architecture) in Flax linen, with a functional KV cache.

Layout follows HF's GPT2LMHeadModel so that weights map one to one:
wte, wpe, h_{i}/{ln_1, attn/{c_attn, c_proj}, ln_2, mlp/{c_fc, c_proj}}, ln_f, and
a language-model head tied to wte. HF's Conv1D stores weights as [in, out], which
is already a Flax Dense kernel.

Pre-LN blocks: x += attn(ln_1(x)); x += mlp(ln_2(x)); final ln_f. Causal attention.
No dropout: the caption decoder is used deterministically (the original
fine-tuning used GPT-2's default dropout 0.1; see the report of weights/captioner.py).

KV cache: `init_kv_cache` returns a dict of arrays
  {'k': [n_layer, B, S, H, D], 'v': same, 'index': int32 scalar}
where S is a fixed maximum length. Calling the model with `cache=` writes the new
keys/values at positions index .. index+T-1 and returns the updated cache, so
incremental decoding works inside lax.while_loop / lax.scan with static shapes.
"""
from collections.abc import Mapping
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unidiffuser_jax.models import layers

Dtype = jnp.dtype

_ACTIVATIONS = {
    # HF "gelu_new" is the tanh approximation; "gelu" is the exact erf form.
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
}


def _dense(features: int, names: tuple[str, str], std: float, dtype, param_dtype, name: str):
  return layers.dense(features, names, kernel_init=nn.initializers.normal(std), dtype=dtype,
                      param_dtype=param_dtype, name=name)


def _layer_norm(eps: float, dtype, param_dtype, name: str | None):
  return layers.layer_norm(eps, dtype=dtype, param_dtype=param_dtype, name=name)


class GPT2Attention(nn.Module):
  """Causal multi-head self-attention; logits and softmax in float32."""
  n_embd: int
  n_head: int
  proj_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_bte, positions_t, cache_kv=None, cache_index=None):
    b, t, e = x_bte.shape
    h = self.n_head
    d = e // h
    qkv = _dense(3 * e, ('embed', 'heads'), 0.02, self.dtype, self.param_dtype, 'c_attn')(x_bte)
    q_bthd, k_bthd, v_bthd = [a.reshape(b, t, h, d) for a in jnp.split(qkv, 3, axis=-1)]
    if cache_kv is None:
      k_all, v_all = k_bthd, v_bthd
      key_pos = positions_t
      new_kv = None
    else:
      ck_bshd, cv_bshd = cache_kv
      at = (0, cache_index, 0, 0)
      k_all = jax.lax.dynamic_update_slice(ck_bshd, k_bthd.astype(ck_bshd.dtype), at)
      v_all = jax.lax.dynamic_update_slice(cv_bshd, v_bthd.astype(cv_bshd.dtype), at)
      # Slots not yet written lie at positions > every query position, so the
      # causal mask below also hides them.
      key_pos = jnp.arange(ck_bshd.shape[1])
      new_kv = (k_all, v_all)
    causal_qk = key_pos[None, :] <= positions_t[:, None]
    out_bthd = layers.attention(q_bthd, k_all.astype(self.dtype), v_all.astype(self.dtype),
                                mask_lm=causal_qk)
    out = _dense(e, ('heads', 'embed'), self.proj_std, self.dtype, self.param_dtype,
                 'c_proj')(out_bthd.reshape(b, t, e))
    return out, new_kv


class GPT2MLP(nn.Module):
  n_embd: int
  n_inner: int
  activation: str
  proj_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _dense(self.n_inner, ('embed', 'mlp'), 0.02, self.dtype, self.param_dtype, 'c_fc')(x)
    x = _ACTIVATIONS[self.activation](x)
    return _dense(self.n_embd, ('mlp', 'embed'), self.proj_std, self.dtype, self.param_dtype,
                  'c_proj')(x)


class GPT2Block(nn.Module):
  n_embd: int
  n_head: int
  n_inner: int
  activation: str
  eps: float
  proj_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions_t, cache_kv=None, cache_index=None):
    a, new_kv = GPT2Attention(self.n_embd, self.n_head, self.proj_std, self.dtype, self.param_dtype,
                              name='attn')(
                                  _layer_norm(self.eps, self.dtype, self.param_dtype, 'ln_1')(x),
                                  positions_t, cache_kv, cache_index)
    x = x + a
    m = GPT2MLP(self.n_embd, self.n_inner, self.activation, self.proj_std, self.dtype,
                self.param_dtype, name='mlp')(
                    _layer_norm(self.eps, self.dtype, self.param_dtype, 'ln_2')(x))
    return x + m, new_kv


class GPT2(nn.Module):
  """GPT-2 language model with tied head. Sizes default to HF "gpt2" (124M)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None    # None: 4 * n_embd
  activation: str = 'gelu_new'  # 'gelu_new' (tanh approx., HF gpt2) or 'gelu' (erf)
  layer_norm_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.n_embd % self.n_head:
      raise ValueError(f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}')
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} not in {sorted(_ACTIVATIONS)}')
    emb_init = nn.initializers.normal(0.02)
    self.wte = nn.Embed(self.vocab_size, self.n_embd, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        embedding_init=nn.with_logical_partitioning(emb_init, ('vocab', 'embed')))
    self.wpe = nn.Embed(self.n_positions, self.n_embd, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        embedding_init=nn.with_logical_partitioning(emb_init, ('pos', 'embed')))
    # HF's GPT-2 init scales residual output projections by 1/sqrt(2 * n_layer).
    proj_std = 0.02 / math.sqrt(2 * self.n_layer)
    self.h = [
        GPT2Block(self.n_embd, self.n_head, self.n_inner or 4 * self.n_embd, self.activation,
                  self.layer_norm_epsilon, proj_std, self.dtype, self.param_dtype)
        for _ in range(self.n_layer)
    ]
    self.ln_f = _layer_norm(self.layer_norm_epsilon, self.dtype, self.param_dtype, None)

  def embed(self, input_ids):
    """Token embeddings [..., n_embd] (no position embedding)."""
    return self.wte(input_ids)

  def __call__(self, input_ids=None, inputs_embeds=None, cache: Mapping | None = None):
    """Logits [B, T, vocab] (float32); with `cache`, returns (logits, new_cache).

    Exactly one of input_ids [B, T] (int) and inputs_embeds [B, T, n_embd] is given.
    Positions are 0..T-1, or cache['index'] .. cache['index']+T-1 with a cache.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError('pass exactly one of input_ids and inputs_embeds')
    x_bte = self.wte(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    t = x_bte.shape[1]
    if cache is None and t > self.n_positions:
      # Position lookups would silently clamp; refuse instead.
      raise ValueError(f'sequence of {t} positions exceeds n_positions={self.n_positions}')
    start = 0 if cache is None else cache['index']
    positions_t = start + jnp.arange(t)
    x_bte = x_bte + self.wpe(positions_t)[None]
    new_k, new_v = [], []
    for i, block in enumerate(self.h):
      kv = None if cache is None else (cache['k'][i], cache['v'][i])
      x_bte, kv = block(x_bte, positions_t, kv, start)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    x_bte = self.ln_f(x_bte)
    # Tied head; accumulate in float32 even when computing in bfloat16.
    logits = jnp.einsum('bte,ve->btv', x_bte.astype(self.dtype),
                        self.wte.embedding.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    if cache is None:
      return logits
    new_cache = {'k': jnp.stack(new_k), 'v': jnp.stack(new_v), 'index': start + t}
    return logits, new_cache


def init_kv_cache(model: GPT2, batch: int, max_len: int, dtype=None) -> dict:
  """An empty cache for `batch` sequences of up to `max_len` positions."""
  if max_len > model.n_positions:
    raise ValueError(f'max_len={max_len} exceeds n_positions={model.n_positions}')
  d = model.n_embd // model.n_head
  shape = (model.n_layer, batch, max_len, model.n_head, d)
  dtype = dtype or model.dtype
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'index': jnp.zeros((), jnp.int32)}
