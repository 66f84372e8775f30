"""Can a demo-sized transformer read the glyph set's digit at all? A supervised probe.

  python benchmarks/probe_glyph_classifier.py [--patch=4] [--backgrounds=dark,light]
      [--steps=2000] [--lr=1e-3]

Renders the glyph set (data_pipelines/glyph_data.py: 2,048 training and 512 held-out
images, 16 px) and trains six of the U-ViT's blocks at the demo's size (models/uvit.py's Block:
width 128, 4 heads, MLP 512; tokens of patch x patch pixels, learned positions, mean-pooled)
to classify the digit with cross-entropy, with the demo's optimiser (AdamW, betas (0.9, 0.9),
weight decay 0.03, 50 warm-up steps, clip 1, batch 32). Prints held-out accuracy every 250
steps. docs/SMALL_DATA.md ("Session 12") compares its speed with the diffusion objective's:
the same data and capacity learn the digit in ~1,000 supervised steps, so a demo run that
leaves the digit at chance is limited by the training signal, not by what the network can
represent. --backgrounds=dark keeps one background (one contrast polarity).
"""
import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipelines import glyph_data  # noqa: E402
from unidiffuser_jax.models import uvit  # noqa: E402

SIZE = 16


def render_set(n: int, seed: int, backgrounds: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """float32 [n, 16, 16, 3] images in 0..1 and int [n] digits."""
  rng = np.random.default_rng(seed)
  images, digits = [], []
  for _ in range(n):
    a = glyph_data.sample_attrs(rng)
    bg = backgrounds[rng.integers(len(backgrounds))]
    images.append(glyph_data.render(a["digit"], a["colour"], bg, SIZE, rng))
    digits.append(a["digit"])
  return np.stack(images).astype(np.float32) / 255.0, np.array(digits)


def to_tokens(x_bhwc: np.ndarray, patch: int) -> np.ndarray:
  b, g = x_bhwc.shape[0], SIZE // patch
  x = x_bhwc.reshape(b, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * g, patch * patch * 3)


class Classifier(nn.Module):
  """The U-ViT's own blocks (models/uvit.py: post-LN, exact GELU) on patch tokens, mean-pooled."""
  width: int = 128
  depth: int = 6

  @nn.compact
  def __call__(self, tokens_bnd):
    pos = self.param("pos", nn.initializers.normal(0.02), (1,) + tokens_bnd.shape[1:2] + (self.width,))
    x = nn.Dense(self.width)(tokens_bnd) + pos
    for _ in range(self.depth):
      x = uvit.Block(self.width, num_heads=4, mlp_dim=4 * self.width)(x)
    return nn.Dense(len(glyph_data.DIGITS))(x.mean(axis=1))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--patch", type=int, default=4, choices=(1, 2, 4, 8))
  p.add_argument("--backgrounds", default="dark,light")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--every", type=int, default=250)
  p.add_argument("--n_train", type=int, default=2048)
  a = p.parse_args(argv)
  backgrounds = a.backgrounds.split(",")
  if not set(backgrounds) <= set(glyph_data.BACKGROUNDS):
    p.error(f"--backgrounds: choose from {sorted(glyph_data.BACKGROUNDS)}")
  x_tr, y_tr = render_set(a.n_train, 0, backgrounds)
  x_te, y_te = render_set(512, 1, backgrounds)
  mean, std = x_tr.mean(), x_tr.std()
  tok_tr, tok_te = (to_tokens((x - mean) / std, a.patch) for x in (x_tr, x_te))

  model = Classifier()
  params = nn.unbox(model.init(jax.random.key(0), tok_tr[:2]))
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
      optax.linear_schedule(0.0, a.lr, 50), b1=0.9, b2=0.9, weight_decay=0.03))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  accuracy = jax.jit(lambda p, x, y: (model.apply(p, x).argmax(-1) == y).mean())
  rng = np.random.default_rng(0)
  t0 = time.time()
  print(f"patch {a.patch}, backgrounds {backgrounds}, lr {a.lr}: held-out digit accuracy "
        f"(chance {1 / len(glyph_data.DIGITS):.2f})")
  for i in range(1, a.steps + 1):
    idx = rng.integers(0, len(tok_tr), 32)
    params, opt_state = step(params, opt_state, tok_tr[idx], y_tr[idx])
    if i % a.every == 0 or i == a.steps:
      print(f"step {i:5d}: {float(accuracy(params, tok_te, y_te)):.2f}  "
            f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
