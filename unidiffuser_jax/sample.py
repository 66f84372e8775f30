"""`--mode=sample`: every UniDiffuser generation mode as one compiled program, over the mesh.

The modes are a table (TASKS): each declares once the host inputs it reads and the outputs
it makes. For each task in config.sample.tasks:
  inputs (prompts and/or images) -> encoders -> one jitted program (the mode's
  DPM-Solver lax.scan + decoding) per fixed-size batch -> records (generate)
  -> PNGs, grid.png, captions.jsonl under <workdir>/samples/<task>/ (write_outputs).

Every input gets its output: a task with inputs makes one sample per prompt or image (the
only cap is stated: interpolate pairs images 2i and 2i+1 and says when an odd last one is
left out); a task without inputs makes config.sample.num. Sample i of a task always uses
the key rng.key_for(seed, i, 'sample/<task>'), and the mode runs vmapped over samples, so a
sample does not depend on which batch it lands in or how many devices share the work.
Batches are padded to config.sample.batch_size, so each task compiles exactly once.
Scoring samples is the caller's (Evaluator takes a score function; the demo's judge lives in
unidiffuser_jax/demo.py).
"""
from collections.abc import Callable
import dataclasses
import functools
import json
import logging
import os

import jax
import matplotlib
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from data_pipelines import shards, transforms
from unidiffuser_jax import checkpoints, encoders as encoders_lib, errors, latent_stats, lora, rng
from unidiffuser_jax import sharding, weight_jobs
from unidiffuser_jax.diffusion import modes, solvers
from unidiffuser_jax.models import captioner as captioner_lib, uvit

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the table of tasks

@dataclasses.dataclass(frozen=True)
class Task:
  """A generation mode: what it reads, what it makes, and its body for one sample.

  inputs: host inputs, each of "prompts" (-> text latent 'text'), "images" (-> 'z', 'clip')
    and "image_pairs" (images 2i and 2i+1 -> 'z', 'clip', 'z2', 'clip2').
  outputs: "image" (latents 'z' -> pixels -> PNGs) and/or "caption" (text latents 'text'
    -> beam search -> captions.jsonl).
  body(nnet, x, key, s, kw) -> {'z'?, 'text'?} for one sample; x holds the inputs with a
    leading batch axis of 1, s is config.sample, kw the solver settings.
  """
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  body: Callable


def guidance_scale(s, task: str) -> float:
  """config.sample's guidance scale for `task`: its entry in s.task_guidance ("task=scale"
  strings) if there is one, else s.guidance_scale."""
  scales = {}
  for entry in s.task_guidance:
    name, sep, value = str(entry).partition("=")
    try:
      if not sep or name.strip() not in TASKS:
        raise ValueError
      scales[name.strip()] = float(value)
    except ValueError:
      raise errors.ConfigError(
          f"config.sample.task_guidance entry {entry!r}: write task=scale with a task of "
          f"{sorted(TASKS)}, e.g. \"i2t=3\"") from None
  return scales.get(task, float(s.guidance_scale))


def _guidance(x, s, task):
  """The sample's own guidance scale when the inputs carry one (a traced number: one program
  serves every scale; 0 then still runs the unconditional rows), else config.sample's."""
  return x["guidance"][0] if "guidance" in x else guidance_scale(s, task)


def _t2i(nnet, x, key, s, kw):
  z, _ = modes.t2i(nnet, x["text"], key, guidance_scale=_guidance(x, s, "t2i"),
                   uncond_text=x.get("uncond_text"), **kw)
  return {"z": z[0]}


def _i2t(nnet, x, key, s, kw):
  return {"text": modes.i2t(nnet, x["z"], x["clip"], key, guidance_scale=_guidance(x, s, "i2t"),
                            **kw)[0]}


def _joint(nnet, x, key, s, kw):
  z, _, text = modes.joint(nnet, key, batch_size=1, guidance_scale=_guidance(x, s, "joint"), **kw)
  return {"z": z[0], "text": text[0]}


def _image_only(nnet, x, key, s, kw):
  return {"z": modes.image_only(nnet, key, batch_size=1, **kw)[0][0]}


def _text_only(nnet, x, key, s, kw):
  return {"text": modes.text_only(nnet, key, batch_size=1, **kw)[0]}


