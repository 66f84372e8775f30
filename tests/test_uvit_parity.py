"""Parity of our U-ViT with diffusers' UniDiffuserModel (an independent PyTorch port).

A tiny diffusers model with every parameter randomised (LayerNorms and the
zero-initialised data-type position token included, so a swapped or ignored
tensor shows up) is renamed to the released thu-ml key layout (weights/uvit.py's
diffusers table: a wrong entry shows up as a forward mismatch or a strict-load
failure), written to safetensors, read with our loader, imported, and run on the
same inputs.
"""
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import jax.numpy as jnp

from unidiffuser_jax.models.uvit import UViT, interpolate_patch_pos
from unidiffuser_jax.weights import uvit as wuvit
from unidiffuser_jax.weights.convert import WeightMismatchError
from unidiffuser_jax.weights.tensors import load_tensors
from unidiffuser_jax.weights.uvit import export_uvit, import_uvit

modeling_uvit = pytest.importorskip('diffusers.pipelines.deprecated.unidiffuser.modeling_uvit')

HEADS, HEAD_DIM, DEPTH = 4, 8, 4  # depth 4: two in-blocks, so LIFO skip order is exercised
CFG = dict(latent_size=8, latent_channels=4, patch_size=2, width=HEADS * HEAD_DIM, depth=DEPTH,
           num_heads=HEADS, mlp_dim=4 * HEADS * HEAD_DIM, text_dim=6, num_text_tokens=5,
           clip_img_dim=7)


def _torch_model(version: str, seed: int = 0, cfg: dict = CFG):
  """diffusers' UniDiffuserModel configured as the released post-LN network, random weights.

  `cfg`: our UViT fields (CFG's keys); its depth is diffusers' num_layers."""
  torch.manual_seed(seed)
  model = modeling_uvit.UniDiffuserModel(
      text_dim=cfg['text_dim'], clip_img_dim=cfg['clip_img_dim'],
      num_text_tokens=cfg['num_text_tokens'], num_attention_heads=cfg['num_heads'],
      attention_head_dim=cfg['width'] // cfg['num_heads'], in_channels=cfg['latent_channels'],
      out_channels=cfg['latent_channels'], num_layers=cfg['depth'], dropout=0.0,
      attention_bias=False, sample_size=cfg['latent_size'], patch_size=cfg['patch_size'],
      activation_fn='gelu',
      norm_type='layer_norm', block_type='unidiffuser', pre_layer_norm=False,
      use_timestep_embedding=False, norm_elementwise_affine=True, use_patch_pos_embed=False,
      ff_final_dropout=True, use_data_type_embedding=(version == 'v1'))
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('norm.weight') or name.endswith('norm1.weight') or \
         name.endswith('norm3.weight') or name.endswith('norm_out.weight'):
        p.copy_(1.0 + 0.2 * noise)  # LayerNorm scales: away from the init value 1
      elif p.ndim >= 2 and 'pos_embed' not in name and 'embedding' not in name:
        p.copy_(noise / np.sqrt(p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1)))
      else:
        p.copy_(0.3 * noise)  # biases, pos tables, embeddings, pos_embed_token
  return model.eval()


# -- diffusers <-> the released thu-ml layout: the library's table (weights/uvit.py), torch here --

def diffusers_to_released(state: dict, version: str, depth: int = DEPTH) -> dict:
  return wuvit.diffusers_to_released({k: v.numpy() for k, v in state.items()}, version, depth)


def released_to_diffusers(tensors: dict, version: str, depth: int = DEPTH) -> dict:
  return {k: torch.from_numpy(v)
          for k, v in wuvit.released_to_diffusers(tensors, version, depth).items()}


# -- running both --

def _inputs(version: str, b: int = 3, seed: int = 7):
  rng = np.random.default_rng(seed)
  x = dict(z=rng.normal(size=(b, CFG['latent_size'], CFG['latent_size'], CFG['latent_channels'])),
           clip_img=rng.normal(size=(b, 1, CFG['clip_img_dim'])),
           text=rng.normal(size=(b, CFG['num_text_tokens'], CFG['text_dim'])),
           t_img=np.array([0.0, 371.25, 1000.0]),  # fractional, as the sampler feeds
           t_text=np.array([1000.0, 12.5, 0.0]))
  x = {k: v.astype(np.float32) for k, v in x.items()}
  x['data_type'] = np.array([0, 1, 1], np.int32) if version == 'v1' else None
  return x


