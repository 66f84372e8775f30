"""The full-width train step as the compiler receives it: shardings, donation, bytes.

The laion config's U-ViT (width 1536, 24 heads, MLP 6144, 64x64x4 latents,
bfloat16, remat per block; depth cut to 2 so lowering stays fast: every block
has the same parameters, so deeper models shard identically) is built by
train.build(abstract=True) and lowered (not compiled, not run) on an
8-device CPU mesh data=1, fsdp=4, tensor=2. The per-argument and per-result
shardings are parsed from the lowered module's `main` signature (Shardy
attributes, i.e. what XLA's partitioner receives) and compared, for every
parameter, EMA copy and AdamW moment, with the golden dump
tests/golden/shardings_laion.txt (tests/test_shardings_golden.py), and for the
batch with hand-written PartitionSpecs. No libtpu.
"""
import math
import re

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec as P

from configs import laion
from tests.golden import shardings as golden
from unidiffuser_jax import aot, sharding, train
from unidiffuser_jax.models import uvit

BATCH = 8


@pytest.fixture(scope="module")
def lowered():
  config = laion.get_config()
  config.model.depth = 2
  mesh = sharding.make_mesh(golden.MESH)
  built = train.build(config, mesh, abstract=True)
  low = aot.lower_train(built, config, BATCH)
  return dict(text=low.as_text(), state=built.state, specs=built.state_specs, mesh=mesh)


def _dims(inner: str) -> tuple:
  """'{"fsdp"}, {}' -> (('fsdp',), ())"""
  return tuple(tuple(re.findall(r'"(\w+)"', d)) for d in re.findall(r"\{([^}]*)\}", inner))


def _main_signature(text: str) -> tuple[list, dict]:
  start = text.index("func.func public @main(")
  end = text.index("{\n", start)
  sig = text[start:end]
  args_part, results_part = sig.split(") -> (", 1)
  args = [(int(i), shape, _dims(inner), "tf.aliasing_output" in rest)
          for i, shape, inner, rest in re.findall(
              r"%arg(\d+): tensor<([^>]*)> \{sdy\.sharding = #sdy\.sharding<@mesh, \[(.*?)\][^>]*>"
              r"([^}]*)\}", args_part)]
  results = {name: (shape, _dims(inner)) for shape, name, inner in re.findall(
      r'tensor<([^>]*)> \{jax\.result_info = "([^"]*)", sdy\.sharding = '
      r"#sdy\.sharding<@mesh, \[(.*?)\]", results_part)}
  return args, results


def _as_dims(spec: P, ndim: int) -> tuple:
  out = []
  for i in range(ndim):
    a = spec[i] if i < len(spec) else None
    out.append(() if a is None else ((a,) if isinstance(a, str) else tuple(a)))
  return tuple(out)


def _shape_str(shape, dtype) -> str:
  return "x".join(map(str, shape)) + ("x" if shape else "") + {"float32": "f32", "int32": "i32"}[
      str(dtype)]


def _state_args(lowered):
  """[(keystr, param path, leaf, arg dims, donated)]: the state's leaves are main's first
  arguments, in order."""
  args, _ = _main_signature(lowered["text"])
  leaves = jax.tree_util.tree_flatten_with_path(lowered["state"])[0]
  assert len(args) > len(leaves)
  out = []
  for (path, leaf), (i, shape, dims, donated) in zip(leaves, args):
    name = jax.tree_util.keystr(path)
    assert shape == _shape_str(leaf.shape, leaf.dtype), (i, name, shape, leaf.shape)
    out.append((name, golden.param_path(path), leaf, dims, donated))
  return out


@pytest.mark.slow
def test_every_state_sharding_is_golden(lowered):
  """Each parameter, its EMA copy and both AdamW moments, in and out, as the golden dump says."""
  _, results = _main_signature(lowered["text"])
  table = golden.load("laion")
  copies = {}
  for name, path, leaf, dims, _ in _state_args(lowered):
    if leaf.ndim == 0:  # the step counter and Adam's count are replicated
      assert dims == (), name
      continue
    shape, spec = table[f"uvit/{path}"]  # depth 2's blocks are the first blocks of depth 30
    assert shape == "x".join(map(str, leaf.shape)), (name, shape)
    want = _as_dims(spec, leaf.ndim)
    assert dims == want, f"input {name}: {dims} != {want}"
    _, out_dims = results[f"result[0]{name}"]
    assert out_dims == want, f"output {name}: {out_dims} != {want}"
    copies[path] = copies.get(path, 0) + 1
  assert set(copies.values()) == {4}, copies  # params, ema_params, mu, nu
  assert "out_blocks_0/skip_linear/kernel" in copies and "pos_embed" in copies


def test_state_is_donated_and_batch_is_split_over_data_axes(lowered):
  state_args = _state_args(lowered)
  assert all(donated for *_, donated in state_args), "train state must alias its outputs"
  args, results = _main_signature(lowered["text"])
  by_shape = {shape: dims for _, shape, dims, _ in args[len(state_args):]}
  assert by_shape[f"{BATCH}x64x64x8xf32"] == (("data", "fsdp"), (), (), ())   # moments
  assert by_shape[f"{BATCH}x77x768xf32"] == (("data", "fsdp"), (), ())        # text_hidden
  assert by_shape[f"{BATCH}xi32"] == (("data", "fsdp"),)                     # data_type
  assert results["result[1]['loss']"][1] == ()                              # metrics replicated


def test_per_device_parameter_bytes(lowered):
  mesh = lowered["mesh"]
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  per_device = total = whole = 0
  for name, _, leaf, dims, _ in _state_args(lowered):
    if not name.startswith(".params"):
      continue
    n = math.prod(leaf.shape) * leaf.dtype.itemsize
    split = math.prod(size(d) for d in dims)
    if name.endswith(("['qkv']['kernel']", "['fc1']['kernel']", "['fc2']['kernel']")):
      assert split == 8, name  # the big matrices are cut over every device
    assert n % split == 0, name
    per_device += n // split
    total += n
    whole += n if split == 1 else 0
  # what --mode=describe reports must be what the compiler is asked to hold
  assert per_device == sharding.bytes_per_device(lowered["state"].params, lowered["specs"].params,
                                                 mesh)
  # Replicated by the rules: LayerNorms, small biases and the position tables (pos_width, 6.8 MB
  # here; configs/common.py); everything else is cut 8 ways.
  assert whole < 0.025 * total, whole / total
  assert 7.5 < (total - whole) / (per_device - whole) <= 8.0


def test_activation_constraints_reach_the_compiler():
  """Under the trainer's tracing context the U-ViT's residual stream is pinned to batch
  sharding (under the legacy `with mesh:` flax silently dropped every constraint: 0 here)."""
  config = laion.get_config()
  config.model.update(depth=2, width=64, num_heads=2, mlp_dim=128)
  mesh = sharding.make_mesh(golden.MESH)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = uvit.from_config(config.model)
  args = uvit.dummy_inputs(model, BATCH)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *args)["params"]))
  fn = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  with sharding.tracing_context(mesh, rules):
    text = fn.lower(params, *args).as_text()
  pinned = re.findall(r'sdy.sharding_constraint [^\n]*\[\{"data", "fsdp"\}, \{\}, \{\}\]', text)
  # tokens in, norm2 and norm3 of every block, norm1 of the skip block, the final norm
  assert len(pinned) >= 2 * 3 + 1 + 2, len(pinned)
