"""U-ViT weights in the released thu-ml layout (uvit_v0.pth / uvit_v1.pth) <-> our params.

Released key layout (torch shapes; W = width, F = mlp_dim, p = patch, C = channels):
  patch_embed.proj.{weight [W,C,p,p], bias}      text_embed / clip_img_embed.{weight,bias}
  pos_embed [1, 2+L+1+N, W]                       v1 only: token_embedding.weight [2,W], pos_embed_token [1,1,W]
  in_blocks.{i} / mid_block:  norm2, norm3, attn.qkv.weight (no bias; rows (3, heads, hd), ours
                              are (heads, 3, hd)), attn.proj, mlp.fc1, mlp.fc2
  out_blocks.{i}: the same plus norm1 and skip_linear (norm1 exists only in skip blocks)
  norm, decoder_pred, clip_img_out, text_out
Our module names mirror these (dots in ModuleList indices become underscores).

diffusers' port (UniDiffuserModel) names the same tensors otherwise (diffusers_names): it splits
attn.qkv into attn1.to_q / to_k / to_v, calls the post-attention LayerNorm norm1, keeps the
out-blocks' skip Linear + LayerNorm under .skip, and stores an unused copy of the patch embedding
at transformer.pos_embed.proj.

What a file determines (infer_uvit_config): version (v1 has token_embedding / pos_embed_token),
num_data_types, width, latent_channels and patch_size (patch_embed's kernel), depth (the in/out
block count k; depth d builds d//2 in-blocks, so any d with d//2 == k fits), mlp_dim, text_dim,
clip_img_dim, and qkv biases (refused: neither this U-ViT nor the released ones have them). Not
num_heads: attn.qkv.weight is [3W, W] for every head count (only our own exports record it, in
their safetensors metadata). Not num_text_tokens and latent_size separately either: pos_embed has
3 + L + (latent_size/p)^2 rows (two time tokens, the CLIP image token, L text tokens, the
patches; v1's data-type token has its own pos_embed_token), and every L >= 1 with a square
remainder fits the shapes. split_pos_table says which split is taken.
"""
from collections.abc import Mapping
import math
import re

import jax
import numpy as np
import flax.linen as nn

from unidiffuser_jax.models.uvit import UViT, abstract_variables
from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.convert import Entry, WeightMismatchError

__all__ = ['uvit_entries', 'import_uvit', 'export_uvit', 'WeightMismatchError', 'GEOMETRY',
           'infer_uvit_config', 'pos_table_splits', 'split_pos_table', 'geometry_diffs',
           'diffusers_names', 'released_to_diffusers', 'diffusers_to_released']

# The UViT fields that decide the parameter shapes or their layout (num_heads: the qkv order).
GEOMETRY = ('version', 'latent_size', 'latent_channels', 'patch_size', 'width', 'depth',
            'num_heads', 'mlp_dim', 'text_dim', 'num_text_tokens', 'clip_img_dim',
            'num_data_types')
CLIP_TEXT_TOKENS = 77  # CLIP's context length: the text-token count of every released model
POS_EXTRA_TOKENS = 3  # pos_embed rows before the text: t_img, t_text; the CLIP image token after


def _linear(ours: tuple[str, ...], theirs: str, bias: bool = True) -> list[Entry]:
  out = [Entry(ours + ('kernel',), f'{theirs}.weight', convert.linear_kernel, convert.linear_kernel)]
  if bias:
    out.append(Entry(ours + ('bias',), f'{theirs}.bias'))
  return out


def _norm(ours: tuple[str, ...], theirs: str) -> list[Entry]:
  return [Entry(ours + ('scale',), f'{theirs}.weight'), Entry(ours + ('bias',), f'{theirs}.bias')]


