"""UniDiffuser's caption decoder: prefix layers + GPT-2, with jittable generation.

The text latent [B, L, 64] (L = 77) comes from CLIP text features via
`encode_prefix` (Linear 768 -> 64). To caption, `decode_prefix` (Linear 64 -> n_embd)
turns it into L prefix embeddings that GPT-2 continues (ClipCap-style).
The vocabulary is GPT-2's 50257 tokens plus one added "<|EOS|>" (id 50257).

Generation (`beam_search`, `greedy`, `nucleus`) is written with lax.while_loop
and a fixed-size KV cache, so it jits with static shapes and batches over B.
Outputs are tokens [B, max_new_tokens] (0 after the end, like the reference pads)
and lengths [B] (number of generated tokens including the EOS, or
max_new_tokens when none was produced).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unidiffuser_jax.models import layers
from unidiffuser_jax.models.gpt2 import GPT2, init_kv_cache

GPT2_VOCAB = 50257
EOS_ID = 50257  # "<|EOS|>" appended after GPT-2's vocabulary.


class CaptionDecoder(nn.Module):
  prefix_inner_dim: int = 768   # CLIP text width
  prefix_hidden_dim: int = 64   # text latent width
  vocab_size: int = GPT2_VOCAB + 1
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation: str = 'gelu_new'
  eos_id: int = EOS_ID
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    if not 0 <= self.eos_id < self.vocab_size:
      raise ValueError(f'eos_id={self.eos_id} outside the vocabulary of {self.vocab_size}')
    def dense(features, names):
      # torch nn.Linear's default init differs; these layers are trained or imported.
      return layers.dense(features, names, kernel_init=nn.initializers.normal(0.02),
                          dtype=self.dtype, param_dtype=self.param_dtype)
    self.prefix_encoder = dense(self.prefix_hidden_dim, ('embed', 'io'))
    self.prefix_decoder = dense(self.n_embd, ('io', 'embed'))
    self.gpt = GPT2(**gpt_kwargs(self))

  def encode_prefix(self, h_bld):
    """CLIP text last_hidden_state [B, L, 768] -> text latent [B, L, 64]."""
    return self.prefix_encoder(h_bld)

  def decode_prefix(self, latent_blc):
    """Text latent [B, L, 64] -> GPT-2 prefix embeddings [B, L, n_embd]."""
    return self.prefix_decoder(latent_blc)

  def __call__(self, prefix_latent_blc, token_ids_bt):
    """Teacher-forced logits [B, T, vocab], aligned with token_ids.

    logits[:, t] is the prediction of token_ids[:, t] from the prefix and
    token_ids[:, :t] (the first one comes from the last prefix position, so the
    last token is never fed in).
    """
    if self.is_initializing():
      # init() only creates what is called; make sure encode_prefix exists too.
      self.encode_prefix(jnp.zeros((1, 1, self.prefix_inner_dim), self.dtype))
    prefix_ble = self.decode_prefix(prefix_latent_blc)
    tok_bte = self.gpt.embed(token_ids_bt[:, :-1])
    x = jnp.concatenate([prefix_ble.astype(tok_bte.dtype), tok_bte], axis=1)
    logits = self.gpt(inputs_embeds=x)
    return logits[:, prefix_ble.shape[1] - 1:]

  def reconstruct(self, clip_hidden_bld, token_ids_bt):
    """Stage-1 training path: CLIP text features -> 64-d latent -> captions' logits."""
    return self(self.encode_prefix(clip_hidden_bld), token_ids_bt)

  # Host-side conveniences (call on the unbound module with its params); the
  # module-level functions below do the work.
  @nn.nowrap
  def beam_search(self, params, prefix_latent_blc, **kw):
    return beam_search(self, params, prefix_latent_blc, **kw)

  @nn.nowrap
  def greedy(self, params, prefix_latent_blc, **kw):
    return greedy(self, params, prefix_latent_blc, **kw)

  @nn.nowrap
  def nucleus(self, params, prefix_latent_blc, key, **kw):
    return nucleus(self, params, prefix_latent_blc, key, **kw)

  # Incremental decoding pieces used by the generation functions below.
  def prefill(self, prefix_latent_blc, cache):
    """Runs the prefix; returns (last-position logits [B, V], cache)."""
    logits, cache = self.gpt(inputs_embeds=self.decode_prefix(prefix_latent_blc), cache=cache)
    return logits[:, -1], cache

  def step(self, token_ids_n, cache):
    """Feeds one token per sequence; returns (logits [N, V], cache)."""
    logits, cache = self.gpt(input_ids=token_ids_n[:, None], cache=cache)
    return logits[:, 0], cache


