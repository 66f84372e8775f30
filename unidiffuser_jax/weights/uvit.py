"""U-ViT weights in the released thu-ml layout (uvit_v0.pth / uvit_v1.pth) <-> our params.

Released key layout (torch shapes; W = width, F = mlp_dim, p = patch, C = channels):
  patch_embed.proj.{weight [W,C,p,p], bias}      text_embed / clip_img_embed.{weight,bias}
  pos_embed [1, 2+L+1+N, W]                       v1 only: token_embedding.weight [2,W], pos_embed_token [1,1,W]
  in_blocks.{i} / mid_block:  norm2, norm3, attn.qkv.weight (no bias; rows (3, heads, hd), ours
                              are (heads, 3, hd)), attn.proj, mlp.fc1, mlp.fc2
  out_blocks.{i}: the same plus norm1 and skip_linear (norm1 exists only in skip blocks)
  norm, decoder_pred, clip_img_out, text_out
Our module names mirror these (dots in ModuleList indices become underscores).
"""
from collections.abc import Mapping

import jax
import numpy as np
import flax.linen as nn

from unidiffuser_jax.models.uvit import UViT, abstract_variables
from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.convert import Entry, WeightMismatchError

__all__ = ['uvit_entries', 'import_uvit', 'export_uvit', 'WeightMismatchError']


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
