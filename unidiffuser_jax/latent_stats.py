"""Latent normalisation fitted to the training data (config.encoders.fit_latent_stats = N).

The diffusion schedule assumes latents of roughly zero mean and unit variance
(Stable Diffusion's 0.18215 is 1 / std of its VAE latents). A fixed constant only
fits the data it was measured on, so a fresh run with fit_latent_stats = N > 0
measures, over its first N training examples, the per-channel mean of the image
latent and of the text latent and one overall std of each, and from then on uses

  z    = (posterior sample - mean_c) / std          (image latent, per channel c)
  text = (encode_prefix(...) - mean_d) / std_text   (text latent, per feature d)

The numbers are written once to <workdir>/latent_stats.json (process 0) before
the first step; resuming, sampling and export read them back from there, so a
checkpoint is always decoded with the normalisation it was trained with. The
reductions run on the global (sharded) batch, so every process gets the same
numbers.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from unidiffuser_jax import encoders as encoders_lib
from unidiffuser_jax import rng, sharding

FILE = "latent_stats.json"


def path_in(workdir: str) -> str:
  return os.path.join(workdir, FILE)


def apply(encoders: encoders_lib.Encoders, stats: dict) -> encoders_lib.Encoders:
  """The bundle with the fitted shift/scale of both latents."""
  return dataclasses.replace(
      encoders, latent_shift=tuple(stats["latent_shift"]), latent_scale=float(stats["latent_scale"]),
      text_shift=tuple(stats["text_shift"]), text_scale=float(stats["text_scale"]))


def load(workdir: str) -> dict:
  path = path_in(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing: this config fits its latent normalisation to the training data "
        f"(encoders.fit_latent_stats > 0) and the training job writes that file; train first, "
        f"or point --config.sample.checkpoint at the workdir that holds it")
  with open(path) as f:
    return json.load(f)


def fit(encoders: encoders_lib.Encoders, enc_params, data_iterator, mesh, num_examples: int,
        seed: int) -> dict:
  """Per-channel means and overall stds of both latents over >= num_examples examples."""
  raw = dataclasses.replace(encoders, latent_shift=0.0, latent_scale=1.0, text_shift=0.0,
                            text_scale=1.0)

  @jax.jit
  def sums(batch, key):
    z, _, text = raw.batch_to_latents(enc_params, batch, key)
    out = {}
    for name, x in (("z", z), ("text", text)):
      x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
      out[name] = (x.sum(0), jnp.square(x).sum(0), x.shape[0])
    return out

  totals, seen, i = None, 0, 0
  with tqdm.tqdm(total=num_examples, desc="latent stats", unit="ex") as bar:
    while seen < num_examples:
      host = dict(next(data_iterator))
      host.pop("skipped", None)
      batch = sharding.to_global(host, mesh)
      got = jax.device_get(sums(batch, rng.key_for(seed, i, "latent_stats")))
      got = jax.tree.map(lambda x: np.asarray(x, np.float64), got)
      totals = got if totals is None else jax.tree.map(np.add, totals, got)
      n = int(jax.tree.leaves(batch)[0].shape[0])
      seen, i = seen + n, i + 1
      bar.update(n)
  out = {"examples": seen}
  for name, key in (("z", "latent"), ("text", "text")):
    s, sq, n = totals[name]
    mean = s / n
    var = np.maximum(sq / n - mean ** 2, 0.0).mean()
    out[f"{key}_shift"] = [float(v) for v in mean]
    out[f"{key}_scale"] = float(1.0 / np.sqrt(max(var, 1e-12)))
  return out


def fit_or_load(config, encoders, enc_params, make_iterator, mesh, workdir: str):
  """Encoders normalised as config.encoders.fit_latent_stats says (unchanged when it is 0): the
  statistics in `workdir`, else those of the run config.train.init_from names (a fine-tune
  keeps its base's normalisation), else fitted now and written to `workdir`."""
  n = int(config.encoders.fit_latent_stats)
  if n <= 0:
    return encoders
  path = path_in(workdir)
  base = str(config.train.init_from)   # a fine-tune keeps the normalisation its base learned with
  if os.path.exists(path):
    stats = load(workdir)
  else:
    if base and os.path.exists(path_in(base)):
      stats = load(base)
    else:
      stats = fit(encoders, enc_params, make_iterator(), mesh, n, int(config.seed))
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(stats, f, indent=1)
      os.replace(path + ".tmp", path)
  print(f"latent normalisation ({path}): image scale {stats['latent_scale']:.4g}, "
        f"text scale {stats['text_scale']:.4g} (from {stats['examples']} examples)", flush=True)
  return apply(encoders, stats)
