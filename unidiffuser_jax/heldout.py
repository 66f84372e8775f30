"""The held-out loss: the training objective on a fixed held-out batch, at fixed timesteps.

The first config.eval.loss_examples pairs of the evaluation set (eval_data; each image with
its first caption) are scored at every t in config.eval.loss_timesteps (image and text both
noised to t) with noise drawn from rng.key_for(seed, t, 'heldout'): the same numbers for the
same weights on every run, so a curve over training steps compares like with like. Reported
as 'heldout/loss_t<t>' per timestep and 'heldout/loss' (their mean), with the objective's
own weighting (config.train.loss_weight, min_snr_gamma).

During training, eval_training.py logs it every config.train.eval_every steps.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from PIL import Image

from data_pipelines import transforms
from unidiffuser_jax import eval_data, rng, sharding
from unidiffuser_jax.diffusion import objective
from unidiffuser_jax.errors import ConfigError


def heldout_batch(config, eval_set: eval_data.EvalSet) -> dict:
  """The first loss_examples items -> a raw training batch (image, clip_image, tokens)."""
  n = min(int(config.eval.loss_examples), len(eval_set))
  images, clips, captions = [], [], []
  for i in range(n):
    item = eval_set.items[i]
    img = item["image"]
    pil = (transforms.decode_image(img, max_pixels=1 << 28)[0] if isinstance(img, bytes)
           else transforms.to_rgb(Image.fromarray(np.asarray(img, np.uint8))))
    images.append(transforms.image_to_array(pil, int(config.data.resolution)))
    clips.append(transforms.clip_image(pil, int(config.data.clip_resolution)))
    captions.append(item["captions"][0])
  tok = transforms.load_tokenizer(config.data.tokenizer)
  return dict(image=np.stack(images), clip_image=np.stack(clips),
              tokens=transforms.tokenize(tok, captions, int(config.data.max_length)),
              data_type=np.full((n,), int(config.data.data_type), np.int32))


class HeldoutLoss:
  """loss(params) -> {'heldout/loss_t<t>': float, 'heldout/loss': float} (see module docs)."""

  def __init__(self, config, model, encoders, enc_params, mesh, batch: dict):
    n = batch["image"].shape[0]
    sharding.check_batch_divisible(n, mesh, what="the held-out batch (config.eval.loss_examples"
                                   " or the set's size)")
    self._timesteps = [int(t) for t in config.eval.loss_timesteps]
    if not self._timesteps or not all(1 <= t <= 1000 for t in self._timesteps):
      raise ConfigError(f"config.eval.loss_timesteps={tuple(config.eval.loss_timesteps)}: "
                        f"give timesteps in 1..1000")
    self._seed, self._enc_params, self._mesh = int(config.seed), enc_params, mesh
    self._replicated = NamedSharding(mesh, P())
    self._batch = {k: jax.make_array_from_callback(
        v.shape, sharding.batch_sharding(mesh, v.ndim), lambda idx, v=v: v[idx])
        for k, v in batch.items()}
    kw = objective.config_kwargs(config.train)   # clean_prob is unused: the timesteps are given

    def loss(params, enc_params, batch, t, key):
      k_enc, k_loss = jax.random.split(key)
      z0, clip0, text0 = encoders.batch_to_latents(enc_params, batch, k_enc)
      nnet = functools.partial(model.apply, {"params": params})
      ts = jnp.full((n,), t, jnp.int32)
      total, _ = objective.loss_fn(nnet, z0, clip0, text0, batch["data_type"], k_loss,
                                   timesteps=(ts, ts), **kw)
      return total

    # traced under the config's mesh and rules, as train.build's step: the same constraints
    self._loss = jax.jit(sharding.traced_under(
        loss, mesh, sharding.rules_from_config(config.sharding.rules)))

  def __call__(self, params) -> dict:
    params = jax.device_put(params, self._replicated)
    out = {}
    values = [self._loss(params, self._enc_params, self._batch, t,
                         rng.key_for(self._seed, t, "heldout")) for t in self._timesteps]
    for t, v in zip(self._timesteps, jax.device_get(values)):
      out[f"heldout/loss_t{t}"] = float(v)
    out["heldout/loss"] = float(np.mean([out[f"heldout/loss_t{t}"] for t in self._timesteps]))
    return out
