"""Key tables for the caption decoder (GPT-2 + prefix layers).

Layouts understood (their names -> our CaptionDecoder params):
- 'released': thu-ml's caption_decoder.pth: module.encode_prefix.{weight,bias},
  module.decode_prefix.*, module.gpt.transformer.{wte,wpe,h.N.*,ln_f}.*,
  module.gpt.lm_head.weight (tied to wte).
- 'stripped': the same without "module." (what thu-ml loads after removing it).
- 'diffusers': UniDiffuserTextDecoder's state dict: encode_prefix.*, decode_prefix.*,
  transformer.transformer.*, transformer.lm_head.weight.
- Hub "gpt2" (GPT2LMHeadModel / GPT2Model files: "transformer.h.0..." or "h.0..."),
  for a fresh captioner: see `init_from_hub_gpt2`.

Every table is a list of convert.Entry, so any missing, unexpected or mis-shaped
tensor is named. Param trees here are unboxed ({'params': ...}, nn.meta.unbox).
The tied lm_head is not a separate parameter: on import it must equal wte (an
untied head cannot be represented and is refused); on export it is written as a
copy of wte. Old transformers versions also saved the causal-mask buffers
h.N.attn.bias / h.N.attn.masked_bias; they are ignored.
"""
from collections.abc import Mapping
import re

import flax.linen as nn
import numpy as np

from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.convert import Entry, WeightMismatchError

LAYOUTS = {  # layout -> (prefix of everything, prefix of the GPT2LMHeadModel)
    'released': ('module.', 'gpt.'),
    'stripped': ('', 'gpt.'),
    'diffusers': ('', 'transformer.'),
}

_BUFFER = re.compile(r'(^|\.)h\.\d+\.attn\.(bias|masked_bias)$')


def _is_buffer(name: str) -> bool:
  return bool(_BUFFER.search(name))


def _linear(path, name) -> list[Entry]:
  return [Entry(path + ('kernel',), name + '.weight', convert.linear_kernel, convert.linear_kernel),
          Entry(path + ('bias',), name + '.bias')]


def _conv1d(path, name) -> list[Entry]:
  # HF Conv1D weights are [in, out] already.
  return [Entry(path + ('kernel',), name + '.weight'), Entry(path + ('bias',), name + '.bias')]


def _ln(path, name) -> list[Entry]:
  return [Entry(path + ('scale',), name + '.weight'), Entry(path + ('bias',), name + '.bias')]


def gpt2_entries(n_layer: int, prefix: str = 'transformer.',
                 root: tuple[str, ...] = ()) -> list[Entry]:
  """GPT2Model tensors named `prefix`wte.weight ... -> our GPT2 params under `root`."""
  e = [Entry(root + ('wte', 'embedding'), prefix + 'wte.weight'),
       Entry(root + ('wpe', 'embedding'), prefix + 'wpe.weight')]
  for i in range(n_layer):
    p, n = root + (f'h_{i}',), f'{prefix}h.{i}'
    e += _ln(p + ('ln_1',), n + '.ln_1')
    e += _conv1d(p + ('attn', 'c_attn'), n + '.attn.c_attn')
    e += _conv1d(p + ('attn', 'c_proj'), n + '.attn.c_proj')
    e += _ln(p + ('ln_2',), n + '.ln_2')
    e += _conv1d(p + ('mlp', 'c_fc'), n + '.mlp.c_fc')
    e += _conv1d(p + ('mlp', 'c_proj'), n + '.mlp.c_proj')
  e += _ln(root + ('ln_f',), prefix + 'ln_f')
  return e


def caption_decoder_entries(n_layer: int, layout: str = 'released') -> list[Entry]:
  if layout not in LAYOUTS:
    raise ValueError(f'unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}')
  top, gpt = LAYOUTS[layout]
  root = ('params',)
  return (_linear(root + ('prefix_encoder',), top + 'encode_prefix')
          + _linear(root + ('prefix_decoder',), top + 'decode_prefix')
          + gpt2_entries(n_layer, top + gpt + 'transformer.', root + ('gpt',)))


def lm_head_name(layout: str) -> str:
  top, gpt = LAYOUTS[layout]
  return top + gpt + 'lm_head.weight'


def detect_layout(tensors: Mapping[str, np.ndarray]) -> str:
  for layout in ('released', 'stripped', 'diffusers'):
    top, gpt = LAYOUTS[layout]
    if top + gpt + 'transformer.wte.weight' in tensors:
      return layout
  raise WeightMismatchError(
      'not a caption decoder file: no module.gpt.transformer.wte.weight, '
      'gpt.transformer.wte.weight or transformer.transformer.wte.weight; '
      f'first names: {sorted(tensors)[:5]}')


