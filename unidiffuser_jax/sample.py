"""`--mode=sample`: every UniDiffuser generation mode as one compiled program, over the mesh.

For each task in config.sample.tasks:
  inputs (prompts and/or images) -> encoders -> one jitted program (the mode's
  DPM-Solver lax.scan + decoding) per fixed-size batch -> PNGs, grid.png,
  captions.jsonl under <workdir>/samples/<task>/.

Sample i of a task always uses the key rng.key_for(seed, i, 'sample/<task>'),
and the mode runs vmapped over samples, so a sample does not depend on which
batch it lands in or how many devices share the work. Batches are padded to
config.sample.batch_size, so each task compiles exactly once.
"""
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from unidiffuser_jax import checkpoints, encoders as encoders_lib, errors, latent_stats, rng
from unidiffuser_jax import sharding, train
from unidiffuser_jax import weight_jobs
from unidiffuser_jax.diffusion import modes, solvers
from unidiffuser_jax.models import captioner as captioner_lib

log = logging.getLogger(__name__)

TASKS = ("t2i", "i2t", "joint", "i", "t", "i2t2i", "t2i2t", "gibbs", "interpolate")
_NEEDS_PROMPTS = ("t2i", "t2i2t")
_NEEDS_IMAGES = ("i2t", "i2t2i", "gibbs", "interpolate")
# interpolate: sample i goes from input image 2i to image 2i+1 in config.sample.interp_points.


# ---------------------------------------------------------------- the programs

def _solver_kw(s, shapes):
  return dict(shapes=shapes, steps=int(s.steps), order=int(s.order), method=s.method,
              skip_type=s.skip_type, data_type=int(s.data_type))


def mode_program(task: str, model, encoders, s, shapes):
  """(params, enc_params, inputs, keys) -> outputs for one batch; vmapped over samples."""
  kw = _solver_kw(s, shapes)
  g = float(s.guidance_scale)

  def per_sample(params, inputs, key):
    nnet = functools.partial(model.apply, {"params": params})
    one = lambda x: x[None]
    if task == "t2i":
      z, clip = modes.t2i(nnet, one(inputs["text"]), key, guidance_scale=g,
                          uncond_text=inputs.get("uncond_text"), **kw)
      return {"z": z[0]}
    if task == "i2t":
      return {"text": modes.i2t(nnet, one(inputs["z"]), one(inputs["clip"]), key,
                                guidance_scale=g, **kw)[0]}
    if task == "joint":
      z, clip, text = modes.joint(nnet, key, batch_size=1, guidance_scale=g, **kw)
      return {"z": z[0], "text": text[0]}
    if task == "i":
      z, clip = modes.image_only(nnet, key, batch_size=1, **kw)
      return {"z": z[0]}
    if task == "t":
      return {"text": modes.text_only(nnet, key, batch_size=1, **kw)[0]}
    if task == "i2t2i":
      text, z, clip = modes.i2t2i(nnet, one(inputs["z"]), one(inputs["clip"]), key,
                                  guidance_scale=g, **kw)
      return {"text": text[0], "z": z[0]}
    if task == "t2i2t":
      z, clip, text = modes.t2i2t(nnet, one(inputs["text"]), key, guidance_scale=g, **kw)
      return {"z": z[0], "text": text[0]}
    if task == "gibbs":
      texts, zs, clips = modes.gibbs(nnet, one(inputs["z"]), one(inputs["clip"]), key,
                                     rounds=int(s.gibbs_rounds), guidance_scale=g, **kw)
      return {"text": texts[:, 0], "z": zs[:, 0]}
    if task == "interpolate":
      zs, clips, texts = modes.interpolate(
          nnet, one(inputs["z"]), one(inputs["clip"]), one(inputs["z2"]), one(inputs["clip2"]),
          key, num=int(s.interp_points), **{k: v for k, v in kw.items()})
      return {"z": zs[:, 0]}
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")

  def program(params, enc_params, inputs, keys):
    out = jax.vmap(per_sample, in_axes=(None, 0, 0))(params, inputs, keys)
    if "z" in out:  # decode inside the same program: pixels in [-1, 1]
      z = out["z"]
      flat = z.reshape((-1,) + z.shape[-3:])
      pix = encoders.decode_latent(enc_params, flat)
      out["pixels"] = pix.reshape(z.shape[:-3] + pix.shape[1:])
    if "text" in out:
      t = out["text"]
      flat = t.reshape((-1,) + t.shape[-2:])
      tokens, lengths = captioner_lib.beam_search(
          encoders.captioner, {"params": enc_params["captioner"]}, encoders.caption_prefix(flat),
          num_beams=int(s.num_beams),
          max_new_tokens=int(s.max_caption_tokens), eos_id=encoders.captioner.eos_id)
      out["tokens"] = tokens.reshape(t.shape[:-2] + tokens.shape[-1:])
      out["lengths"] = lengths.reshape(t.shape[:-2])
    return out

  return program