def _run_torch(model, x):
  with torch.no_grad():
    z, clip, text = model(
        torch.from_numpy(x['z']).permute(0, 3, 1, 2), torch.from_numpy(x['clip_img']),
        torch.from_numpy(x['text']), torch.from_numpy(x['t_img']), torch.from_numpy(x['t_text']),
        data_type=torch.from_numpy(x['data_type']) if x['data_type'] is not None else None)
  return z.permute(0, 2, 3, 1).numpy(), clip.numpy(), text.numpy()


def _run_ours(model, params, x):
  args = {k: (jnp.asarray(v) if v is not None else None) for k, v in x.items()}
  return tuple(np.asarray(o) for o in model.apply({'params': params}, **args))


@pytest.fixture(scope='module', params=['v0', 'v1'])
def setup(request, tmp_path_factory):
  version = request.param
  torch_model = _torch_model(version)
  released = diffusers_to_released(torch_model.state_dict(), version)
  path = tmp_path_factory.mktemp(version) / f'uvit_{version}.safetensors'
  save_file(released, str(path))
  model = UViT(version=version, **CFG)
  params = import_uvit(load_tensors(str(path)), model)
  return version, torch_model, model, params, load_tensors(str(path))


def test_forward_matches_diffusers(setup):
  version, torch_model, model, params, _ = setup
  x = _inputs(version)
  want = _run_torch(torch_model, x)
  got = _run_ours(model, params, x)
  for name, w, g in zip(('z', 'clip_img', 'text'), want, got):
    assert g.shape == w.shape, name
    err = np.abs(g - w).max()
    print(f'{version} {name}: max abs err {err:.2e} (output scale {np.abs(w).max():.2f})')
    assert err <= 1e-4, (name, err)


def test_export_roundtrip_and_back_into_diffusers(setup):
  version, torch_model, model, params, released = setup
  exported = export_uvit(params, model)
  assert set(exported) == set(released)
  for k in released:
    np.testing.assert_array_equal(exported[k], released[k], err_msg=k)
  again = import_uvit(exported, model)
  flat = lambda t, p='': {p + k: v for kk, vv in t.items()
                          for k, v in (flat(vv, kk + '/').items() if isinstance(vv, dict)
                                       else [(kk, vv)])}
  a, b = flat(params), flat(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
  # PyTorch users can load what we export.
  fresh = _torch_model(version, seed=5)
  missing, unexpected = fresh.load_state_dict(released_to_diffusers(exported, version), strict=True)
  assert not missing and not unexpected
  x = _inputs(version)
  for w, g in zip(_run_torch(torch_model, x), _run_torch(fresh.eval(), x)):
    np.testing.assert_array_equal(w, g)


def test_module_prefix_is_accepted(setup):
  version, _, model, params, released = setup
  prefixed = import_uvit({'module.' + k: v for k, v in released.items()}, model)
  np.testing.assert_array_equal(prefixed['out_blocks_1']['norm1']['scale'],
                                params['out_blocks_1']['norm1']['scale'])


def test_missing_and_misshaped_tensors_are_named(setup):
  version, _, model, _, released = setup
  broken = dict(released)
  del broken['out_blocks.1.norm1.weight']
  with pytest.raises(WeightMismatchError, match=r"out_blocks\.1\.norm1\.weight"):
    import_uvit(broken, model)
  broken = dict(released)
  broken['in_blocks.0.attn.qkv.weight'] = broken['in_blocks.0.attn.qkv.weight'][:-1]
  with pytest.raises(WeightMismatchError, match=r"in_blocks\.0\.attn\.qkv\.weight"):
    import_uvit(broken, model)
  # A checkpoint of the other version is refused, naming the v1-only tensors.
  other = UViT(version='v0' if version == 'v1' else 'v1', **CFG)
  with pytest.raises(WeightMismatchError, match='token_embedding'):
    import_uvit(released, other)


def test_diffusers_tensors_the_table_does_not_place_are_named(setup):
  version, torch_model, _, _, _ = setup
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  state['transformer.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(WeightMismatchError, match=r'transformer\.extra\.weight'):
    wuvit.diffusers_to_released(state, version, DEPTH)


@pytest.mark.parametrize('new', [(6, 6), (3, 5), (4, 4)])
def test_pos_embed_interpolation_matches_torch(new):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(1, 16, 5)).astype(np.float32)  # a 4x4 grid
  want = torch.nn.functional.interpolate(
      torch.from_numpy(table).reshape(1, 4, 4, 5).permute(0, 3, 1, 2), size=new, mode='bilinear')
  want = want.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], 5).numpy()
  got = np.asarray(interpolate_patch_pos(jnp.asarray(table), (4, 4), new))
  np.testing.assert_allclose(got, want, atol=1e-6)

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
