"""`--mode=eval`: the paper's evaluation of a trained or imported UniDiffuser.

  python -m unidiffuser_jax.main --config=configs/laion.py --mode=eval --workdir=DIR \\
    --flagfile=DIR/weights/uvit.flags --config.eval.source=tfds \\
    --config.eval.inception=DIR/weights/inception --config.eval.ref_stats=coco_val2014_256.npz

For every guidance scale in config.eval.guidance_scales (default: config.sample's scale for
the task, sample.guidance_scale) and every task in config.eval.tasks, it draws config.eval.num samples with the compiled samplers
(sample.generate: fixed-size batches, data-parallel over the mesh, sample i keyed by
(config.sample.seed, i) whatever the scale), in chunks so that a 30K run never holds its
images, and scores them:

  t2i   FID of the samples vs config.eval.ref_stats (FID Inception features, eval_features:
        sharded, float64 statistics combined exactly across hosts); CLIP score of each image
        vs its prompt (clip_score.py, torchmetrics' 100 * cos convention).
  i2t   CLIP score of each input image vs its generated caption; BLEU-1..4 and CIDEr-D of the
        captions vs the set's reference captions (caption_metrics.py, simple_tokenize).
  loss  the held-out loss at fixed timesteps and noise (heldout.py), once per run.

Prompts and images come from config.eval.source (eval_data: TFDS coco_captions, img2dataset
shards, a folder + captions.jsonl; the protocol's seeded selection is written to
DIR/eval/prompts.jsonl) or, with source "", from config.sample's prompts/images.

Writes DIR/eval/eval.json (one row per (task, guidance scale) + the held-out loss + the
protocol), TensorBoard scalars in DIR/eval, DIR/eval/<task>_g<scale>/ (the first
config.eval.save_samples samples as PNGs and grid.png; captions.jsonl of every caption) and
DIR/eval/fid_clip.png (FID against CLIP score over guidance scales, the paper's figure).

`--config.eval.stats_only=True` instead writes the reference statistics of the set's images
(pytorch-fid's .npz) with the documented preprocessing (reference_image) and stops.

A runbook may add its own scores: run(config, workdir, score=fn) with
fn(task, host, records) -> {name: number} (the demo's judge; it gets all records of a task).
"""
from collections.abc import Callable
import json
import os
import time

import jax
import matplotlib
import numpy as np
import tqdm
from PIL import Image

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from data_pipelines import transforms  # noqa: E402
from unidiffuser_jax import caption_metrics, clip_score, errors, eval_data  # noqa: E402
from unidiffuser_jax import eval_features, fid, heldout, sample, sharding, tb_events  # noqa: E402
from unidiffuser_jax.diffusion import solvers  # noqa: E402
from unidiffuser_jax.models.inception import POOL_DIM  # noqa: E402
from unidiffuser_jax.weights import clip as wclip  # noqa: E402

METRICS = ("fid", "clip_score", "captions", "loss")
TASKS = ("t2i", "i2t")
FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
           "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
           "nearest": Image.Resampling.NEAREST}
_CHUNK_BATCHES = 16   # sampler batches generated (and held as pixels) between metric updates


# ---------------------------------------------------------------- images

def to_pil(image) -> Image.Image:
  """Encoded bytes, a path or a uint8 [H, W, 3] array -> an RGB PIL image."""
  if isinstance(image, str):
    with open(image, "rb") as f:
      image = f.read()
  if isinstance(image, bytes):
    return transforms.decode_image(image, max_pixels=1 << 28)[0]
  return transforms.to_rgb(Image.fromarray(np.asarray(image, np.uint8)))


def reference_image(image, crop: str, resolution: int, filt: str) -> np.ndarray:
  """A reference image as FID sees it: crop ("center": the centre square; "none"), resize to
  resolution x resolution with the PIL filter `filt` (0: keep the size) -> uint8 [H, W, 3].
  The Inception network then resizes to 299 bilinearly (pytorch-fid's F.interpolate)."""
  pil = to_pil(image)
  if crop == "center":
    pil = transforms.center_square(pil)
  elif crop != "none":
    raise errors.ConfigError(f"config.eval.ref_crop={crop!r}; use 'center' or 'none'")
  if filt not in FILTERS:
    raise errors.ConfigError(f"config.eval.ref_filter={filt!r}; use one of {sorted(FILTERS)}")
  if resolution and pil.size != (resolution, resolution):
    pil = pil.resize((resolution, resolution), FILTERS[filt])
  return np.asarray(pil, np.uint8)