# ---------------------------------------------------------------- inputs

def _load_image(path_or_bytes, resolution: int, clip_resolution: int):
  from data_pipelines import transforms
  data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
  img, _ = transforms.decode_image(data, max_pixels=1 << 28)
  return transforms.image_to_array(img, resolution), transforms.clip_image(img, clip_resolution)


def _demo_heldout(config, n: int):
  """The demo's held-out records: (captions, image bytes, attributes)."""
  from data_pipelines import demo_sets, shards
  demo = demo_sets.get(config.data.demo)
  caps, imgs, attrs = [], [], []
  for path in config.data.heldout.split(","):
    for e in shards.iter_entries(path):
      if "files" not in e:
        continue
      img_ext = next(x for x in shards.IMAGE_EXTS if x in e["files"])
      caps.append(e["files"]["txt"].decode())
      imgs.append(e["files"][img_ext])
      attrs.append(demo.parse_caption(caps[-1]))
      if len(caps) == n:
        return caps, imgs, attrs
  return caps, imgs, attrs


def gather_inputs(task: str, config):
  """Host inputs for a task: {'prompts': [...]} and/or {'images': [...]} plus truth for the demo."""
  s = config.sample
  out = {}
  prompts = list(s.prompts)
  if s.prompt_file:
    with open(s.prompt_file) as f:
      prompts += [line.strip() for line in f if line.strip()]
  images = _expand_images(s.images)
  if config.data.get("demo") and not prompts and not images:
    caps, imgs, attrs = _demo_heldout(config, int(s.num))
    prompts, images, out["truth"] = caps, imgs, attrs
  if task in _NEEDS_PROMPTS:
    if not prompts:
      raise ValueError(f"task {task} needs prompts: --config.sample.prompts='(\"a cat\",)' "
                       f"or --config.sample.prompt_file=FILE")
    out["prompts"] = prompts
  if task in _NEEDS_IMAGES:
    if not images:
      raise ValueError(f"task {task} needs input images: --config.sample.images='(\"a.png\",)' "
                       f"(files or folders)")
    out["images"] = images
  return out


def _expand_images(items) -> list:
  """Image files as given; a folder stands for the images in it (sorted by name)."""
  from data_pipelines import shards
  out = []
  for item in items:
    if isinstance(item, str) and os.path.isdir(item):
      found = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().rsplit(".", 1)[-1] in shards.IMAGE_EXTS)
      if not found:
        raise ValueError(f"config.sample.images: the folder {item} holds no images")
      out.extend(found)
    else:
      out.append(item)
  return out


# ---------------------------------------------------------------- the job

def load_uvit_params(config, workdir: str):
  path = config.sample.get("checkpoint", "") or workdir
  return checkpoints.load_params(path)


