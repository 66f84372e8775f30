"""LoRA vs full fine-tuning: the trainer's step time and XLA's memory plan, same model and batch.

  python benchmarks/bench_lora.py                    # configs/demo.py's U-ViT and batch, rank 8
  python benchmarks/bench_lora.py --quick            # configs/demo.py:tiny, few steps: sanity only
  python benchmarks/bench_lora.py --rank=16 --base_dtype=bfloat16
  python benchmarks/bench_lora.py --laion_memory --batch=8   # configs/laion.py on ONE device:
                                                   # XLA's memory plan of both steps, no arrays

Both sides are train.make_train_step (the function the trainer jits, with its shardings, on one
device) over the U-ViT objective on a synthetic batch through the demo's encoders: full
fine-tuning (train.uvit_task: params, EMA and AdamW state of every weight) and LoRA
(lora.wrap_task: the base a frozen input, adapters on config.train.lora.targets). Reported per
side: median step time over --steps timed steps after --warmup, and compiled.memory_analysis()
(arguments, outputs, temporaries) of the jitted step on this backend.

--laion_memory compiles both steps of configs/laion.py (952M U-ViT, bf16 compute, remat per
block) for one device of this backend from abstract inputs (unidiffuser_jax/aot.py: features
batch, the caption decoder the only frozen encoder, nothing allocated) and prints XLA's
per-device memory plan against 16 and 24 GiB; nothing is timed.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from configs import laion as laion_config  # noqa: E402
from data_pipelines import synthetic  # noqa: E402
from unidiffuser_jax import aot, encoders as encoders_lib, lora, sharding, train, vocab  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402
from unidiffuser_jax.diffusion import objective  # noqa: E402


def _config(args):
  c = demo_config.get_config("tiny" if args.quick else None)
  c.runbook = ""
  c.data.source = "synthetic"
  c.encoders.fit_latent_stats = 0
  c.mesh = dict(data=1, fsdp=1, tensor=1, num_devices=1)
  c.train.lora.update(rank=args.rank, base_dtype=args.base_dtype)
  return vocab.derive(c)


def _build(name, task, frozen, frozen_sh, config, mesh, batch):
  """-> a thunk running one step (state carried), after compiling; prints the memory plan."""
  built = train.build_task(config, config.train, task, mesh, frozen, frozen_sh)
  state = built.state
  t0 = time.perf_counter()
  compiled = built.lower(batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  n_trained = sum(x.size for x in jax.tree.leaves(state.params))
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  print(f"{name:>5}: compile {compile_s:.1f} s, trained params {n_trained:,}, memory_analysis: "
        f"arguments {mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)}, "
        f"temporaries {mib(mem.temp_size_in_bytes)}", flush=True)
  box = [state]

  def run():
    box[0], m = compiled(box[0], frozen, batch)
    jax.block_until_ready(m["loss"])
  return run


def _time(runs: dict, args) -> dict:
  """Median step time per side; the sides alternate step by step, so a change in the machine's
  load hits both alike."""
  times = {k: [] for k in runs}
  for i in range(args.warmup + args.steps):
    for k, run in runs.items():
      t0 = time.perf_counter()
      run()
      if i >= args.warmup:
        times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def laion_memory(args):
  config = laion_config.get_config()
  config.mesh = dict(data=1, fsdp=1, tensor=1, num_devices=1)
  config.train.lora.update(rank=args.rank, base_dtype=args.base_dtype)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: configs/laion.py, one device, "
        f"batch {args.batch}, LoRA rank {args.rank}, base {args.base_dtype}", flush=True)
  for name, cfg in (("full", lora.full_config(config)), ("lora", config)):
    built = train.build(cfg, mesh, abstract=True)   # the trainer's build, no weights
    t0 = time.perf_counter()
    compiled = built.lower(aot.features_batch(config, args.batch, mesh)).compile()
    for hbm in (16, 24):
      lines, _ = aot.memory_report(compiled, hbm, f"{name}, {hbm} GiB")
      print("\n".join(lines[:1] + lines[2:3] if hbm == 24 else lines), flush=True)
    print(f"  (compile {time.perf_counter() - t0:.0f} s)", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--base_dtype", default="float32", choices=lora.BASE_DTYPES)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--laion_memory", action="store_true")
  parser.add_argument("--batch", type=int, default=8, help="--laion_memory's global batch")
  args = parser.parse_args()
  if args.laion_memory:
    laion_memory(args)
    return
  if args.quick:
    args.warmup, args.steps = 1, 3
  config = _config(args)
  mesh = sharding.make_mesh(config.mesh)
  model = uvit.from_config(config.model)
  enc = encoders_lib.build(config.encoders)
  enc_params, enc_sh = train.build_frozen(config, mesh, enc)
  task = train.uvit_task(model, enc, int(config.seed), objective.config_kwargs(config.train))
  it = synthetic.make_iterator(resolution=config.data.resolution,
                               clip_resolution=config.data.clip_resolution,
                               max_length=config.data.max_length,
                               vocab_size=config.data.synthetic_vocab_size,
                               host_batch=config.train.batch_size, seed=0)
  batch = sharding.to_global(next(it), mesh)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; U-ViT width "
        f"{model.width} depth {model.depth}, {uvit.count_params(dict(config.model, dtype='float32')):,} "
        f"params, batch {config.train.batch_size}, LoRA rank {args.rank} on "
        f"{config.train.lora.targets!r}, base {args.base_dtype}", flush=True)
  runs = {"full": _build("full", task, enc_params, enc_sh, config, mesh, batch)}
  # A LoRA fine-tune of the full step's initial weights (their values do not change the time).
  lcfg = lora.LoraConfig.from_config(config.train.lora)
  rules = sharding.rules_from_config(config.sharding.rules)
  abstract = uvit.abstract_variables(model)["params"]
  base_sh = sharding.named_shardings(sharding.logical_to_specs(abstract, mesh, rules), mesh)
  base = jax.jit(lambda: jax.tree.map(lambda x: x.astype(args.base_dtype),
                                      nn.unbox(task.init_params())), out_shardings=base_sh)()
  runs["lora"] = _build("lora", lora.wrap_task(task, model, lcfg, int(config.seed)),
                        {"encoders": enc_params, "base": base},
                        {"encoders": enc_sh, "base": base_sh}, config, mesh, batch)
  med = _time(runs, args)
  for k, t in med.items():
    print(f"{k:>5}: step {1e3 * t:7.1f} ms (median of {args.steps}, sides alternating)")
  full, lora_t = med["full"], med["lora"]
  print(f"LoRA / full step time: {lora_t / full:.2f}")


if __name__ == "__main__":
  main()
