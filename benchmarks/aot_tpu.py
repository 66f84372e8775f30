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
train step (train.make_train_step over train.uvit_task, jitted with the
trainer's shardings) is lowered and compiled for abstract inputs:
  state   jax.eval_shape(init) laid out by sharding.logical_to_specs (the trainer's rules)
  frozen  the caption decoder's parameters (encode_prefix is the only frozen network a
          features batch touches), abstract and sharded the same way
  batch   the features format {moments [B,64,64,8], clip_img [B,1,512],
          text_hidden [B,77,768], data_type [B]}, split over (data, fsdp)
Nothing is allocated; the printout is XLA's own per-device memory plan
(compiled.memory_analysis()) and FLOP count (compiled.cost_analysis()), and
whether arguments + outputs - aliased + temporaries fit in --hbm_gib.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; TPU devices are compile-only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu takes a machine-wide lock file; compile-only clients touch no chip, so two may coexist.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from unidiffuser_jax import encoders as encoders_lib  # noqa: E402
from unidiffuser_jax import rng, sharding, train  # noqa: E402

# HBM per chip. libtpu's compile-only v4 devices are single TensorCores (num_cores=1, two per
# chip, 16 GiB each); v5p devices are megacore chips (num_cores=2).
HBM_GIB = {"TPU v5 lite": 16, "TPU v4": 32, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def hbm_per_device(device) -> float:
  per_chip = HBM_GIB.get(device.device_kind, 16)
  if device.device_kind == "TPU v4" and getattr(device, "num_cores", 2) == 1:
    return per_chip / 2
  return per_chip


def load_config(spec: str):
  """'configs/laion.py[:arg]' -> ConfigDict."""
  import importlib.util
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


def abstract_with(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_frozen(encoders, mesh, rules, seed: int):
  """The caption decoder's parameters as sharded ShapeDtypeStructs (nothing allocated)."""
  boxed = jax.eval_shape(lambda: encoders._init_part("captioner", rng.key_for(seed, 0, "init/c")))
  shardings = sharding.named_shardings(sharding.logical_to_specs(boxed, mesh, rules), mesh)
  frozen_shardings = {"captioner": shardings}
  return abstract_with({"captioner": nn.unbox(boxed)}, frozen_shardings), frozen_shardings


def features_batch(config, model, batch: int, mesh) -> dict:
  f = config.encoders.autoencoder.factor
  h = config.data.resolution // f
  shapes = {"moments": ((batch, h, h, 2 * model.latent_channels), jnp.float32),
            "clip_img": ((batch, 1, model.clip_img_dim), jnp.float32),
            "text_hidden": ((batch, model.num_text_tokens, config.encoders.clip_text.width),
                            jnp.float32),
            "data_type": ((batch,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def _gib(n) -> str:
  return f"{n / 2**30:8.3f} GiB"


def report_memory(compiled, hbm_gib: float, label: str) -> bool:
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = arg + out - alias + temp
  print(f"[{label}] memory_analysis, per device:")
  print(f"  arguments {_gib(arg)} | outputs {_gib(out)} | aliased (donated) {_gib(alias)} | "
        f"temporaries {_gib(temp)} | code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB")
  fits = peak <= hbm_gib * 2**30
  print(f"  peak = arguments + outputs - aliased + temporaries = {_gib(peak)} of {hbm_gib} GiB HBM "
        f"-> {'FITS' if fits else 'DOES NOT FIT'} ({100 * peak / (hbm_gib * 2**30):.0f}%)")
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    print(f"  cost_analysis: {cost['flops'] / 1e12:.2f} TFLOP per device per step"
          + (f", {cost['bytes accessed'] / 2**30:.1f} GiB accessed" if "bytes accessed" in cost else ""))
  return fits


def compile_train(config, mesh, batch: int):
  rules = sharding.rules_from_config(config.sharding.rules)
  model = train.make_model(config.model)
  encoders = encoders_lib.build(config.encoders)
  task = train.uvit_task(model, encoders, int(config.seed))
  tx = train.make_optimizer(config.train)
  boxed = jax.eval_shape(train.init_fn(task, tx))
  state_shardings = sharding.named_shardings(sharding.logical_to_specs(boxed, mesh, rules), mesh)
  state = abstract_with(nn.unbox(boxed), state_shardings)
  frozen, frozen_shardings = abstract_frozen(encoders, mesh, rules, int(config.seed))
  step = train.compile_train_step(train.make_train_step(task, tx, config.train, int(config.seed)),
                                  mesh, state_shardings, frozen_shardings)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  t0 = time.perf_counter()
  # Traced under the config's logical-axis rules, as train.run_loop does: the U-ViT's
  # activation constraints (act_* names) resolve only there.
  with sharding.tracing_context(mesh, rules):
    lowered = step.lower(state, frozen, features_batch(config, model, batch, mesh))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  print(f"train step: {n_params:,} U-ViT parameters, global batch {batch} "
        f"({batch // sharding._axis_size(mesh, sharding.BATCH_AXES)} per data shard); "
        f"lowered in {t1 - t0:.0f} s, compiled in {t2 - t1:.0f} s")
  p_specs = jax.tree.map(lambda s: s.spec, state_shardings.params)
  p_bytes = sharding.bytes_per_device(state.params, p_specs, mesh)
  print(f"  parameters per device (float32 master copy): {_gib(p_bytes)}; params + EMA + AdamW "
        f"moments = 4x that = {_gib(4 * p_bytes)}")
  return compiled, model, state, mesh


def compile_sampler(config, model, state, mesh, batch: int):
  """One classifier-free-guided network evaluation of t2i sampling (what the solver's scan runs)."""
  params = state.ema_params
  b = batch
  img = config.data.resolution // config.encoders.autoencoder.factor
  bs = lambda nd: sharding.batch_sharding(mesh, nd)
  x = (jax.ShapeDtypeStruct((b, img, img, model.latent_channels), jnp.float32, sharding=bs(4)),
       jax.ShapeDtypeStruct((b, 1, model.clip_img_dim), jnp.float32, sharding=bs(3)),
       jax.ShapeDtypeStruct((b, model.num_text_tokens, model.text_dim), jnp.float32, sharding=bs(3)))

  def guided(params, z, clip, text):
    # conditional (t_text = 0) and unconditional (text noised to T) halves in one call.
    t = jnp.full((b,), 500.0)
    zz, cc = jnp.concatenate([z, z]), jnp.concatenate([clip, clip])
    tt = jnp.concatenate([text, jnp.zeros_like(text)])
    out = model.apply({"params": params}, zz, cc, tt, jnp.concatenate([t, t]),
                      jnp.concatenate([jnp.zeros((b,)), jnp.full((b,), 1000.0)]),
                      jnp.ones((2 * b,), jnp.int32))
    return jax.tree.map(lambda o: 8.0 * o[:b] - 7.0 * o[b:], out[:2])

  p_shardings = jax.tree.map(lambda a: a.sharding, params)
  fn = jax.jit(guided, in_shardings=(p_shardings, bs(4), bs(3), bs(3)))
  t0 = time.perf_counter()
  compiled = fn.lower(params, *x).compile()
  print(f"sampler network step (t2i, guided, batch {b} -> 2x{b} evaluations): compiled in "
        f"{time.perf_counter() - t0:.0f} s")
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
  hbm = args.hbm_gib or hbm_per_device(devices[0])
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
    compiled, model, state, mesh = compile_train(config, mesh, batch)
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
    ok &= report_memory(compile_sampler(config, model, state, mesh, sb), hbm, "sampler step")
  sys.stdout.flush()
  sys.stderr.flush()
  # libtpu 0.0.42 can segfault while tearing down its compile-only client; skip teardown.
  os._exit(0 if ok else 1)


if __name__ == "__main__":
  main()