def run(config, workdir: str) -> dict:
  """Runs every task in config.sample.tasks; returns {task: scores or output dir}."""
  s = config.sample
  try:  # fail on bad solver settings before loading anything
    solvers.check_args(int(s.steps), int(s.order), s.method, s.skip_type)
  except ValueError as e:
    raise errors.ConfigError(f"config.sample: {e}") from None
  for task in s.tasks:  # fail on missing prompts/images before loading anything
    if task not in TASKS:
      raise ValueError(f"config.sample.tasks: unknown task {task!r}; choose from {TASKS}")
    gather_inputs(task, config)
  ctx = _setup(config, workdir)
  params = jax.device_put(load_uvit_params(config, workdir), ctx["replicated"])
  results = {}
  for task in s.tasks:
    results[task] = _run_task(task, config, workdir, params=params, **_ctx_args(ctx))
  return results


def _setup(config, workdir: str) -> dict:
  """Mesh, model, normalised encoders and their params, tokenizers, latent shapes."""
  from data_pipelines import transforms
  s = config.sample
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(int(s.batch_size), mesh, what="config.sample.batch_size")
  model = train.make_model(config.model)
  weight_jobs.check_imported_uvit(model, s.get("checkpoint", ""), "sample.checkpoint")
  encoders = encoders_lib.build(config.encoders)
  if int(config.encoders.fit_latent_stats) > 0:
    encoders = latent_stats.apply(encoders, latent_stats.load(s.get("checkpoint", "") or workdir))
  enc_params, _ = encoders.load_params(config.encoders.weights, mesh, int(config.seed),
                                       config.sharding.rules)
  return dict(
      mesh=mesh, model=model, encoders=encoders, enc_params=enc_params,
      replicated=NamedSharding(mesh, P()),  # sampling is data-parallel: weights replicated
      tokenizer=transforms.load_tokenizer(config.data.tokenizer),
      cap_tokenizer=transforms.load_tokenizer(config.captioner.tokenizer or config.data.tokenizer),
      shapes=modes.LatentShapes(
          z=(model.latent_size, model.latent_size, model.latent_channels),
          clip=(1, model.clip_img_dim), text=(model.num_text_tokens, model.text_dim)))


def _ctx_args(ctx: dict) -> dict:
  return {k: ctx[k] for k in ("mesh", "model", "encoders", "enc_params", "tokenizer",
                              "cap_tokenizer", "shapes")}


class Evaluator:
  """Judges a training run every config.train.eval_every steps (the learning curve).

  Samples each task of config.sample.tasks that has a judge (t2i, i2t) on the first
  config.sample.eval_num held-out inputs with the current EMA weights, through the
  same compiled programs as the final sampling; returns {'judge/<task>_<attr>': acc}
  for TensorBoard and keeps <workdir>/samples/curve.json and curve.png up to date.
  """

  def __init__(self, config, workdir: str):
    self._config, self._workdir, self._ctx = config, workdir, None
    self._curve_path = os.path.join(workdir, "samples", "curve.json")
    self._curve = []
    if os.path.exists(self._curve_path):   # a resumed run continues its curve
      with open(self._curve_path) as f:
        self._curve = json.load(f)

  def __call__(self, step: int, state) -> dict:
    if self._ctx is None:
      self._ctx = _setup(self._config, self._workdir)
    params = jax.device_put(state.ema_params, self._ctx["replicated"])
    num = int(self._config.sample.eval_num)
    scalars = {}
    for task in self._config.sample.tasks:
      if task not in ("t2i", "i2t"):
        continue
      host, n = _task_inputs(task, self._config)
      n = min(n, num)
      recs = generate(task, host, n, self._config, params=params, progress=False,
                      **_ctx_args(self._ctx))
      scores = _judge(task, self._config, host, [r["pixels"] for r in recs if "pixels" in r],
                      [r for r in recs if "caption" in r], n)
      scalars.update({f"judge/{task}_{a}": float(v) for a, v in scores.items()
                      if isinstance(v, (int, float)) and a != "n"})
    self._curve = [c for c in self._curve if c["step"] < step] + [dict(step=step, **scalars)]
    os.makedirs(os.path.dirname(self._curve_path), exist_ok=True)
    with open(self._curve_path, "w") as f:
      json.dump(self._curve, f, indent=1)
    plot_curve(self._curve, os.path.join(os.path.dirname(self._curve_path), "curve.png"))
    return scalars