# ---------------------------------------------------------------- metric networks

class InceptionStats:
  """Generated or reference images -> FID statistics, sharded over the mesh."""

  def __init__(self, config, mesh):
    ecfg = config.eval
    self.local_batch = _local_batch(ecfg)
    self.net = eval_features.ShardedFeatures(
        eval_features.inception_fn, eval_features.load_inception(ecfg.inception), mesh,
        self.local_batch)

  def new(self) -> fid.FeatureStats:
    return fid.FeatureStats(POOL_DIM)

  def add(self, stats: fid.FeatureStats, images_uint8: list) -> None:
    """Adds this process's share of `images_uint8` (the same list on every process)."""
    share = eval_features.process_share(len(images_uint8))
    local = (eval_features.to_unit(images_uint8[i]) for i in share)
    stats.merge(eval_features.feature_stats(
        self.net, local, eval_features.num_batches(len(images_uint8), self.local_batch)))


class ClipScorer:
  """CLIP score of (image, text) pairs with the CLIP model config.eval.clip names."""

  def __init__(self, config, mesh):
    ecfg = config.eval
    try:
      directory = wclip.find_model_dir(ecfg.clip)
      vision, vparams = wclip.load_clip_vision(directory)
      text, tparams = wclip.load_clip_text(directory)
      head, hparams = wclip.load_clip_text_projection(directory)
      self._tokenizer = transforms.load_tokenizer(directory)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise errors.ConfigError(f"config.eval.clip={ecfg.clip}: {str(e).splitlines()[0]}"
                               ) from None
    self._size, self._length = vision.image_size, text.max_positions
    local = _local_batch(ecfg)
    self._local_batch = local
    self._image = eval_features.ShardedFeatures(
        lambda x, p: vision.apply({"params": p}, x), vparams, mesh, local)
    self._text = eval_features.ShardedFeatures(
        lambda t, p: head.apply({"params": p["head"]},
                                text.apply({"params": p["text"]}, t), t),
        {"text": tparams, "head": hparams}, mesh, local)

  def add(self, stats: clip_score.ClipScoreStats, images: list, texts: list[str]) -> None:
    """Adds this process's share of the pairs (images: uint8 arrays or encoded bytes)."""
    share = eval_features.process_share(len(texts))
    nb = eval_features.num_batches(len(texts), self._local_batch)
    pix = (transforms.clip_image(to_pil(images[i]), self._size) for i in share)
    toks = (transforms.tokenize(self._tokenizer, [texts[i]], self._length)[0] for i in share)
    batches = zip(eval_features.padded_batches(pix, self._local_batch, nb),
                  eval_features.padded_batches(toks, self._local_batch, nb))
    for (p, mask), (t, _) in batches:
      img_emb, txt_emb = self._image(p), self._text(t)
      if mask.any():
        stats.add(img_emb[mask], txt_emb[mask])


def _local_batch(ecfg) -> int:
  b = int(ecfg.feature_batch_size)
  if b <= 0 or b % jax.process_count():
    raise errors.ConfigError(f"config.eval.feature_batch_size={b}: a positive multiple of the "
                             f"process count {jax.process_count()}")
  return b // jax.process_count()


def _combined_clip(stats: clip_score.ClipScoreStats) -> float:
  sums = eval_features.allreduce_sums(dict(n=stats.n, total=stats.total,
                                           total_clamped=stats.total_clamped))
  out = clip_score.ClipScoreStats()
  out.n, out.total, out.total_clamped = int(round(sums["n"])), sums["total"], sums["total_clamped"]
  return out.compute()


# ---------------------------------------------------------------- checks before any work