def gpt_kwargs(model: CaptionDecoder) -> dict:
  """The GPT2 fields of a caption decoder."""
  return dict(vocab_size=model.vocab_size, n_positions=model.n_positions, n_embd=model.n_embd,
              n_layer=model.n_layer, n_head=model.n_head, n_inner=model.n_inner,
              activation=model.activation, dtype=model.dtype, param_dtype=model.param_dtype)


def caption_loss(logits_btv, token_ids_bt, mask_bt):
  """Mean next-token cross entropy over real caption tokens (mask 1, EOS included)."""
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32),
                                                          token_ids_bt)
  mask_bt = mask_bt.astype(jnp.float32)
  return jnp.sum(ce_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def _log_probs(logits, temperature):
  # The reference computes log(softmax(.)) rather than log_softmax; keep that form.
  t = temperature if temperature > 0 else 1.0
  return jnp.log(jax.nn.softmax(logits.astype(jnp.float32) / t, axis=-1))


def _start(model, params, prefix_latent_blc, max_new_tokens):
  b, l, _ = prefix_latent_blc.shape
  gpt = GPT2(**gpt_kwargs(model), parent=None)
  # The last generated token is never fed back, hence the -1.
  if l + max_new_tokens - 1 > gpt.n_positions:
    raise ValueError(f"a caption of up to {max_new_tokens} tokens after the {l}-token prefix "
                     f"needs {l + max_new_tokens - 1} positions, the caption decoder has "
                     f"n_positions={gpt.n_positions}: lower config.sample.max_caption_tokens")
  cache = init_kv_cache(gpt, b, l + max_new_tokens - 1)
  return model.apply(params, prefix_latent_blc, cache, method=CaptionDecoder.prefill)


def beam_search(model: CaptionDecoder, params, prefix_latent_blc, *, num_beams: int = 5,
                max_new_tokens: int = 67, eos_id: int | None = None, temperature: float = 1.0,
                all_beams: bool = False):
  """Beam search with the semantics of the reference (diffusers' generate_beam).

  Returns (tokens [B, max_new_tokens] int32, lengths [B] int32) of the best beam;
  with all_beams, (tokens [B, K, N], lengths [B, K], scores [B, K]) of every beam,
  best first (scores are the final length-normalised ones). Jitted inside (one
  compilation serves both forms); also callable under an outer jit.
  """
  out = beam_search_all(model, params, prefix_latent_blc, num_beams=num_beams,
                        max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature)
  if all_beams:
    return out
  tokens_bkn, lengths_bk, _ = out
  return tokens_bkn[:, 0], lengths_bk[:, 0]


@functools.partial(jax.jit, static_argnames=('model', 'num_beams', 'max_new_tokens', 'eos_id',
                                             'temperature'))
def beam_search_all(model: CaptionDecoder, params, prefix_latent_blc, *, num_beams: int = 5,
                    max_new_tokens: int = 67, eos_id: int | None = None,
                    temperature: float = 1.0):
  """All beams, best first: (tokens [B, K, N], lengths [B, K], normalised scores [B, K]).

  Reference behaviour reproduced on purpose (quirks included):
  - Step 0 takes the top-k tokens of the prefix's last position; scores are raw
    log-probs and every length starts at 1.
  - Afterwards a finished beam may only continue with token 0 at no cost (its
    candidate row is -inf except 0 there), so finished beams keep competing with
    their old score and get 0s appended.
  - Lengths of unfinished beams grow by one BEFORE ranking, and candidates are
    ranked by score_sum / length (length-normalised) over all beams x vocab.
  - The kept score is recomputed as normalised_score * length (a float
    round-trip, not the raw sum).
  - A beam stops after emitting eos; the loop stops when all beams have stopped
    (per prompt here: a finished prompt's state is frozen, as the reference breaks;
    running on would only append more 0s and could reorder beams by float noise).
  - The answer is the beam with the best score / length at the end; its length
    counts the EOS.
  """
  if max_new_tokens < 1 or num_beams < 1:
    raise ValueError(f'need max_new_tokens >= 1 and num_beams >= 1, got {max_new_tokens}, '
                     f'{num_beams}')
  k = num_beams
  eos = model.eos_id if eos_id is None else eos_id
  b = prefix_latent_blc.shape[0]
  logits_bv, cache = _start(model, params, prefix_latent_blc, max_new_tokens)
  v = logits_bv.shape[-1]
  logp_bv = _log_probs(logits_bv, temperature)
  scores_bk, tok_bk = jax.lax.top_k(logp_bv, k)
  tok_bk = tok_bk.astype(jnp.int32)
  # Every beam of a prompt shares the prefix cache.
  cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1) if c.ndim else c, cache)
  buf_bkn = jnp.zeros((b, k, max_new_tokens), jnp.int32).at[:, :, 0].set(tok_bk)
  lengths_bk = jnp.ones((b, k), jnp.int32)
  stopped_bk = tok_bk == eos
  done_b = jnp.all(stopped_bk, axis=1)
  only_zero_v = jnp.where(jnp.arange(v) == 0, 0.0, -jnp.inf)

  def cond(state):
    i, *_, done_b = state
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    i, cache, buf_bkn, scores_bk, lengths_bk, stopped_bk, tok_bk, done_b = state
    logits_nv, cache = model.apply(params, tok_bk.reshape(b * k), cache, method=CaptionDecoder.step)
    logp_bkv = _log_probs(logits_nv, temperature).reshape(b, k, v)
    logp_bkv = jnp.where(stopped_bk[..., None], only_zero_v, logp_bkv)
    sums_bkv = scores_bk[..., None] + logp_bkv
    grown_bk = lengths_bk + (~stopped_bk).astype(jnp.int32)
    avg_bkv = sums_bkv / grown_bk[..., None].astype(jnp.float32)
    new_avg_bk, flat_bk = jax.lax.top_k(avg_bkv.reshape(b, k * v), k)
    src_bk = flat_bk // v
    new_tok_bk = (flat_bk % v).astype(jnp.int32)
    new_lengths_bk = jnp.take_along_axis(grown_bk, src_bk, axis=1)
    new_buf = jnp.take_along_axis(buf_bkn, src_bk[..., None], axis=1)
    new_buf = jax.lax.dynamic_update_slice(new_buf, new_tok_bk[..., None], (0, 0, i))
    new_scores_bk = new_avg_bk * new_lengths_bk.astype(jnp.float32)
    new_stopped_bk = jnp.take_along_axis(stopped_bk, src_bk, axis=1) | (new_tok_bk == eos)
    flat_src = (jnp.arange(b)[:, None] * k + src_bk).reshape(b * k)
    cache = {'k': jnp.take(cache['k'], flat_src, axis=1),
             'v': jnp.take(cache['v'], flat_src, axis=1), 'index': cache['index']}
    keep = lambda new, old: jnp.where(done_b.reshape((b,) + (1,) * (old.ndim - 1)), old, new)
    state = (i + 1, cache, keep(new_buf, buf_bkn), keep(new_scores_bk, scores_bk),
             keep(new_lengths_bk, lengths_bk), keep(new_stopped_bk, stopped_bk),
             keep(new_tok_bk, tok_bk), done_b)
    done_b = done_b | jnp.all(state[5], axis=1)
    return state[:-1] + (done_b,)

  state = (jnp.int32(1), cache, buf_bkn, scores_bk, lengths_bk, stopped_bk, tok_bk, done_b)
  _, _, buf_bkn, scores_bk, lengths_bk, *_ = jax.lax.while_loop(cond, body, state)
  final_bk = scores_bk / lengths_bk.astype(jnp.float32)
  # Stable sort: on exact ties the lower beam index wins (torch's order is unspecified).
  order_bk = jnp.argsort(-final_bk, axis=1, stable=True)
  return (jnp.take_along_axis(buf_bkn, order_bk[..., None], axis=1),
          jnp.take_along_axis(lengths_bk, order_bk, axis=1),
          jnp.take_along_axis(final_bk, order_bk, axis=1))


