"""`--mode=describe`: what a config builds, without building anything on a device.

Shapes and layouts come from train.build(abstract=True) (the trainer's own build, through
jax.eval_shape) on an AbstractMesh of the configured shape, so describing the 952M model on a
laptop costs nothing.
"""
import collections

import jax
import numpy as np

from unidiffuser_jax import lora, sharding, train
from unidiffuser_jax.models import uvit


def describe(config, num_devices: int | None = None) -> str:
  num_devices = num_devices or config.mesh.num_devices or jax.device_count()
  mesh = sharding.abstract_mesh(config.mesh, num_devices)
  sharding.check_batch_divisible(config.train.batch_size, mesh)
  model = uvit.from_config(config.model)
  built = train.build(lora.full_config(config), mesh, abstract=True)   # full fine-tuning's state
  state, specs = built.state, built.state_specs

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  lines = [f"params: {n_params}",
           f"mesh: {dict(zip(mesh.axis_names, mesh.axis_sizes))} ({num_devices} devices)",
           f"model: {config.model.version} width={config.model.width} depth={config.model.depth} "
           f"tokens={model.num_tokens} dtype={config.model.dtype} remat={config.model.remat}",
           "parameter groups (shape -> sharding):"]
  groups = collections.OrderedDict()
  flat_p = jax.tree_util.tree_flatten_with_path(state.params)[0]
  flat_s = jax.tree.leaves(specs.params, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for (path, leaf), spec in zip(flat_p, flat_s):
    name = "/".join(_key(k) for k in path)
    group = _group(name)
    groups.setdefault(group, []).append((name, leaf.shape, spec))
  for group, items in groups.items():
    specs_seen = sorted({f"{tuple(shape)} -> {spec}" for _, shape, spec in items[:64]})
    lines.append(f"  {group} ({len(items)} arrays): " + "; ".join(specs_seen[:4]) +
                 (" ..." if len(specs_seen) > 4 else ""))
  pb = sharding.bytes_per_device(state.params, specs.params, mesh)
  ob = sharding.bytes_per_device(state.opt_state, specs.opt_state, mesh)
  eb = sharding.bytes_per_device(state.ema_params, specs.ema_params, mesh)
  lines += [f"per-device bytes: params {_gib(pb)}, ema {_gib(eb)}, optimizer state {_gib(ob)}, "
            f"total {_gib(pb + eb + ob)}"]
  if lora.enabled(config):   # the LoRA fine-tune of the same model, against the full one above
    lines += lora.describe_lines(config, model, built.tx, mesh, built.rules, pb + eb + ob)
  return "\n".join(lines)


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _group(name: str) -> str:
  head = name.split("/")[0]
  for stem in ("in_blocks", "out_blocks"):
    if head.startswith(stem):
      return stem + "/" + "/".join(name.split("/")[1:-1])
  return head


def _gib(n: int) -> str:
  return f"{n / 2**30:.3f} GiB" if n >= 2**24 else f"{n / 2**20:.2f} MiB"
