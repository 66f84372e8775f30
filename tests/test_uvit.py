"""Shape, size, precision, remat and partitioning checks of the U-ViT (tiny sizes)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unidiffuser_jax.models import uvit as uvit_lib
from unidiffuser_jax.models.uvit import UViT, count_params, resize_pos_embed

FULL = dict(version='v1', latent_size=64, latent_channels=4, patch_size=2, width=1536, depth=30,
            num_heads=24, mlp_dim=6144, text_dim=64, num_text_tokens=77, clip_img_dim=512)
# depth 2 = one in-block, the mid-block and one skip out-block: every kind of block.
TINY = dict(version='v1', latent_size=8, latent_channels=4, patch_size=2, width=32, depth=2,
            num_heads=4, mlp_dim=64, text_dim=6, num_text_tokens=5, clip_img_dim=7)


def _inputs(cfg, b=2, seed=0, size=None):
  """Random inputs drawn with numpy (jax.random kernels are slow to compile on CPU)."""
  size = size or cfg['latent_size']
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return dict(
      z=f32(b, size, size, cfg['latent_channels']),
      clip_img=f32(b, 1, cfg['clip_img_dim']),
      text=f32(b, cfg['num_text_tokens'], cfg['text_dim']),
      t_img=jnp.asarray(rng.uniform(0, 1000, b), jnp.float32),  # fractional, as at sampling
      t_text=jnp.asarray(rng.uniform(0, 1000, b), jnp.float32),
      data_type=jnp.array([0, 1][:b], jnp.int32) if cfg['version'] == 'v1' else None)


def _random_variables(model, seed=0):
  """Random weights without model.init (whose RNG kernels are slow to compile on CPU).

  Norm scales are drawn around 1 and biases around 0 so every parameter matters.
  """
  template = nn.meta.unbox(uvit_lib.abstract_variables(model))
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    scale = 0.1 if 'pos_embed' in name or 'norm' in name or 'embedding' in name else 0.2
    value = rng.normal(0.0, scale, leaf.shape) / (np.sqrt(leaf.shape[0]) if 'kernel' in name else 1.)
    if "['scale']" in name:
      value += 1.0
    return jnp.asarray(value, jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, template)


@pytest.fixture(scope='module')
def tiny():
  """(model, inputs, unboxed variables) of the tiny v1 model, built once."""
  model, x = UViT(**TINY), _inputs(TINY)
  return model, x, _random_variables(model)


@pytest.mark.slow
def test_full_param_count_matches_released_models():
  assert count_params(FULL) == 952_509_520
  assert count_params({**FULL, 'version': 'v0'}) == 952_504_912


def test_full_token_count():
  assert UViT(**FULL).num_tokens == 1105
  assert UViT(**{**FULL, 'version': 'v0'}).num_tokens == 1104
  variables = nn.meta.unbox(uvit_lib.abstract_variables(UViT(**{**FULL, 'version': 'v0'})))
  assert variables['params']['pos_embed'].shape == (1, 1104, 1536)
  assert 'token_embedding' not in variables['params']
  assert 'pos_embed_token' not in variables['params']


@pytest.mark.slow
def test_init_matches_reference_recipe(tiny):
  """Dense N(0, .02) & zero bias, LayerNorm 1/0, pos_embed N(0, .02), pos_embed_token 0."""
  model, x, _ = tiny
  # rbg keys: threefry init kernels take many seconds to compile on CPU.
  params = jax.jit(model.init)(jax.random.key(3, impl='unsafe_rbg'), **x)['params']
  params = nn.meta.unbox(params)
  qkv = np.concatenate([np.ravel(params[b]['attn']['qkv']['kernel'])
                        for b in ('in_blocks_0', 'mid_block', 'out_blocks_0')])
  assert abs(qkv.std() - 0.02) < 0.001 and abs(qkv.mean()) < 0.001
  assert 'bias' not in params['in_blocks_0']['attn']['qkv']
  np.testing.assert_array_equal(params['out_blocks_0']['skip_linear']['bias'], 0.)
  np.testing.assert_array_equal(params['out_blocks_0']['norm1']['scale'], 1.)
  np.testing.assert_array_equal(params['mid_block']['norm3']['bias'], 0.)
  assert 'norm1' not in params['in_blocks_0'] and 'norm1' not in params['mid_block']
  assert abs(np.asarray(params['pos_embed']).std() - 0.02) < 0.003
  np.testing.assert_array_equal(params['pos_embed_token'], 0.)


@pytest.mark.slow
def test_output_shapes_and_data_type(tiny):
  # (v0 forwards are covered by tests/test_uvit_parity.py.)
  model, x, params = tiny
  z, clip, text = model.apply(params, **x)
  assert z.shape == x['z'].shape and clip.shape == x['clip_img'].shape
  assert text.shape == x['text'].shape
  assert all(np.isfinite(np.asarray(o)).all() for o in (z, clip, text))
  # data_type=None means 1 (the sampling default), and the flag changes the output.
  x1 = {**x, 'data_type': jnp.ones(2, jnp.int32)}
  np.testing.assert_array_equal(model.apply(params, **{**x, 'data_type': None})[0],
                                model.apply(params, **x1)[0])
  assert not np.allclose(model.apply(params, **x1)[0], z)


def test_every_output_depends_on_every_input(tiny):
  """Joint attention: each modality's noise prediction sees all the others."""
  model, x, params = tiny
  base = model.apply(params, **x)
  for name in ('z', 'clip_img', 'text', 't_img', 't_text'):
    moved = model.apply(params, **{**x, name: x[name] + 1.0})
    for out_new, out_old in zip(moved, base):
      assert not np.allclose(out_new, out_old, atol=1e-6), name


