"""load_tensors reads torch.save files bit-exactly and refuses pickles that run code."""
import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from unidiffuser_jax.weights.tensors import UnsafeWeightsError, load_tensors, save_safetensors


def _bits(a: np.ndarray) -> np.ndarray:
  """Raw bytes, so that equality is bit-equality (NaNs, -0.0, bf16 included)."""
  return np.ascontiguousarray(a).view(np.uint8)


def _assert_bit_equal(ours: np.ndarray, theirs: torch.Tensor):
  want = theirs.contiguous()
  if want.dtype == torch.bfloat16:
    want_np = want.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  else:
    want_np = want.numpy()
  assert ours.dtype == want_np.dtype, (ours.dtype, want_np.dtype)
  assert ours.shape == want_np.shape
  np.testing.assert_array_equal(_bits(ours), _bits(want_np))


def _state_dict():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 10, generator=g)
  shared = torch.randn(40, generator=g)
  sd = collections.OrderedDict()
  sd["f32"] = torch.randn(3, 5, generator=g)
  sd["f32"][0, 0] = float("nan")
  sd["f32"][0, 1] = -0.0
  sd["f16"] = torch.randn(4, 3, generator=g).half()
  sd["bf16"] = torch.randn(2, 7, generator=g).bfloat16()
  sd["f64"] = torch.randn(3, generator=g).double()
  sd["i64"] = torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4)
  sd["i32"] = torch.arange(9, dtype=torch.int32)
  sd["u8"] = torch.arange(250, 256, dtype=torch.uint8)
  sd["bool"] = torch.tensor([True, False, True])
  sd["scalar"] = torch.tensor(3.5)
  sd["empty"] = torch.zeros(0, 4)
  sd["transposed"] = base.t()                          # non-contiguous
  sd["strided"] = base[::2, 1::3]                     # non-unit strides
  sd["view_a"] = shared[5:17].view(3, 4)               # shares storage, offset 5
  sd["view_b"] = shared[20:].view(4, 5).t()            # same storage, offset 20, transposed
  sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
  sd["bf16_t"] = torch.randn(3, 4, generator=g).bfloat16().t()
  return sd


def test_torch_save_round_trip_bit_equal(tmp_path):
  sd = _state_dict()
  path = tmp_path / "weights.pth"
  torch.save(sd, path)
  with zipfile.ZipFile(path) as zf:  # the views really share one storage blob
    assert len([n for n in zf.namelist() if "/data/" in n]) < len(sd)
  out = load_tensors(str(path))
  assert list(out) == list(sd)
  for name, t in sd.items():
    _assert_bit_equal(out[name], t.detach())


def test_nested_checkpoint_rule(tmp_path):
  sd = _state_dict()
  path = tmp_path / "ckpt.bin"
  torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, path)
  out = load_tensors(str(path))
  assert set(out) == set(sd)
  path2 = tmp_path / "ckpt2.pt"
  torch.save({"model": {"enc": {"w": sd["f32"]}, "step": 7}}, path2)
  out2 = load_tensors(str(path2))
  assert list(out2) == ["enc.w"]
  _assert_bit_equal(out2["enc.w"], sd["f32"])
  path3 = tmp_path / "plain.pth"
  torch.save({"module.w": sd["i64"], "extra": {"b": sd["f16"]}, "note": "hi"}, path3)
  out3 = load_tensors(str(path3))
  assert sorted(out3) == ["extra.b", "module.w"]  # "module." prefix is left alone


class _RunsCode:
  """Pickles as a call to os.system; loading it must never call anything."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Custom:
  pass


def test_refuses_code_execution(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(2), "payload": _RunsCode(str(marker))}, path)
  with zipfile.ZipFile(path) as zf:  # the file really does reference os.system
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")][0]
    assert b"system" in zf.read(pkl)
  with pytest.raises(UnsafeWeightsError, match=r"refusing to load global '(os|posix)\.system'"):
    load_tensors(str(path))
  assert not marker.exists()


def test_refuses_custom_class(tmp_path):
  path = tmp_path / "custom.pth"
  torch.save({"w": torch.ones(2), "cfg": _Custom()}, path)
  with pytest.raises(UnsafeWeightsError, match=r"test_safe_loading\._Custom"):
    load_tensors(str(path))


def test_refuses_out_of_bounds_view(tmp_path):
  """A crafted geometry that would read past its storage is rejected, not read."""
  path = tmp_path / "oob.pth"
  torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
  with zipfile.ZipFile(path) as zf:
    entries = {n: zf.read(n) for n in zf.namelist()}
  pkl_name = [n for n in entries if n.endswith("data.pkl")][0]
  # The pickle holds size (4,) as BININT1 4 after offset 0; turn the size into 40.
  pkl = entries[pkl_name]
  needle = b"K\x00K\x04\x85"
  assert pkl.count(needle) == 1
  entries[pkl_name] = pkl.replace(needle, b"K\x00K\x28\x85")
  with zipfile.ZipFile(path, "w") as zf:
    for n, data in entries.items():
      zf.writestr(n, data)
  with pytest.raises(UnsafeWeightsError, match="reaches element 39"):
    load_tensors(str(path))


def test_legacy_format_is_refused_clearly(tmp_path):
  path = tmp_path / "legacy.pth"
  with open(path, "wb") as f:
    pickle.dump({"w": 1}, f)
  with pytest.raises(ValueError, match="not a zip-format PyTorch file"):
    load_tensors(str(path))


def test_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "a": rng.standard_normal((3, 4)).astype(np.float32).T,  # non-contiguous input
      "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
      "c": np.arange(6, dtype=np.int64),
  }
  path = tmp_path / "w.safetensors"
  save_safetensors(str(path), tensors)
  out = load_tensors(str(path))
  for k, v in tensors.items():
    assert out[k].dtype == v.dtype and out[k].shape == v.shape
    np.testing.assert_array_equal(_bits(out[k]), _bits(v))
