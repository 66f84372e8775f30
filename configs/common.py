"""The config schema: every key of a runbook's config, declared once, with the paper's values.

Each builder returns one section (data, encoders, train, captioner, sample, weights, extract)
with the paper's / LAION's value for every key; a runbook (demo.py, laion.py, laion_256.py)
passes only the values it changes. A key a builder does not declare is refused (one line), so
no section grows a key at run time and the library reads every key without a default.
"""
import ml_collections as mc

# Logical axis -> mesh axis. FSDP splits the model width; tensor parallelism
# splits heads and MLP hidden units. Everything else is replicated.
SHARDING_RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("io", None),
    ("norm", None),
    ("pos", None),
    # The U-ViT's position tables' width: replicated (7 MB). Sharded over fsdp, their batch-
    # summed gradient f32[1105, 1536] became an all-reduce-scatter fusion that libtpu 0.0.42.1
    # aborts on for v5p (SIGABRT, RotatedPincerFusionEmitter; benchmarks/README.md).
    ("pos_width", None),
    ("layers", None),
    # Activations (models/uvit.constrain_activation): batch over the data-parallel axes.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
)


def sharding() -> mc.ConfigDict:
  return mc.ConfigDict({"rules": [list(r) for r in SHARDING_RULES]})


def _section(name: str, declared: dict, given: dict) -> mc.ConfigDict:
  """`declared` with `given` over it (nested dicts merged too); an undeclared key is refused."""
  return mc.ConfigDict(_merge(name, declared, given))


def _merge(name: str, declared: dict, given: dict) -> dict:
  unknown = sorted(set(given) - set(declared))
  if unknown:
    raise KeyError(f"config.{name} has no key(s) {unknown}; declared: {sorted(declared)}")
  merged = dict(declared)
  for k, v in given.items():
    nested = isinstance(declared[k], dict) and isinstance(v, dict)
    merged[k] = _merge(f"{name}.{k}", declared[k], v) if nested else v
  return merged


def mesh(**kw) -> mc.ConfigDict:
  # data x fsdp x tensor; -1: the devices left over. num_devices 0: all devices present.
  return _section("mesh", dict(data=1, fsdp=-1, tensor=1, num_devices=0), kw)


def data(**kw) -> mc.ConfigDict:
  """config.data: the reader (data_pipelines; it adds no defaults of its own); LAION's values.

  source             "shards" (tar shards) | "features" (--mode=extract's) | "synthetic".
  shards             shard tars: comma list of files, directories (all *.tar), globs,
                     '{00000..00099}' ranges; any epath path (local, gs://).
  features           precomputed ArrayRecord feature shards (same syntax; directories mean
                     *.array_record); features.make_feature_iterator.
  tokenizer          a tokenizer directory or a hub id in the local cache
                     (transforms.load_tokenizer); "" = no tokens (batches carry `caption`).
  resolution         image side after centre square crop + LANCZOS.
  clip_resolution    CLIP image input side.
  max_length         token ids padded/truncated to this length.
  data_type          the batches' `data_type` field (0 web, 1 clean).
  shuffle_buffer     window-shuffle window in records (0/1 = off).
  interleave_cycle   shards read concurrently per host (or per worker).
  num_workers        grain worker processes (0 = in-process).
  prefetch           batches buffered ahead (per worker with workers).
  min_side           minimum original short side (0 = off).
  max_aspect         maximum long/short side ratio (None or 0 = off).
  max_watermark, max_unsafe   maximum pwatermark / punsafe (None = off).
  min_aesthetic      minimum aesthetic score (None = off).
  min_caption_chars  minimum cleaned caption length (0 = off).
  max_caption_chars  maximum cleaned caption length (None or 0 = off).
  max_image_pixels   header pixel limit checked before decoding.
  synthetic_vocab_size, synthetic_examples   the synthetic source's token range and length.
  drop_remainder     drop the last partial batch of a finite run.
  with_text          batches also carry `key` and `caption` string arrays.
  """
  return _section("data", dict(
      source="shards",
      # tokenizer: a CLIP tokenizer dir or a hub id in the local cache (configs/laion.py).
      shards="", features="", tokenizer="openai/clip-vit-large-patch14",
      resolution=512, clip_resolution=224, max_length=77, data_type=0,
      shuffle_buffer=10000, interleave_cycle=16, num_workers=8, prefetch=4,
      min_side=512, max_aspect=2.0, max_watermark=0.5, max_unsafe=0.5, min_aesthetic=0.0,
      min_caption_chars=5, max_caption_chars=1000, max_image_pixels=8192 * 8192,
      synthetic_vocab_size=49408, synthetic_examples=1 << 30,
      drop_remainder=True,   # a finite run (extract) keeps its last partial batch with False
      with_text=False,       # stage 1 and extract set it
  ), kw)