def _loss(model, x):
  def loss(p):
    z, clip, text = model.apply(p, **x)
    return jnp.sum(z ** 2) + jnp.sum(clip ** 2) + jnp.sum(text ** 2)
  return loss


@pytest.fixture(scope='module')
def f32_loss_grad(tiny):
  """Reference float32 loss and gradient, no remat (computed once, eagerly)."""
  model, x, params = tiny
  return jax.value_and_grad(_loss(model, x))(params)


@pytest.mark.slow
def test_bfloat16_runs_and_stays_close(tiny, f32_loss_grad):
  model32, x, params = tiny
  model16 = UViT(**TINY, dtype=jnp.bfloat16)

  @jax.jit  # one compile is cheaper than eager per-op compiles of a new dtype
  def outputs_and_grads(p):
    return model16.apply(p, **x), jax.grad(_loss(model16, x))(p)

  out16, g16 = outputs_and_grads(params)
  for a, b in zip(model32.apply(params, **x), out16):
    assert b.dtype == jnp.float32  # outputs are returned in float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    print(f'bfloat16 vs float32 relative error {rel:.4f}')
    assert 0 < rel < 0.02, rel  # > 0: bfloat16 really was used
  # Gradients (what mixed-precision training uses) stay float32 and close too.
  for a, b in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(f32_loss_grad[1])):
    assert a.dtype == jnp.float32
    assert float(jnp.linalg.norm(a - b)) <= 0.03 * float(jnp.linalg.norm(b)) + 1e-6


def test_attention_implementations_agree(tiny):
  model, x, params = tiny
  ref = model.apply(params, **x)
  got = UViT(**TINY, attention='xla').apply(params, **x)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, atol=2e-6)
  with pytest.raises(ValueError, match='attention'):
    UViT(**TINY, attention='flash').apply(params, **x)


@pytest.mark.slow
def test_remat_variants_identical(tiny, f32_loss_grad):
  _, x, params = tiny
  ref_loss, ref_grad = f32_loss_grad
  for remat in ('block', 'dots_saveable'):
    l, g = jax.value_and_grad(_loss(UViT(**TINY, remat=remat), x))(params)
    np.testing.assert_allclose(l, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           g, ref_grad)
  with pytest.raises(ValueError, match='remat'):
    UViT(**TINY, remat='bogus').apply(params, **x)