def _n_layer(template: Mapping, root: tuple[str, ...]) -> int:
  node = template
  for k in root:
    node = node[k]
  return sum(1 for k in node if re.fullmatch(r'h_\d+', k))


def _drop_tied_head(tensors: Mapping[str, np.ndarray], head: str, wte: str) -> dict:
  tensors = dict(tensors)
  if head in tensors:
    w = np.asarray(tensors.pop(head))
    if wte in tensors and not (w.shape == np.shape(tensors[wte])
                               and np.array_equal(w, tensors[wte])):
      raise WeightMismatchError(
          f'tensor {head!r} differs from {wte!r}: our GPT-2 ties the LM head to the token '
          'embedding and cannot hold a separate head')
  return tensors


def import_caption_decoder(tensors: Mapping[str, np.ndarray], template: Mapping,
                           layout: str | None = None) -> dict:
  """Released / diffusers caption decoder tensors -> CaptionDecoder params.

  `template`: the (boxed or unboxed) variables of CaptionDecoder.init or its
  jax.eval_shape; it fixes the expected shapes and dtypes.
  """
  template = nn.meta.unbox(template)
  layout = layout or detect_layout(tensors)
  top, gpt = LAYOUTS[layout]
  tensors = _drop_tied_head(tensors, lm_head_name(layout), top + gpt + 'transformer.wte.weight')
  entries = caption_decoder_entries(_n_layer(template, ('params', 'gpt')), layout)
  return convert.assign(template, tensors, entries, ignore_unexpected=_is_buffer)


def export_caption_decoder(params: Mapping, layout: str = 'released') -> dict[str, np.ndarray]:
  """CaptionDecoder params -> {name: float32 array} in `layout` (safetensors-ready)."""
  params = nn.meta.unbox(params)
  entries = caption_decoder_entries(_n_layer(params, ('params', 'gpt')), layout)
  out = convert.export(params, entries)
  top, gpt = LAYOUTS[layout]
  out[lm_head_name(layout)] = out[top + gpt + 'transformer.wte.weight'].copy()
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _hub_prefix(tensors: Mapping[str, np.ndarray]) -> str:
  if 'transformer.wte.weight' in tensors:
    return 'transformer.'
  if 'wte.weight' in tensors:
    return ''
  raise WeightMismatchError(
      f'not a GPT-2 file: neither transformer.wte.weight nor wte.weight; first names: '
      f'{sorted(tensors)[:5]}')


def import_gpt2(tensors: Mapping[str, np.ndarray], template: Mapping) -> dict:
  """Hub GPT-2 tensors ("transformer.h.0..." or "h.0...") -> our GPT2 params."""
  template = nn.meta.unbox(template)
  prefix = _hub_prefix(tensors)
  tensors = _drop_tied_head(tensors, 'lm_head.weight', prefix + 'wte.weight')
  entries = gpt2_entries(_n_layer(template, ('params',)), prefix, ('params',))
  return convert.assign(template, tensors, entries, ignore_unexpected=_is_buffer)


def export_gpt2(params: Mapping, prefix: str = 'transformer.') -> dict[str, np.ndarray]:
  params = nn.meta.unbox(params)
  out = convert.export(params, gpt2_entries(_n_layer(params, ('params',)), prefix, ('params',)))
  out['lm_head.weight'] = out[prefix + 'wte.weight'].copy()
  return out


def init_from_hub_gpt2(tensors: Mapping[str, np.ndarray], init_params: Mapping) -> dict:
  """A fresh caption decoder from a hub GPT-2: GPT-2 weights from `tensors`, prefix
  layers from `init_params` (a CaptionDecoder.init result).

  The hub's wte has one row fewer than our vocabulary (no "<|EOS|>"): the missing
  row is set to the mean of the existing rows. That is deterministic and makes the
  new token start as an "average" token whose logit is about average too (recent
  transformers' resize_token_embeddings also centres new rows on the mean; older ones
  drew N(0, 0.02)). Any other mismatch is an error.
  """
  init_params = nn.meta.unbox(init_params)
  prefix = _hub_prefix(tensors)
  tensors = _drop_tied_head(tensors, 'lm_head.weight', prefix + 'wte.weight')
  gpt_template = {'params': init_params['params']['gpt']}
  vocab = gpt_template['params']['wte']['embedding'].shape[0]
  wte = np.asarray(tensors[prefix + 'wte.weight'])
  if wte.ndim == 2 and wte.shape[0] == vocab - 1:
    eos_row = wte.astype(np.float64).mean(axis=0, keepdims=True).astype(wte.dtype)
    tensors[prefix + 'wte.weight'] = np.concatenate([wte, eos_row], axis=0)
  gpt = import_gpt2(tensors, gpt_template)['params']
  out = {k: v for k, v in init_params['params'].items() if k != 'gpt'}
  out['gpt'] = gpt
  return {'params': out}