def check(config, eval_set) -> None:
  """One line per missing piece, before any weights load or sample is drawn."""
  ecfg = config.eval
  bad = sorted(set(ecfg.metrics) - set(METRICS))
  if bad:
    raise errors.ConfigError(f"config.eval.metrics: unknown {bad}; use any of {METRICS}")
  bad = sorted(set(ecfg.tasks) - set(TASKS))
  if bad:
    raise errors.ConfigError(f"config.eval.tasks: unknown {bad}; use any of {TASKS}")
  if "fid" in ecfg.metrics and "t2i" in ecfg.tasks:
    if not ecfg.inception:
      eval_features.load_inception("")   # raises the one-line import instruction
    if not os.path.exists(ecfg.inception):
      raise errors.ConfigError(f"config.eval.inception={ecfg.inception}: no such file or "
                               f"directory")
    if not ecfg.ref_stats:
      raise errors.ConfigError(
          "FID needs reference statistics: --config.eval.ref_stats=FILE.npz (pytorch-fid / "
          "U-ViT's, or write them: --mode=eval --config.eval.stats_only=True over the set)")
    try:
      fid.load_stats(ecfg.ref_stats, dim=POOL_DIM)
    except fid.StatsFileError as e:
      raise errors.ConfigError(f"config.eval.ref_stats: {e}") from None
  if "clip_score" in ecfg.metrics and not ecfg.clip:
    raise errors.ConfigError("the CLIP score needs a CLIP model: --config.eval.clip="
                             "openai/clip-vit-large-patch14 (a transformers CLIP dir or a repo "
                             "id in the local hub cache; nothing is downloaded)")
  if "clip_score" in ecfg.metrics:
    try:
      wclip.find_model_dir(ecfg.clip)
    except FileNotFoundError as e:
      raise errors.ConfigError(f"config.eval.clip: {str(e).splitlines()[0]}") from None
  if eval_set is None and "loss" in ecfg.metrics:
    raise errors.ConfigError("the held-out loss needs an evaluation set: config.eval.source "
                             "(tfds | shards | folder), or drop 'loss' from config.eval.metrics")


# ---------------------------------------------------------------- reference statistics

def write_reference_stats(config, eval_set, mesh, out_dir: str) -> str:
  """stats_only: FID statistics of the set's images (reference_image) -> .npz; returns its path."""
  ecfg = config.eval
  if eval_set is None:
    raise errors.ConfigError("config.eval.stats_only needs a reference set: config.eval.source "
                             "(tfds | shards | folder)")
  path = ecfg.ref_stats or os.path.join(out_dir, "ref_stats.npz")
  net = InceptionStats(config, mesh)
  total = len(eval_set)
  share = eval_features.process_share(total)
  images = (eval_features.to_unit(reference_image(
      eval_set.items[i]["image"], ecfg.ref_crop, int(ecfg.ref_resolution), ecfg.ref_filter))
      for i in share)
  bar = tqdm.tqdm(total=len(share), desc="reference statistics", unit="img",
                  disable=jax.process_index() != 0)
  stats = eval_features.feature_stats(
      net.net, images, eval_features.num_batches(total, net.local_batch), progress=bar.update)
  bar.close()
  stats = eval_features.allreduce_stats(stats)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fid.save_stats(path, stats.mean(), stats.cov())
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
      json.dump(dict(images=stats.n, source=ecfg.source, tfds_name=ecfg.tfds_name,
                     split=ecfg.split, path=ecfg.path, crop=ecfg.ref_crop,
                     resolution=int(ecfg.ref_resolution), filter=ecfg.ref_filter,
                     network="pytorch-fid FID Inception pool3 (bilinear resize to 299)"),
                f, indent=1)
  print(f"reference statistics of {stats.n} images -> {path}", flush=True)
  return path


# ---------------------------------------------------------------- the job

def select_inputs(config, eval_set, num: int, prompts_path: str | None = None) -> dict:
  """{'prompts', 'images', 'image_names', 'references', 'index'}: the first `num` of the set's
  seeded selection (eval_data.select; its list written to prompts_path by process 0), or of
  config.sample's prompts/images when there is no set."""
  if eval_set is None:
    own = sample.config_inputs(config)
    return dict(prompts=own["prompts"][:num], images=own["images"][:num],
                image_names=[os.path.basename(i) for i in own["images"][:num]],
                references=None, index=None)
  sel = eval_data.select(eval_set, num, int(config.eval.caption_seed),
                         prompts_path if jax.process_index() == 0 else None)
  return dict(prompts=sel.prompts, images=eval_data.LazyImages(eval_set.items, sel.order),
              image_names=sel.names, references=sel.references, index=sel.order)


def _runs(config) -> list[tuple[str, float]]:
  """(task, guidance scale) pairs: every task at each of config.eval.guidance_scales, or
  without them at config.sample's scale for that task (sample.guidance_scale)."""
  scales = [float(g) for g in config.eval.guidance_scales]
  if scales:
    return [(task, g) for g in scales for task in config.eval.tasks]
  return [(task, sample.guidance_scale(config.sample, task)) for task in config.eval.tasks]