def test_every_param_has_logical_names():
  boxed = uvit_lib.abstract_variables(UViT(**TINY))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  for v in leaves:
    assert len(v.names) == len(v.value.shape), v
  specs = nn.get_partition_spec(boxed)
  flat = jax.tree_util.tree_leaves_with_path(specs['params'],
                                             is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  names = {jax.tree_util.keystr(k): tuple(s) for k, s in flat}
  assert len(names) == len(leaves)
  assert names["['in_blocks_0']['attn']['qkv']['kernel']"] == ('embed', 'heads')
  assert names["['in_blocks_0']['attn']['proj']['kernel']"] == ('heads', 'embed')
  assert names["['mid_block']['mlp']['fc1']['kernel']"] == ('embed', 'mlp')
  assert names["['out_blocks_0']['mlp']['fc2']['kernel']"] == ('mlp', 'embed')
  assert names["['pos_embed']"] == (None, 'pos', 'pos_width')
  assert names["['norm']['scale']"] == ('norm',)


@pytest.mark.slow
def test_resize_pos_embed():
  variables = jax.tree_util.tree_map(  # boxed, as model.init returns them
      lambda box, v: box.replace_boxed(v),
      uvit_lib.abstract_variables(UViT(**TINY)), _random_variables(UViT(**TINY)),
      is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  same = resize_pos_embed(variables, 8, 8, 2)
  np.testing.assert_array_equal(nn.meta.unbox(same)['params']['pos_embed'],
                                nn.meta.unbox(variables)['params']['pos_embed'])
  bigger = resize_pos_embed(variables, 8, 12, 2)
  table = nn.meta.unbox(bigger)['params']['pos_embed']
  n_prefix = 2 + TINY['num_text_tokens'] + 1
  assert table.shape == (1, n_prefix + 36, TINY['width'])
  np.testing.assert_array_equal(table[:, :n_prefix],
                                nn.meta.unbox(variables)['params']['pos_embed'][:, :n_prefix])
  # The resized params drive a model built for the new size...
  big_model = UViT(**{**TINY, 'latent_size': 12})
  out_big = big_model.apply(nn.meta.unbox(bigger), **_inputs(TINY, size=12))
  assert out_big[0].shape == (2, 12, 12, 4)
  # ...and equal the old model interpolating on the fly at that size.
  out_fly = UViT(**TINY).apply(nn.meta.unbox(variables), **_inputs(TINY, size=12))
  for a, b in zip(out_big, out_fly):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
  model, x = UViT(**TINY), _inputs(TINY)
  with pytest.raises(ValueError, match='text'):
    model.init(jax.random.key(0), **{**x, 'text': x['text'][:, :3]})
  with pytest.raises(ValueError, match='version'):
    UViT(**{**TINY, 'version': 'v2'}).init(jax.random.key(0), **x)


@pytest.mark.slow
def test_runs_sharded_over_data_fsdp_tensor(tiny):
  """The logical names shard on a (data, fsdp, tensor) = (2, 2, 2) mesh and give the same outputs."""
  model, x, params = tiny
  rules = (('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor'), ('io', None),
           ('norm', None), ('pos', None), ('pos_width', None))  # as configs/common.py
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(uvit_lib.abstract_variables(model)), mesh, rules)
  qkv_sharding = shardings['params']['in_blocks_0']['attn']['qkv']['kernel']
  assert tuple(qkv_sharding.spec) == ('fsdp', 'tensor')
  sharded = jax.device_put(params, shardings)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  x4 = {k: jax.device_put(jnp.concatenate([v, v]), batch) for k, v in x.items()}
  got = jax.jit(model.apply)(sharded, **x4)
  for a, b in zip(got, model.apply(params, **x)):
    np.testing.assert_allclose(np.asarray(a)[:2], b, atol=2e-5)