# The two autoencoders: the SD KL-f8 VAE (models/vae.py) and the demo's parameter-free
# space-to-depth map (models/pixel_ae.py). Latents are (moments - shift) * scale.
_AUTOENCODERS = {
    "vae": dict(kind="vae", factor=8, scale=0.18215, shift=0.0,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                norm_num_groups=32),
    "pixel": dict(kind="pixel", factor=2, scale=1.0, shift=0.0),
}


def encoders(**kw) -> mc.ConfigDict:
  """config.encoders: the frozen encoders at the released sizes (CLIP ViT-B/32 image, ViT-L/14
  text, GPT-2 caption decoder, SD VAE). autoencoder=dict(kind="pixel", ...) picks the other
  autoencoder's fields. clip_text.vocab_size, captioner.vocab_size and captioner.eos_id are
  not config: every job reads them from the tokenizers (unidiffuser_jax/vocab.derive)."""
  kind = dict(kw.get("autoencoder", {})).get("kind", "vae")
  if kind not in _AUTOENCODERS:
    raise KeyError(f"config.encoders.autoencoder.kind={kind!r}; use one of {sorted(_AUTOENCODERS)}")
  return _section("encoders", dict(
      autoencoder=_AUTOENCODERS[kind],
      text_scale=1.0,  # the released model feeds encode_prefix's output as it is
      fit_latent_stats=0,  # examples measured at the start of a run (latent_stats.py); 0 = fixed
      clip_image=dict(image_size=224, patch_size=32, width=768, num_layers=12, num_heads=12,
                      mlp_dim=3072, proj_dim=512),
      clip_text=dict(width=768, num_layers=12, num_heads=12, mlp_dim=3072, max_positions=77),
      captioner=dict(prefix_inner_dim=768, prefix_hidden_dim=64, n_positions=1024,
                     n_embd=768, n_layer=12, n_head=12),
      # Per-part weights: an orbax params dir (--mode=import writes them); "" = random init.
      weights=dict(autoencoder="", clip_image="", clip_text="", captioner=""),
  ), kw)


def captioner(**kw) -> mc.ConfigDict:
  """config.captioner: stage 1, the caption decoder's training (unidiffuser_jax/captioner_train)."""
  kw = dict(kw)
  train_kw = kw.pop("train", {})
  c = _section("captioner", dict(
      tokenizer="gpt2",  # caption tokenizer ("" = data.tokenizer); needs <|EOS|>
      max_caption_tokens=77, train=None), kw)
  c.train = train(**{**dict(steps=100_000, batch_size=768, lr=2e-5, warmup_steps=1000,
                            weight_decay=0.01, betas=(0.9, 0.999), ema_decay=0.0), **train_kw})
  return c


def clip_fit(**kw) -> mc.ConfigDict:
  """config.clip_fit: the demo runbook's stage 0, the CLIP pair fitted contrastively to the
  training set (unidiffuser_jax/clip_train.py); train.steps 0 = no such stage (the encoders
  config.encoders.weights names, else the seed's random ones). parts: the fitted encoders the
  later stages use (the others stay random). embed_std: a fitted image encoder's embedding
  per-dimension std over std_examples training images (the U-ViT's clip_img scale)."""
  kw = dict(kw)
  train_kw = kw.pop("train", {})
  c = _section("clip_fit", dict(parts=("clip_image", "clip_text"), embed_std=1.0,
                                std_examples=1024, train=None), kw)
  c.train = train(**{**dict(steps=0, batch_size=64, lr=1e-3, warmup_steps=50, lr_decay="cosine",
                            weight_decay=0.01, betas=(0.9, 0.999), ema_decay=0.0), **train_kw})
  return c


