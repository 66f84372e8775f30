"""Sampling, per mode: our compiled sampler vs diffusers' UniDiffuserPipeline (PyTorch).

  python benchmarks/bench_sample.py            # 44.8M-parameter U-ViT (bench_train's), 16x16
                                               # latent, 77 text tokens, batch 2, 10 steps
  python benchmarks/bench_sample.py --quick    # configs/demo.py:tiny, 3 steps: sanity only
  python benchmarks/bench_sample.py --modes t2i joint --steps 50 --batch 8

Same weights, sizes, solver, steps and guidance on both sides, float32, one
process, every core (torch threads = os.cpu_count(), or --torch_threads on a
loaded machine, where two threads on two shared cores can be 10x slower than
one; XLA's CPU client uses one Eigen thread per core). Our U-ViT is
initialised, exported with export_uvit to the released thu-ml layout, renamed
to diffusers' UniDiffuserModel names and loaded with load_state_dict(strict=
True); one forward is compared before timing.

Solver on both sides: multistep DPM-Solver++ (data prediction), order --order,
--steps steps = --steps U-ViT evaluations per sample and mode call, with the
same lower-order warm-up and (under 15 steps) lower-order final steps. Ours:
solvers.sample(method='multistep', skip_type='time_uniform', t 1 -> 1e-3);
diffusers: DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', SD's scaled
linear betas, final_sigmas_type='sigma_min', i.e. also ending at t = 1e-3; its
default 'zero' would make the last step first order at any step count). This
is the pairing tests/test_solvers.py checks step by step. It is not the
UniDiffuser reference sampler (our default, the singlestep 'fast'), although
diffusers' pipeline docstring names the multistep scheduler as the paper's;
both make one U-ViT evaluation per step, so the timed work is the same. The
time grids differ slightly (continuous vs diffusers' discrete linspace
timesteps), which does not change the work. Guidance: ours
s = --guidance (cond + s (cond - uncond)) = diffusers' g = s + 1.

WHAT IS TIMED (the denoising loop: U-ViT + solver, nothing else):
  ours      one jitted call of the program sample.mode_program builds, minus its
            decoding: jax.vmap over samples of the per-sample modes.t2i / i2t /
            joint / image_only / text_only call (initial noise, every fresh
            guidance noise, the lax.scan of solver steps), block_until_ready.
            The cond and uncond rows go through the network as ONE batch.
  diffusers UniDiffuserPipeline.__call__'s steps 3.2/4.2 (initial noise, the text
            decoder's encode of the text noise), 5 (scheduler.set_timesteps), 6 and
            8 (the denoising loop: pipe._get_noise_pred + pipe.scheduler.step
            per timestep), run by this script on the pipeline object, under
            torch.inference_mode. The cond and uncond branches are separate
            UniDiffuserModel calls (2 for t2i/i2t, 3 for joint), as in diffusers.
NOT TIMED on either side: prompt/image encoding (CLIP text, CLIP image, VAE
encoder), VAE decoding, caption beam search, PIL/PNG post-processing, host <->
device copies of the (given) conditions. Conditions for t2i (text latent) and
i2t (z, clip_img) are random arrays made before timing.
Separately reported: our compile time (lower + compile, once per mode), and, for
context only, one end-to-end diffusers pipeline call per mode (tiny random CLIP
text/vision encoders, AutoencoderKL, UniDiffuserTextDecoder, tokenizers from
tiny BPE files written to a temp dir), i.e. the pipeline really runs built from
components, including what the loop numbers leave out.

Reported per mode and side: median seconds per call over --reps calls after
--warmup, samples/s, U-ViT evaluations/s (per-sample network forwards: batch x
steps x forwards per step), achieved GFLOP/s (analytic forward FLOPs from
bench_train.forward_flops: matmuls and attention products only) and its
fraction of the matmul peak measured in the same run (matmul_peak.measure, best
of JAX and torch), and the speed ratio ours/diffusers (samples/s; > 1: ours is
faster).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import bench_train  # noqa: E402  (Size, forward_flops: one FLOP count for both benchmarks)
from tests.torchvision_compat import import_torchvision  # noqa: E402

import_torchvision()  # diffusers' AutoencoderKL imports transformers, which imports torchvision

MODES = ("t2i", "i2t", "joint", "i", "t")
# Our mode name -> diffusers' mode name.
DIFFUSERS_MODE = {"t2i": "text2img", "i2t": "img2text", "joint": "joint", "i": "img", "t": "text"}
# U-ViT forwards per solver step with guidance (the i and t modes have no guidance).
FORWARDS_PER_STEP = {"t2i": 2, "i2t": 2, "joint": 3, "i": 1, "t": 1}


@dataclasses.dataclass(frozen=True)
class Run:
  size: bench_train.Size
  steps: int
  order: int
  guidance: float  # ours: cond + s (cond - uncond)
  warmup: int
  reps: int


FULL = Run(size=dataclasses.replace(bench_train.FULL, batch=2), steps=10, order=3, guidance=7.0,
           warmup=1, reps=3)
QUICK = Run(size=dataclasses.replace(bench_train.quick_size(), batch=2), steps=3, order=3,
            guidance=7.0, warmup=1, reps=2)


def _median_time(fn, warmup: int, reps: int):
  """(median seconds, all timed seconds, the last call's output)."""
  for _ in range(warmup):
    out = fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times, out


# ---------------------------------------------------------------- ours (JAX)

def make_ours(s: bench_train.Size):
  import flax.linen as nn
  import jax

  from unidiffuser_jax.models import uvit

  model = bench_train.our_uvit(s)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *uvit.dummy_inputs(model))))()
  return model, params["params"]


