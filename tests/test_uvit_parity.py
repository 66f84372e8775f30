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
from tests.refs import uvit as uvit_ref
from unidiffuser_jax.weights.uvit import export_uvit, import_uvit

def _run_ours(model, params, x):
  args = {k: (jnp.asarray(v) if v is not None else None) for k, v in x.items()}
  return tuple(np.asarray(o) for o in model.apply({'params': params}, **args))


@pytest.fixture(scope='module', params=['v0', 'v1'])
def setup(request, tmp_path_factory):
  version = request.param
  torch_model = uvit_ref.torch_model(version)
  released = uvit_ref.diffusers_to_released(torch_model.state_dict(), version)
  path = tmp_path_factory.mktemp(version) / f'uvit_{version}.safetensors'
  save_file(released, str(path))
  model = UViT(version=version, **uvit_ref.CFG)
  params = import_uvit(load_tensors(str(path)), model)
  return version, torch_model, model, params, load_tensors(str(path))


def test_forward_matches_diffusers(setup):
  version, torch_model, model, params, _ = setup
  x = uvit_ref.inputs(version)
  want = uvit_ref.run_torch(torch_model, x)
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
  fresh = uvit_ref.torch_model(version, seed=5)
  missing, unexpected = fresh.load_state_dict(uvit_ref.released_to_diffusers(exported, version),
                                              strict=True)
  assert not missing and not unexpected
  x = uvit_ref.inputs(version)
  for w, g in zip(uvit_ref.run_torch(torch_model, x), uvit_ref.run_torch(fresh.eval(), x)):
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
  other = UViT(version='v0' if version == 'v1' else 'v1', **uvit_ref.CFG)
  with pytest.raises(WeightMismatchError, match='token_embedding'):
    import_uvit(released, other)


def test_diffusers_tensors_the_table_does_not_place_are_named(setup):
  version, torch_model, _, _, _ = setup
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  state['transformer.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(WeightMismatchError, match=r'transformer\.extra\.weight'):
    wuvit.diffusers_to_released(state, version, uvit_ref.DEPTH)


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