def weights(**kw) -> mc.ConfigDict:
  """config.weights: --mode=import sources (a released file, a directory or a repo id in the local
  hub cache; "" = skip that part), written to <workdir>/weights/<part> (weight_jobs.py).
  resize_pos_embed: a U-ViT file for another latent size is interpolated (patch positions).
  clip_tokenizer: CLIP's BPE merges file -> the tokenizer dir <workdir>/weights/clip_tokenizer.
  inception: pytorch-fid's FID Inception .pth -> <workdir>/weights/inception (config.eval)."""
  return _section("weights", dict(uvit="", autoencoder="", clip_image="", clip_text="",
                                  captioner="", clip_tokenizer="", inception="",
                                  resize_pos_embed=False), kw)


def extract(**kw) -> mc.ConfigDict:
  """config.extract: --mode=extract's precomputed features (VAE moments, CLIP image embedding,
  tokens or CLIP text hidden states) for --config.data.source=features. batch_size 0: train's."""
  return _section("extract", dict(text="tokens", shard_size=10000, batch_size=0), kw)


def export(**kw) -> mc.ConfigDict:
  """config.export: --mode=export (weight_jobs.py). A LoRA run (train.lora.rank > 0) exports its
  adapters alone (DIR/export/uvit_<version>.lora.safetensors); merge_lora=True writes the base
  with the adapters merged in, in the released layout, instead."""
  return _section("export", dict(merge_lora=False), kw)


def sample(**kw) -> mc.ConfigDict:
  """config.sample: the reference's DPM-Solver++ "fast", order 3, 50 steps, time-uniform
  (unidiffuser_jax/diffusion/solvers.py); tasks and inputs (unidiffuser_jax/sample.py).
  guidance_scale serves every task but those task_guidance names ("task=scale", e.g. "i2t=3")."""
  return _section("sample", dict(
      tasks=("t2i",), num=4, batch_size=4, eval_num=4,
      steps=50, order=3, method="fast", skip_type="time_uniform",
      guidance_scale=7.0, task_guidance=(), data_type=1, empty_prompt_uncond=False,
      prompts=(), prompt_file="", images=(), seed=1, checkpoint="",
      num_beams=5, max_caption_tokens=67, gibbs_rounds=3, interp_points=5,
      profile=False,  # --mode=sample: a jax.profiler trace of the job into <workdir>/profile
      # LoRA adapters (--mode=export's *.lora.safetensors) merged into the U-ViT once before
      # compiling: comma list of files, and their scales (one per file, or one for all).
      lora="", lora_scale="1.0",
  ), kw)


def serve(**kw) -> mc.ConfigDict:
  """config.serve: --mode=serve (unidiffuser_jax/serve.py), a web page over the samplers.

  Each (task, steps) in tasks x steps is compiled once at start-up for batch_size samples;
  concurrent requests of one (task, steps) share a batch, waiting at most max_wait_ms for it
  to fill. steps=() offers config.sample.steps only. Uploads over max_upload_mb or
  max_image_pixels and prompts over max_prompt_chars are refused or cut with a message.
  output_dir "": <workdir>/serve (the generated PNGs, their parameters in text chunks)."""
  return _section("serve", dict(
      host="127.0.0.1", port=7860, tasks=("t2i", "i2t", "joint", "i2t2i", "t2i2t", "interpolate"),
      steps=(), batch_size=8, max_wait_ms=100, max_samples=4, max_queued_samples=256,
      max_guidance=20.0, max_prompt_chars=500, max_upload_mb=10.0, max_image_pixels=4096 * 4096,
      request_timeout_s=600, output_dir="",
  ), kw)


