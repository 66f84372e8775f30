"""Teach the trained demo a colour word it has never seen, by LoRA on a CPU; judge before/after.

  python -m unidiffuser_jax.main --config=configs/demo.py --workdir=workdirs/demo   # the base, once
  python benchmarks/lora_new_word.py --base=workdirs/demo --workdir=workdirs/purple

1. data: --n new captioned images of one new colour (--colour, --rgb; shapes and positions as
   the demo's, same caption grammar), plus --n_heldout held-out ones, as shards;
2. a LoRA fine-tune of the base's EMA U-ViT (train.train with train.init_from = the base and
   train.lora.rank = --rank) on those images plus --replay images of the base's own training
   set (replay, so the old words keep their meaning; --replay=0: the new images alone), for
   --steps steps, timed;
3. t2i for the held-out new-colour prompts and the base's 64 held-out prompts, with the base
   and with the fine-tuned model (its adapters merged into the base), judged by the demo's
   judge (the new colour added to its palette for the new prompts).

The demo's tokenizer is word-level and built from the demo's captions, so the new word maps to
its [UNK] token: the fine-tune teaches what [UNK] means in a colour slot (the frozen text
encoder has no other id for an unseen word; a BPE tokenizer such as CLIP's spells any word).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from configs import demo as demo_config  # noqa: E402
from data_pipelines import demo_data, demo_sets, make_shards, shards  # noqa: E402
from unidiffuser_jax import demo, sample, train, vocab  # noqa: E402


def make_data(args, tokenizer: str) -> dict:
  rgb = tuple(int(v) for v in args.rgb.split(","))

  def example(rng, split):  # pylint: disable=unused-argument
    a = dict(colour=args.colour, shape=demo_data.SHAPES[rng.integers(len(demo_data.SHAPES))],
             position=demo_data.POSITIONS[rng.integers(len(demo_data.POSITIONS))])
    img = demo_data.render(args.colour, a["shape"], a["position"], args.size, rng, fill=rgb)
    return a, img, demo_data.caption_for(args.colour, a["shape"], a["position"], rng)

  params = dict(n_train=args.n, n_heldout=args.n_heldout, size=args.size, seed=args.seed,
                shard_size=500, colour=args.colour, rgb=list(rgb))
  return demo_data.write_set(os.path.join(args.workdir, "data"), params, lambda _: tokenizer,
                             example, url="newword")


def write_replay(base: str, out_dir: str, n: int) -> list[str]:
  """The first n records of the base run's training shards, copied to shards of their own."""
  src = sorted(os.path.join(base, "demo_data", "train", f)
               for f in os.listdir(os.path.join(base, "demo_data", "train")) if f.endswith(".tar"))
  done = 0
  with make_shards.ShardWriter(out_dir, 500) as w:
    for path in src:
      for e in shards.iter_entries(path):
        if done == n:
          return w.paths
        if "files" in e:
          ext = next(x for x in shards.IMAGE_EXTS if x in e["files"])
          w.write(e["files"][ext], ext, e["files"]["txt"].decode(), dict(url="replay"))
          done += 1
  return w.paths


def base_config(args):
  c = demo_config.get_config()
  c.runbook, c.demo.set = "", ""
  c.data.tokenizer = os.path.join(args.base, "demo_data", "tokenizer")
  c.encoders.weights.captioner = os.path.join(args.base, "captioner")
  return vocab.derive(c)


def t2i(config, src: str, prompts: list[str]) -> list[dict]:
  config = config.copy_and_resolve_references()
  config.sample.checkpoint = src
  inputs = dict(sample.config_inputs(config), prompts=list(prompts), images=[])
  host, n = sample.task_inputs("t2i", inputs, config)
  return sample.generate("t2i", host, n, config, progress=False,
                         **sample.load_sampler(config, src))


def judge_new(records, truth, palette) -> dict:
  got = [demo_data.judge_image(r["pixels"], palette) for r in records]
  out = {a: float(np.mean([g[a] == t[a] for g, t in zip(got, truth)]))
         for a in demo_data.ATTRIBUTES}
  out["all"] = float(np.mean([all(g[a] == t[a] for a in demo_data.ATTRIBUTES)
                              for g, t in zip(got, truth)]))
  out["colours_drawn"] = {c: sum(g["colour"] == c for g in got) for c in palette}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="the trained demo's workdir")
  p.add_argument("--workdir", required=True)
  p.add_argument("--colour", default="purple")
  p.add_argument("--rgb", default="150,60,190")
  p.add_argument("--n", type=int, default=160)
  p.add_argument("--n_heldout", type=int, default=48)
  p.add_argument("--size", type=int, default=16)
  p.add_argument("--seed", type=int, default=7)
  p.add_argument("--replay", type=int, default=160,
                 help="images of the base's training set mixed in (0: the new images alone)")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--alpha", type=float, default=8.0)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--batch", type=int, default=32)
  args = p.parse_args()

  config = base_config(args)
  paths = make_data(args, config.data.tokenizer)
  ft = config.copy_and_resolve_references()
  replay = (write_replay(args.base, os.path.join(args.workdir, "data", "replay"), args.replay)
            if args.replay else [])
  ft.data.shards = ",".join(paths["train_shards"] + replay)
  ft.train.update(init_from=args.base, steps=args.steps, batch_size=args.batch, lr=args.lr,
                  warmup_steps=10, log_every=50, checkpoint_every=args.steps, eval_every=0)
  ft.train.lora.update(rank=args.rank, alpha=args.alpha)
  run_dir = os.path.join(args.workdir, "run")
  t0 = time.perf_counter()
  train.train(ft, run_dir)
  train_s = time.perf_counter() - t0

  new_truth = paths["heldout_attrs"]
  new_prompts = [a["caption"] for a in new_truth]
  palette = dict(demo_data.COLOURS, **{args.colour: tuple(int(v) for v in args.rgb.split(","))})
  shapes = demo_sets.get("shapes")
  with open(os.path.join(args.base, "demo_data", "demo.json")) as f:   # paths relative to the
    old_shards = [os.path.join(args.base, "demo_data", "heldout", os.path.basename(p))  # base's cwd
                  for p in json.load(f)["paths"]["heldout_shards"]]
  old = demo.read_heldout(shapes, old_shards, 64)
  judge = demo.Judge("shapes", old)
  results = {"train_seconds": train_s, "args": vars(args)}
  for name, src, cfg in (("before", args.base, config), ("after", run_dir, ft)):
    new = judge_new(t2i(cfg, src, new_prompts), new_truth, palette)
    old_records = t2i(cfg, src, old["prompts"])
    host = {"prompts": old["prompts"]}
    results[name] = {"new_word": new, "old_prompts": judge.score("t2i", host, old_records)}
    print(f"{name}: new-word t2i {json.dumps(new)}; old prompts t2i "
          f"{ {k: v for k, v in results[name]['old_prompts'].items() if k != 'chance'} }",
          flush=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(f"LoRA fine-tune: {args.steps} steps in {train_s:.0f} s (incl. compile); "
        f"results in {args.workdir}/results.json")


if __name__ == "__main__":
  main()