def _sample_loop(model, params, prefix_latent_blc, max_new_tokens, eos, pick):
  """Shared one-sequence-per-prompt decoding loop; pick(logits [B, V], i) -> ids [B]."""
  b = prefix_latent_blc.shape[0]
  logits_bv, cache = _start(model, params, prefix_latent_blc, max_new_tokens)
  tok_b = pick(logits_bv, 0)
  buf_bn = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok_b)
  lengths_b = jnp.ones((b,), jnp.int32)
  done_b = tok_b == eos

  def cond(state):
    i, *_, done_b = state
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    i, cache, buf_bn, lengths_b, tok_b, done_b = state
    logits_bv, cache = model.apply(params, tok_b, cache, method=CaptionDecoder.step)
    new_tok_b = jnp.where(done_b, 0, pick(logits_bv, i))  # 0s after the end
    buf_bn = jax.lax.dynamic_update_slice(buf_bn, new_tok_b[:, None], (0, i))
    lengths_b = lengths_b + (~done_b).astype(jnp.int32)
    return i + 1, cache, buf_bn, lengths_b, new_tok_b, done_b | (new_tok_b == eos)

  state = (jnp.int32(1), cache, buf_bn, lengths_b, tok_b, done_b)
  _, _, buf_bn, lengths_b, _, _ = jax.lax.while_loop(cond, body, state)
  return buf_bn, lengths_b


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'eos_id'))
def greedy(model: CaptionDecoder, params, prefix_latent_blc, *, max_new_tokens: int = 67,
           eos_id: int | None = None):
  """Arg-max decoding; (tokens [B, max_new_tokens], lengths [B]) as in beam_search."""
  eos = model.eos_id if eos_id is None else eos_id
  pick = lambda logits, i: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return _sample_loop(model, params, prefix_latent_blc, max_new_tokens, eos, pick)


