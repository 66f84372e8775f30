"""FID: Flax FID Inception vs pytorch-fid's InceptionV3, Fréchet distance vs pytorch-fid's.

The reference network is pytorch-fid's own (``InceptionV3`` with its FIDInceptionA/C/E
blocks) with random weights (torchvision imports through conftest.py, see
tests/torchvision_compat.py): its weight download is patched to hand back a random state
dict of the same names, which is also saved with torch.save and read by our safe loader.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import fid_score, inception as pf_inception

from unidiffuser_jax import fid
from unidiffuser_jax.models.inception import FIDInception, resize_bilinear
from unidiffuser_jax.weights import inception as inception_weights
from unidiffuser_jax.weights.convert import WeightMismatchError


def _random_state_dict(seed: int) -> dict:
  """torchvision Inception3 names/shapes (the FID blocks keep them), random values.

  He-scaled convs keep activations O(1) through the ~50 layers; BatchNorm statistics
  and affine terms are random too, so every loaded tensor matters.
  """
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                        init_weights=False)
  g = torch.Generator().manual_seed(seed)
  sd = net.state_dict()
  out = {}
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      out[k] = v
    elif k.endswith("conv.weight") or k == "fc.weight":
      fan_in = v[0].numel()
      out[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    elif k.endswith("running_var"):
      out[k] = 0.5 + torch.rand(v.shape, generator=g)
    elif k.endswith("bn.weight"):
      out[k] = 0.5 + torch.rand(v.shape, generator=g)
    else:  # bn.bias, running_mean, fc.bias
      out[k] = 0.2 * torch.randn(v.shape, generator=g)
  return out


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  """(pytorch-fid InceptionV3 [pool3], its fid_inception_v3 [logits], our params)."""
  sd = _random_state_dict(0)
  path = tmp_path_factory.mktemp("fid") / inception_weights.FID_WEIGHTS_FILE
  torch.save(sd, path)
  mp = pytest.MonkeyPatch()
  mp.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: dict(sd))
  try:
    ref_pool = pf_inception.InceptionV3([3]).eval()
    ref_full = pf_inception.fid_inception_v3().eval()
  finally:
    mp.undo()
  return ref_pool, ref_full, inception_weights.load_inception_params(path), sd


def _images(seed, b, h, w):
  return np.random.default_rng(seed).uniform(0, 1, (b, h, w, 3)).astype(np.float32)


def _to_torch(x_bhwc):
  return torch.from_numpy(np.ascontiguousarray(x_bhwc.transpose(0, 3, 1, 2)))


def _check_close(ours, ref, what, tol=1e-4):
  err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))
  scale = max(1.0, float(np.max(np.abs(ref))))
  print(f"{what}: max |diff| {err:.3g}, max |ref| {np.max(np.abs(ref)):.3g}")
  assert err <= tol * scale, f"{what}: max |diff| {err} > {tol} * {scale}"


def test_pool_features_match_pytorch_fid_after_resize(nets):
  ref_pool, _, params, _ = nets
  x = _images(1, 2, 75, 75)  # resized to 299 inside both
  with torch.no_grad():
    ref = ref_pool(_to_torch(x))[0][:, :, 0, 0].numpy()
  pool, _ = jax.jit(FIDInception().apply)({"params": params}, jnp.asarray(x))
  assert pool.shape == (2, 2048) and pool.dtype == jnp.float32
  assert np.std(ref) > 1e-2  # random weights still give informative features
  _check_close(pool, ref, "pool3 (75x75 input)")


def test_pool_and_logits_match_at_299(nets):
  _, ref_full, params, _ = nets
  x = _images(2, 1, 299, 299)
  feats = {}
  hook = ref_full.avgpool.register_forward_hook(
      lambda m, i, o: feats.__setitem__("pool", o[:, :, 0, 0].numpy()))
  with torch.no_grad():
    ref_logits = ref_full(_to_torch(2 * x - 1)).numpy()  # Inception3 itself has no [0,1] map
  hook.remove()
  pool, logits = jax.jit(FIDInception().apply)({"params": params}, jnp.asarray(x))
  assert logits.shape == (1, 1008)
  _check_close(pool, feats["pool"], "pool3 (299 input)")
  _check_close(logits, ref_logits, "logits (299 input)")


@pytest.mark.parametrize("hw", [(75, 75), (32, 48), (512, 300), (299, 299)])
def test_resize_matches_torch_interpolate(hw):
  x = _images(3, 2, *hw)
  ref = F.interpolate(_to_torch(x), size=(299, 299), mode="bilinear",
                      align_corners=False).numpy().transpose(0, 2, 3, 1)
  ours = np.asarray(resize_bilinear(jnp.asarray(x)))
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_loader_round_trip_and_one_line_errors(nets, tmp_path):
  _, _, params, sd = nets
  exported = inception_weights.export_inception(params)
  want = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert exported.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(exported[k], want[k])
  bad = dict(want)
  del bad["Mixed_7c.branch_pool.bn.running_var"]
  bad["fc.weight"] = bad["fc.weight"][:1000]
  bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  with pytest.raises(WeightMismatchError) as e:
    inception_weights.inception_params_from_tensors(bad, where="x.pth")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("x.pth: ") and "3 weight problem(s)" in msg
  assert "Mixed_7c.branch_pool.bn.running_var" in msg and "fc.weight" in msg
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    inception_weights.load_inception_params(tmp_path / "absent.pth")


# 2nd and 3rd: fewer samples than dimensions (singular covariances: pytorch-fid's sqrtm is
# approximate there; at 2048 dimensions the two differ by ~1.5e-7 relative, 14 s for pytorch-fid).
@pytest.mark.parametrize("n1,n2,d,rtol", [(300, 250, 32, 1e-12), (20, 25, 48, 1e-6),
                                          (12, 10, 512, 1e-6)])
def test_frechet_distance_matches_pytorch_fid(n1, n2, d, rtol):
  rng = np.random.default_rng(n1)
  a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
  b = 0.5 + rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 1.1 / np.sqrt(d)
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  ours = fid.frechet_distance(mu1, s1, mu2, s2)
  print(f"FID n=({n1},{n2}) d={d}: ours {ours!r} ref {ref!r}")
  assert abs(ours - ref) <= rtol * abs(ref)


def test_stats_accumulator_matches_numpy_and_merges():
  rng = np.random.default_rng(5)
  x = (3.0 + rng.normal(size=(103, 16)) @ rng.normal(size=(16, 16))).astype(np.float32)
  whole = fid.FeatureStats(16).add(x)
  parts = [fid.FeatureStats(16).add(x[i:i + 10]) for i in range(0, 103, 10)]
  merged = fid.FeatureStats(16)
  for p in reversed(parts):
    merged.merge(p)
  x64 = x.astype(np.float64)
  for s in (whole, merged):
    assert s.n == 103
    np.testing.assert_allclose(s.mean(), x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.cov(), np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match=r"expected \[batch, 16\]"):
    whole.add(x[:, :8])
  with pytest.raises(ValueError, match="at least 2"):
    fid.FeatureStats(4).add(np.ones((1, 4))).cov()


def test_fid_of_a_set_with_itself_and_shuffled_copy():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(200, 24)) @ rng.normal(size=(24, 24))
  s1 = fid.FeatureStats(24).add(x)
  s2 = fid.FeatureStats(24).add(x[rng.permutation(200)])
  same = fid.frechet_distance(s1.mean(), s1.cov(), s1.mean(), s1.cov())
  shuffled = fid.frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov())
  other = fid.frechet_distance(s1.mean(), s1.cov(), s1.mean() + 1, s1.cov())
  assert abs(same) < 1e-6 and abs(shuffled) < 1e-6
  assert abs(other - 24) < 1e-6  # only the mean moved: |1|^2 * 24


def test_stats_files(tmp_path):
  rng = np.random.default_rng(7)
  mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(30, 8)), rowvar=False)
  path = tmp_path / "ref.npz"
  fid.save_stats(path, mu, sigma)
  with np.load(path) as f:  # pytorch-fid reads f["mu"], f["sigma"]
    np.testing.assert_array_equal(f["mu"], mu)
    np.testing.assert_array_equal(f["sigma"], sigma)
  m2, s2 = fid.load_stats(path, dim=8)
  np.testing.assert_array_equal(m2, mu)
  np.testing.assert_array_equal(s2, sigma)

  def one_line_error(p, match, **kw):
    with pytest.raises(fid.StatsFileError, match=match) as e:
      fid.load_stats(p, **kw)
    assert "\n" not in str(e.value)

  one_line_error(path, "2048-d", dim=2048)
  np.savez(tmp_path / "nosigma.npz", mu=mu)
  one_line_error(tmp_path / "nosigma.npz", r"no array\(s\) \['sigma'\]")
  np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:4])
  one_line_error(tmp_path / "shape.npz", r"mu \(8,\) and sigma \(4, 8\)")
  (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
  one_line_error(tmp_path / "junk.npz", "cannot read FID statistics")
  one_line_error(tmp_path / "absent.npz", "cannot read FID statistics")
  np.savez(tmp_path / "nan.npz", mu=mu * np.nan, sigma=sigma)
  one_line_error(tmp_path / "nan.npz", "NaN")

# Compared against an independent reference (PyTorch / numpy re-derivation): `-m "not parity"` skips.
pytestmark = pytest.mark.parity
