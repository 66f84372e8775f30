"""Every parameter's sharding, for each runbook, against the checked-in golden dump.

tests/golden/shardings_<config>.txt lists each parameter of the U-ViT and of the frozen
encoders with its PartitionSpec under the config's rules (abstract init, nothing allocated).
A change of rules, model structure or fit_spec shows up here as a diff; after an intended
change regenerate with `python -m tests.golden.shardings` and review the diff in the commit.
tests/test_aot.py checks that the lowered train step hands the compiler these same layouts.
"""
import difflib

import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo, laion
from tests.golden import shardings as golden
from unidiffuser_jax import sharding

CONFIGS = {"demo": demo, "laion": laion}


@pytest.mark.slow
@pytest.mark.parametrize("name", golden.CONFIGS)
def test_every_parameter_matches_the_golden_dump(name):
  with open(golden.path_of(name)) as f:
    want = f.read()
  got = golden.dump(name)
  if got != want:
    diff = list(difflib.unified_diff(want.splitlines(), got.splitlines(), "golden", "now",
                                     lineterm="", n=0))
    pytest.fail(f"{len(diff)} diff lines vs {golden.path_of(name)} (regenerate with "
                f"`python -m tests.golden.shardings` if intended):\n" + "\n".join(diff[:60]))


@pytest.mark.slow
@pytest.mark.parametrize("name", golden.CONFIGS)
def test_ema_and_optimizer_state_follow_the_parameters(name):
  """The rest of the train state: EMA and both AdamW moments laid out as their parameter,
  every scalar (step, Adam's count) replicated."""
  config = CONFIGS[name].get_config()
  state, specs = golden.state_specs(config, sharding.abstract_mesh(golden.MESH, golden.NUM_DEVICES))
  want = {p[len("uvit/"):]: s for p, (_, s) in golden.load(name).items() if p.startswith("uvit/")}
  copies = dict.fromkeys(want, 0)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(leaves, spec_leaves, strict=True):
    name_ = jax.tree_util.keystr(path)
    if leaf.ndim == 0:
      assert spec == P(), name_
      continue
    key = golden.param_path(path)
    assert spec == want[key], f"{name_}: {spec} != {want[key]}"
    copies[key] += 1
  # params, ema_params, mu, nu
  assert set(copies.values()) == {4}, {k: v for k, v in copies.items() if v != 4}


# A few layouts spelled out by hand, so that a regenerated file is also checked against intent
# (configs/common.py's rules: embed -> fsdp, mlp / heads -> tensor; LayerNorms replicated).
ANCHORS = {
    "uvit/out_blocks_0/attn/qkv/kernel": ("1536x4608", P("fsdp", "tensor")),
    "uvit/out_blocks_0/attn/proj/kernel": ("1536x1536", P("tensor", "fsdp")),
    "uvit/mid_block/mlp/fc1/bias": ("6144", P("tensor")),
    "uvit/in_blocks_0/mlp/fc2/kernel": ("6144x1536", P("tensor", "fsdp")),
    "uvit/pos_embed": ("1x1104x1536", P()),  # replicated: configs/common.py, pos_width
    "uvit/mid_block/norm2/scale": ("1536", P()),
    "uvit/text_out/kernel": ("1536x64", P("fsdp")),
}


def test_golden_laion_agrees_with_hand_written_anchors():
  table = golden.load("laion")
  for path, want in ANCHORS.items():
    assert table[path] == want, (path, table[path])
  assert len(table) > 1000  # every parameter, not a selection