def compile_plan(**kw) -> mc.ConfigDict:
  """config.compile: --mode=compile, an ahead-of-time plan of the run (unidiffuser_jax/compile.py)."""
  return _section("compile", dict(
      topology="",       # libtpu topology, e.g. "v5p:4x4x4", "v5e:16x16"; "" = this machine's devices
      batch=0,           # global train batch to plan; 0 = train.batch_size (rounded to data*fsdp)
      sampler=False,     # also compile each sampling mode's program (sample.mode_program)
      sample_tasks=(),   # which sampling modes; () = all of sample.TASKS
      sample_batch=0,    # samples per sampler call; 0 = sample.batch_size
      hbm_gib=0.0,       # memory per device to plan against; 0 = the chip's (CPU: host RAM / devices)
      isolate=True,      # each candidate in a child process: a compiler abort is one report row
      # search=True: rank meshes x remat x grad accumulation for the topology (search.py)
      search=False,
      search_tensor=(1, 2, 4),                       # tensor-parallel sizes to try
      # uvit.REMAT_POLICIES to try (the laion plan's best: dots_with_no_batch_dims_saveable)
      search_remat=("none", "block", "dots_saveable", "dots_with_no_batch_dims_saveable"),
      search_accum=(1, 2, 3, 4),  # train.grad_accum values to try (those dividing the per-chip batch)
      # Persistent XLA compilation cache for train, sample and compile (profiling.py):
      # "" = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/compile_cache; "none" = off;
      # else a directory (e.g. shared by runs).
      cache_dir="",
  ), kw)


def train(**kw) -> mc.ConfigDict:
  """The paper's recipe: AdamW 2e-4, wd 0.03, betas (0.9, 0.9), warm-up then constant, EMA 0.9999."""
  return _section("train", dict(
      steps=1000, batch_size=8, grad_accum=1,
      lr=2e-4, warmup_steps=5000,
      lr_decay="constant",  # after warm-up: "constant" (paper) or "cosine" (to 0 at `steps`)
      weight_decay=0.03, betas=(0.9, 0.9), grad_clip_norm=1.0,
      ema_decay=0.9999,
      clean_prob=0.0,  # fraction of samples with one modality clean (objective.py); paper: 0
      loss_weight="eps",  # "eps" (paper) or "v": per-timestep loss weight (objective.py)
      min_snr_gamma=0.0,  # loss weight min(SNR, gamma) / SNR per part (objective.py); paper: 0
      text_weight=1.0,  # each text element's weight in the loss's mean (objective.py); paper: 1
      log_every=50, checkpoint_every=1000, keep_checkpoints=3,
      # steps between evaluations during training (eval_training.py: held-out loss, FID / CLIP
      # score where their weights are present; a runbook's own, the demo's judge); 0 = none
      eval_every=0,
      init_from="",  # fine-tune: params dir from --mode=import, or a workdir (its EMA)
      profile_steps=(),  # (first, last) step of a jax.profiler trace into <workdir>/profile; () = none
      # A step with a NaN/Inf loss or gradient norm is skipped in-graph (nonfinite.py); the run
      # stops after this many in a row (checked at logging and checkpoint steps). 0 = never stop.
      max_nonfinite_steps=10,
      # 0: resume from the newest readable checkpoint (unreadable ones are named and skipped);
      # N: exactly step N, an error if it is missing or unreadable (checkpoints.restore_latest).
      restore_step=0,
      # A checkpoint from another number of processes: False refuses (its data positions cannot
      # be split another way without repeating records); True keeps weights and optimizer state
      # and starts a fresh pass over the data (checkpoints.restore_latest).
      restart_data_on_resize=False,
      # Seconds between a preemption notice (SIGTERM) and the hard kill; the trainer agrees on a
      # step, saves it and exits 0, and warns if that took longer (preemption.py). TPU: 30 s.
      preemption_grace_s=30.0,
      # LoRA fine-tuning of init_from (unidiffuser_jax/lora.py): rank 0 = full fine-tuning.
      # Adapters W + (alpha / rank) * A @ B on the Dense layers whose module path fully matches
      # `targets` (default: attention qkv/proj and MLP fc1/fc2 of every block); dropout on their
      # input; base_dtype: the frozen base weights' storage ("float32" or "bfloat16").
      lora=dict(rank=0, alpha=8.0, dropout=0.0, base_dtype="float32",
                targets=r"(in_blocks_\d+|mid_block|out_blocks_\d+)/(attn/(qkv|proj)|mlp/(fc1|fc2))"),
  ), kw)