def evaluate_task(task, scale, config, inputs, sampler, nets, out_dir, score=None) -> dict:
  """Samples and scores one (task, guidance scale); returns its eval.json row. nets: the
  metric networks to use ({'fid': InceptionStats, 'clip': ClipScorer}, any of them); out_dir:
  where process 0 writes the first config.eval.save_samples samples and the captions (None:
  nowhere)."""
  ecfg = config.eval
  key = "prompts" if task == "t2i" else "images"
  n = len(inputs[key])
  if n == 0:
    raise errors.ConfigError(f"config.eval: task {task} has no {key} (config.eval.source, or "
                             f"config.sample.{'prompts' if task == 't2i' else 'images'})")
  row = dict(task=task, guidance_scale=scale, num=n)
  chunk = int(config.sample.batch_size) * _CHUNK_BATCHES
  fid_stats = nets["fid"].new() if "fid" in nets and task == "t2i" else None
  clip_stats = clip_score.ClipScoreStats() if "clip" in nets else None
  kept, captions = [], []
  t0 = time.perf_counter()
  bar = tqdm.tqdm(total=n, desc=f"eval {task} g={scale:g}", unit="sample",
                  disable=jax.process_index() != 0)
  for a in range(0, n, chunk):
    b = min(n, a + chunk)
    host = {"sample_ids": list(range(a, b)), "guidance": [scale] * (b - a)}
    if task == "t2i":
      host["prompts"] = list(inputs["prompts"][a:b])
    else:
      host["images"] = inputs["images"][a:b]
      host["image_names"] = list(inputs["image_names"][a:b])
    records = sample.generate(task, host, b - a, config, progress=False, **sampler)
    for r in records:
      r["index"] += a
      if inputs["index"] is not None:
        r["item"] = inputs["index"][r["index"]]   # the input's index in the evaluation set
    if task == "t2i":
      pixels = [r["pixels"] for r in records]
      if fid_stats is not None:
        nets["fid"].add(fid_stats, pixels)
      if clip_stats is not None:
        nets["clip"].add(clip_stats, pixels, host["prompts"])
    else:
      caps = [r["caption"] for r in records]
      captions += caps
      if clip_stats is not None:
        nets["clip"].add(clip_stats, host["images"], caps)
    kept += records if score is not None else [
        r for r in records if r["index"] < int(ecfg.save_samples)]
    bar.update(b - a)
  bar.close()
  row["seconds"] = round(time.perf_counter() - t0, 2)
  if fid_stats is not None:
    stats = eval_features.allreduce_stats(fid_stats)
    mu, sigma = fid.load_stats(ecfg.ref_stats, dim=POOL_DIM)
    row["fid"] = fid.frechet_distance(stats.mean(), stats.cov(), mu, sigma)
  if clip_stats is not None:
    row["clip_score"] = _combined_clip(clip_stats)
  if task == "i2t" and "captions" in ecfg.metrics and inputs["references"] is not None:
    tok = caption_metrics.simple_tokenize
    cands = {str(i): tok(c) for i, c in enumerate(captions)}
    refs = {str(i): [tok(r) for r in inputs["references"][i]] for i in range(len(captions))}
    row.update({f"bleu{k + 1}": v for k, v in enumerate(caption_metrics.bleu(cands, refs))})
    row["cider_d"] = caption_metrics.cider_d(cands, refs)[0]
  if score is not None:
    host_all = {"prompts": inputs["prompts"]} if task == "t2i" else {}
    for k, v in score(task, host_all, kept).items():
      if isinstance(v, (int, float)) and k != "n":
        row[f"judge_{k}"] = float(v)
  if jax.process_index() == 0 and out_dir is not None:
    task_dir = os.path.join(out_dir, f"{task}_g{scale:g}")
    shown = [r for r in kept if r["index"] < int(ecfg.save_samples)]
    sample.write_outputs(shown, task_dir)
    if captions:
      with open(os.path.join(task_dir, "captions.jsonl"), "w") as f:
        for i, c in enumerate(captions):
          f.write(json.dumps({"index": i, "image": inputs["image_names"][i], "caption": c})
                  + "\n")
  return row