def _qkv_entry(ours: tuple[str, ...], theirs: str, num_heads: int) -> Entry:
  """attn.qkv.weight [3W, W] with rows (3, heads, hd) <-> our kernel [W, 3W] with columns (heads, 3, hd)."""
  def to_ours(w):
    three_w, width = w.shape
    w = w.reshape(3, num_heads, three_w // (3 * num_heads), width).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(w.reshape(three_w, width).T)

  def to_theirs(k):
    width, three_w = k.shape
    k = k.T.reshape(num_heads, 3, three_w // (3 * num_heads), width).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(k.reshape(three_w, width))

  def checked(fn):
    def run(w):  # a mis-shaped tensor must reach assign's shape check, not crash here
      try:
        return fn(w)
      except ValueError:
        return w
    return run
  return Entry(ours + ('kernel',), f'{theirs}.weight', checked(to_ours), to_theirs)


def _block(ours: str, theirs: str, skip: bool, num_heads: int) -> list[Entry]:
  o = (ours,)
  entries = []
  if skip:
    entries += _linear(o + ('skip_linear',), f'{theirs}.skip_linear')
    entries += _norm(o + ('norm1',), f'{theirs}.norm1')
  entries.append(_qkv_entry(o + ('attn', 'qkv'), f'{theirs}.attn.qkv', num_heads))
  entries += _linear(o + ('attn', 'proj'), f'{theirs}.attn.proj')
  entries += _norm(o + ('norm2',), f'{theirs}.norm2')
  entries += _linear(o + ('mlp', 'fc1'), f'{theirs}.mlp.fc1')
  entries += _linear(o + ('mlp', 'fc2'), f'{theirs}.mlp.fc2')
  entries += _norm(o + ('norm3',), f'{theirs}.norm3')
  return entries


def uvit_entries(model: UViT) -> list[Entry]:
  """The full table for `model` (its version and depth decide which keys exist)."""
  entries = [
      Entry(('patch_embed', 'kernel'), 'patch_embed.proj.weight', convert.conv_kernel, _conv_to_torch),
      Entry(('patch_embed', 'bias'), 'patch_embed.proj.bias'),
      Entry(('pos_embed',), 'pos_embed'),
  ]
  entries += _linear(('text_embed',), 'text_embed')
  entries += _linear(('clip_img_embed',), 'clip_img_embed')
  if model.version == 'v1':
    entries += [Entry(('token_embedding', 'embedding'), 'token_embedding.weight'),
                Entry(('pos_embed_token',), 'pos_embed_token')]
  for i in range(model.depth // 2):
    entries += _block(f'in_blocks_{i}', f'in_blocks.{i}', False, model.num_heads)
  entries += _block('mid_block', 'mid_block', False, model.num_heads)
  for i in range(model.depth // 2):
    entries += _block(f'out_blocks_{i}', f'out_blocks.{i}', True, model.num_heads)
  entries += _norm(('norm',), 'norm')
  entries += _linear(('decoder_pred',), 'decoder_pred')
  entries += _linear(('clip_img_out',), 'clip_img_out')
  entries += _linear(('text_out',), 'text_out')
  return entries


def _conv_to_torch(k: np.ndarray) -> np.ndarray:
  """flax Conv kernel [kh, kw, in, out] -> torch Conv2d weight [out, in, kh, kw]."""
  return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def _strip_module_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """DataParallel/DDP checkpoints prefix every key with 'module.'."""
  if tensors and all(k.startswith('module.') for k in tensors):
    return {k[len('module.'):]: v for k, v in tensors.items()}
  return dict(tensors)


def import_uvit(tensors: Mapping[str, np.ndarray], model: UViT) -> dict:
  """Released-layout tensors -> our (unboxed, float32) 'params' collection for `model`.

  Use as model.apply({'params': params}, ...). Raises WeightMismatchError naming
  every missing, unexpected or mis-shaped tensor (e.g. a v1 file for a v0 model).
  """
  template = nn.meta.unbox(abstract_variables(model))['params']
  return convert.assign(template, _strip_module_prefix(tensors), uvit_entries(model))


def export_uvit(params: Mapping, model: UViT) -> dict[str, np.ndarray]:
  """Our params (the 'params' collection or variables holding it; boxed or not) -> released layout."""
  if 'params' in params and 'pos_embed' not in params:
    params = params['params']
  params = jax.device_get(nn.meta.unbox(params))
  return {k: np.asarray(v, np.float32) for k, v in convert.export(params, uvit_entries(model)).items()}


# ----------------------------------------------------------------------------- what a file needs

def pos_table_splits(rows: int, patch_size: int) -> list[tuple[int, int]]:
  """Every (num_text_tokens, latent_size) whose position table has `rows` rows (fewest text
  tokens first)."""
  rest = rows - POS_EXTRA_TOKENS
  grids = range(math.isqrt(max(rest - 1, 0)), 0, -1)
  return [(rest - g * g, g * patch_size) for g in grids]


def split_pos_table(rows: int, patch_size: int, text_tokens: int,
                    latent_size: int) -> tuple[int, int]:
  """(num_text_tokens, latent_size) of a position table with `rows` rows; the config's
  (`text_tokens`, `latent_size`) are the hints.

  Shapes alone allow every split (pos_table_splits). The rule:
    1. the config's own (text_tokens, latent_size) if it fits;
    2. else the one split whose text-token count is the config's or CLIP's 77 (the text-token
       count comes from the text encoder, so it is the config's or the released one; the latent
       size is only a consequence);
    3. else refuse: no such split, or two of them and neither is the config's geometry (96 rows
       at patch 2 fit both 12 tokens with an 18x18 latent and 77 tokens with an 8x8 latent; a
       config of 12 tokens and latent 8 matches each in one field).
  The config's latent size alone is no evidence: some text-token count fits any latent size.
  Raises WeightMismatchError (one line) in case 3.
  """
  splits = pos_table_splits(rows, patch_size)
  if (text_tokens, latent_size) in splits:
    return text_tokens, latent_size
  anchored = [s for s in splits if s[0] in (text_tokens, CLIP_TEXT_TOKENS)]
  if len(anchored) == 1:
    return anchored[0]
  head = (f'pos_embed has {rows} rows = {POS_EXTRA_TOKENS} + text tokens + '
          f'(latent_size/{patch_size})^2, which does not say how many are text tokens')
  fix = (f'set --config.model.num_text_tokens to the count the file was trained with '
         f'(the config has {text_tokens})')
  if anchored:
    options = ' or '.join(f'{l} text tokens with latent_size {z}' for l, z in anchored)
    raise WeightMismatchError(f'{head}: it fits {options}, and neither is the config\'s '
                              f'{text_tokens} text tokens with latent_size {latent_size}; {fix}')
  same_latent = [l for l, z in splits if z == latent_size]
  hint = (f' (with the config\'s latent_size {latent_size} it would be {same_latent[0]} text '
          f'tokens)' if same_latent else '')
  raise WeightMismatchError(f'{head}: no split has the config\'s {text_tokens} or CLIP\'s '
                            f'{CLIP_TEXT_TOKENS} text tokens{hint}; {fix}')


def _shape(t: Mapping[str, np.ndarray], name: str, ndim: int) -> tuple[int, ...]:
  if name not in t:
    raise WeightMismatchError(f'no tensor {name!r}: not a U-ViT in the released layout')
  shape = tuple(int(d) for d in t[name].shape)
  if len(shape) != ndim:
    raise WeightMismatchError(f'tensor {name!r} has shape {shape}, expected {ndim} dimensions')
  return shape


def infer_uvit_config(tensors: Mapping[str, np.ndarray], model_cfg: Mapping,
                      recorded: Mapping | None = None) -> tuple[dict, list[str]]:
  """-> (the config.model values the file's weights need, notes).

  `model_cfg` (the current config.model) supplies what the shapes cannot tell: num_heads (kept,
  with a note, unless `recorded` has it), the hints for the position-table split
  (split_pos_table), an equivalent depth, and the fields outside GEOMETRY (dtype, remat, ...).
  `recorded`: the model config an export of ours stores in its metadata; its num_heads,
  text-token count, latent size and depth are used when they fit the shapes. Raises
  WeightMismatchError (one line) for a file this U-ViT cannot hold or cannot place.
  """
  t = _strip_module_prefix(tensors)
  out = dict(model_cfg)
  notes = []
  biased = sorted(k for k in t if re.search(r'attn\.qkv\.bias$', k))
  if biased:
    raise WeightMismatchError(f'the file\'s attention has qkv biases ({biased[0]}, ...); this '
                              f'U-ViT\'s qkv projection has none (nor have the released models)')
  width, channels, p, p2 = _shape(t, 'patch_embed.proj.weight', 4)
  if p != p2:
    raise WeightMismatchError(f'patch_embed.proj.weight has a {p}x{p2} kernel; patches are square')
  out.update(width=width, latent_channels=channels, patch_size=p)
  out['mlp_dim'] = _shape(t, 'mid_block.mlp.fc1.weight', 2)[0]
  out['text_dim'] = _shape(t, 'text_embed.weight', 2)[1]
  out['clip_img_dim'] = _shape(t, 'clip_img_embed.weight', 2)[1]
  if 'token_embedding.weight' in t or 'pos_embed_token' in t:
    out['version'] = 'v1'
    out['num_data_types'] = _shape(t, 'token_embedding.weight', 2)[0]
  else:
    out['version'] = 'v0'
  blocks = {m.group(1, 2) for k in t for m in [re.match(r'(in|out)_blocks\.(\d+)\.', k)] if m}
  n_in = len({i for kind, i in blocks if kind == 'in'})
  n_out = len({i for kind, i in blocks if kind == 'out'})
  if n_in != n_out:
    raise WeightMismatchError(f'the file has {n_in} in-blocks but {n_out} out-blocks; a U-ViT has '
                              f'as many of each')
  rec = dict(recorded or {})
  if rec.get('depth') is not None and int(rec['depth']) // 2 == n_in:
    out['depth'] = int(rec['depth'])
  elif int(model_cfg.get('depth', -1)) // 2 != n_in:
    out['depth'] = 2 * n_in + 1  # the number of blocks (diffusers' num_layers counts the same)
  rows = _shape(t, 'pos_embed', 3)[1]
  rec_split = (rec.get('num_text_tokens'), rec.get('latent_size'))
  if rec_split in pos_table_splits(rows, p):
    out['num_text_tokens'], out['latent_size'] = rec_split
  else:
    out['num_text_tokens'], out['latent_size'] = split_pos_table(
        rows, p, int(model_cfg['num_text_tokens']), int(model_cfg['latent_size']))
  heads = rec.get('num_heads')
  if heads is not None and width % int(heads) == 0:
    out['num_heads'] = int(heads)
  else:
    heads = int(model_cfg['num_heads'])
    hint = (f' (the released models use 64-wide heads: {width // 64} for width {width})'
            if width % 64 == 0 else '')
    if width % heads:
      raise WeightMismatchError(
          f'num_heads is not stored in a released-layout file, and the config\'s {heads} does '
          f'not divide the file\'s width {width}: set --config.model.num_heads to the heads the '
          f'file was trained with{hint}')
    notes.append(f'num_heads {heads} is not stored in the file and was kept from the config: it '
                 f'decides how attn.qkv is split, so it must be the heads the file was trained '
                 f'with{hint}')
  return out, notes


def geometry_diffs(a: Mapping, b: Mapping) -> list[str]:
  """The GEOMETRY fields in which model configs `a` and `b` build different networks."""
  diff = []
  for k in GEOMETRY:
    if k == 'num_data_types' and a.get('version') == b.get('version') == 'v0':
      continue  # v0 has no data-type embedding
    if k == 'depth':
      if int(a[k]) // 2 != int(b[k]) // 2:
        diff.append(k)
    elif a.get(k) != b.get(k):
      diff.append(k)
  return diff


# ----------------------------------------------------------------------------- diffusers' names

# diffusers tensors that copy another one and are never used: {copy: original}.
_DIFFUSERS_COPIES = {'transformer.pos_embed.proj.weight': 'vae_img_in.proj.weight',
                     'transformer.pos_embed.proj.bias': 'vae_img_in.proj.bias'}


def diffusers_names(version: str, depth: int) -> tuple[list[tuple[str, str]],
                                                          list[tuple[str, str]]]:
  """([(released name, diffusers UniDiffuserModel name)] of the tensors that only change name,
  [(released block, diffusers block)] whose attn.qkv.weight diffusers splits into
  attn1.to_q / to_k / to_v) for a U-ViT of `version` and `depth` (depth // 2 in/out blocks)."""
  pairs = [(f'{ours}.{p}', f'{theirs}.{p}')
           for ours, theirs in (('patch_embed.proj', 'vae_img_in.proj'), ('text_embed', 'text_in'),
                                ('clip_img_embed', 'clip_img_in'), ('norm', 'transformer.norm_out'),
                                ('decoder_pred', 'vae_img_out'), ('clip_img_out', 'clip_img_out'),
                                ('text_out', 'text_out'))
           for p in ('weight', 'bias')]
  pairs.append(('pos_embed', 'pos_embed'))
  if version == 'v1':
    pairs += [('token_embedding.weight', 'data_type_token_embedding.weight'),
              ('pos_embed_token', 'data_type_pos_embed_token')]
  blocks = [(f'in_blocks.{i}', f'transformer.transformer_in_blocks.{i}')
            for i in range(depth // 2)]
  blocks.append(('mid_block', 'transformer.transformer_mid_block'))
  for i in range(depth // 2):
    ours, theirs = f'out_blocks.{i}', f'transformer.transformer_out_blocks.{i}'
    blocks.append((ours, f'{theirs}.block'))
    pairs += [(f'{ours}.{o}.{p}', f'{theirs}.skip.{t}.{p}')
              for o, t in (('skip_linear', 'skip_linear'), ('norm1', 'norm'))
              for p in ('weight', 'bias')]
  per_block = (('attn.proj', 'attn1.to_out.0'), ('norm2', 'norm1'), ('mlp.fc1', 'ff.net.0.proj'),
               ('mlp.fc2', 'ff.net.2'), ('norm3', 'norm3'))
  pairs += [(f'{ours}.{o}.{p}', f'{theirs}.{t}.{p}') for ours, theirs in blocks
            for o, t in per_block for p in ('weight', 'bias')]
  return pairs, blocks


def released_to_diffusers(tensors: Mapping[str, np.ndarray], version: str,
                          depth: int) -> dict[str, np.ndarray]:
  """Released-layout tensors -> a diffusers UniDiffuserModel state dict (numpy copies)."""
  pairs, blocks = diffusers_names(version, depth)
  out = {theirs: np.array(tensors[ours]) for ours, theirs in pairs}
  for ours, theirs in blocks:
    for n, w in zip('qkv', np.split(np.asarray(tensors[f'{ours}.attn.qkv.weight']), 3, axis=0)):
      out[f'{theirs}.attn1.to_{n}.weight'] = np.array(w)
  for copy, original in _DIFFUSERS_COPIES.items():
    out[copy] = out[original].copy()
  return out


def diffusers_to_released(state: Mapping[str, np.ndarray], version: str,
                          depth: int) -> dict[str, np.ndarray]:
  """A diffusers UniDiffuserModel state dict (numpy arrays) -> released-layout tensors.
  Raises WeightMismatchError naming any tensor the table does not place."""
  pairs, blocks = diffusers_names(version, depth)
  out = {ours: np.asarray(state[theirs]) for ours, theirs in pairs}
  for ours, theirs in blocks:
    out[f'{ours}.attn.qkv.weight'] = np.concatenate(
        [np.asarray(state[f'{theirs}.attn1.to_{n}.weight']) for n in 'qkv'], axis=0)
  placed = {theirs for _, theirs in pairs} | set(_DIFFUSERS_COPIES) | {
      f'{theirs}.attn1.to_{n}.weight' for _, theirs in blocks for n in 'qkv'}
  unplaced = sorted(set(state) - placed)
  if unplaced:
    raise WeightMismatchError(f'{len(unplaced)} diffusers tensor(s) with no released name: '
                              f'{", ".join(unplaced[:5])}')
  return out