def eval_(**kw) -> mc.ConfigDict:
  """config.eval: --mode=eval (unidiffuser_jax/evaluate.py), the paper's evaluation.

  tasks, num          tasks scored (t2i: FID + CLIP score; i2t: CLIP score + BLEU/CIDEr-D) and
                      samples per task (COCO-30K: 30000 t2i prompts).
  guidance_scales     one evaluation per scale (the FID-vs-CLIP-score curve); () = config.sample's
                      scale for each task (guidance_scale, task_guidance).
  source              "" config.sample's prompts/images | "tfds" (tfds.data_source(tfds_name,
                      split) into grain; nothing downloads) | "shards" (img2dataset tars at
                      `path`) | "folder" (images + captions.jsonl at `path`).
  split               TFDS split; "val+test+restval" = all of COCO val2014 (Karpathy splits).
  caption_seed        the protocol's seeded choice: `num` images of the set in a seeded order,
                      one of each image's captions as its prompt (COCO-30K); written to
                      <workdir>/eval/prompts.jsonl.
  metrics             any of "fid", "clip_score", "captions" (BLEU-1..4, CIDEr-D), "loss" (the
                      held-out loss, also logged during training every train.eval_every steps).
  inception           the FID Inception: --mode=import's params dir or pytorch-fid's .pth.
  ref_stats           reference statistics (.npz of pytorch-fid / U-ViT, or stats_only's).
  clip                CLIP model for the CLIP score: a transformers CLIP dir or a cached repo id.
  stats_only          write ref_stats (default <workdir>/eval/ref_stats.npz) over the set's
                      images and stop. Reference images: ref_crop "center" (centre square) or
                      "none", then resized to ref_resolution x ref_resolution with ref_filter
                      (a PIL filter: lanczos, bicubic, bilinear, box, nearest; ref_resolution 0
                      keeps the size). Default: U-ViT's COCO protocol (centre crop, LANCZOS, 256).
  feature_batch_size  Inception/CLIP batch (global; a multiple of the data-parallel size).
  loss_examples, loss_timesteps   the held-out loss: the set's first loss_examples pairs at each
                      fixed timestep (image and text at the same t), noise from the seed.
  save_samples        samples per (task, scale) written as PNGs + grid (captions: all).
  train_num           during training (every train.eval_every steps, eval_training.py): FID /
                      CLIP score of the first train_num inputs of the selection, where the
                      metric networks' weights are present (else the held-out loss alone).
  """
  return _section("eval", dict(
      tasks=("t2i", "i2t"), num=30000, guidance_scales=(),
      source="", tfds_name="coco_captions", split="val+test+restval", tfds_data_dir="",
      path="", caption_seed=0,
      metrics=("fid", "clip_score", "captions", "loss"),
      inception="", ref_stats="", clip="openai/clip-vit-large-patch14",
      stats_only=False, ref_crop="center", ref_resolution=256, ref_filter="lanczos",
      feature_batch_size=64, loss_examples=256, loss_timesteps=(100, 300, 500, 700, 900),
      save_samples=64, train_num=1000,
  ), kw)


def debug(**kw) -> mc.ConfigDict:
  """config.debug: fault injection for tests and drills (off by default).

  poison_steps   1-based train steps whose floating inputs and loss are made NaN in-graph, to
                 exercise the non-finite guard (nonfinite.py), e.g. --config.debug.poison_steps=(5,6).
  """
  return _section("debug", dict(poison_steps=()), kw)
