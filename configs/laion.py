"""UniDiffuser-v1 (952,509,520 parameters) at 512x512 on LAION: the paper's stages 2 and 3.

  # plan: parameter count, mesh, shardings and per-device memory, no device needed
  python -m unidiffuser_jax.main --config=configs/laion.py --mode=describe
  # stage 2: laion-high-resolution, 200K steps, batch 2112 (from the stage-1 checkpoint)
  python -m unidiffuser_jax.main --config=configs/laion.py --workdir=gs://BUCKET/uvit512 \
      --config.data.shards='gs://BUCKET/laion-hr/{00000..99999}.tar'
  # stage 3: laion-aesthetics v2 5+, original side >= 512, pwatermark < 0.5, ~220K more steps,
  # resumed with optimizer state: same workdir, new shards, --config.train.steps=420000
  #   --config.data.min_side=512 --config.data.max_watermark=0.5 --config.data.min_aesthetic=5

Planned pod configurations (--mode=compile with libtpu 0.0.42.1 on compile-only devices:
XLA's memory plan and a roofline, not measured step times; benchmarks/README.md, "configs/laion.py
on v5p-128, v5e-256 and v4-128"):

  v5p-128 (v5p:4x4x4, 64 chips): fsdp=64 (the default mesh), batch 2112 = 33 per chip,
      --config.model.remat=dots_with_no_batch_dims_saveable --config.model.attention=splash
      39.9 of 95 GiB per chip; estimated MFU 57.7% (compute, HBM and ICI times not
      overlapping; compute-bound, so <= 100% with perfect overlap)
  v5e-256 (v5e:16x16): fsdp=256, --config.train.batch_size=2048 = 8 per chip,
      --config.model.remat=none --config.model.attention=splash
      15.68 of 16 GiB per chip (the compiler's limit is 15.75); estimated MFU 40.9% (HBM-bound;
      <= 78.9%). With headroom: --config.model.remat=dots_with_no_batch_dims_saveable, 10.0 GiB,
      36.2% (<= 63.6%)

  v4-128 (v4:4x4x4, 64 chips of 32 GiB): fsdp=64, batch 2112 as --config.train.grad_accum=3
      (11 per chip per pass), --config.model.remat=none --config.model.attention=splash
      27.8 of 32 GiB per chip; estimated MFU 72.8% (compute-bound). With headroom:
      --config.model.remat=dots_with_no_batch_dims_saveable, 14.9 GiB, 68.9%

The splash kernel has been compiled for these chips and checked against the reference in Pallas'
interpreter (tests/test_layers.py), not yet run on a TPU. The defaults (einsum attention, remat
per block) run on every backend (splash is a TPU kernel; elsewhere it runs in the interpreter); on v5p-128 they fit (22.2 GiB per chip) but
recompute every matmul and move float32 attention logits through HBM: estimated MFU 30.2%
(<= 51.1%).

Reproduces the recipe of Bao et al. 2023 (REFERENCE.md): AdamW lr 2e-4, weight decay 0.03,
betas (0.9, 0.9), 5K warm-up then constant, EMA 0.9999, bfloat16 compute with float32 master
weights and float32 softmax, remat per block. Frozen encoders: SD KL-f8 VAE (scale 0.18215),
CLIP ViT-B/32 image, CLIP ViT-L/14 text, GPT-2 caption decoder; their weights come from
`--mode=import` (config.encoders.weights). `arg` picks the U-ViT layout: "v1" (default) or "v0".

Text tokenizer (config.data.tokenizer): CLIP's BPE (49408 tokens, 77 per caption, padded with
<|endoftext|>), a tokenizer directory or a hub id in the local cache (default
openai/clip-vit-large-patch14). Without a hub, make the directory from the merges file CLIP
ships, bpe_simple_vocab_16e6.txt.gz (e.g. inside the open-clip-torch wheel:
`pip download --no-deps open-clip-torch==3.3.0 && unzip -j open_clip_torch-*.whl
open_clip/bpe_simple_vocab_16e6.txt.gz`):

  python -m unidiffuser_jax.main --config=configs/laion.py --mode=import --workdir=DIR \
      --config.weights.clip_tokenizer=bpe_simple_vocab_16e6.txt.gz
  # then every job: --config.data.tokenizer=DIR/weights/clip_tokenizer

Its ids equal open_clip.tokenize's (captions cleaned as CLIP does: ftfy, HTML entities,
whitespace, lower case; data_pipelines/transforms.tokenize), except for the padding id.
"""
import ml_collections as mc

from configs import common


def get_config(arg: str | None = None) -> mc.ConfigDict:
  version = arg or "v1"
  c = mc.ConfigDict()
  c.seed = 0
  c.runbook = ""  # --mode=train is the U-ViT training job alone
  c.mesh = common.mesh()
  c.sharding = common.sharding()
  c.data = common.data()   # LAION's filters; the tokenizer: see the docstring
  # SD KL-f8 VAE (scale 0.18215), CLIP ViT-B/32 image, ViT-L/14 text, GPT-2 caption decoder;
  # vocabulary sizes and <|EOS|> from data.tokenizer (CLIP's, 49408) and captioner.tokenizer
  # (GPT-2's + <|EOS|>, 50258; id 50257) (vocab.py).
  c.encoders = common.encoders()

  c.model = mc.ConfigDict(dict(
      version=version,
      latent_size=c.data.get_ref("resolution") // c.encoders.autoencoder.get_ref("factor"),
      latent_channels=c.encoders.autoencoder.get_ref("latent_channels"), patch_size=2,
      width=1536, depth=30, num_heads=24, mlp_dim=6144,
      text_dim=c.encoders.captioner.get_ref("prefix_hidden_dim"),
      num_text_tokens=c.data.get_ref("max_length"),
      clip_img_dim=c.encoders.clip_image.get_ref("proj_dim"),
      num_data_types=2, dtype="bfloat16", remat="block", pos_init="normal", prediction="eps",
      attention="einsum",  # layers.ATTENTION_IMPLS; "splash" on TPU (see the docstring)
  ))

  c.train = common.train(steps=200_000, batch_size=2112, lr=2e-4, warmup_steps=5000,
                         weight_decay=0.03, betas=(0.9, 0.9), grad_clip_norm=0.0,
                         ema_decay=0.9999, log_every=100, checkpoint_every=2000)
  c.captioner = common.captioner()
  c.weights = common.weights()
  c.extract = common.extract()
  c.eval = common.eval_()
  c.debug = common.debug()
  c.export = common.export()
  c.sample = common.sample()
  c.serve = common.serve(steps=(25, 50))
  c.compile = common.compile_plan()
  return c