def ours_program(task: str, model, run: Run):
  """sample.mode_program's per-sample body without decoding, vmapped and jitted."""
  import functools

  import jax

  from unidiffuser_jax.diffusion import modes

  s = run.size
  shapes = modes.LatentShapes(z=(s.latent_size, s.latent_size, s.latent_channels),
                              clip=(1, s.clip_img_dim), text=(s.num_text_tokens, s.text_dim))
  kw = dict(shapes=shapes, steps=run.steps, order=run.order, method="multistep",
            skip_type="time_uniform", data_type=1)
  g = run.guidance

  def per_sample(params, inputs, key):
    nnet = functools.partial(model.apply, {"params": params})
    one = lambda x: x[None]
    if task == "t2i":
      return modes.t2i(nnet, one(inputs["text"]), key, guidance_scale=g, **kw)[0][0]
    if task == "i2t":
      return modes.i2t(nnet, one(inputs["z"]), one(inputs["clip"]), key, guidance_scale=g, **kw)[0]
    if task == "joint":
      z, _, text = modes.joint(nnet, key, batch_size=1, guidance_scale=g, **kw)
      return z[0], text[0]
    if task == "i":
      return modes.image_only(nnet, key, batch_size=1, **kw)[0][0]
    if task == "t":
      return modes.text_only(nnet, key, batch_size=1, **kw)[0]
    raise ValueError(f"unknown mode {task!r}; choose from {MODES}")

  return jax.jit(lambda params, inputs, keys: jax.vmap(per_sample, in_axes=(None, 0, 0))(
      params, inputs, keys))


def time_ours(task: str, model, params, run: Run, cond: dict) -> dict:
  import jax
  import jax.numpy as jnp

  inputs = {"t2i": {"text": cond["text"]},
            "i2t": {"z": cond["z"], "clip": cond["clip_img"]}}.get(task, {})
  inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
  keys = jax.random.split(jax.random.key(11), run.size.batch)
  program = ours_program(task, model, run)
  t0 = time.perf_counter()
  compiled = program.lower(params, inputs, keys).compile()
  compile_s = time.perf_counter() - t0
  med, times, out = _median_time(lambda: jax.block_until_ready(compiled(params, inputs, keys)),
                                 run.warmup, run.reps)
  finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(out))
  return dict(sec=med, times=times, compile_s=compile_s, finite=finite)


# ---------------------------------------------------------------- weights: ours -> diffusers

def make_unet(s: bench_train.Size, released: dict):
  """diffusers' UniDiffuserModel holding the released-layout (v1) `released` weights, renamed by
  weights/uvit.py's diffusers table."""
  import torch

  from unidiffuser_jax.weights.uvit import released_to_diffusers

  unet = bench_train.diffusers_uvit(s)
  state = {k: torch.from_numpy(v) for k, v in released_to_diffusers(released, "v1", s.depth).items()}
  unet.load_state_dict(state, strict=True)
  return unet.eval()


