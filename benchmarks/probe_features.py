"""Does a trained demo U-ViT carry an attribute of a clean image through its blocks?

  python benchmarks/probe_features.py --workdir=workdirs/glyphs --config=configs/demo.py:glyphs

Runs the U-ViT on clean images (t_img = 0) with pure-noise text at t_text = 1000 (what the i2t
sampler's first call sees), keeps every token's output of each block (flax
capture_intermediates), and fits a linear probe (standardised features, logistic regression,
C = 0.1) per attribute and block on 1,024 images; prints its accuracy on other images, next to
the same probe on the raw image latent and on the blocks of the same network at its random
initialisation. Generated sets: 1,536 fresh images drawn by the set's generator with another
seed (1,024 fit, 512 scored; the run never saw them); the handwriting set (fixed scans): fit on
1,024 of the run's training scans, scored on its 64 held-out ones. docs/SMALL_DATA.md
("Session 13") reads the tables.
"""
import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import probe_denoiser  # noqa: E402  (benchmarks/ is this script's directory)
from unidiffuser_jax import demo  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402

_BLOCK_PREFIXES = ("in_blocks", "mid_block", "out_blocks")


def block_features(model, params_by_name: dict, encoders, enc_params, config, records: dict,
                   batch: int = 256) -> dict[str, dict[str, np.ndarray]]:
  """{network name: {'raw_latent' | block name: [N, features]}} for the records' images; the
  inputs are encoded once per batch and shared by the networks."""
  out: dict[str, dict[str, list]] = {name: {} for name in params_by_name}
  for s in range(0, len(records["images"]), batch):
    inputs = probe_denoiser.image_inputs(config, records["images"][s:s + batch])
    b = inputs["image"].shape[0]
    inputs["tokens"] = jnp.zeros((b, config.data.max_length), jnp.int32)
    z0, clip0, text0 = encoders.batch_to_latents(enc_params, inputs, jax.random.key(0))
    noise_text = jax.random.normal(jax.random.key(3), text0.shape)
    for name, params in params_by_name.items():
      _, inter = model.apply({"params": params}, z0, clip0, noise_text, jnp.zeros((b,)),
                             jnp.full((b,), 1000.0), jnp.ones((b,), jnp.int32),
                             capture_intermediates=True)
      feats = {"raw_latent": np.asarray(z0).reshape(b, -1)}
      for block, v in inter["intermediates"].items():
        if block.startswith(_BLOCK_PREFIXES):
          feats[block] = np.asarray(v["__call__"][0]).reshape(b, -1)   # [B, tokens x width]
      for k, v in feats.items():
        out[name].setdefault(k, []).append(v)
  return {name: {k: np.concatenate(v) for k, v in f.items()} for name, f in out.items()}


def probe_sets(config, workdir: str, demo_set, heldout: dict) -> tuple[dict, dict]:
  if config.demo.set == "handwriting":
    train = demo.read_heldout(demo_set, config.data.shards.split(","), n=-1)
    return {k: v[:1024] for k, v in train.items()}, heldout
  fresh = demo_set.build_demo(os.path.join(workdir, "probe_data"), n_train=1536, n_heldout=8,
                              size=int(config.data.resolution), seed=777)
  records = demo.read_heldout(demo_set, fresh["train_shards"], n=-1)
  return ({k: v[:1024] for k, v in records.items()}, {k: v[1024:] for k, v in records.items()})


def main(config, workdir: str) -> None:
  heldout, demo_set, sampler = probe_denoiser.open_demo_run(config, workdir)
  model, enc, enc_params = sampler["model"], sampler["encoders"], sampler["enc_params"]
  fit, score = probe_sets(config, workdir, demo_set, heldout)
  init = nn.unbox(model.init(jax.random.key(0), *uvit.dummy_inputs(model))["params"])
  networks = {"trained": sampler["params"], "init": init}
  print(f"linear probes: fit on {len(fit['images'])} images, scored on {len(score['images'])}")
  all_fit = block_features(model, networks, enc, enc_params, config, fit)
  all_score = block_features(model, networks, enc, enc_params, config, score)
  for name in networks:
    f_fit, f_score = all_fit[name], all_score[name]
    for attr in demo_set.ATTRIBUTES:
      y_fit = [t[attr] for t in fit["truth"]]
      y_score = [t[attr] for t in score["truth"]]
      cells = []
      for k in f_fit:
        if name == "init" and k == "raw_latent":
          continue
        scaler = StandardScaler().fit(f_fit[k])
        clf = LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(f_fit[k]), y_fit)
        cells.append(f"{k} {clf.score(scaler.transform(f_score[k]), y_score):.2f}")
      print(f"{name:7} {attr:10} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  args, rest = parser.parse_known_args()
  config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=False)
  flags.FLAGS([sys.argv[0]] + rest)
  main(flags.FLAGS.config, args.workdir)
