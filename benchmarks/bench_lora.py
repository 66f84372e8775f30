"""LoRA vs full fine-tuning: the trainer's step time and XLA's memory plan, same model and batch.

  python benchmarks/bench_lora.py                    # configs/demo.py's U-ViT and batch, rank 8
  python benchmarks/bench_lora.py --quick            # configs/demo.py:tiny, few steps: sanity only
  python benchmarks/bench_lora.py --rank=16 --base_dtype=bfloat16

Both sides are train.make_train_step (the function the trainer jits, with its shardings, on one
device) over the U-ViT objective on a synthetic batch through the demo's encoders: full
fine-tuning (train.uvit_task: params, EMA and AdamW state of every weight) and LoRA
(lora.wrap_task: the base a frozen input, adapters on config.train.lora.targets). Reported per
side: median step time over --steps timed steps after --warmup, and compiled.memory_analysis()
(arguments, outputs, temporaries) of the jitted step on this backend.
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
from data_pipelines import synthetic  # noqa: E402
from unidiffuser_jax import encoders as encoders_lib, lora, sharding, train, vocab  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402


def _config(args):
  c = demo_config.get_config("tiny" if args.quick else None)
  c.runbook = ""
  c.data.source = "synthetic"
  c.encoders.fit_latent_stats = 0
  c.mesh = dict(data=1, fsdp=1, tensor=1, num_devices=1)
  c.train.lora.update(rank=args.rank, base_dtype=args.base_dtype)
  return vocab.derive(c)


def _bench(name, task, frozen, frozen_sh, config, mesh, batch, args):
  rules = sharding.rules_from_config(config.sharding.rules)
  tx = train.make_optimizer(config.train)
  state, state_sh = train.create_state(task, tx, config, mesh)
  step = train.compile_train_step(train.make_train_step(task, tx, config.train, 0), mesh,
                                  state_sh, frozen_sh)
  with sharding.tracing_context(mesh, rules):
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, frozen, batch)
      jax.block_until_ready(m["loss"])
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  n_trained = sum(x.size for x in jax.tree.leaves(state.params))
  mib = lambda n: f"{n / 2**20:.1f} MiB"
  print(f"{name:>5}: step {1e3 * statistics.median(times):7.1f} ms (median of {len(times)}; "
        f"compile {compile_s:.1f} s), trained params {n_trained:,}, memory_analysis: arguments "
        f"{mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)}, "
        f"temporaries {mib(mem.temp_size_in_bytes)}", flush=True)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--base_dtype", default="float32", choices=lora.BASE_DTYPES)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  if args.quick:
    args.warmup, args.steps = 1, 3
  config = _config(args)
  mesh = sharding.make_mesh(config.mesh)
  model = train.make_model(config.model)
  enc = encoders_lib.build(config.encoders)
  enc_params, enc_sh = enc.load_params(config.encoders.weights, mesh, int(config.seed))
  task = train.uvit_task(model, enc, int(config.seed), train.objective_kwargs(config.train))
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
  full = _bench("full", task, enc_params, enc_sh, config, mesh, batch, args)
  # A LoRA fine-tune of the full step's initial weights (their values do not change the time).
  lcfg = lora.LoraConfig.from_config(config.train.lora)
  rules = sharding.rules_from_config(config.sharding.rules)
  abstract = uvit.abstract_variables(model)["params"]
  base_sh = sharding.named_shardings(sharding.logical_to_specs(abstract, mesh, rules), mesh)
  base = jax.jit(lambda: jax.tree.map(lambda x: x.astype(args.base_dtype),
                                      nn.unbox(task.init_params())), out_shardings=base_sh)()
  lora_t = _bench("lora", lora.wrap_task(task, model, lcfg, int(config.seed)),
                  {"encoders": enc_params, "base": base}, {"encoders": enc_sh, "base": base_sh},
                  config, mesh, batch, args)
  print(f"LoRA / full step time: {lora_t / full:.2f}")


if __name__ == "__main__":
  main()