def _i2t2i(nnet, x, key, s, kw):
  text, z, _ = modes.i2t2i(nnet, x["z"], x["clip"], key, guidance_scale=_guidance(x, s, "i2t2i"),
                           **kw)
  return {"text": text[0], "z": z[0]}


def _t2i2t(nnet, x, key, s, kw):
  z, _, text = modes.t2i2t(nnet, x["text"], key, guidance_scale=_guidance(x, s, "t2i2t"), **kw)
  return {"z": z[0], "text": text[0]}


def _gibbs(nnet, x, key, s, kw):
  texts, zs, _ = modes.gibbs(nnet, x["z"], x["clip"], key, rounds=int(s.gibbs_rounds),
                             guidance_scale=_guidance(x, s, "gibbs"), **kw)
  return {"text": texts[:, 0], "z": zs[:, 0]}   # one per round


def _interpolate(nnet, x, key, s, kw):
  zs, _, _ = modes.interpolate(nnet, x["z"], x["clip"], x["z2"], x["clip2"], key,
                               num=int(s.interp_points), **kw)
  return {"z": zs[:, 0]}   # one per point


TASKS = {
    "t2i": Task(("prompts",), ("image",), _t2i),
    "i2t": Task(("images",), ("caption",), _i2t),
    "joint": Task((), ("image", "caption"), _joint),
    "i": Task((), ("image",), _image_only),
    "t": Task((), ("caption",), _text_only),
    "i2t2i": Task(("images",), ("caption", "image"), _i2t2i),
    "t2i2t": Task(("prompts",), ("image", "caption"), _t2i2t),
    "gibbs": Task(("images",), ("caption", "image"), _gibbs),
    "interpolate": Task(("image_pairs",), ("image",), _interpolate),
}


# ---------------------------------------------------------------- the programs

def _solver_kw(s, shapes):
  return dict(shapes=shapes, steps=int(s.steps), order=int(s.order), method=s.method,
              skip_type=s.skip_type, data_type=int(s.data_type))