def run(config, workdir: str, score: Callable | None = None) -> dict:
  """The job (module docs); returns eval.json's content."""
  ecfg = config.eval
  try:
    solvers.check_args(int(config.sample.steps), int(config.sample.order), config.sample.method,
                       config.sample.skip_type)
  except ValueError as e:
    raise errors.ConfigError(f"config.sample: {e}") from None
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  eval_set = eval_data.load(ecfg)
  if ecfg.stats_only:
    return {"ref_stats": write_reference_stats(config, eval_set,
                                               sharding.make_mesh(config.mesh), out_dir)}
  check(config, eval_set)
  inputs = select_inputs(config, eval_set, int(ecfg.num), os.path.join(out_dir, "prompts.jsonl"))
  sampler = sample.load_sampler(config, workdir)
  mesh = sampler["mesh"]
  nets = {}
  if "fid" in ecfg.metrics and "t2i" in ecfg.tasks:
    nets["fid"] = InceptionStats(config, mesh)
  if "clip_score" in ecfg.metrics:
    nets["clip"] = ClipScorer(config, mesh)
  rows = [evaluate_task(task, scale, config, inputs, sampler, nets, out_dir, score)
          for task, scale in _runs(config)]
  result = dict(checkpoint=config.sample.checkpoint or workdir, rows=rows,
                protocol=_protocol(config))
  if "loss" in ecfg.metrics:
    t0 = time.perf_counter()
    loss = heldout.HeldoutLoss(config, sampler["model"], sampler["encoders"],
                               sampler["enc_params"], mesh,
                               heldout.heldout_batch(config, eval_set))(sampler["params"])
    result["heldout"] = {**loss, "seconds": round(time.perf_counter() - t0, 2)}
  if jax.process_index() == 0:
    _write(result, out_dir)
  for row in rows:
    print(_line(row), flush=True)
  if "heldout" in result:
    print(f"held-out loss {result['heldout']['heldout/loss']:.4f} "
          f"(at t = {tuple(int(t) for t in ecfg.loss_timesteps)})", flush=True)
  return result


def _protocol(config) -> dict:
  ecfg, s = config.eval, config.sample
  return dict(source=ecfg.source, tfds_name=ecfg.tfds_name, split=ecfg.split, path=ecfg.path,
              caption_seed=int(ecfg.caption_seed), num=int(ecfg.num), sample_seed=int(s.seed),
              steps=int(s.steps), order=int(s.order), method=s.method,
              resolution=int(config.data.resolution), ref_stats=ecfg.ref_stats,
              inception=ecfg.inception, clip=ecfg.clip,
              clip_score="100 * cos, torchmetrics (mean clamped at 0)",
              captions="BLEU-1..4 / CIDEr-D as pycocoevalcap on simple_tokenize'd text")


_SHOWN = ("fid", "clip_score", "bleu4", "cider_d")


def _line(row: dict) -> str:
  parts = [f"{k} {row[k]:.4g}" for k in _SHOWN if k in row]
  parts += [f"{k[6:]} {v:.3f}" for k, v in row.items() if k.startswith("judge_")]
  return (f"{row['task']} g={row['guidance_scale']:g} ({row['num']} samples, "
          f"{row['seconds']:.0f} s): " + (", ".join(parts) or "no metrics"))


def _write(result: dict, out_dir: str) -> None:
  with open(os.path.join(out_dir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  writer = tb_events.ScalarWriter(out_dir)
  scalars = {f"{r['task']}_g{r['guidance_scale']:g}/{k}": v for r in result["rows"]
             for k, v in r.items() if isinstance(v, float) and k != "guidance_scale"}
  scalars.update(result.get("heldout", {}))
  writer.write_scalars(0, scalars)
  writer.close()
  plot_fid_clip(result["rows"], os.path.join(out_dir, "fid_clip.png"))


def plot_fid_clip(rows: list[dict], path: str) -> None:
  """t2i: FID against CLIP score, one point per guidance scale (the paper's trade-off
  figure); i2t: CLIP score against guidance scale. Panels without data are left out."""
  t2i = [r for r in rows if r["task"] == "t2i" and "fid" in r and "clip_score" in r]
  i2t = [r for r in rows if r["task"] == "i2t" and "clip_score" in r]
  panels = [p for p in (t2i, i2t) if p]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
  for ax, rs in zip(axes[0], panels):
    if rs is t2i:
      ax.plot([r["clip_score"] for r in rs], [r["fid"] for r in rs], marker="o")
      for r in rs:
        ax.annotate(f"{r['guidance_scale']:g}", (r["clip_score"], r["fid"]), fontsize=7)
      ax.set_xlabel("CLIP score")
      ax.set_ylabel("FID")
      ax.set_title("t2i: FID vs CLIP score (labels: guidance)")
    else:
      ax.plot([r["guidance_scale"] for r in rs], [r["clip_score"] for r in rs], marker="o")
      ax.set_xlabel("guidance scale")
      ax.set_ylabel("CLIP score")
      ax.set_title("i2t: CLIP score")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
