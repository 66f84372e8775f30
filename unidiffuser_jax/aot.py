"""Ahead-of-time planning of the train and sample steps: abstract inputs, no arrays.

Everything here works on jax.ShapeDtypeStructs laid out by the trainer's shardings, so the
full-size train step can be lowered and compiled for any mesh (compile-only TPU devices from
libtpu, or fake CPU devices in the tests) without allocating a parameter:
  state   jax.eval_shape(train.init_fn) laid out by sharding.logical_to_specs (the trainer's rules)
  frozen  the caption decoder's parameters (encode_prefix is the only frozen network a
          features batch touches), abstract and sharded the same way
  batch   the features format {moments [B,h,w,2C], clip_img [B,1,D], text_hidden [B,L,W],
          data_type [B]}, split over (data, fsdp)
benchmarks/aot_tpu.py is the command line over this module; tests/test_aot.py checks what the
compiler is handed.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax import rng, sharding, train
from unidiffuser_jax.models import uvit

# HBM per chip. libtpu's compile-only v4 devices are single TensorCores (num_cores=1, two per
# chip, 16 GiB each); v5p devices are megacore chips (num_cores=2).
HBM_GIB = {"TPU v5 lite": 16, "TPU v4": 32, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def hbm_per_device(device) -> float:
  per_chip = HBM_GIB.get(device.device_kind, 16)
  if device.device_kind == "TPU v4" and getattr(device, "num_cores", 2) == 1:
    return per_chip / 2
  return per_chip


def abstract_with(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def abstract_encoder_params(encoders, seed: int, parts=encoders_lib.PARTS) -> dict:
  """{part: boxed abstract parameters} of the frozen networks, initialised as
  Encoders.load_params does (jax.eval_shape: nothing allocated)."""
  init = lambda part: encoders._init_part(  # pylint: disable=protected-access
      part, rng.key_for(seed, 0, f"init/{part}"))
  return {part: jax.eval_shape(lambda part=part: init(part)) for part in parts}


def abstract_frozen(encoders, mesh, rules, seed: int):
  """({"captioner": sharded ShapeDtypeStructs}, {"captioner": shardings}): the caption decoder."""
  boxed = abstract_encoder_params(encoders, seed, parts=("captioner",))
  shardings = sharding.named_shardings(sharding.logical_to_specs(boxed, mesh, rules), mesh)
  return abstract_with(nn.unbox(boxed), shardings), shardings


def features_batch(config, model: uvit.UViT, batch: int, mesh) -> dict:
  """An abstract features batch of `batch` examples split over (data, fsdp)."""
  f = config.encoders.autoencoder.factor
  h = config.data.resolution // f
  shapes = {"moments": ((batch, h, h, 2 * model.latent_channels), jnp.float32),
            "clip_img": ((batch, 1, model.clip_img_dim), jnp.float32),
            "text_hidden": ((batch, model.num_text_tokens, config.encoders.clip_text.width),
                            jnp.float32),
            "data_type": ((batch,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """The real train step, jitted with the trainer's shardings, and its abstract arguments."""
  model: uvit.UViT
  step: object               # jitted (state, frozen, batch) -> (state, metrics)
  state: train.TrainState    # ShapeDtypeStructs with shardings
  specs: train.TrainState    # the state's PartitionSpecs
  frozen: dict               # {"captioner": abstract parameters}
  mesh: jax.sharding.Mesh
  rules: tuple


def plan_train(config, mesh) -> TrainPlan:
  """train.make_train_step over train.uvit_task, as the trainer builds it, for abstract inputs."""
  seed = int(config.seed)
  rules = sharding.rules_from_config(config.sharding.rules)
  model = train.make_model(config.model)
  encoders = encoders_lib.build(config.encoders)
  task = train.uvit_task(model, encoders, seed)
  tx = train.make_optimizer(config.train)
  boxed = jax.eval_shape(train.init_fn(task, tx))
  specs = sharding.logical_to_specs(boxed, mesh, rules)
  state_shardings = sharding.named_shardings(specs, mesh)
  state = abstract_with(nn.unbox(boxed), state_shardings)
  frozen, frozen_shardings = abstract_frozen(encoders, mesh, rules, seed)
  step = train.compile_train_step(train.make_train_step(task, tx, config.train, seed), mesh,
                                  state_shardings, frozen_shardings)
  return TrainPlan(model, step, state, specs, frozen, mesh, rules)


def lower_train(plan: TrainPlan, config, batch: int):
  """Lowers the train step for a global `batch`. Traced under the config's logical-axis rules, as
  train.run_loop does: the U-ViT's activation constraints (act_* names) resolve only there."""
  with sharding.tracing_context(plan.mesh, plan.rules):
    return plan.step.lower(plan.state, plan.frozen,
                           features_batch(config, plan.model, batch, plan.mesh))


def lower_sampler(config, model: uvit.UViT, params, mesh, batch: int):
  """One classifier-free-guided network evaluation of t2i sampling (what the solver's scan
  runs), for abstract sharded `params` (e.g. a TrainPlan's state.ema_params)."""
  b = batch
  img = config.data.resolution // config.encoders.autoencoder.factor
  bs = lambda nd: sharding.batch_sharding(mesh, nd)
  x = (jax.ShapeDtypeStruct((b, img, img, model.latent_channels), jnp.float32, sharding=bs(4)),
       jax.ShapeDtypeStruct((b, 1, model.clip_img_dim), jnp.float32, sharding=bs(3)),
       jax.ShapeDtypeStruct((b, model.num_text_tokens, model.text_dim), jnp.float32,
                            sharding=bs(3)))

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
  return fn.lower(params, *x)


def _gib(n) -> str:
  return f"{n / 2**30:8.3f} GiB"


def memory_report(compiled, hbm_gib: float, label: str) -> tuple[list[str], bool]:
  """(printable lines, fits): XLA's per-device memory plan and FLOP count of `compiled`."""
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = arg + out - alias + temp
  fits = peak <= hbm_gib * 2**30
  lines = [
      f"[{label}] memory_analysis, per device:",
      f"  arguments {_gib(arg)} | outputs {_gib(out)} | aliased (donated) {_gib(alias)} | "
      f"temporaries {_gib(temp)} | code {mem.generated_code_size_in_bytes / 2**20:.1f} MiB",
      f"  peak = arguments + outputs - aliased + temporaries = {_gib(peak)} of {hbm_gib} GiB HBM "
      f"-> {'FITS' if fits else 'DOES NOT FIT'} ({100 * peak / (hbm_gib * 2**30):.0f}%)"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    lines.append(f"  cost_analysis: {cost['flops'] / 1e12:.2f} TFLOP per device per step"
                 + (f", {cost['bytes accessed'] / 2**30:.1f} GiB accessed"
                    if "bytes accessed" in cost else ""))
  return lines, fits
