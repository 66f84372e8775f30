"""UniDiffuser stage 1: 256x256 on laion2B-en, 250K steps, batch 11264, 5K warm-up.

  python -m unidiffuser_jax.main --config=configs/laion_256.py --mode=describe
  python -m unidiffuser_jax.main --config=configs/laion_256.py --workdir=gs://BUCKET/uvit256 \
      --config.data.shards='gs://BUCKET/laion2b-en/{00000..99999}.tar'

The same network as configs/laion.py (v1 by default; `arg` = "v0" for the v0 layout) at a
32x32 latent: 1024/4 = 256 patch tokens, and the position table sized for 256 px. Stage 2
starts from this checkpoint after interpolating the patch positions to 64x64
(models/uvit.resize_pos_embed). The text tokenizer is configs/laion.py's (its docstring: how to
make it from CLIP's BPE file without a hub).
"""
from configs import laion


def get_config(arg: str | None = None):
  c = laion.get_config(arg)
  c.data.resolution = 256
  c.data.min_side = 256
  c.data.max_watermark = 1.0
  c.train.steps = 250_000
  c.train.batch_size = 11264
  c.train.warmup_steps = 5000
  return c
