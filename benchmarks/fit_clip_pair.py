"""Fit the demo's CLIP image and text encoders contrastively to a demo set (a probe, not a stage).

  python benchmarks/fit_clip_pair.py --workdir=workdirs/glyphs --out=workdirs/clip_glyphs \
      --config=configs/demo.py:glyphs
  python -m unidiffuser_jax.main --config=configs/demo.py:glyphs --workdir=workdirs/glyphs_clip \
      --config.encoders.weights.clip_image=workdirs/clip_glyphs/clip_image \
      --config.encoders.weights.clip_text=workdirs/clip_glyphs/clip_text

The demo's CLIP pair is random and frozen (its image embedding is nearly constant across
images). This starts from the same random encoders (the seed's 'init/<part>' draw), adds a
linear head on the text encoder's mean-pooled hidden states, and trains all of it with the
symmetric contrastive (InfoNCE) loss on the set's training images and captions, read by the
training input pipeline (--workdir: a demo run's workdir, or a new one: the set is built there).
Then: the 5-nearest-neighbour read-out of each attribute from the fitted image embedding (768
training-stream images against 256 others), and the image projection divided by the embedding's
per-dimension std so the U-ViT's `clip_img` has unit scale like the fitted latents. Writes
plain parameter dirs <out>/clip_image and <out>/clip_text, which config.encoders.weights reads.
docs/SMALL_DATA.md ("Session 14") reads the numbers.
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import demo_sets  # noqa: E402
from unidiffuser_jax import demo, encoders as encoders_lib, input_pipeline, sharding  # noqa: E402

_PARTS = ("clip_image", "clip_text")


def contrastive_loss(img_bp, txt_bp, log_scale):
  """Symmetric InfoNCE over the batch (pair i is the positive of row and column i) and the
  image -> text retrieval accuracy."""
  img_bp = img_bp / jnp.linalg.norm(img_bp, axis=-1, keepdims=True)
  txt_bp = txt_bp / jnp.linalg.norm(txt_bp, axis=-1, keepdims=True)
  logits_bb = jnp.exp(jnp.minimum(log_scale, np.log(100.0))) * img_bp @ txt_bp.T
  labels_b = jnp.arange(logits_bb.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  loss = (ce(logits_bb, labels_b).mean() + ce(logits_bb.T, labels_b).mean()) / 2
  return loss, (logits_bb.argmax(1) == labels_b).mean()


def main(config, workdir: str, out: str, steps: int, batch: int, lr: float) -> None:
  demo.open_run(config, workdir)
  data_cfg = config.copy_and_resolve_references()
  data_cfg.unlock()
  data_cfg.data.with_text = True
  train_cfg = data_cfg.train
  train_cfg.batch_size = batch
  it = input_pipeline.make_train_iterator(data_cfg, train_cfg, 0, 1)
  enc = encoders_lib.build(config.encoders)
  mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  start, _ = enc.load_params({}, mesh, int(config.seed), config.sharding.rules)
  head = nn.Dense(int(config.encoders.clip_image.proj_dim), use_bias=False)
  params = {part: start[part] for part in _PARTS}
  params["head"] = head.init(jax.random.key(1), jnp.zeros((1, int(config.encoders.clip_text.width))))["params"]
  params["log_scale"] = jnp.asarray(np.log(1 / 0.07), jnp.float32)

  def loss_fn(p, image_bssc, tokens_bl):
    img_bp = enc.clip_image.apply({"params": p["clip_image"]}, image_bssc)
    hidden_bld = enc.clip_text.apply({"params": p["clip_text"]}, tokens_bl)
    mask_bl1 = (tokens_bl != 0).astype(jnp.float32)[..., None]   # 0 pads the word-level tokens
    txt_bp = head.apply({"params": p["head"]}, (hidden_bld * mask_bl1).sum(1) / mask_bl1.sum(1))
    return contrastive_loss(img_bp, txt_bp, p["log_scale"])

  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 4), steps), weight_decay=0.01))
  opt_state = opt.init(params)

  @jax.jit
  def step(p, s, image_bssc, tokens_bl):
    (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(p, image_bssc, tokens_bl)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss, acc

  t0 = time.time()
  for i in range(steps):
    b = next(it)
    params, opt_state, loss, acc = step(params, opt_state, jnp.asarray(b["clip_image"]),
                                        jnp.asarray(b["tokens"]))
    if i % 250 == 0 or i == steps - 1:
      print(f"step {i}: contrastive loss {float(loss):.3f}, in-batch retrieval {float(acc):.2f} "
            f"({time.time() - t0:.0f} s)", flush=True)

  demo_set = demo_sets.get(config.demo.set)
  embed = jax.jit(lambda p, x: enc.clip_image.apply({"params": p}, x))
  feats, truth = [], []
  while len(truth) < 1024:
    b = next(it)
    feats.append(np.asarray(embed(params["clip_image"], jnp.asarray(b["clip_image"]))))
    truth += [demo_set.parse_caption(c) for c in b["caption"]]
  x = np.concatenate(feats)[:1024]
  std = float(x.std(0).mean())
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  nearest = np.argsort(-(xn[768:] @ xn[:768].T), axis=1)[:, :5]
  for attr in demo_set.ATTRIBUTES:
    fit = [t[attr] for t in truth[:768]]
    votes = [[fit[j] for j in row] for row in nearest]
    pred = [max(set(v), key=v.count) for v in votes]
    acc = np.mean([p == t[attr] for p, t in zip(pred, truth[768:1024])])
    print(f"5-NN {attr} from the fitted image embedding: {acc:.2f}")
  print(f"image embedding per-dimension std {std:.4f} -> 1 (projection rescaled)")
  params["clip_image"]["visual_projection"]["kernel"] /= std
  ckptr = ocp.StandardCheckpointer()
  for part in _PARTS:
    ckptr.save(os.path.abspath(os.path.join(out, part)), jax.device_get(params[part]), force=True)
  ckptr.wait_until_finished()
  print(f"wrote {out}/clip_image and {out}/clip_text")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  args, rest = parser.parse_known_args()
  config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=False)
  flags.FLAGS([sys.argv[0]] + rest)
  main(flags.FLAGS.config, args.workdir, args.out, args.steps, args.batch, args.lr)
