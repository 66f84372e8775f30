"""How good is a trained demo run's image denoiser, per timestep, against the best the data allows?

  python benchmarks/probe_denoiser.py --workdir=workdirs/demo [--config=configs/demo.py] [--n=64]

For the first n held-out (image, caption) pairs of the run's generated set, noises the image
latent to t (fixed noise) and turns the U-ViT's noise prediction into x0 = (x_t - sqrt(1 - ab)
eps) / sqrt(ab), with the caption's clean text latent (t2i's conditional branch) and with pure
noise text at t = 1000 (its unconditional branch). Prints the mean squared x0 error per latent
element next to the *empirical optimal denoiser*: the exact posterior mean over the training
latents (as a Gaussian mixture centred on them), over all of them (unconditional) or over the
training images whose caption names the same attributes (conditional). docs/SMALL_DATA.md
("Session 5") reads these tables. The run must use the pixel autoencoder (the optimum is
computed in its latent space) and fit_latent_stats (read from WORKDIR/latent_stats.json).
"""
import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import demo_sets, transforms  # noqa: E402
from unidiffuser_jax import demo, sample  # noqa: E402
from unidiffuser_jax.diffusion import objective  # noqa: E402

TIMESTEPS = (100, 250, 400, 550, 700, 850, 950)


def image_inputs(config, encoded_images) -> dict:
  """{'image', 'clip_image'} batch arrays of encoded image files, as the samplers load them."""
  loaded = [sample.load_image(b, config.data.resolution, config.data.clip_resolution)
            for b in encoded_images]
  return {"image": jnp.asarray(np.stack([a for a, _ in loaded])),
          "clip_image": jnp.asarray(np.stack([c for _, c in loaded]))}


def _train_latents(config, encoders, enc_params, demo_set):
  """Normalised image latents of every training record and the attributes its caption names."""
  train = demo.read_heldout(demo_set, config.data.shards.split(","), n=-1)  # -1: every record
  images = image_inputs(config, train["images"])["image"]
  moments = jax.jit(encoders.image_moments)(enc_params, images)
  mean, _ = jnp.split(moments, 2, axis=-1)
  latents = (mean - jnp.asarray(encoders.latent_shift)) * encoders.latent_scale
  attrs = [tuple(sorted(t.items())) for t in train["truth"]]
  return np.asarray(latents, np.float64).reshape(len(attrs), -1), attrs


def _optimum(x_t, a, train_z, cands):
  """Posterior mean of x0 given x_t = sqrt(a) x0 + sqrt(1 - a) eps, x0 uniform over cands."""
  c = train_z[cands]
  d = ((x_t - np.sqrt(a) * c) ** 2).sum(1) / (2 * (1 - a))
  w = np.exp(-(d - d.min()))
  return (w / w.sum()) @ c


def open_demo_run(config, workdir: str) -> tuple[dict, object, dict]:
  """A trained demo run for a probe: (held-out inputs, the generated set's module, the run's
  sampler: model, encoders, weights)."""
  heldout = demo.open_run(config, workdir)
  if heldout is None:
    raise SystemExit("error: the probe needs a generated set (config.demo.set)")
  return heldout, demo_sets.get(config.demo.set), sample.load_sampler(config, workdir)


def main(config, workdir: str, n: int) -> None:
  heldout, demo_set, sampler = open_demo_run(config, workdir)
  model, enc, enc_params = sampler["model"], sampler["encoders"], sampler["enc_params"]
  params = sampler["params"]
  batch = {**image_inputs(config, heldout["images"][:n]),
           "tokens": jnp.asarray(transforms.tokenize(sampler["tokenizer"], heldout["prompts"][:n],
                                                     config.data.max_length))}
  z0, clip0, text0 = enc.batch_to_latents(enc_params, batch, jax.random.key(0))
  b = z0.shape[0]
  train_z, train_attrs = _train_latents(config, enc, enc_params, demo_set)
  held_attrs = [tuple(sorted(t.items())) for t in heldout["truth"][:n]]
  ab = np.concatenate([[1.0], objective.schedule.alphas_cumprod()])
  nnet = jax.jit(functools.partial(model.apply, {"params": params}))
  eps_z = jax.random.normal(jax.random.key(1), z0.shape)
  eps_c = jax.random.normal(jax.random.key(2), clip0.shape)
  noise_text = jax.random.normal(jax.random.key(3), text0.shape)
  z0_flat = np.asarray(z0, np.float64).reshape(b, -1)
  rows = []
  print(f"x0 MSE per latent element, {b} held-out pairs, {len(train_z)} training latents")
  print("   t | U-ViT clean text | U-ViT text at 1000 | optimum same attributes | optimum all")
  for t in TIMESTEPS:
    t_b = jnp.full((b,), t, jnp.int32)
    z_t = objective.noise_to(z0, eps_z, t_b)
    c_t = objective.noise_to(clip0, eps_c, t_b)
    row = {"t": t}
    for name, text, t_text in (("cond", text0, 0.0), ("uncond", noise_text, 1000.0)):
      pz, _, _ = nnet(z_t, c_t, text, t_b.astype(jnp.float32), jnp.full((b,), t_text),
                      jnp.ones((b,), jnp.int32))
      x0 = (z_t - np.sqrt(1 - ab[t]) * pz) / np.sqrt(ab[t])
      row[name] = float(jnp.mean(jnp.square(x0 - z0)))
    x_t = np.asarray(z_t, np.float64).reshape(b, -1)
    everyone = np.arange(len(train_z))
    for name, pick in (("opt_cond", lambda i: [j for j, a in enumerate(train_attrs)
                                               if a == held_attrs[i]]),
                       ("opt_uncond", lambda i: everyone)):
      errs = [np.mean((_optimum(x_t[i], ab[t], train_z, pick(i)) - z0_flat[i]) ** 2)
              for i in range(b)]
      row[name] = float(np.mean(errs))
    rows.append(row)
    print(f"{t:4d} | {row['cond']:16.4f} | {row['uncond']:18.4f} | {row['opt_cond']:23.4f} | "
          f"{row['opt_uncond']:11.4f}", flush=True)
  with open(os.path.join(workdir, "probe_denoiser.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--n", type=int, default=64)
  args, rest = parser.parse_known_args()
  config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=False)
  flags.FLAGS([sys.argv[0]] + rest)
  main(flags.FLAGS.config, args.workdir, args.n)
