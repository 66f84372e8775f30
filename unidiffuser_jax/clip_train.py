"""Stage 0 of the demo runbook: the CLIP pair fitted contrastively to the training set.

  images --CLIP image encoder--> embedding [B, P]        (becomes the U-ViT's clip_img)
  tokens --CLIP text encoder--> hidden [B, L, W] --mean over the non-pad tokens--> text_head --> [B, P]
  loss: symmetric InfoNCE over the batch (CLIP's), temperature learned

The released UniDiffuser reads images through a CLIP trained on image-text pairs; the demo's
encoders start random, and a random image encoder's embedding is nearly the same vector for
every image (docs/SMALL_DATA.md, session 14), so without this stage `clip_img` carries nothing.
Both encoders start from the seed's random draw ('init/<part>', as the frozen encoders do) and
are trained with the generic loop (train.run_loop: resumable, logged) into DIR/clip. Then
train_clip writes the encoders config.clip_fit.parts names as plain parameter dirs
DIR/clip/encoders/<part> (what config.encoders.weights reads); a fitted image encoder's
projection is scaled so the embedding's per-dimension std over the training images is
config.clip_fit.embed_std (1: the unit scale the fitted latents have), the scale at which the
U-ViT sees clip_img. The text head and temperature serve this stage only. Off in the demo's
recipe: image-to-text gains; whether the shapes' text-to-image loses is not settled over seeds
(docs/SMALL_DATA.md, session 14).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unidiffuser_jax import checkpoints, encoders as encoders_lib, input_pipeline, rng, sharding
from unidiffuser_jax import train, weight_jobs
from unidiffuser_jax.errors import ConfigError
from unidiffuser_jax.models import layers

PARTS = ("clip_image", "clip_text")
ENCODERS_DIR = "encoders"  # under the stage's workdir: one plain params dir per part
_MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learned temperature


class ContrastivePair(nn.Module):
  """The image and text encoders (submodules named as the encoder parts) and the text head."""
  clip_image: nn.Module
  clip_text: nn.Module
  proj_dim: int

  @nn.compact
  def __call__(self, image_bssc, tokens_bl):
    img_bp = self.clip_image(image_bssc)
    hidden_bld = self.clip_text(tokens_bl)
    mask_bl1 = (tokens_bl != 0).astype(jnp.float32)[..., None]   # id 0 pads the caption tokens
    pooled_bd = (hidden_bld * mask_bl1).sum(1) / jnp.maximum(mask_bl1.sum(1), 1.0)
    txt_bp = layers.dense(self.proj_dim, ("embed", "io"), kernel_init=nn.initializers.normal(0.02),
                          dtype=jnp.float32, use_bias=False, name="text_head")(pooled_bd)
    log_scale = self.param("log_scale", nn.with_logical_partitioning(
        nn.initializers.constant(np.log(1 / 0.07)), ()), (), jnp.float32)
    return img_bp, txt_bp, log_scale


def contrastive_loss(img_bp, txt_bp, log_scale):
  """Symmetric InfoNCE (pair i is the positive of row and column i) and the image -> text
  in-batch retrieval accuracy."""
  img_bp = img_bp / jnp.linalg.norm(img_bp, axis=-1, keepdims=True)
  txt_bp = txt_bp / jnp.linalg.norm(txt_bp, axis=-1, keepdims=True)
  logits_bb = jnp.exp(jnp.minimum(log_scale, np.log(_MAX_LOGIT_SCALE))) * img_bp @ txt_bp.T
  labels_b = jnp.arange(logits_bb.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  loss = (ce(logits_bb, labels_b).mean() + ce(logits_bb.T, labels_b).mean()) / 2
  return loss, (logits_bb.argmax(1) == labels_b).mean()


def contrastive_pair(encoders, config) -> ContrastivePair:
  """The pair module over the encoders bundle's CLIP image and text encoders (the stage's model)."""
  return ContrastivePair(encoders.clip_image, encoders.clip_text,
                         int(config.encoders.clip_image.proj_dim))


def clip_task(encoders, config) -> train.Task:
  pair = contrastive_pair(encoders, config)
  seed = int(config.seed)

  def init_params():
    # The encoders start as the demo's random ones (init draws them too, from the head's key,
    # and they are replaced); the head and temperature keep init's values.
    s = encoders.clip_image_size
    params = dict(pair.init(rng.key_for(seed, 0, "init/clip_head"), jnp.zeros((1, s, s, 3)),
                            jnp.zeros((1, encoders.text_length), jnp.int32))["params"])
    params.update({part: encoders.random_part(part, seed) for part in PARTS})
    return params

  def loss(params, frozen, batch, key):
    del frozen, key   # nothing frozen, nothing random
    img_bp, txt_bp, log_scale = pair.apply({"params": params}, batch["clip_image"], batch["tokens"])
    total, accuracy = contrastive_loss(img_bp, txt_bp, log_scale)
    return total, {"retrieval_accuracy": accuracy, "logit_scale": jnp.exp(log_scale)}

  def prepare_batch(batch):
    return {k: batch[k] for k in ("clip_image", "tokens", "skipped") if k in batch}

  return train.Task("clip", init_params, loss, prepare_batch)


def parts(config) -> tuple[str, ...]:
  """The fitted encoders the later stages use (config.clip_fit.parts)."""
  names = tuple(config.clip_fit.parts)
  if not names or not set(names) <= set(PARTS):
    raise ConfigError(f"config.clip_fit.parts={names!r}; name one or both of {PARTS}")
  return names


def train_clip(config, workdir: str) -> str:
  """Runs stage 0 into `workdir` (resumable) and writes the encoders config.clip_fit.parts
  names; returns the dir holding them (<dir>/<part>, for config.encoders.weights)."""
  out = os.path.join(workdir, ENCODERS_DIR)
  if all(os.path.isdir(os.path.join(out, part)) for part in parts(config)):
    return out
  train_cfg = config.clip_fit.train
  mesh = sharding.make_mesh(config.mesh)
  train.check_config(config, train_cfg, mesh)
  encoders = encoders_lib.build(config.encoders)
  iterator = lambda: input_pipeline.make_train_iterator(config, train_cfg, jax.process_index(),
                                                        jax.process_count())
  built = train.build_task(config, train_cfg, clip_task(encoders, config), mesh, {}, {})
  train.run_loop(config, train_cfg, built, workdir, iterator())
  fitted = checkpoints.load_params(workdir)
  for part in parts(config):
    params = fitted[part]
    if part == "clip_image":
      params = scaled_image_encoder(config, encoders, params, iterator())
    weight_jobs.save_params(os.path.join(out, part), params)
  return out


def scaled_image_encoder(config, encoders, params, data_iterator):
  """The image encoder with its projection rescaled so the embedding's per-dimension std over
  config.clip_fit.std_examples training images is config.clip_fit.embed_std."""
  embed = jax.jit(lambda p, x: encoders.clip_image.apply({"params": p}, x))
  feats, seen = [], 0
  while seen < int(config.clip_fit.std_examples):
    batch = next(data_iterator)
    feats.append(np.asarray(embed(params, jnp.asarray(batch["clip_image"]))))
    seen += len(feats[-1])
  std = float(np.concatenate(feats).std(0).mean())
  params = jax.tree.map(np.asarray, params)
  params["visual_projection"]["kernel"] = (params["visual_projection"]["kernel"]
                                           * (float(config.clip_fit.embed_std) / max(std, 1e-12)))
  print(f"clip: image embedding per-dimension std {std:.4g} -> {config.clip_fit.embed_std} "
        f"(from {seen} training images)", flush=True)
  return params