def top_p_filter(logits_bv, top_p: float):
  """Sets logits outside the smallest set whose probability exceeds top_p to -inf.

  As in HF's TopPLogitsWarper: a token is dropped when the cumulative probability
  of the tokens ranked above it already exceeds top_p; the top token always stays.
  """
  order_bv = jnp.argsort(-logits_bv, axis=-1)
  sorted_bv = jnp.take_along_axis(logits_bv, order_bv, axis=-1)
  cum_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
  drop_sorted = jnp.concatenate(
      [jnp.zeros_like(cum_bv[:, :1], bool), cum_bv[:, :-1] > top_p], axis=-1)
  drop_bv = jnp.zeros_like(drop_sorted).at[
      jnp.arange(logits_bv.shape[0])[:, None], order_bv].set(drop_sorted)
  return jnp.where(drop_bv, -jnp.inf, logits_bv)


def nucleus(model: CaptionDecoder, params, prefix_latent_blc, key, *, top_p: float = 0.9,
            temperature: float = 1.0, max_new_tokens: int = 67, eos_id: int | None = None):
  """Top-p sampling; step i draws with jax.random.fold_in(key, i). Same outputs as greedy.

  top_p and temperature are traced (changing them does not recompile).
  """
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}')
  return _nucleus(model, params, prefix_latent_blc, key, jnp.float32(top_p),
                  jnp.float32(temperature), max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'eos_id'))
def _nucleus(model, params, prefix_latent_blc, key, top_p, temperature, *, max_new_tokens,
             eos_id):
  eos = model.eos_id if eos_id is None else eos_id

  def pick(logits_bv, i):
    filtered = top_p_filter(logits_bv.astype(jnp.float32) / temperature, top_p)
    return jax.random.categorical(jax.random.fold_in(key, i), filtered, axis=-1).astype(jnp.int32)

  return _sample_loop(model, params, prefix_latent_blc, max_new_tokens, eos, pick)


def decode_text(tokenizer, tokens, lengths, eos_id: int = EOS_ID) -> list[str]:
  """Host helper: cuts each row at its length and at the first EOS, then detokenises."""
  tokens = np.asarray(tokens)
  lengths = np.asarray(lengths)
  texts = []
  for row, n in zip(tokens, lengths):
    ids = [int(t) for t in row[:int(n)]]
    if eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    texts.append(tokenizer.decode(ids, skip_special_tokens=True))
  return texts
