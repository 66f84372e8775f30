"""Ahead-of-time inputs of the train and sample steps: abstract, no arrays.

The state and frozen encoders come from train.build(config, mesh, abstract=True) (the trainer's
one build, as ShapeDtypeStructs carrying its shardings); this module adds the abstract batch
(the features format {moments [B,h,w,2C], clip_img [B,1,D], text_hidden [B,L,W], data_type [B]},
split over (data, fsdp)) and the sampler's guided network call, so the full-size steps can be
lowered and compiled for any mesh (compile-only TPU devices from libtpu, or CPU devices)
without allocating a parameter. tests/test_aot.py checks what the compiler is handed.
"""
import jax
import jax.numpy as jnp

from unidiffuser_jax import sharding, train
from unidiffuser_jax.models import uvit

# HBM per chip. libtpu's compile-only v4 devices are single TensorCores (num_cores=1, two per
# chip, 16 GiB each); v5p devices are megacore chips (num_cores=2).
HBM_GIB = {"TPU v5 lite": 16, "TPU v4": 32, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32}


def hbm_per_device(device) -> float:
  per_chip = HBM_GIB.get(device.device_kind, 16)
  if device.device_kind == "TPU v4" and getattr(device, "num_cores", 2) == 1:
    return per_chip / 2
  return per_chip


def features_batch(config, batch: int, mesh) -> dict:
  """An abstract features batch of `batch` examples split over (data, fsdp)."""
  model = uvit.from_config(config.model)
  f = config.encoders.autoencoder.factor
  h = config.data.resolution // f
  shapes = {"moments": ((batch, h, h, 2 * model.latent_channels), jnp.float32),
            "clip_img": ((batch, 1, model.clip_img_dim), jnp.float32),
            "text_hidden": ((batch, model.num_text_tokens, config.encoders.clip_text.width),
                            jnp.float32),
            "data_type": ((batch,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def lower_train(built: train.Built, config, batch: int):
  """The built train step lowered for an abstract features batch of global size `batch`."""
  return built.lower(features_batch(config, batch, built.mesh))


def lower_sampler(config, params, mesh, batch: int):
  """One classifier-free-guided network evaluation of t2i sampling (what the solver's scan
  runs), for abstract sharded `params` (e.g. a Built's state.ema_params)."""
  model = uvit.from_config(config.model)
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
  rules = sharding.rules_from_config(config.sharding.rules)
  fn = jax.jit(sharding.traced_under(guided, mesh, rules),
               in_shardings=(p_shardings, bs(4), bs(3), bs(3)))
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
