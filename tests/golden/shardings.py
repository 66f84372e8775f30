"""Every parameter's PartitionSpec under a runbook's sharding rules: the golden dump.

One line per parameter, `path shape spec`, for the U-ViT (`uvit/...`, laid out as the
trainer lays out its state) and the frozen encoders (`<part>/...`, as train.build_frozen
lays them out), on the abstract mesh MESH: nothing is allocated and no device is needed.
A spec is one entry per dimension, comma-separated: `-` replicated, `fsdp`, `data+fsdp`
(a dimension split over two axes); `replicated` when no dimension is split.

Regenerate after an intended change of rules, models or configs, and review the diff:

  python -m tests.golden.shardings          # rewrites tests/golden/shardings_<config>.txt
"""
import importlib
import os
import tempfile

import jax
import ml_collections
from jax.sharding import PartitionSpec as P

from data_pipelines import demo_sets
from unidiffuser_jax import sharding, train, vocab

# Every mesh axis but data larger than one, so each rule shows; tests/test_aot.py lowers the
# real train step on the same mesh (8 fake CPU devices) and checks it against these files.
MESH = dict(data=1, fsdp=4, tensor=2)
NUM_DEVICES = 8
CONFIGS = ("demo", "laion")  # configs/<name>.py
HERE = os.path.dirname(os.path.abspath(__file__))


def path_of(config_name: str) -> str:
  return os.path.join(HERE, f"shardings_{config_name}.txt")


def param_path(keys) -> str:
  """A jax key path -> 'a/b/c' of its dict keys (drops TrainState fields and optax indices)."""
  return "/".join(str(k.key) for k in keys if isinstance(k, jax.tree_util.DictKey))


def format_spec(spec: P, ndim: int) -> str:
  dims = [spec[i] if i < len(spec) else None for i in range(ndim)]
  if all(d is None for d in dims):
    return "replicated"
  return ",".join("-" if d is None else (d if isinstance(d, str) else "+".join(d)) for d in dims)


def parse_spec(text: str) -> P:
  if text == "replicated":
    return P()
  dims = [None if d == "-" else (tuple(d.split("+")) if "+" in d else d) for d in text.split(",")]
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def state_specs(config, mesh):
  """(abstract TrainState, its PartitionSpecs): the trainer's U-ViT state (train.build)."""
  built = train.build(config, mesh, abstract=True)
  return built.state, built.state_specs


def _lines(prefix: str, abstract, specs) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  assert len(leaves) == len(spec_leaves)
  return [f"{prefix}/{param_path(path)} {'x'.join(map(str, leaf.shape)) or 'scalar'} "
          f"{format_spec(spec, leaf.ndim)}" for (path, leaf), spec in zip(leaves, spec_leaves)]


def _with_vocab(config):
  """The demo's vocabulary sizes come from its generated word-level tokenizer, as in a run
  (vocab.derive); laion's are its released tokenizers' (the model defaults)."""
  if not config.get("demo") or not config.demo.set:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  with tempfile.TemporaryDirectory() as tmp:  # derive reads the sizes; nothing is kept
    config.data.tokenizer = demo_sets.get(config.demo.set).build_tokenizer(tmp)
    return vocab.derive(config)


def dump(config_name: str) -> str:
  """The golden text of configs/<config_name>.py."""
  config = _with_vocab(importlib.import_module(f"configs.{config_name}").get_config())
  mesh = sharding.abstract_mesh(MESH, NUM_DEVICES)
  built = train.build(config, mesh, abstract=True)
  lines = _lines("uvit", built.state.params, built.state_specs.params)
  for part, abstract in built.frozen.items():
    lines += _lines(part, abstract, jax.tree.map(lambda a: a.sharding.spec, abstract))
  mesh_text = " ".join(f"{k}={v}" for k, v in MESH.items())
  header = [f"# configs/{config_name}.py: every parameter's PartitionSpec on mesh {mesh_text}.",
            "# Written by `python -m tests.golden.shardings`; do not edit by hand."]
  return "\n".join(header + sorted(lines)) + "\n"


def load(config_name: str) -> dict[str, tuple[str, P]]:
  """{path: (shape text, spec)} from the checked-in golden file."""
  out = {}
  with open(path_of(config_name)) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      path, shape, spec = line.split()
      out[path] = (shape, parse_spec(spec))
  return out


def main() -> None:
  for name in CONFIGS:
    text = dump(name)
    with open(path_of(name), "w") as f:
      f.write(text)
    print(f"{path_of(name)}: {text.count(chr(10)) - 2} parameters")


if __name__ == "__main__":
  main()