def plot_curve(curve: list[dict], path: str) -> None:
  """Judge accuracy vs training step, one panel per task (PNG)."""
  tasks = sorted({k.split("/")[1].split("_")[0] for c in curve for k in c if k.startswith("judge/")})
  if not tasks:
    return
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
  steps = [c["step"] for c in curve]
  for ax, task in zip(axes[0], tasks):
    attrs = sorted({k.split("_", 1)[1] for c in curve for k in c if k.startswith(f"judge/{task}_")})
    for a in attrs:
      ax.plot(steps, [c.get(f"judge/{task}_{a}", np.nan) for c in curve], marker="o", ms=3, label=a)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title(f"{task}: judge accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


_COMPILED: dict = {}


def _compiled(task, config, model, encoders, shapes):
  """The task's jitted programs, built once per (task, model, encoders, sampler settings):
  the training-time evaluator and the final sampling of the same process share them."""
  key = (task, model, encoders, shapes, repr(sorted(config.sample.items())))
  if key not in _COMPILED:
    def encode_images(p, img, clip_img, keys):
      # The posterior sample of image i uses its own key, so it is the same in any batch.
      moments = encoders.image_moments(p, img)
      z = jax.vmap(lambda m, k: encoders.latent_from_moments(m[None], k)[0])(moments, keys)
      return z, encoders.clip_embedding(p, clip_img)
    _COMPILED[key] = dict(text=jax.jit(encoders.text_latent), image=jax.jit(encode_images),
                          program=jax.jit(mode_program(task, model, encoders, config.sample, shapes)))
  return _COMPILED[key]


def generate(task, host, n, config, *, mesh, model, encoders, params, enc_params, tokenizer,
             cap_tokenizer, shapes, progress: bool = True):
  """Samples n outputs of `task` for the host inputs -> [{index, pixels?, caption?, prompt?}]."""
  from data_pipelines import transforms
  s = config.sample
  bsz = int(s.batch_size)
  fns = _compiled(task, config, model, encoders, shapes)
  batch_sh = lambda x: NamedSharding(mesh, P(sharding.BATCH_AXES, *([None] * (x.ndim - 1))))
  results = []
  with mesh:
    for start in tqdm.trange(0, n, bsz, desc=f"sample {task}", unit="batch", disable=not progress):
      idx = np.arange(start, start + bsz)
      real = idx < n
      idx = np.where(real, idx, n - 1)   # pad the last batch by repeating the last sample
      inputs = {}
      if "prompts" in host:
        toks = transforms.tokenize(tokenizer, [host["prompts"][i] for i in idx],
                                   config.data.max_length)
        inputs["text"] = fns["text"](enc_params, jnp.asarray(toks))
      for name, suffix in (("images", ""), ("images2", "2")):
        if name not in host:
          continue
        arrs = [_load_image(host[name][i], config.data.resolution,
                            config.data.clip_resolution) for i in idx]
        img = np.stack([a for a, _ in arrs])
        cimg = np.stack([c for _, c in arrs])
        enc_keys = jax.vmap(lambda i, sfx=suffix: rng.key_for(int(s.seed), i, f"encode/{task}{sfx}"))(
            jnp.asarray(idx))
        inputs["z" + suffix], inputs["clip" + suffix] = fns["image"](enc_params, img, cimg, enc_keys)
      keys = jax.vmap(lambda i: rng.key_for(int(s.seed), i, f"sample/{task}"))(jnp.asarray(idx))
      inputs = {k: jax.device_put(v, batch_sh(v)) for k, v in inputs.items()}
      out = jax.device_get(fns["program"](params, enc_params, inputs, keys))
      for j in np.flatnonzero(real):
        i = int(idx[j])
        rec = {"index": i}
        if "prompts" in host:
          rec["prompt"] = host["prompts"][i]
        if "images" in host and isinstance(host["images"][i], str):
          rec["image"] = os.path.basename(host["images"][i])
        if "pixels" in out:
          rec["pixels"] = _to_uint8(out["pixels"][j])
        if "tokens" in out:
          toks, lens = out["tokens"][j], out["lengths"][j]
          texts = captioner_lib.decode_text(cap_tokenizer, np.atleast_2d(toks),
                                            np.atleast_1d(lens), encoders.captioner.eos_id)
          rec["caption"] = texts[0] if len(texts) == 1 else texts
        results.append(rec)
  return results


def _task_inputs(task, config):
  host = gather_inputs(task, config)
  if task == "interpolate":
    host["images2"] = host["images"][1::2]
    host["images"] = host["images"][0::2][:len(host["images2"])]
  # Every input gets its output (config.sample.num only sizes the demo's held-out set
  # and the tasks without inputs).
  n = len(host.get("prompts", host.get("images", []))) or int(config.sample.num)
  return host, n


def _run_task(task, config, workdir, *, mesh, model, encoders, params, enc_params, tokenizer,
              cap_tokenizer, shapes):
  host, n = _task_inputs(task, config)
  out_dir = os.path.join(workdir, "samples", task)
  os.makedirs(out_dir, exist_ok=True)
  recs = generate(task, host, n, config, mesh=mesh, model=model, encoders=encoders, params=params,
                  enc_params=enc_params, tokenizer=tokenizer, cap_tokenizer=cap_tokenizer,
                  shapes=shapes)
  pixels_all, captions = [], []
  for rec in recs:
    i = rec["index"]
    if "pixels" in rec:
      pix = rec["pixels"]
      pixels_all.append(pix)
      for r, im in enumerate(pix if pix.ndim == 4 else [pix]):
        suffix = f"_{r}" if pix.ndim == 4 else ""   # gibbs rounds, interpolation points
        Image.fromarray(im).save(os.path.join(out_dir, f"{i:05d}{suffix}.png"))
    if "caption" in rec:
      captions.append({k: rec[k] for k in ("index", "image", "prompt", "caption") if k in rec})
  if captions:
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
      for rec in captions:
        f.write(json.dumps(rec) + "\n")
  if pixels_all:
    _save_grid(pixels_all, os.path.join(out_dir, "grid.png"))
  result = {"dir": out_dir, "num": n}
  if "truth" in host:
    result["scores"] = _judge(task, config, host, pixels_all, captions, n)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
      json.dump(result["scores"], f, indent=1)
  print(f"{task}: {n} samples in {out_dir}" +
        (f" | judge: {_fmt_scores(result['scores'])}" if "scores" in result else ""), flush=True)
  return result


def _judge(task, config, host, pixels_all, captions, n):
  from data_pipelines import demo_sets
  demo = demo_sets.get(config.data.demo)
  if task == "t2i":
    return demo.score_t2i(np.stack(pixels_all[:n]), host["prompts"][:n])
  if task == "i2t":
    return demo.score_i2t([c["caption"] for c in captions[:n]], host["truth"][:n])
  return {}


def _fmt_scores(scores) -> str:
  chance = scores.get("chance", {})
  return ", ".join(f"{a} {scores[a]:.2f} (chance {chance[a]:.2f})" for a in chance if a in scores)


def _to_uint8(x):
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _save_grid(images, path, cols: int = 8):
  ims = [im for im in images if im.ndim == 3] or [r for im in images for r in im]
  h, w, _ = ims[0].shape
  rows = (len(ims) + cols - 1) // cols
  grid = np.full((rows * h, min(cols, len(ims)) * w, 3), 255, np.uint8)
  for k, im in enumerate(ims):
    r, c = divmod(k, cols)
    grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
  Image.fromarray(grid).save(path)
