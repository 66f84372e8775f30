"""UniDiffuser-v1 (952,509,520 parameters) at 512x512 on LAION: the paper's stages 2 and 3.

  # plan: parameter count, mesh, shardings and per-device memory, no device needed
  python -m unidiffuser_jax.main --config=configs/laion.py --mode=describe
  # stage 2: laion-high-resolution, 200K steps, batch 2112 (from the stage-1 checkpoint)
  python -m unidiffuser_jax.main --config=configs/laion.py --workdir=gs://BUCKET/uvit512 \
      --config.data.shards='gs://BUCKET/laion-hr/{00000..99999}.tar'
  # stage 3: laion-aesthetics v2 5+, original side >= 512, pwatermark < 0.5, ~220K more steps,
  # resumed with optimizer state: same workdir, new shards, --config.train.steps=420000
  #   --config.data.min_side=512 --config.data.max_watermark=0.5 --config.data.min_aesthetic=5

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
  c.mesh = dict(data=1, fsdp=-1, tensor=1, num_devices=0)  # 0: all devices present
  c.sharding = common.sharding()

  c.data = mc.ConfigDict(dict(
      source="shards",
      # tokenizer: a CLIP tokenizer dir (e.g. DIR/weights/clip_tokenizer from --mode=import) or
      # a hub id in the local cache; see the docstring.
      shards="", features="", tokenizer="openai/clip-vit-large-patch14",
      resolution=512, clip_resolution=224, max_length=77, data_type=0,
      shuffle_buffer=10000, interleave_cycle=16, num_workers=8, prefetch=4,
      min_side=512, max_aspect=2.0, max_watermark=0.5, max_unsafe=0.5, min_aesthetic=0.0,
      min_caption_chars=5, max_caption_chars=1000, max_image_pixels=8192 * 8192,
      synthetic_vocab_size=49408, synthetic_examples=1 << 30,
  ))

  c.encoders = mc.ConfigDict(dict(
      autoencoder=dict(kind="vae", factor=8, scale=0.18215, shift=0.0, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=4, norm_num_groups=32),
      clip_image=dict(image_size=224, patch_size=32, width=768, num_layers=12, num_heads=12, mlp_dim=3072,
                      proj_dim=512),
      # Vocabulary sizes and the caption decoder's <|EOS|> id: from data.tokenizer (CLIP's, 49408)
      # and captioner.tokenizer (GPT-2's + <|EOS|>, 50258; id 50257) (vocab.py).
      clip_text=dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072, max_positions=77),
      captioner=dict(prefix_inner_dim=768, prefix_hidden_dim=64, n_positions=1024,
                     n_embd=768, n_layer=12, n_head=12),
      text_scale=1.0,  # the released model feeds encode_prefix's output as it is
      fit_latent_stats=0,  # published constants (0.18215, text as it is), not fitted
      weights=dict(autoencoder="", clip_image="", clip_text="", captioner=""),
  ))

  c.model = mc.ConfigDict(dict(
      version=version,
      latent_size=c.data.get_ref("resolution") // c.encoders.autoencoder.get_ref("factor"),
      latent_channels=c.encoders.autoencoder.get_ref("latent_channels"), patch_size=2,
      width=1536, depth=30, num_heads=24, mlp_dim=6144,
      text_dim=c.encoders.captioner.get_ref("prefix_hidden_dim"),
      num_text_tokens=c.data.get_ref("max_length"),
      clip_img_dim=c.encoders.clip_image.get_ref("proj_dim"),
      num_data_types=2, dtype="bfloat16", remat="block", pos_init="normal",
  ))

  c.train = common.train(steps=200_000, batch_size=2112, lr=2e-4, warmup_steps=5000,
                         weight_decay=0.03, betas=(0.9, 0.9), grad_clip_norm=0.0,
                         ema_decay=0.9999, log_every=100, checkpoint_every=2000)
  c.captioner = mc.ConfigDict(dict(
      tokenizer="gpt2",  # caption tokenizer ("" = data.tokenizer); needs <|EOS|>
      max_caption_tokens=77,
      train=common.train(steps=100_000, batch_size=768, lr=2e-5, warmup_steps=1000,
                         weight_decay=0.01, betas=(0.9, 0.999), ema_decay=0.0),
  ))
  # --mode=import sources (a released file, a directory or a repo id in the local hub cache;
  # "" = skip that part): written to <workdir>/weights/<part>. See unidiffuser_jax/weight_jobs.py.
  # resize_pos_embed: a U-ViT file for another latent size is interpolated (patch positions).
  # clip_tokenizer: CLIP's BPE merges file -> the tokenizer directory <workdir>/weights/clip_tokenizer.
  c.weights = mc.ConfigDict(dict(uvit="", autoencoder="", clip_image="", clip_text="",
                                 captioner="", clip_tokenizer="", resize_pos_embed=False))
  # --mode=extract: precomputed features (VAE moments, CLIP image embedding, tokens or CLIP text
  # hidden states) for training with --config.data.source=features. batch_size 0: train's.
  c.extract = mc.ConfigDict(dict(text="tokens", shard_size=10000, batch_size=0))

  # Sampler: the reference's DPM-Solver++ "fast", order 3, 50 steps, time-uniform (methods in
  # unidiffuser_jax/diffusion/solvers.py).
  c.sample = mc.ConfigDict(dict(
      tasks=("t2i",), num=4, batch_size=4, eval_num=4,
      steps=50, order=3, method="fast", skip_type="time_uniform",
      guidance_scale=7.0, data_type=1, empty_prompt_uncond=False,
      prompts=(), prompt_file="", images=(), seed=1, checkpoint="",
      num_beams=5, max_caption_tokens=67, gibbs_rounds=3, interp_points=5,
  ))
  return c
