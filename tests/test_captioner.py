"""Caption decoder behaviour: it learns captions, generation is deterministic per key
and shaped as documented, and weight problems are named."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unidiffuser_jax.models.captioner import (CaptionDecoder, beam_search, caption_loss,
                                              decode_text, greedy, nucleus, top_p_filter)
from unidiffuser_jax.weights import captioner as wcap
from unidiffuser_jax.weights.convert import WeightMismatchError

V, EOS, L, INNER, HIDDEN, MAX_NEW = 40, 39, 4, 16, 8, 8
CAPTIONS = [[5, 6, 7], [12, 3, 3, 9], [20, 21], [1, 2, 3, 4, 5, 6], [30, 12, 5, 8, 17]]


def _model(**kw):
  return CaptionDecoder(prefix_inner_dim=INNER, prefix_hidden_dim=HIDDEN, vocab_size=V,
                        n_positions=32, n_embd=32, n_layer=2, n_head=4, eos_id=EOS, **kw)


def _batch():
  t = max(len(c) for c in CAPTIONS) + 1
  tokens = np.zeros((len(CAPTIONS), t), np.int32)
  mask = np.zeros((len(CAPTIONS), t), np.float32)
  for i, c in enumerate(CAPTIONS):
    tokens[i, :len(c) + 1] = c + [EOS]  # padding (0) after EOS is masked out
    mask[i, :len(c) + 1] = 1
  feats = np.random.default_rng(0).normal(size=(len(CAPTIONS), L, INNER)).astype(np.float32)
  return feats, tokens, mask


@pytest.fixture(scope='module')
def trained():
  """Stage-1 style training: CLIP-like features -> encode/decode prefix -> GPT-2."""
  model = _model()
  feats, tokens, mask = _batch()
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, L, HIDDEN)),
                                            jnp.asarray(tokens[:1])))
  opt = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      def loss_fn(p):
        logits = model.apply(p, feats, tokens, method=CaptionDecoder.reconstruct)
        return caption_loss(logits, tokens, mask)
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=300)
    return params, losses

  params, losses = train(params)
  return model, params, np.asarray(losses)


@pytest.mark.slow
def test_overfits_and_beam_search_reproduces_captions(trained):
  model, params, losses = trained
  assert losses[-1] < 0.02 < losses[0], (losses[0], losses[-1])
  feats, _, _ = _batch()
  latent = jax.jit(model.apply, static_argnames='method')(params, feats,
                                                           method=CaptionDecoder.encode_prefix)
  tokens, lengths = beam_search(model, params, latent, max_new_tokens=MAX_NEW)
  assert tokens.shape == (len(CAPTIONS), MAX_NEW) and tokens.dtype == jnp.int32
  for row, n, caption in zip(np.asarray(tokens), np.asarray(lengths), CAPTIONS):
    assert n == len(caption) + 1
    np.testing.assert_array_equal(row[:n], caption + [EOS])
    assert not row[n:].any()  # zeros after the end, as the reference pads
  g_tokens, g_lengths = greedy(model, params, latent, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(g_tokens, tokens)
  np.testing.assert_array_equal(g_lengths, lengths)

  class Tok:  # stands in for a GPT-2 tokenizer
    def decode(self, ids, skip_special_tokens=True):
      return ' '.join(str(i) for i in ids)

  texts = decode_text(Tok(), tokens, lengths, eos_id=EOS)
  assert texts == [' '.join(map(str, c)) for c in CAPTIONS]


@pytest.mark.slow
def test_sampling_shapes_and_determinism(trained):
  model, params, _ = trained
  # Same shapes as in the test above, so greedy is not compiled again.
  latent = jax.random.normal(jax.random.key(1), (len(CAPTIONS), L, HIDDEN))
  kw = dict(max_new_tokens=MAX_NEW, top_p=0.95, temperature=3.0)
  a = nucleus(model, params, latent, jax.random.key(7), **kw)
  b = nucleus(model, params, latent, jax.random.key(7), **kw)
  c = nucleus(model, params, latent, jax.random.key(8), **kw)
  assert a[0].shape == (len(CAPTIONS), MAX_NEW) and a[1].shape == (len(CAPTIONS),)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])  # a hot temperature: other keys, other samples
  for row, n in zip(np.asarray(a[0]), np.asarray(a[1])):
    assert 1 <= n <= MAX_NEW and not row[n:].any()
    assert (row[:n - 1] != EOS).all()
  g1 = greedy(model, params, latent, max_new_tokens=MAX_NEW)
  g2 = model.greedy(params, latent, max_new_tokens=MAX_NEW)  # method form, same function
  np.testing.assert_array_equal(g1[0], g2[0])
  assert g1[0].shape == (len(CAPTIONS), MAX_NEW)
  # A tiny nucleus keeps only the top token: nucleus sampling becomes greedy.
  t = nucleus(model, params, latent, jax.random.key(3), max_new_tokens=MAX_NEW, top_p=1e-6)
  np.testing.assert_array_equal(t[0], g1[0])


def test_top_p_filter_and_loss():
  logits = jnp.log(jnp.array([[0.5, 0.1, 0.3, 0.1]]))
  filt = jax.jit(top_p_filter)
  kept = np.isfinite(np.asarray(filt(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[True, False, True, False]])  # 0.5 + 0.3 >= 0.7
  kept = np.isfinite(np.asarray(filt(logits, 0.4)))
  np.testing.assert_array_equal(kept, [[True, False, False, False]])
  rng = np.random.default_rng(0)
  lg = rng.normal(size=(2, 3, 5)).astype(np.float32)
  ids = np.array([[1, 2, 0], [4, 4, 4]])
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  want = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 4]) / 3
  got = jax.jit(caption_loss)(jnp.asarray(lg), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bf16_forward_close(trained):
  model, params, _ = trained
  feats, tokens, _ = _batch()
  run = lambda m: jax.jit(m.apply, static_argnames='method')(
      params, feats, tokens, method=CaptionDecoder.reconstruct)
  f32, bf = run(model), run(_model(dtype=jnp.bfloat16))
  assert bf.dtype == jnp.float32
  assert np.abs(np.asarray(bf) - np.asarray(f32)).max() < 0.05 * np.abs(np.asarray(f32)).max()


def test_weight_problems_are_named(trained):
  model, params, _ = trained
  tensors = wcap.export_caption_decoder(params)
  bad = dict(tensors)
  bad['module.gpt.transformer.h.1.mlp.c_fc.weight'] = np.zeros((32, 7), np.float32)
  del bad['module.decode_prefix.bias']
  bad['module.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(WeightMismatchError) as err:
    wcap.import_caption_decoder(bad, params)
  msg = str(err.value)
  assert "'module.gpt.transformer.h.1.mlp.c_fc.weight' has shape (32, 7)" in msg
  assert "missing tensor 'module.decode_prefix.bias'" in msg
  assert "unexpected tensor 'module.extra.weight'" in msg
  untied = dict(tensors)
  untied['module.gpt.lm_head.weight'] = tensors['module.gpt.lm_head.weight'] + 1
  with pytest.raises(WeightMismatchError, match='lm_head'):
    wcap.import_caption_decoder(untied, params)
  # Old transformers' causal-mask buffers are tolerated.
  with_buffers = dict(tensors)
  with_buffers['module.gpt.transformer.h.0.attn.bias'] = np.ones((1, 1, 32, 32), np.float32)
  wcap.import_caption_decoder(with_buffers, params)
  with pytest.raises(WeightMismatchError, match='not a caption decoder'):
    wcap.import_caption_decoder({'foo': np.zeros(1)}, params)



def test_a_caption_longer_than_the_positions_names_the_setting(trained):
  model, params, _ = trained
  feats, _, _ = _batch()
  prefix = model.apply(params, jnp.asarray(feats), method=CaptionDecoder.encode_prefix)
  greedy(model, params, prefix, max_new_tokens=29)   # 4 prefix + 29 - 1 = 32 positions: fits
  with pytest.raises(ValueError, match='needs 33 positions.*n_positions=32.*max_caption_tokens'):
    greedy(model, params, prefix, max_new_tokens=30)
