"""Caption decoder parity against the PyTorch references (transformers' GPT-2,
diffusers' UniDiffuserTextDecoder), with weights passed through our importers
from safetensors files."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('diffusers')
from diffusers.pipelines.deprecated.unidiffuser import modeling_text_decoder  # noqa: E402

from tests.refs import captioner as cap_ref  # noqa: E402
from unidiffuser_jax.models.captioner import CaptionDecoder, beam_search  # noqa: E402
from unidiffuser_jax.models.gpt2 import GPT2, init_kv_cache  # noqa: E402
from unidiffuser_jax.weights import captioner as wcap  # noqa: E402
from unidiffuser_jax.weights.tensors import load_tensors  # noqa: E402

torch.set_num_threads(1)

V, EOS, L, E, LAYERS, HEADS = 64, 63, 4, 32, 2, 4
INNER, HIDDEN = 16, 8


def _save_load(tensors, tmp_path, name):
  path = str(tmp_path / name)
  save_file(tensors, path)
  return load_tensors(path)


def _hf_gpt2(activation, vocab=100, n_positions=32):
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=E, n_layer=LAYERS,
                                n_head=HEADS, activation_function=activation,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=0, eos_token_id=0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # larger weights than HF's init so that every part matters
    for name, p in model.named_parameters():
      p.normal_(0, 0.3 if p.ndim == 2 else 0.1)
      if name.endswith('ln_1.weight') or name.endswith('ln_2.weight') or 'ln_f.weight' in name:
        p.add_(1.0)
  return model


@pytest.mark.parametrize('activation', ['gelu_new', 'gelu'])
def test_gpt2_logits_match_transformers(tmp_path, activation):
  ref = _hf_gpt2(activation)
  tensors = _save_load(cap_ref.to_numpy(ref.state_dict()), tmp_path, 'gpt2.safetensors')
  model = GPT2(vocab_size=100, n_positions=32, n_embd=E, n_layer=LAYERS, n_head=HEADS,
               activation=activation)
  ids = np.random.default_rng(0).integers(0, 100, size=(2, 11))
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids))
  params = wcap.import_gpt2(tensors, template)
  with torch.no_grad():
    want = ref(torch.as_tensor(ids)).logits.numpy()
    emb = torch.randn(2, 7, E, generator=torch.Generator().manual_seed(1))
    want_emb = ref(inputs_embeds=emb).logits.numpy()
  apply = jax.jit(model.apply)
  got = np.asarray(apply(params, jnp.asarray(ids)))
  assert np.abs(want).max() > 1.0  # not a degenerate comparison
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  if activation != 'gelu_new':
    return  # the rest does not depend on the activation; compilations are slow here
  got_emb = np.asarray(apply(params, inputs_embeds=jnp.asarray(emb.numpy())))
  np.testing.assert_allclose(got_emb, want_emb, atol=1e-4, rtol=0)

  # Incremental decoding with the KV cache: 5 tokens at once, then one at a time.
  cache = init_kv_cache(model, 2, 16)
  chunks = [ids[:, :5]] + [ids[:, i:i + 1] for i in range(5, 11)]
  steps = []
  for chunk in chunks:
    logits, cache = apply(params, jnp.asarray(chunk), cache=cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), got, atol=1e-5, rtol=0)
  assert int(cache['index']) == 11

  # bfloat16 compute stays close (float32 softmax and head accumulation).
  bf = GPT2(vocab_size=100, n_positions=32, n_embd=E, n_layer=LAYERS, n_head=HEADS,
            activation=activation, dtype=jnp.bfloat16)
  got_bf = np.asarray(jax.jit(bf.apply)(params, jnp.asarray(ids)))
  assert got_bf.dtype == np.float32
  assert np.abs(got_bf - want).max() < 0.1 * np.abs(want).max()


def _reference_decoder(seed=0, eos_boost=1.0):
  """A random UniDiffuserTextDecoder whose beams stop at varied lengths."""
  torch.manual_seed(seed)
  ref = modeling_text_decoder.UniDiffuserTextDecoder(
      prefix_length=L, prefix_inner_dim=INNER, prefix_hidden_dim=HIDDEN, vocab_size=V,
      n_positions=64, n_embd=E, n_layer=LAYERS, n_head=HEADS).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim == 2 and 'wte' not in name and 'wpe' not in name:
        p.normal_(0, 1.0 / np.sqrt(p.shape[0]))
      elif p.ndim == 1 and name.endswith('bias'):
        p.normal_(0, 0.05)
    w = ref.transformer.transformer.wte.weight
    w.normal_(0, 0.1)
    ref.transformer.transformer.wpe.weight.normal_(0, 0.5)
    # Raise the EOS logit by about eos_boost everywhere so that beams end early.
    ref.transformer.transformer.ln_f.bias.copy_(eos_boost * w[EOS] / (w[EOS] @ w[EOS]))
  return ref


def _captioner():
  return CaptionDecoder(prefix_inner_dim=INNER, prefix_hidden_dim=HIDDEN, vocab_size=V,
                        n_positions=64, n_embd=E, n_layer=LAYERS, n_head=HEADS, eos_id=EOS)


def _import_reference(ref, tmp_path):
  released = cap_ref.released_layout(cap_ref.to_numpy(ref.state_dict()))
  tensors = _save_load(released, tmp_path, 'caption_decoder.safetensors')
  model = _captioner()
  template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, L, HIDDEN)),
                            jnp.zeros((1, 3), jnp.int32))
  return model, wcap.import_caption_decoder(tensors, template), tensors


def test_prefix_layers_and_teacher_forcing_match_diffusers(tmp_path):
  ref = _reference_decoder()
  model, params, _ = _import_reference(ref, tmp_path)
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, L, INNER)).astype(np.float32)
  ids = rng.integers(0, V, size=(2, 6))
  with torch.no_grad():
    out, hidden = ref(torch.as_tensor(ids), torch.as_tensor(h))
    want_dec = ref.decode_prefix(hidden).numpy()
  apply = jax.jit(model.apply, static_argnames='method')
  np.testing.assert_allclose(
      apply(params, jnp.asarray(h), method=CaptionDecoder.encode_prefix), hidden.numpy(),
      atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      apply(params, hidden.numpy(), method=CaptionDecoder.decode_prefix), want_dec,
      atol=1e-5, rtol=0)
  got = apply(params, jnp.asarray(h), jnp.asarray(ids), method=CaptionDecoder.reconstruct)
  # Our logits[:, t] predict token t: the reference's outputs at positions L-1 .. L+T-2.
  np.testing.assert_allclose(got, out.logits.numpy()[:, L - 1:L + ids.shape[1] - 1],
                             atol=1e-4, rtol=0)


@pytest.mark.parametrize('eos_boost', [0.0, 1.0])
def test_beam_search_matches_diffusers_generate_beam(tmp_path, eos_boost):
  max_new = 12
  ref = _reference_decoder(eos_boost=eos_boost)
  model, params, _ = _import_reference(ref, tmp_path)
  gen = torch.Generator().manual_seed(0)
  latents = torch.randn(8, L, HIDDEN, generator=gen)
  want_tokens, want_lengths, want_beams = [], [], []
  with torch.no_grad():
    for lat in latents:
      toks, lens = ref.generate_beam(input_embeds=ref.decode_prefix(lat[None]), eos_token_id=EOS,
                                     entry_length=max_new)
      toks = np.pad(toks.numpy(), ((0, 0), (0, max_new - toks.shape[1])))
      want_beams.append((toks, lens.numpy()))
      want_tokens.append(toks[0])
      want_lengths.append(int(lens[0]))
  want_tokens = np.stack(want_tokens)
  # The case must be able to fail: different prompts give different captions; without
  # the EOS boost captions run to the limit, with it they stop early at varied lengths
  # and finished beams compete with unfinished ones.
  assert len({tuple(t[:n]) for t, n in zip(want_tokens, want_lengths)}) >= 4
  if eos_boost:
    assert len(set(want_lengths)) >= 2 and max(want_lengths) < max_new
    assert sum(len(set(lens.tolist())) > 1 for _, lens in want_beams) >= 4
  else:
    assert max(want_lengths) == max_new

  tokens, lengths = beam_search(model, params, jnp.asarray(latents.numpy()),
                                max_new_tokens=max_new)
  np.testing.assert_array_equal(np.asarray(lengths), want_lengths)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)

  # Every beam, in the reference's order.
  all_tokens, all_lengths, _ = beam_search(model, params, jnp.asarray(latents.numpy()),
                                           max_new_tokens=max_new, all_beams=True)
  for b, (toks, lens) in enumerate(want_beams):
    np.testing.assert_array_equal(np.asarray(all_lengths[b]), lens)
    np.testing.assert_array_equal(np.asarray(all_tokens[b]), toks)


def test_import_export_roundtrip(tmp_path):
  ref = _reference_decoder()
  model, params, tensors = _import_reference(ref, tmp_path)
  exported = wcap.export_caption_decoder(params)
  assert set(exported) == set(tensors)
  for name, value in tensors.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  again = _save_load(exported, tmp_path, 'exported.safetensors')
  params2 = wcap.import_caption_decoder(again, params)
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  # The diffusers layout imports too, to the same parameters.
  params3 = wcap.import_caption_decoder(cap_ref.to_numpy(ref.state_dict()), params)
  assert wcap.detect_layout(cap_ref.to_numpy(ref.state_dict())) == 'diffusers'
  jax.tree.map(np.testing.assert_array_equal, params, params3)


@pytest.mark.parametrize('with_prefix', [True, False])
def test_fresh_captioner_from_hub_gpt2(with_prefix):
  hub = _hf_gpt2('gelu_new', vocab=V - 1, n_positions=64)
  sd = cap_ref.to_numpy(hub.state_dict() if with_prefix else hub.transformer.state_dict())
  model = _captioner()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, L, HIDDEN)),
                          jnp.zeros((1, 3), jnp.int32))
  rng = np.random.default_rng(0)
  init = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), nn.meta.unbox(shapes))
  params = wcap.init_from_hub_gpt2(sd, init)
  prefix = 'transformer.' if with_prefix else ''
  wte = np.asarray(params['params']['gpt']['wte']['embedding'])
  np.testing.assert_array_equal(wte[:V - 1], sd[prefix + 'wte.weight'])
  np.testing.assert_allclose(wte[EOS], sd[prefix + 'wte.weight'].mean(0), atol=1e-7)
  np.testing.assert_array_equal(params['params']['gpt']['h_1']['mlp']['c_fc']['kernel'],
                                sd[prefix + 'h.1.mlp.c_fc.weight'])
  jax.tree.map(np.testing.assert_array_equal, params['params']['prefix_decoder'],
               init['params']['prefix_decoder'])
  if not with_prefix:
    return
  # GPT-2 logits over the old vocabulary are unchanged.
  ids = np.array([[1, 5, 7, 2]])
  with torch.no_grad():
    want = hub(torch.as_tensor(ids)).logits.numpy()
  gpt = GPT2(vocab_size=V, n_positions=64, n_embd=E, n_layer=LAYERS, n_head=HEADS)
  got = jax.jit(gpt.apply)({'params': params['params']['gpt']}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got)[..., :V - 1], want, atol=1e-4, rtol=0)

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
