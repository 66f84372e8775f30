"""Flax AutoencoderKL vs diffusers.AutoencoderKL (tiny, random weights), both key layouts."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.refs import vae as vae_ref
from unidiffuser_jax.models.vae import AutoencoderKL, sample_latent
from unidiffuser_jax.weights import vae as vae_weights
from unidiffuser_jax.weights.convert import WeightMismatchError, flatten
from unidiffuser_jax.weights.tensors import load_tensors, save_safetensors

TOL = 1e-4


def _ours():
  return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_ref.CHANNELS,
                       layers_per_block=vae_ref.LAYERS, latent_channels=vae_ref.LATENT,
                       norm_num_groups=vae_ref.GROUPS)


@pytest.fixture(scope="module")
def setup():
  tvae = vae_ref.torch_vae()
  x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, vae_ref.LATENT, 4, 6)).astype(np.float32)
  with torch.no_grad():
    moments_ref = tvae.encode(torch.from_numpy(x)).latent_dist.parameters.numpy()
    decoded_ref = tvae.decode(torch.from_numpy(z)).sample.numpy()
  sd = {k: v.detach().clone() for k, v in tvae.state_dict().items()}
  return dict(sd=sd, x=x, z=z, moments_ref=moments_ref, decoded_ref=decoded_ref)


@jax.jit
def _encode_decode(params, x, z):
  # One jitted function: a single compile is much cheaper than op-by-op dispatch.
  model = _ours()
  return (model.apply({"params": params}, x, method=model.encode),
          model.apply({"params": params}, z, method=model.decode))


def _check_parity(params, s):
  x = jnp.asarray(s["x"].transpose(0, 2, 3, 1))
  z = jnp.asarray(s["z"].transpose(0, 2, 3, 1))
  moments, decoded = _encode_decode(params, x, z)
  assert moments.shape == (2, 4, 6, 2 * vae_ref.LATENT) and decoded.shape == (2, 16, 24, 3)
  err_m = np.abs(np.asarray(moments).transpose(0, 3, 1, 2) - s["moments_ref"]).max()
  err_d = np.abs(np.asarray(decoded).transpose(0, 3, 1, 2) - s["decoded_ref"]).max()
  # The reference outputs must be non-trivial for the comparison to mean anything.
  assert np.abs(s["moments_ref"]).max() > 0.1 and np.abs(s["decoded_ref"]).std() > 0.1
  assert err_m <= TOL, f"encode max abs err {err_m}"
  assert err_d <= TOL, f"decode max abs err {err_d}"
  return err_m, err_d


def test_parity_diffusers_layout(setup, tmp_path):
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  save_safetensors(str(path), {k: v.numpy() for k, v in setup["sd"].items()})
  params = vae_weights.load_vae_params(_ours(), str(path))  # layout detected
  _check_parity(params, setup)


def test_parity_ldm_layout(setup, tmp_path):
  path = tmp_path / "autoencoder_kl.pth"
  ldm = vae_ref.to_ldm(setup["sd"])
  assert "decoder.up.0.block.2.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
  ldm["loss.logvar"] = np.zeros(())  # LDM checkpoints carry training-only loss weights
  torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in ldm.items()}}, path)
  tensors = load_tensors(str(path))
  assert vae_weights.detect_layout(tensors) == "ldm"
  params = vae_weights.vae_params_from_tensors(_ours(), tensors, layout="ldm")
  _check_parity(params, setup)


def test_deprecated_attention_names_and_export(setup):
  old = {}
  for k, v in setup["sd"].items():
    for new, dep in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
    old[k] = v.numpy()
  params = vae_weights.vae_params_from_tensors(_ours(), old)
  back = vae_weights.export_vae_tensors(params, _ours(), "diffusers")
  assert set(back) == set(setup["sd"])
  for k, v in setup["sd"].items():
    np.testing.assert_array_equal(back[k], v.numpy())


def test_missing_tensor_is_named(setup):
  tensors = {k: v.numpy() for k, v in setup["sd"].items()}
  del tensors["decoder.up_blocks.1.upsamplers.0.conv.weight"]
  with pytest.raises(WeightMismatchError,
                     match=r"decoder\.up_blocks\.1\.upsamplers\.0\.conv\.weight"):
    vae_weights.vae_params_from_tensors(_ours(), tensors)


def test_sample_latent():
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((4, 5, 5, 2)).astype(np.float32)
  logvar = rng.uniform(-3, 2, (4, 5, 5, 2)).astype(np.float32)
  logvar[0, 0, 0, 0] = 50.0  # clamped to 20
  logvar[0, 0, 0, 1] = -80.0  # clamped to -30
  moments = jnp.asarray(np.concatenate([mean, logvar], -1))

  @jax.jit
  def run(key):
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    # 2000 copies of one example: independent draws along the batch axis.
    draws = sample_latent(jnp.tile(moments[1:2], (2000, 1, 1, 1)), jax.random.fold_in(key, 1))
    return sample_latent(moments, key), eps, draws

  z, eps, draws = map(np.asarray, run(jax.random.key(3)))
  want = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * eps
  np.testing.assert_allclose(z, want, rtol=1e-6, atol=1e-6)
  assert np.isfinite(z).all()
  # Over many draws the sample statistics match mean/std.
  std = np.exp(0.5 * logvar[1])
  assert (np.abs(draws.mean(0) - mean[1]) <= 5 * std / np.sqrt(2000)).all()  # 5 sigma
  np.testing.assert_allclose(draws.std(0), std, rtol=0.1)  # ~6 sigma of the sample std


def test_bf16_compute_is_close(setup):
  tensors = {k: v.numpy() for k, v in setup["sd"].items()}
  params = vae_weights.vae_params_from_tensors(_ours(), tensors)
  model = AutoencoderKL(block_out_channels=vae_ref.CHANNELS, layers_per_block=vae_ref.LAYERS,
                        latent_channels=vae_ref.LATENT, norm_num_groups=vae_ref.GROUPS,
                        dtype=jnp.bfloat16)
  x = jnp.asarray(setup["x"].transpose(0, 2, 3, 1))
  moments = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
  assert moments.dtype == jnp.float32
  ref = setup["moments_ref"].transpose(0, 2, 3, 1)
  rel = np.abs(np.asarray(moments) - ref).max() / np.abs(ref).max()
  assert rel < 0.05, rel


def test_full_size_key_table_matches_diffusers():
  """SD KL-f8 at full size: every diffusers / LDM tensor maps to a parameter of the right shape.

  The torch model lives on the meta device and our template is a ShapeDtypeStruct
  tree, so nothing full-size is allocated.
  """
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
  theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  model = AutoencoderKL()
  template = vae_weights.vae_template(model)
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(template))
  assert n_ours == sum(int(np.prod(s)) for s in theirs.values()) == 83_653_863
  flat = flatten(template)
  for layout in ("diffusers", "ldm"):
    entries = vae_weights.vae_entries(template, layout)
    names = {e.name for e in entries}
    assert len(names) == len(entries) == len(theirs)
    if layout == "ldm":
      ldm = {}
      for k, shape in theirs.items():
        k2, is_1x1 = vae_ref.ldm_name(k, num_levels=4)
        ldm[k2] = shape + (1, 1) if is_1x1 else shape
      assert "decoder.up.1.block.0.nin_shortcut.weight" in ldm  # 512 -> 256, high-res side
    want = theirs if layout == "diffusers" else ldm
    assert names == set(want)
    for e in entries:
      fake = np.broadcast_to(np.zeros((), np.float32), want[e.name])  # no memory
      assert e.to_ours(fake).shape == flat[e.path].shape, e.name

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