def forward_parity(model, params, unet, s: bench_train.Size) -> float:
  """Max abs difference of one U-ViT forward (ours vs diffusers) on random inputs."""
  import jax.numpy as jnp
  import torch

  c = bench_train.make_batch(s, seed=5)
  t_img = np.linspace(0, 1000, s.batch).astype(np.float32)
  t_text = t_img[::-1].copy()
  ours = model.apply({"params": params}, jnp.asarray(c["z"]), jnp.asarray(c["clip_img"]),
                     jnp.asarray(c["text"]), jnp.asarray(t_img), jnp.asarray(t_text),
                     jnp.ones((s.batch,), jnp.int32))
  with torch.inference_mode():
    theirs = unet(torch.from_numpy(c["z"]).permute(0, 3, 1, 2), torch.from_numpy(c["clip_img"]),
                  torch.from_numpy(c["text"]), timestep_img=torch.from_numpy(t_img),
                  timestep_text=torch.from_numpy(t_text), data_type=1)
  theirs = (theirs[0].permute(0, 2, 3, 1), theirs[1], theirs[2])
  return max(float(np.abs(np.asarray(a) - b.numpy()).max()) for a, b in zip(ours, theirs))


# ---------------------------------------------------------------- diffusers pipeline from parts

def _write_bpe(directory: str, vocab: list[str], merges: list[str]) -> tuple[str, str]:
  os.makedirs(directory, exist_ok=True)
  vocab_path = os.path.join(directory, "vocab.json")
  merges_path = os.path.join(directory, "merges.txt")
  with open(vocab_path, "w") as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f)
  with open(merges_path, "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return vocab_path, merges_path


def make_pipeline(s: bench_train.Size, unet, run: Run, tmp: str):
  """UniDiffuserPipeline from tiny random components around the benchmarked U-ViT."""
  import torch
  from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
  from diffusers.pipelines.deprecated.unidiffuser import (UniDiffuserPipeline,
                                                          UniDiffuserTextDecoder)
  from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                            CLIPVisionConfig, CLIPVisionModelWithProjection, GPT2Tokenizer)
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  torch.manual_seed(0)
  chars = list(bytes_to_unicode().values())  # GPT-2 / CLIP's stand-in for each byte
  clip_vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>",
                                                      "<|endoftext|>"]
  clip_tok = CLIPTokenizer(*_write_bpe(os.path.join(tmp, "clip"), clip_vocab,
                                       ["c a", "ca t</w>"]), model_max_length=s.num_text_tokens)
  gpt_vocab = chars + ["Ġc", "Ġca", "Ġcat", "<|endoftext|>"]
  gpt_tok = GPT2Tokenizer(*_write_bpe(os.path.join(tmp, "gpt2"), gpt_vocab,
                                      ["Ġ c", "Ġc a", "Ġca t"]))
  # diffusers' text2img mode only applies the text decoder's encode_prefix when the CLIP text
  # width exceeds the prefix dim (true of the released 768 -> 64), so keep it wider.
  hidden = max(32, 2 * s.text_dim)
  text_encoder = CLIPTextModel(CLIPTextConfig(
      vocab_size=len(clip_vocab), hidden_size=hidden, intermediate_size=2 * hidden,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=s.num_text_tokens,
      bos_token_id=len(clip_vocab) - 2, eos_token_id=len(clip_vocab) - 1,
      pad_token_id=len(clip_vocab) - 1)).eval()
  image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
      image_size=16, patch_size=8, projection_dim=s.clip_img_dim)).eval()
  processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
  # One block: no down-sampling, so pixels = latent size and the VAE is nearly free.
  vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                      layers_per_block=1, latent_channels=s.latent_channels, norm_num_groups=8,
                      sample_size=s.latent_size).eval()
  decoder = UniDiffuserTextDecoder(
      prefix_length=s.num_text_tokens, prefix_inner_dim=hidden, prefix_hidden_dim=s.text_dim,
      vocab_size=len(gpt_vocab), n_positions=s.num_text_tokens + 80, n_embd=hidden, n_layer=1,
      n_head=2, n_inner=2 * hidden).eval()
  scheduler = DPMSolverMultistepScheduler(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      solver_order=run.order, algorithm_type="dpmsolver++", prediction_type="epsilon",
      lower_order_final=True, final_sigmas_type="sigma_min")
  pipe = UniDiffuserPipeline(vae=vae, text_encoder=text_encoder, image_encoder=image_encoder,
                             clip_image_processor=processor, clip_tokenizer=clip_tok,
                             text_decoder=decoder, text_tokenizer=gpt_tok, unet=unet,
                             scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def diffusers_loop(pipe, task: str, run: Run, cond: dict, seed: int = 0):
  """The pipeline's own steps 3.2/4.2, 5, 6 and 8 for `task` (see the module docstring)."""
  import torch

  s = run.size
  mode = DIFFUSERS_MODE[task]
  g = run.guidance + 1.0  # diffusers: g cond + (1 - g) uncond
  gen = torch.Generator().manual_seed(seed)
  b, h = s.batch, s.latent_size * pipe.vae_scale_factor
  # Conditions (not generated by the loop in the pipeline either).
  text_c = torch.from_numpy(cond["text"])
  z_c = torch.from_numpy(cond["z"]).permute(0, 3, 1, 2).contiguous()
  clip_c = torch.from_numpy(cond["clip_img"])

  def one():
    with torch.inference_mode():
      if mode == "text2img":
        prompt_embeds = text_c
      else:
        prompt_embeds = pipe.prepare_text_latents(b, 1, pipe.text_encoder_seq_len,
                                                  pipe.text_encoder_hidden_size, torch.float32,
                                                  "cpu", gen)
        prompt_embeds = pipe.text_decoder.encode(prompt_embeds)
      if mode == "img2text":
        img_vae, img_clip = z_c, clip_c
      else:
        img_vae = pipe.prepare_image_vae_latents(b, 1, pipe.num_channels_latents, h, h,
                                                 torch.float32, "cpu", gen)
        img_clip = pipe.prepare_image_clip_latents(b, 1, pipe.image_encoder_projection_dim,
                                                   torch.float32, "cpu", gen)
      pipe.scheduler.set_timesteps(run.steps, device="cpu")
      max_timestep = pipe.scheduler.config.num_train_timesteps
      if mode == "joint":
        latents = pipe._combine_joint(img_vae, img_clip, prompt_embeds)
      elif mode in ("text2img", "img"):
        latents = pipe._combine(img_vae, img_clip)
      else:
        latents = prompt_embeds
      for t in pipe.scheduler.timesteps:
        eps = pipe._get_noise_pred(mode, latents, t, prompt_embeds, img_vae, img_clip,
                                   max_timestep, 1, g, gen, "cpu", h, h)
        latents = pipe.scheduler.step(eps, t, latents).prev_sample
      return latents

  return one


def time_diffusers(pipe, task: str, run: Run, cond: dict) -> dict:
  import torch

  fn = diffusers_loop(pipe, task, run, cond)
  calls = []
  orig = pipe.unet.forward

  def counting(*a, **k):
    calls.append(1)
    return orig(*a, **k)

  pipe.unet.forward = counting  # only during the first warm-up call
  fn()
  pipe.unet.forward = orig
  med, times, out = _median_time(fn, max(run.warmup - 1, 0), run.reps)
  return dict(sec=med, times=times, unet_calls=len(calls), finite=bool(torch.isfinite(out).all()))


def check_loop_is_the_pipelines(pipe, run: Run, cond: dict) -> float:
  """Max abs difference between diffusers_loop('i') and a real pipeline call in 'img' mode
  with output_type='latent' and the same generator seed: the timed loop is the pipeline's."""
  import torch

  want = diffusers_loop(pipe, "i", run, cond, seed=4)()
  pipe.set_image_mode()
  with torch.inference_mode():
    got = pipe(num_images_per_prompt=run.size.batch, num_inference_steps=run.steps,
               output_type="latent", generator=torch.Generator().manual_seed(4)).images
  pipe.reset_mode()
  z_want, _ = pipe._split(want, *(2 * [run.size.latent_size * pipe.vae_scale_factor]))
  return float((z_want - got).abs().max())


def time_diffusers_e2e(pipe, task: str, run: Run) -> float:
  """One full pipeline call (encoders, loop, VAE decode / caption beam search), seconds."""
  import torch
  from PIL import Image

  s = run.size
  mode = DIFFUSERS_MODE[task]
  setter = {"text2img": "set_text_to_image_mode", "img2text": "set_image_to_text_mode",
            "joint": "set_joint_mode", "img": "set_image_mode", "text": "set_text_mode"}[mode]
  getattr(pipe, setter)()
  kw = dict(num_inference_steps=run.steps, guidance_scale=run.guidance + 1.0, output_type="np",
            generator=torch.Generator().manual_seed(0))
  side = s.latent_size * pipe.vae_scale_factor
  if mode == "text2img":
    kw["prompt"] = ["a cat"] * s.batch
  elif mode == "img2text":  # one image, a batch of captions (a list of images must be tensors)
    rng = np.random.default_rng(0)
    kw["image"] = Image.fromarray(rng.integers(0, 255, (side, side, 3), np.uint8))
    kw["num_prompts_per_image"] = s.batch
  elif mode == "joint":  # unconditional modes: the batch is the multiplier
    kw["num_images_per_prompt"] = kw["num_prompts_per_image"] = s.batch
  elif mode == "img":
    kw["num_images_per_prompt"] = s.batch
  else:
    kw["num_prompts_per_image"] = s.batch
  t0 = time.perf_counter()
  with torch.inference_mode(), warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # one image for a batch of captions
    out = pipe(**kw)
  sec = time.perf_counter() - t0
  pipe.reset_mode()
  n = len(out.images) if out.images is not None else len(out.text)
  if n != s.batch:
    raise RuntimeError(f"diffusers {mode}: expected {s.batch} samples, got {n}")
  return sec


# ---------------------------------------------------------------- report

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="configs/demo.py:tiny's U-ViT, 3 steps (sanity only)")
  parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--steps", type=int, default=0)
  parser.add_argument("--order", type=int, default=0, choices=(0, 1, 2, 3))
  parser.add_argument("--guidance", type=float, default=None,
                      help="ours s (cond + s (cond - uncond)); diffusers gets s + 1")
  parser.add_argument("--reps", type=int, default=0)
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="skip measuring the matmul peak and use this value")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="torch threads (default: all cores, the fair setting when quiet)")
  parser.add_argument("--no_e2e", action="store_true",
                      help="skip the end-to-end diffusers pipeline calls")
  args = parser.parse_args()
  run = QUICK if args.quick else FULL
  repl = {}
  if args.batch:
    repl["size"] = dataclasses.replace(run.size, batch=args.batch)
  for k in ("steps", "order", "reps"):
    if getattr(args, k):
      repl[k] = getattr(args, k)
  if args.guidance is not None:
    repl["guidance"] = args.guidance
  run = dataclasses.replace(run, **repl)
  s = run.size

  import torch
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  import jax
  import matmul_peak
  import transformers
  from diffusers.utils import logging as diffusers_logging
  transformers.logging.set_verbosity_error()  # tiny stand-in configs trip harmless warnings
  diffusers_logging.set_verbosity_error()

  from unidiffuser_jax.diffusion import solvers
  from unidiffuser_jax.weights.uvit import export_uvit

  print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, jax "
        f"{jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"torch {torch.__version__}")
  print(f"U-ViT v1: width {s.width}, depth {s.depth}, heads {s.num_heads}, mlp {s.mlp_dim}, "
        f"latent {s.latent_size}x{s.latent_size}x{s.latent_channels} (patch {s.patch_size}), "
        f"text {s.num_text_tokens}x{s.text_dim}, clip {s.clip_img_dim} -> {s.num_tokens} tokens; "
        f"float32")
  evals = solvers.num_model_evals(run.steps, run.order, "multistep")
  print(f"solver: multistep DPM-Solver++ order {run.order}, {run.steps} steps "
        f"(orders {solvers.multistep_orders(run.steps, run.order)}), {evals} solver evaluations; "
        f"guidance s={run.guidance} (diffusers g={run.guidance + 1}); batch {s.batch}; median of "
        f"{run.reps} after {run.warmup} warm-up")
  peak = args.peak_gflops or matmul_peak.measure([512] if args.quick else [2048, 4096],
                                                 3 if args.quick else 10)["peak"]

  model, params = make_ours(s)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  unet = make_unet(s, export_uvit(params, model))
  err = forward_parity(model, params, unet, s)
  print(f"params: {n_params:,}; same weights in diffusers (strict load), one forward max abs "
        f"diff ours vs diffusers: {err:.1e}")
  if err > 1e-3:
    raise RuntimeError(f"weights did not transfer: forward differs by {err}")
  cond = bench_train.make_batch(s, seed=3)  # random conditions, made before any timing
  fwd_flops = bench_train.forward_flops(dataclasses.replace(s, batch=1))

  with tempfile.TemporaryDirectory() as tmp:
    pipe = make_pipeline(s, unet, run, tmp)
    loop_err = check_loop_is_the_pipelines(pipe, run, cond)
    print(f"timed diffusers loop vs a real pipeline call ('img', same seed): max abs diff "
          f"{loop_err:.1e}")
    if loop_err > 1e-5:
      raise RuntimeError(f"the replicated diffusers loop differs from the pipeline by {loop_err}")
    rows = []
    for task in args.modes:
      ours = time_ours(task, model, params, run, cond)
      ref = time_diffusers(pipe, task, run, cond)
      want_calls = evals * FORWARDS_PER_STEP[task]
      if ref["unet_calls"] != want_calls:
        raise RuntimeError(f"{task}: diffusers made {ref['unet_calls']} U-ViT calls, "
                           f"expected {want_calls}")
      e2e = None if args.no_e2e else time_diffusers_e2e(pipe, task, run)
      rows.append((task, ours, ref, e2e))
      print(f"  {task}: ours {ours['sec']:.3f} s (compile {ours['compile_s']:.1f} s), diffusers "
            f"{ref['sec']:.3f} s" + ("" if e2e is None else f", diffusers e2e {e2e:.3f} s"),
            flush=True)

  print(f"\nmatmul peak (measured now): {peak:.1f} GFLOP/s; forward FLOPs per sample "
        f"{fwd_flops / 1e6:.1f} MFLOP (analytic)")
  head = (f"{'mode':5} | {'fwd/step':>8} | {'side':9} | {'s/call':>7} | {'samples/s':>9} | "
          f"{'evals/s':>8} | {'GFLOP/s':>7} | {'% peak':>6} | {'compile s':>9} | {'ours/diff':>9}")
  print(head)
  print("-" * len(head))
  for task, ours, ref, e2e in rows:
    fwd = s.batch * evals * FORWARDS_PER_STEP[task]
    for name, r in (("ours", ours), ("diffusers", ref)):
      gf = fwd * fwd_flops / r["sec"] / 1e9
      comp = f"{ours['compile_s']:9.1f}" if name == "ours" else f"{'-':>9}"
      ratio = f"{ref['sec'] / ours['sec']:9.2f}" if name == "ours" else f"{'':>9}"
      print(f"{task:5} | {FORWARDS_PER_STEP[task]:8d} | {name:9} | {r['sec']:7.3f} | "
            f"{s.batch / r['sec']:9.2f} | {fwd / r['sec']:8.1f} | {gf:7.2f} | "
            f"{100 * gf / peak:5.1f}% | {comp} | {ratio}")
    if e2e is not None:
      print(f"{task:5} | {'':8} | {'diff e2e':9} | {e2e:7.3f} | {s.batch / e2e:9.2f} | "
            f"{'':>8} | {'':>7} | {'':>6} | {'':>9} |")
  print("evals/s = per-sample U-ViT forwards per second (batch x steps x fwd/step / time); "
        "ours/diff = samples/s ratio (> 1: ours faster); 'diff e2e' = one full pipeline call "
        "with tiny encoders/decoders (context only, not a like-for-like comparison).")
  bad = [t for t, o, r, _ in rows if not (o["finite"] and r["finite"])]
  if bad:
    print(f"WARNING: non-finite outputs in {bad}")
  print("times (s): " + "; ".join(
      f"{t} ours " + " ".join(f"{x:.3f}" for x in o["times"]) + " diffusers " +
      " ".join(f"{x:.3f}" for x in r["times"]) for t, o, r, _ in rows))


if __name__ == "__main__":
  main()