def mode_program(task: str, model, encoders, s, shapes, on_eval: Callable | None = None,
                 sample_axes=None):
  """(params, enc_params, inputs, keys) -> outputs for one batch; vmapped over samples.

  on_eval(t_img, t_text): called on the host at every network evaluation of every sample
  (jax.debug.callback; the network times of its conditional row), for progress reports.
  sample_axes: mesh axes of the samples' (vmapped) axis in sharding constraints met inside
  (vmap's spmd_axis_name; sampler_program)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose from {tuple(TASKS)}")
  body, kw = TASKS[task].body, _solver_kw(s, shapes)

  def per_sample(params, inputs, key):
    nnet = functools.partial(model.apply, {"params": params})
    if on_eval is not None:
      nnet = _reporting(nnet, on_eval)
    return body(nnet, {k: v[None] for k, v in inputs.items()}, key, s, kw)

  def program(params, enc_params, inputs, keys):
    out = jax.vmap(per_sample, in_axes=(None, 0, 0), spmd_axis_name=sample_axes)(
        params, inputs, keys)
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


def _reporting(nnet, on_eval):
  def wrapped(*args):   # (z, clip_img, text, t_img, t_text, data_type), as modes.Nnet
    jax.debug.callback(on_eval, args[3][0], args[4][0])
    return nnet(*args)
  return wrapped


# ---------------------------------------------------------------- inputs

def load_image(path_or_bytes, resolution: int, clip_resolution: int):
  """An image file, its bytes or a uint8 [H, W, 3] array -> (image [-1, 1] at resolution,
  CLIP-preprocessed at clip_resolution), as the samplers take their input images."""
  if isinstance(path_or_bytes, np.ndarray):
    img = transforms.to_rgb(Image.fromarray(path_or_bytes.astype(np.uint8)))
  else:
    data = (path_or_bytes if isinstance(path_or_bytes, bytes)
            else open(path_or_bytes, "rb").read())
    img, _ = transforms.decode_image(data, max_pixels=1 << 28)
  return transforms.image_to_array(img, resolution), transforms.clip_image(img, clip_resolution)


def config_inputs(config) -> dict:
  """The inputs config.sample names: {'prompts': [...], 'images': [...]} (sample.prompts and
  the lines of sample.prompt_file; sample.images, a folder standing for the images in it)."""
  s = config.sample
  prompts = list(s.prompts)
  if s.prompt_file:
    with open(s.prompt_file) as f:
      prompts += [line.strip() for line in f if line.strip()]
  return {"prompts": prompts, "images": _expand_images(s.images)}


def _expand_images(items) -> list:
  """Image files as given; a folder stands for the images in it (sorted by name)."""
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


def task_inputs(task: str, inputs: dict, config) -> tuple[dict, int]:
  """What `task` reads of `inputs` ({'prompts', 'images' (paths or bytes), 'image_names'?})
  -> (host inputs, number of samples): one per input, config.sample.num without inputs."""
  if task not in TASKS:
    raise ValueError(f"config.sample.tasks: unknown task {task!r}; choose from {tuple(TASKS)}")
  needs = TASKS[task].inputs
  host = {}
  if "prompts" in needs:
    if not inputs.get("prompts"):
      raise ValueError(f"task {task} needs prompts: --config.sample.prompts='(\"a cat\",)' "
                       f"or --config.sample.prompt_file=FILE")
    host["prompts"] = list(inputs["prompts"])
  if "images" in needs or "image_pairs" in needs:
    images = list(inputs.get("images") or [])
    if not images:
      raise ValueError(f"task {task} needs input images: --config.sample.images='(\"a.png\",)' "
                       f"(files or folders)")
    names = list(inputs.get("image_names") or
                 [os.path.basename(i) if isinstance(i, str) else None for i in images])
    if "image_pairs" in needs:
      if len(images) % 2:
        print(f"{task}: pairs images 2i and 2i+1; the last of {len(images)} images "
              f"({names[-1]}) has no partner and is left out", flush=True)
      host["images2"], host["image2_names"] = images[1::2], names[1::2]
      images, names = images[0::2][:len(host["images2"])], names[0::2][:len(host["images2"])]
    host["images"], host["image_names"] = images, names
  n = len(host.get("prompts", host.get("images", []))) or int(config.sample.num)
  return host, n


# ---------------------------------------------------------------- the compiled computation

def load_uvit_params(config, workdir: str):
  path = config.sample.checkpoint or workdir
  return checkpoints.load_params(path)


def _setup(config, workdir: str) -> dict:
  """Mesh, model, normalised encoders and their params, tokenizers, latent shapes."""
  s = config.sample
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_divisible(int(s.batch_size), mesh, what="config.sample.batch_size")
  model = uvit.from_config(config.model)
  weight_jobs.check_imported_uvit(model, s.checkpoint, "sample.checkpoint")
  encoders = encoders_lib.build(config.encoders)
  if int(config.encoders.fit_latent_stats) > 0:
    encoders = latent_stats.apply(encoders, latent_stats.load(s.checkpoint or workdir))
  enc_params, _ = encoders.load_params(config.encoders.weights, mesh, int(config.seed),
                                       config.sharding.rules)
  return dict(context(config, mesh, model, encoders, enc_params),
              replicated=NamedSharding(mesh, P()))  # sampling is data-parallel: weights replicated


def context(config, mesh, model, encoders, enc_params) -> dict:
  """generate's keyword arguments but the U-ViT params, for a model and encoders already built
  (the sampler's own set-up, or a trainer's: evaluation during training)."""
  sharding.check_batch_divisible(int(config.sample.batch_size), mesh,
                                 what="config.sample.batch_size")
  return dict(
      mesh=mesh, model=model, encoders=encoders, enc_params=enc_params,
      tokenizer=transforms.load_tokenizer(config.data.tokenizer),
      cap_tokenizer=transforms.load_tokenizer(config.captioner.tokenizer or config.data.tokenizer),
      shapes=modes.LatentShapes(
          z=(model.latent_size, model.latent_size, model.latent_channels),
          clip=(1, model.clip_img_dim), text=(model.num_text_tokens, model.text_dim)))


def _ctx_args(ctx: dict) -> dict:
  return {k: ctx[k] for k in ("mesh", "model", "encoders", "enc_params", "tokenizer",
                              "cap_tokenizer", "shapes")}


def load_sampler(config, workdir: str) -> dict:
  """The model, encoders, weights (config.sample.checkpoint, else the workdir's newest
  checkpoint) and tokenizers: generate(task, host, n, config, **load_sampler(config, workdir))."""
  ctx = _setup(config, workdir)
  params = lora.for_sampling(config, config.sample.checkpoint or workdir,
                             load_uvit_params(config, workdir),
                             lambda p: jax.device_put(p, ctx["replicated"]))
  return dict(params=params, **_ctx_args(ctx))


def sampler_program(task: str, config, model, encoders, shapes, mesh,
                    on_eval: Callable | None = None):
  """mode_program jitted and traced under the config's mesh and logical-axis rules
  (sharding.traced_under), as train.build traces the step: the U-ViT's activation constraints
  reach the program. The samples' axis takes act_batch's mesh axes (the data-parallel split),
  and inside one sample (a batch of 1, or 2 with guidance) act_batch is left unsplit."""
  rules = sharding.rules_from_config(config.sharding.rules)
  batch = uvit.ACT_AXES[0]
  inner = tuple((name, None if name == batch else axes) for name, axes in rules)
  fn = mode_program(task, model, encoders, config.sample, shapes, on_eval,
                    sample_axes=dict(rules).get(batch))
  return jax.jit(sharding.traced_under(fn, mesh, inner))


def _sample_keys(seeds, ids, purpose: str):
  return jax.vmap(lambda sd, i: rng.key_for(sd, i, purpose))(seeds, ids)


_COMPILED: dict = {}


def _compiled(task, config, model, encoders, shapes, mesh, on_eval=None):
  """The task's jitted programs, built once per (task, model, encoders, mesh, sampler and
  sharding settings): the training-time evaluator and the final sampling of the same process
  share them."""
  key = (task, model, encoders, shapes, mesh, repr(sorted(config.sample.items())),
         repr(config.sharding.rules), on_eval)
  if key not in _COMPILED:
    def encode_images(p, img, clip_img, keys):
      # The posterior sample of image i uses its own key, so it is the same in any batch.
      moments = encoders.image_moments(p, img)
      z = jax.vmap(lambda m, k: encoders.latent_from_moments(m[None], k)[0])(moments, keys)
      return z, encoders.clip_embedding(p, clip_img)
    _COMPILED[key] = dict(
        text=jax.jit(encoders.text_latent), image=jax.jit(encode_images),
        keys=jax.jit(_sample_keys, static_argnames="purpose"),
        program=sampler_program(task, config, model, encoders, shapes, mesh, on_eval))
  return _COMPILED[key]


def _local_rows(mesh, bsz: int) -> list[int]:
  """The rows of a bsz-row batch split over the data-parallel axes that this process's
  devices hold (all rows on one process)."""
  index = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((bsz,))
  return sorted({r for (sl,) in index.values() for r in range(bsz)[sl]})


def _stack_rows(rows: dict, bsz: int) -> np.ndarray:
  """{row: array} -> [bsz, ...] with those rows filled in (the others, which other processes
  hold, stay zero and are never read)."""
  first = next(iter(rows.values()))
  out = np.zeros((bsz,) + first.shape, first.dtype)
  for j, r in rows.items():
    out[j] = r
  return out


def generate(task, host, n, config, *, mesh, model, encoders, params, enc_params, tokenizer,
             cap_tokenizer, shapes, progress: bool = True, on_eval: Callable | None = None):
  """Samples n outputs of `task` for the host inputs (task_inputs) -> one record per sample:
  {index, prompt?, image?, image2? (input file names), pixels?, caption?}. Writes nothing.

  Sample i is keyed by (seed, i) with seed = config.sample.seed; host may give each sample
  its own instead: 'seeds' and 'sample_ids' (lists of n; sample i is then keyed by
  (seeds[i], sample_ids[i]), as sample sample_ids[i] of a run with that seed) and
  'guidance' (n scales, traced, so one compiled program serves them all).

  On several processes every process passes the same host inputs and gets every record: each
  batch is split over the mesh's data-parallel axes (a process reads only the input images
  of its own rows) and the outputs are gathered to every process (process_allgather)."""
  s = config.sample
  bsz = int(s.batch_size)
  fns = _compiled(task, config, model, encoders, shapes, mesh, on_eval)
  seeds = np.asarray(host.get("seeds", np.full(n, int(s.seed))), np.int32)
  ids = np.asarray(host.get("sample_ids", np.arange(n)), np.int32)
  mine = _local_rows(mesh, bsz)
  put = lambda x: jax.make_array_from_callback(   # a batch, the same on every process
      x.shape, sharding.batch_sharding(mesh, x.ndim), lambda i: x[i])
  results = []
  for start in tqdm.trange(0, n, bsz, desc=f"sample {task}", unit="batch", disable=not progress):
    idx = np.arange(start, start + bsz)
    real = idx < n
    idx = np.where(real, idx, n - 1)   # pad the last batch by repeating the last sample
    key_for = lambda purpose: fns["keys"](put(seeds[idx]), put(ids[idx]), purpose=purpose)
    inputs = {}
    if "prompts" in host:
      toks = transforms.tokenize(tokenizer, [host["prompts"][i] for i in idx],
                                 config.data.max_length)
      inputs["text"] = fns["text"](enc_params, put(np.asarray(toks)))
    for name, suffix in (("images", ""), ("images2", "2")):
      if name not in host:
        continue
      arrs = {j: load_image(host[name][idx[j]], config.data.resolution,
                            config.data.clip_resolution) for j in mine}
      img = put(_stack_rows({j: a for j, (a, _) in arrs.items()}, bsz))
      cimg = put(_stack_rows({j: c for j, (_, c) in arrs.items()}, bsz))
      inputs["z" + suffix], inputs["clip" + suffix] = fns["image"](
          enc_params, img, cimg, key_for(f"encode/{task}{suffix}"))
    if "guidance" in host:
      inputs["guidance"] = put(np.asarray(host["guidance"], np.float32)[idx])
    out = fns["program"](params, enc_params, inputs, key_for(f"sample/{task}"))
    out = multihost_utils.process_allgather(out, tiled=True)
    for j in np.flatnonzero(real):
      i = int(idx[j])
      rec = {"index": i}
      if "prompts" in host:
        rec["prompt"] = host["prompts"][i]
      for key, names in (("image", "image_names"), ("image2", "image2_names")):
        if names in host and host[names][i] is not None:
          rec[key] = host[names][i]
      if "pixels" in out:
        rec["pixels"] = _to_uint8(out["pixels"][j])
      if "tokens" in out:
        toks, lens = out["tokens"][j], out["lengths"][j]
        texts = captioner_lib.decode_text(cap_tokenizer, np.atleast_2d(toks),
                                          np.atleast_1d(lens), encoders.captioner.eos_id)
        rec["caption"] = texts[0] if len(texts) == 1 else texts
      results.append(rec)
  return results


# ---------------------------------------------------------------- writing the outputs

_JOIN_KEYS = ("index", "image", "image2", "prompt", "caption")


def write_outputs(records: list[dict], out_dir: str) -> None:
  """Records -> <index>.png (<index>_<r>.png for gibbs rounds and interpolation points),
  grid.png, and captions.jsonl (each line names its input image file and/or prompt).
  Only process 0 writes (one writer per file on a pod)."""
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  pixels_all, captions = [], []
  for rec in records:
    i = rec["index"]
    if "pixels" in rec:
      pix = rec["pixels"]
      pixels_all.append(pix)
      for r, im in enumerate(pix if pix.ndim == 4 else [pix]):
        suffix = f"_{r}" if pix.ndim == 4 else ""
        Image.fromarray(im).save(os.path.join(out_dir, f"{i:05d}{suffix}.png"))
    if "caption" in rec:
      captions.append({k: rec[k] for k in _JOIN_KEYS if k in rec})
  if captions:
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
      for rec in captions:
        f.write(json.dumps(rec) + "\n")
  if pixels_all:
    _save_grid(pixels_all, os.path.join(out_dir, "grid.png"))


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


# ---------------------------------------------------------------- the job

def run(config, workdir: str, inputs: dict | None = None) -> dict:
  """Runs every task in config.sample.tasks on `inputs` (default: config_inputs(config)) and
  writes <workdir>/samples/<task>/; returns {task: {dir, num, records}}."""
  s = config.sample
  try:  # fail on bad solver settings before loading anything
    solvers.check_args(int(s.steps), int(s.order), s.method, s.skip_type)
  except ValueError as e:
    raise errors.ConfigError(f"config.sample: {e}") from None
  inputs = config_inputs(config) if inputs is None else inputs
  for task in s.tasks:  # fail on missing prompts/images or a bad scale before loading anything
    task_inputs(task, inputs, config)
    guidance_scale(s, task)
  sampler = load_sampler(config, workdir)
  results = {}
  for task in s.tasks:
    host, n = task_inputs(task, inputs, config)
    out_dir = os.path.join(workdir, "samples", task)
    records = generate(task, host, n, config, **sampler)
    write_outputs(records, out_dir)
    print(f"{task}: {n} samples in {out_dir}", flush=True)
    results[task] = {"dir": out_dir, "num": n, "records": records}
  return results


class Evaluator:
  """A training-time evaluation (train.run_loop's `evaluate`): every config.train.eval_every
  steps, samples each of `tasks` on the first config.sample.eval_num of `inputs` with the
  current EMA weights, through the same compiled programs as the final sampling, and scores
  the records with score(task, host, records) -> {name: number}. Returns
  {'<prefix>/<task>_<name>': value} for TensorBoard and keeps <workdir>/samples/curve.json
  and curve.png (the learning curve) up to date; a resumed run continues its curve.
  """

  def __init__(self, config, workdir: str, inputs: dict, score: Callable, tasks=None,
               prefix: str = "eval"):
    self._config, self._workdir, self._ctx = config, workdir, None
    self._inputs, self._score, self._prefix = inputs, score, prefix
    self._tasks = tuple(config.sample.tasks if tasks is None else tasks)
    self._curve_path = os.path.join(workdir, "samples", "curve.json")
    self._curve = []
    if os.path.exists(self._curve_path):
      with open(self._curve_path) as f:
        self._curve = json.load(f)

  def __call__(self, step: int, state) -> dict:
    if self._ctx is None:
      self._ctx = _setup(self._config, self._workdir)
    params = lora.eval_params(self._config, jax.device_put(state.ema_params,
                                                           self._ctx["replicated"]), self._ctx)
    scalars = {}
    for task in self._tasks:
      host, n = task_inputs(task, self._inputs, self._config)
      n = min(n, int(self._config.sample.eval_num))
      records = generate(task, host, n, self._config, params=params, progress=False,
                         **_ctx_args(self._ctx))
      scalars.update({f"{self._prefix}/{task}_{k}": float(v)
                      for k, v in self._score(task, host, records).items()
                      if isinstance(v, (int, float)) and k != "n"})
    self._curve = [c for c in self._curve if c["step"] < step] + [dict(step=step, **scalars)]
    if jax.process_index() != 0:   # one writer of the curve files (pods)
      return scalars
    os.makedirs(os.path.dirname(self._curve_path), exist_ok=True)
    with open(self._curve_path, "w") as f:
      json.dump(self._curve, f, indent=1)
    plot_curve(self._curve, os.path.join(os.path.dirname(self._curve_path), "curve.png"))
    return scalars


def plot_curve(curve: list[dict], path: str) -> None:
  """The curve's '<prefix>/<task>_<name>' values vs training step, one panel per
  (prefix, task) (PNG); values all in [0, 1] (accuracies) share a 0-1 axis."""
  panels = sorted({k.split("_", 1)[0] for c in curve for k in c if "/" in k and "_" in k})
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
  steps = [c["step"] for c in curve]
  for ax, panel in zip(axes[0], panels):
    names = sorted({k.split("_", 1)[1] for c in curve for k in c if k.startswith(panel + "_")})
    values = []
    for name in names:
      ys = [c.get(f"{panel}_{name}", np.nan) for c in curve]
      values += ys
      ax.plot(steps, ys, marker="o", ms=3, label=name)
    if all(0.0 <= v <= 1.0 for v in values if not np.isnan(v)):
      ax.set_ylim(0, 1.02)
    prefix, task = panel.split("/", 1)
    ax.set_xlabel("step")
    ax.set_title(f"{task}: {prefix}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
