"""Device mesh, logical-axis rules and sharded creation of parameters and batches.

Models name their parameter axes logically ('embed', 'mlp', 'heads', ...). The
config maps those names to mesh axes ('data', 'fsdp', 'tensor'), so moving from
pure data parallelism to FSDP or tensor parallelism is a config change only.
"""
import contextlib
import functools
from collections.abc import Mapping, Sequence
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from unidiffuser_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the (data, fsdp, tensor) sizes; at most one may be -1 (fill)."""
  mesh_cfg = {k: v for k, v in mesh_cfg.items() if k != "num_devices"}
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; use only {MESH_AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("config.mesh: at most one axis may be -1 (fill the remaining devices)")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by "
          f"{known}; change the fixed mesh axes so their product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
        f"{num_devices} are available; set --config.mesh.* so the product is {num_devices} "
        f"(or set one axis to -1)")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  wanted = int(mesh_cfg.get("num_devices", 0) or 0)
  if wanted > len(devices):
    raise ConfigError(f"config.mesh.num_devices={wanted} but only {len(devices)} devices are "
                      f"present; lower it or set it to 0 (use all)")
  devices = devices[:wanted] if wanted else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
  except NotImplementedError as e:   # a TPU torus: every mesh axis must be whole torus axes
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, shape))} cannot be laid out on these "
                      f"devices' torus: {str(e).splitlines()[0]}") from None


def abstract_mesh(mesh_cfg: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """A device-free mesh of the configured shape, for `describe` and AOT planning."""
  shape = mesh_shape(mesh_cfg, num_devices)
  return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def rules_from_config(rules_cfg) -> tuple[tuple[str, object], ...]:
  """config.sharding.rules: a sequence of (logical_name, mesh_axis | [mesh_axes] | None)."""
  rules = []
  for logical, mesh_axes in rules_cfg:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for a in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if a is not None and a not in MESH_AXES:
        raise ConfigError(f"config.sharding.rules maps {logical!r} to unknown mesh axis {a!r}; "
                          f"use one of {MESH_AXES} or None")
    rules.append((logical, mesh_axes))
  return tuple(rules)


def _axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (those dims stay replicated).

  Small models and odd dims (e.g. 3 RGB channels, 77 tokens) cannot always be
  split; replicating them is correct, only less memory-efficient.
  """
  fitted = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    fitted.append(axes if shape[i] % _axis_size(mesh, axes) == 0 else None)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def logical_to_specs(abstract_boxed_tree, mesh, rules) -> object:
  """PartitionSpecs (mesh axes) for a tree whose leaves may be nn.Partitioned boxes."""
  logical = nn.get_partition_spec(abstract_boxed_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_boxed_tree))
  return jax.tree.map(lambda s, shp: fit_spec(s, shp, mesh), mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def named_shardings(specs, mesh) -> object:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def abstract_with(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch_divisible(global_batch: int, mesh, what: str = "config.train.batch_size") -> None:
  n = _axis_size(mesh, BATCH_AXES)
  if global_batch % n:
    raise ConfigError(
        f"{what}={global_batch} is not divisible by the data-parallel mesh size "
        f"data*fsdp={n}; use a multiple of {n}")


def to_global(host_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax arrays split over (data, fsdp)."""
  out = {}
  for name, x in host_batch.items():
    x = np.asarray(x)
    out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return out


def bytes_per_device(abstract_tree, specs, mesh) -> int:
  """Bytes one device holds for a tree of ShapeDtypeStructs laid out by `specs`."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract_tree),
                        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    n = 1
    for i, d in enumerate(leaf.shape):
      axes = spec[i] if i < len(spec) else None
      n *= d // _axis_size(mesh, axes)
    total += n * jnp.dtype(leaf.dtype).itemsize
  return total


@contextlib.contextmanager
def tracing_context(mesh, rules):
  """Where jitted model code must be traced: the models' activation constraints (logical
  names, nn.with_logical_constraint) resolve against this mesh and these rules.

  jax.set_mesh, not the legacy `with mesh:`: flax looks the mesh up with
  jax.sharding.get_abstract_mesh(), which only set_mesh installs; under `with mesh:` every
  constraint silently vanished and the laion config needed 53 GiB of temporaries per v5e
  chip instead of ~2 (--mode=compile, depth 2; benchmarks/README.md).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def traced_under(fn, mesh, rules):
  """`fn` that, whenever it is traced (jit, eval_shape, lower), resolves the models' logical
  activation constraints against `mesh` (a Mesh or AbstractMesh) and `rules`, whatever
  context the caller is in: jit(traced_under(step, ...)) carries its constraints into every
  program it lowers, so no entry point can drop them by calling it outside tracing_context."""
  abstract = getattr(mesh, "abstract_mesh", mesh)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped
