"""Parity of our LoRA with peft's LoRA on diffusers' UniDiffuserModel (independent PyTorch code).

peft adapts diffusers' attn1.to_q / to_k / to_v (rank r each), attn1.to_out.0, ff.net.0.proj and
ff.net.2 (rank 3r) of every block; ours adapts the fused attn.qkv, attn.proj, mlp.fc1 and mlp.fc2
at rank 3r. Three rank-r adapters on q, k and v are one rank-3r adapter on the fused qkv
(A: the three A's side by side, B: block diagonal), so the same weights give the same function;
peft's alpha for q/k/v is a third of the others' so every scale is alpha / 3r. B is random (not
zero) so the adapters change the output.
"""
import numpy as np
import pytest
import torch

import jax.numpy as jnp
from safetensors.numpy import save_file

from unidiffuser_jax import lora
from unidiffuser_jax.models.uvit import UViT
from unidiffuser_jax.weights import uvit as wuvit
from unidiffuser_jax.weights.tensors import load_tensors
from tests.refs import uvit as uvit_ref

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.parity

R, ALPHA = 2, 5.0   # peft's q/k/v rank; ours (and peft's other layers) 3R
PER_BLOCK = {"attn1.to_out.0": "attn/proj", "ff.net.0.proj": "mlp/fc1", "ff.net.2": "mlp/fc2"}


def _ours_block(released: str) -> str:
  return released.replace(".", "_") if released != "mid_block" else released


@pytest.fixture(scope="module", params=["v0", "v1"])
def setup(request, tmp_path_factory):
  version = request.param
  torch_model = uvit_ref.torch_model(version)
  released = uvit_ref.diffusers_to_released(torch_model.state_dict(), version)
  path = tmp_path_factory.mktemp(version) / "base.safetensors"
  save_file(released, str(path))
  model = UViT(version=version, **uvit_ref.CFG)
  params = wuvit.import_uvit(load_tensors(str(path)), model)
  _, blocks = wuvit.diffusers_names(version, uvit_ref.DEPTH)
  names = [f"{theirs}.attn1.to_{n}" for _, theirs in blocks for n in "qkv"]
  names += [f"{theirs}.{t}" for _, theirs in blocks for t in PER_BLOCK]
  qkv = [n for n in names if ".attn1.to_" in n and not n.endswith("to_out.0")]
  cfg = peft.LoraConfig(r=3 * R, lora_alpha=ALPHA, target_modules=names, lora_dropout=0.0,
                        rank_pattern={n: R for n in qkv}, alpha_pattern={n: ALPHA / 3 for n in qkv})
  peft_model = peft.inject_adapter_in_model(cfg, uvit_ref.torch_model(version))
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for n, p in peft_model.named_parameters():
      if "lora_" in n:   # random A and B: the adapters change the function
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  peft_model.eval()
  return version, torch_model, peft_model, model, params, blocks


def _ours_from_peft(peft_model, blocks, num_heads: int) -> dict:
  """peft's adapter weights -> ours ({module path: {lora_a [in, 3R], lora_b [3R, out]}})."""
  sd = {k: v.detach().numpy() for k, v in peft_model.state_dict().items() if "lora_" in k}
  get = lambda name, which: sd[f"{name}.lora_{which}.default.weight"]
  flat = {}
  for released, theirs in blocks:
    ours = _ours_block(released)
    for t, o in PER_BLOCK.items():
      flat[f"{ours}/{o}"] = {lora.A: get(f"{theirs}.{t}", "A").T, lora.B: get(f"{theirs}.{t}", "B").T}
    a = np.concatenate([get(f"{theirs}.attn1.to_{n}", "A").T for n in "qkv"], axis=1)  # [W, 3R]
    width = a.shape[0]
    b_rel = np.zeros((3 * width, 3 * R), np.float32)   # rows (3, heads, head_dim), as released
    for i, n in enumerate("qkv"):
      b_rel[i * width:(i + 1) * width, i * R:(i + 1) * R] = get(f"{theirs}.attn1.to_{n}", "B")
    # Our qkv columns are (heads, 3, head_dim).
    b = b_rel.reshape(3, num_heads, width // num_heads, 3 * R).transpose(1, 0, 2, 3)
    flat[f"{ours}/attn/qkv"] = {lora.A: a, lora.B: b.reshape(3 * width, 3 * R).T}
  return lora._nest({f"{m}/{w}": v for m, ab in flat.items() for w, v in ab.items()})


def _run_ours(model, params, x, adapters=None):
  args = {k: (jnp.asarray(v) if v is not None else None) for k, v in x.items()}
  if adapters is None:
    return tuple(np.asarray(o) for o in model.apply({"params": params}, **args))
  with lora.applied(adapters, ALPHA / (3 * R)):
    return tuple(np.asarray(o) for o in model.apply({"params": params}, **args))


def test_adapter_forward_matches_peft(setup):
  version, torch_model, peft_model, model, params, blocks = setup
  x = uvit_ref.inputs(version)
  adapters = _ours_from_peft(peft_model, blocks, model.num_heads)
  assert set(lora.flatten(adapters)) == set(lora.targets(params, lora.LoraConfig(
      3 * R, ALPHA, 0.0, r"(in_blocks_\d+|mid_block|out_blocks_\d+)/(attn/(qkv|proj)|mlp/(fc1|fc2))"
  ).targets))
  want, base_t = uvit_ref.run_torch(peft_model, x), uvit_ref.run_torch(torch_model, x)
  got, base_o = _run_ours(model, params, x, adapters), _run_ours(model, params, x)
  merged = _run_ours(model, lora.merge(params, adapters, ALPHA / (3 * R)), x)
  for name, w, g, m, bt, bo in zip(("z", "clip_img", "text"), want, got, merged, base_t, base_o):
    assert np.abs(w - bt).max() > 0.1, name       # the adapters change peft's output
    err = np.abs(g - w).max()
    print(f"{version} {name}: max abs err {err:.2e} (output scale {np.abs(w).max():.2f}, "
          f"the adapters' change {np.abs(w - bt).max():.2f})")
    assert err <= 1e-5, (name, err)
    np.testing.assert_allclose(m, g, atol=1e-5, rtol=0)   # merged == unmerged
    assert np.abs(bo - bt).max() <= 1e-5, name


def test_merged_export_loads_strict_into_diffusers_and_matches_peft(setup):
  version, _, peft_model, model, params, blocks = setup
  adapters = _ours_from_peft(peft_model, blocks, model.num_heads)
  exported = wuvit.export_uvit(lora.merge(params, adapters, ALPHA / (3 * R)), model)
  fresh = uvit_ref.torch_model(version, seed=5)
  missing, unexpected = fresh.load_state_dict(uvit_ref.released_to_diffusers(exported, version),
                                              strict=True)
  assert not missing and not unexpected
  x = uvit_ref.inputs(version)
  for w, g in zip(uvit_ref.run_torch(peft_model, x), uvit_ref.run_torch(fresh.eval(), x)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
