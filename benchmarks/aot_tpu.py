"""Ahead-of-time compile of the full-size train step for a TPU pod slice, on a CPU machine.

  pip install -r requirements-tpu.txt      # libtpu: the TPU compiler, no TPU needed to compile
  python benchmarks/aot_tpu.py                                 # v5e 16x16 (256 chips), configs/laion.py
  python benchmarks/aot_tpu.py --topology=v5p:4x4x4          # 64 chips, batch 2112 = 33 per chip
  python benchmarks/aot_tpu.py --mesh=fsdp=64,tensor=4         # any config.mesh override
  python benchmarks/aot_tpu.py --sampler                       # also the sampler's network step
  # libtpu installed elsewhere (e.g. pip install --target DIR):
  TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so python benchmarks/aot_tpu.py

jax.experimental.topologies.get_topology_desc() asks libtpu for compile-only
devices of a named topology. The config's mesh is built on them and the real
train step (train.build(abstract=True): the trainer's own build) is lowered and compiled for abstract inputs by
unidiffuser_jax/aot.py (state, frozen caption decoder, features batch
{moments [B,64,64,8], clip_img [B,1,512], text_hidden [B,77,768], data_type [B]}).
Nothing is allocated; the printout is XLA's own per-device memory plan
(compiled.memory_analysis()) and FLOP count (compiled.cost_analysis()), and
whether arguments + outputs - aliased + temporaries fit in --hbm_gib.
"""
import argparse
import importlib.util
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; TPU devices are compile-only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu takes a machine-wide lock file; compile-only clients touch no chip, so two may coexist.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from unidiffuser_jax import aot, sharding, train  # noqa: E402


def load_config(spec: str):
  """'configs/laion.py[:arg]' -> ConfigDict."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("aot_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def parse_mesh(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(",")):
    k, _, v = item.partition("=")
    out[k.strip()] = int(v)
  return out


def tpu_devices(topology: str):
  try:
    return topologies.get_topology_desc(topology, "tpu").devices
  except RuntimeError as e:
    raise SystemExit(f"cannot load libtpu ({e}); pip install -r requirements-tpu.txt or set "
                     f"TPU_LIBRARY_PATH to a libtpu.so") from e


def _gib(n) -> str:
  return f"{n / 2**30:8.3f} GiB"


def report_memory(compiled, hbm_gib: float, label: str) -> bool:
  lines, fits = aot.memory_report(compiled, hbm_gib, label)
  print("\n".join(lines))
  return fits


def compile_train(config, mesh, batch: int):
  plan = train.build(config, mesh, abstract=True)
  n_params = sum(x.size for x in jax.tree.leaves(plan.state.params))
  t0 = time.perf_counter()
  lowered = aot.lower_train(plan, config, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f"train step: {n_params:,} U-ViT parameters, global batch {batch} "
        f"({batch // sharding._axis_size(mesh, sharding.BATCH_AXES)} per data shard); "
        f"lowered in {t1 - t0:.0f} s, compiled in {t2 - t1:.0f} s")
  p_bytes = sharding.bytes_per_device(plan.state.params, plan.state_specs.params, mesh)
  print(f"  parameters per device (float32 master copy): {_gib(p_bytes)}; params + EMA + AdamW "
        f"moments = 4x that = {_gib(4 * p_bytes)}")
  return compiled, plan.state, mesh


def compile_sampler(config, state, mesh, batch: int):
  t0 = time.perf_counter()
  compiled = aot.lower_sampler(config, state.ema_params, mesh, batch).compile()
  print(f"sampler network step (t2i, guided, batch {batch} -> 2x{batch} evaluations): compiled "
        f"in {time.perf_counter() - t0:.0f} s")
  return compiled


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:16x16", help="libtpu topology name, e.g. "
                      "v5e:16x16 (256 chips), v5p:4x4x4, v4:4x4x4")
  parser.add_argument("--config", default="configs/laion.py")
  parser.add_argument("--mesh", default="", help="overrides of config.mesh, e.g. fsdp=64,tensor=4")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: config's, "
                      "rounded to the nearest multiple of data*fsdp)")
  parser.add_argument("--hbm_gib", type=float, default=0.0, help="HBM per device (default: by kind)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set model.depth=2 --set model.remat=none")
  parser.add_argument("--hlo_out", default="", help="write the optimised per-device HLO here")
  parser.add_argument("--sampler", action="store_true", help="also compile the sampler step")
  parser.add_argument("--sample_batch", type=int, default=0, help="default: one per data shard x 4")
  args = parser.parse_args()

  config = load_config(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    node = config
    *parents, leaf = key.split(".")
    for k in parents:
      node = node[k]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  devices = tpu_devices(args.topology)
  kind = devices[0].device_kind
  hbm = args.hbm_gib or aot.hbm_per_device(devices[0])
  mesh_cfg = dict(config.mesh)
  mesh_cfg.update(parse_mesh(args.mesh))
  mesh_cfg["num_devices"] = 0
  mesh = sharding.make_mesh(mesh_cfg, devices=devices)
  n_batch = sharding._axis_size(mesh, sharding.BATCH_AXES)
  want = args.batch or int(config.train.batch_size)
  batch = max(n_batch, round(want / n_batch) * n_batch)
  print(f"topology {args.topology}: {len(devices)} x {kind} ({hbm} GiB HBM each); jax "
        f"{jax.__version__}; mesh {dict(mesh.shape)}; config {args.config} "
        f"(model {config.model.version}, width {config.model.width}, depth {config.model.depth}, "
        f"dtype {config.model.dtype}, remat {config.model.remat})")
  if batch != want:
    print(f"global batch {want} is not a multiple of data*fsdp={n_batch}; using {batch}")
  try:
    compiled, state, mesh = compile_train(config, mesh, batch)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(f"[train step] DOES NOT FIT: the TPU compiler says: {str(e).splitlines()[0]}", flush=True)
    os._exit(1)
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(compiled.as_text())
  ok = report_memory(compiled, hbm, "train step")
  if args.sampler:
    sb = args.sample_batch or 4 * n_batch
    ok &= report_memory(compile_sampler(config, state, mesh, sb), hbm, "sampler step")
  sys.stdout.flush()
  sys.stderr.flush()
  # libtpu 0.0.42 can segfault while tearing down its compile-only client; skip teardown.
  os._exit(0 if ok else 1)


if __name__ == "__main__":
  main()
