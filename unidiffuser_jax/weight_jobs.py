"""`--mode=import` (released PyTorch weights in) and `--mode=export` (our weights out).

Import: each part named in config.weights is read safely (safetensors, or a
torch.save'd plain state dict through weights/tensors.py, never by unpickling
code), checked tensor by tensor against the model the config describes, and
written as a plain params tree (orbax StandardCheckpointer) to
DIR/weights/<part>. The job ends with the command-line overrides that use them.
The U-ViT is the exception to "the model the config describes": its file decides
every size it can (plan_uvit_import), the config only num_heads (not stored in
released files) and the hint that splits the position table; the model config the
weights need goes into DIR/weights/import.json and DIR/weights/uvit.flags, and
sample, export and fine-tuning refuse a config.model that differs
(check_imported_uvit).

  config.weights.uvit         uvit_v0.pth / uvit_v1.pth, or our safetensors export
                              (resize_pos_embed=True: keep the config's latent size and
                              resize the file's patch positions bilinearly)
  config.weights.autoencoder  autoencoder_kl.pth (LDM layout), or a diffusers VAE file/dir/repo id
  config.weights.clip_text    a CLIPTextModel / CLIPModel dir or repo id in the local hub cache
  config.weights.clip_image   a CLIPVisionModelWithProjection / CLIPModel dir or repo id
  config.weights.captioner    caption_decoder.pth (released / diffusers layout), or a hub GPT-2
  config.weights.inception    pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID, --mode=eval)
                              (file, dir or "gpt2") to start a fresh caption decoder
  config.weights.clip_tokenizer  CLIP's BPE merges file (bpe_simple_vocab_16e6.txt.gz) -> a
                              CLIPTokenizer directory DIR/weights/clip_tokenizer for
                              config.data.tokenizer (tokenizers.write_clip_tokenizer; no hub)

Export: the U-ViT's EMA params (config.sample.checkpoint, else the workdir's
newest checkpoint) and the caption decoder (config.encoders.weights.captioner,
else DIR/captioner) -> DIR/export/uvit_<version>.safetensors and
DIR/export/caption_decoder.safetensors in the released thu-ml key layout. A LoRA run's
workdir (train.lora.rank > 0; lora.py) exports its adapters alone instead,
DIR/export/uvit_<version>.lora.safetensors (its base's identity and LoRA config in the
metadata; sample with --config.sample.lora=...), or with --config.export.merge_lora=True its
base (the run's train.init_from) with the adapters merged, in the released layout.

Sources are local (files, directories, the local Hugging Face cache; nothing is
downloaded); DIR may be local or remote (gs://...). Both jobs run on one host.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from etils import epath

from data_pipelines import hub_cache
from unidiffuser_jax import checkpoints, encoders as encoders_lib, lora, rng
from unidiffuser_jax.errors import ConfigError
from unidiffuser_jax.models.vae import AutoencoderKL
from unidiffuser_jax.tokenizers import write_clip_tokenizer
from unidiffuser_jax.weights import captioner as wcap
from unidiffuser_jax.weights import clip as wclip
from unidiffuser_jax.weights import inception as winception
from unidiffuser_jax.weights import uvit as wuvit
from unidiffuser_jax.weights import vae as wvae
from unidiffuser_jax.weights.convert import WeightMismatchError
from unidiffuser_jax.weights.tensors import load_metadata, load_tensors, save_safetensors
from unidiffuser_jax.models import uvit


PARTS = ("uvit", "autoencoder", "clip_image", "clip_text", "captioner")
METRIC_PARTS = ("inception",)  # networks of --mode=eval's metrics, not of the model
TOKENIZER_PARTS = ("clip_tokenizer",)  # written as tokenizer directories, not parameters
_VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class WeightJobError(ConfigError):
  """A weight file that cannot be used as given; the message says why (main prints one line)."""


# ============================================================== helpers

def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def _host_float32(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(nn.meta.unbox(tree)))


def save_params(path: str, params) -> None:
  """A plain params tree -> orbax dir (what checkpoints.load_params and encoders read)."""
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(epath.Path(_abs(path)), _host_float32(params), force=True)
  ckpt.wait_until_finished()


def _abs(path: str) -> str:
  """Absolute local paths; remote ones (gs://...) as given."""
  return path if "://" in path else os.path.abspath(path)


def _hub_dir(repo_id: str, names: tuple[str, ...], subfolders=("",)) -> str | None:
  """A snapshot dir of `repo_id` in the local hub cache holding one of `names` (no download)."""
  for snap in hub_cache.snapshot_dirs(repo_id):
    for sub in subfolders:
      d = os.path.join(snap, sub)
      if any(os.path.isfile(os.path.join(d, n)) for n in names):
        return d
  return None


def _file_in(src: str, names: tuple[str, ...], subfolders=("",), what: str = "") -> str:
  """`src` itself if a file; else the first of `names` in the dir / local-cache repo `src`."""
  if os.path.isfile(src):
    return src
  d = src if os.path.isdir(src) else _hub_dir(src, names, subfolders)
  if d is not None:
    for sub in subfolders if os.path.isdir(src) else ("",):
      for n in names:
        if os.path.isfile(os.path.join(d, sub, n)):
          return os.path.join(d, sub, n)
  raise FileNotFoundError(
      f"{what or src}: {src!r} is not a file, and no {' / '.join(names)} was found in it as a "
      f"directory or as a repo id in the local Hugging Face cache. Nothing is downloaded.")


def _read_json(directory: str, name: str) -> dict:
  with open(os.path.join(directory, name)) as f:
    return json.load(f)


def _mismatch_message(what: str, diffs: list[tuple[str, object, object]], flag: str) -> str:
  rows = "\n  ".join(f"{k}: file {f!r}, config {c!r}" for k, f, c in diffs)
  fix = " ".join(f"--config.{flag}.{k}={_flag_value(f)}" for k, f, _ in diffs)
  return f"{what} does not fit config.{flag}:\n  {rows}\n  use: {fix}"


def _flag_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return "'(" + ",".join(str(x) for x in v) + ",)'"
  return str(v)


# ============================================================== U-ViT

UVIT_FLAGS = "uvit.flags"  # next to the imported params: the flags that use them (absl flagfile)


def _geometry(model) -> dict:
  """The GEOMETRY fields of a UViT (defaults included), as plain Python values."""
  return {k: getattr(model, k) for k in wuvit.GEOMETRY}


def _model_flags(need: dict, keys=wuvit.GEOMETRY) -> list[str]:
  return [f"--config.model.{k}={_flag_value(need[k])}" for k in keys]


def plan_uvit_import(config, tensors, path: str, metadata: dict | None = None) -> dict:
  """What importing a released-layout U-ViT file with `config` gives, before anything is written.

  Returns dict(
    model:       the config.model values (GEOMETRY fields) the written weights need,
    diffs:       [(field, the weights' value, config.model's)] for each field in which
                 config.model builds another network,
    notes:       what the shapes could not tell, and other advice, one sentence each,
    resize_from: the file's latent_size when config.weights.resize_pos_embed resizes its patch
                 positions to the config's latent_size, else None,
    overrides:   the command-line flags that make this config use the weights,
    prediction:  what the weights predict: "eps" for released files, our exports' recorded value).
  The file decides every size it can (weights/uvit.py: infer_uvit_config); the config supplies
  num_heads and the hint for the position-table split. Raises WeightJobError (one line) for a
  file that cannot be placed (qkv biases, an ambiguous position table, ...).
  """
  model = uvit.from_config(config.model)
  current = _geometry(model)
  meta = metadata or {}
  recorded = json.loads(meta["config"]) if meta.get("model") == "unidiffuser-uvit" and \
      "config" in meta else None  # our own exports record their model config
  try:
    need, notes = wuvit.infer_uvit_config(tensors, current, recorded)
  except WeightMismatchError as e:
    raise WeightJobError(f"{path}: {e}") from None
  resize_from = None
  resize = bool(config.weights.resize_pos_embed)
  if resize and need["latent_size"] != current["latent_size"]:
    if current["latent_size"] % need["patch_size"]:
      raise WeightJobError(f"{path}: resize_pos_embed: config.model.latent_size "
                           f"{current['latent_size']} is not a multiple of the file's patch size "
                           f"{need['patch_size']}")
    resize_from, need["latent_size"] = need["latent_size"], current["latent_size"]
    notes.append(f"patch positions resized bilinearly from a {resize_from}x{resize_from} latent "
                 f"to {need['latent_size']}x{need['latent_size']} (resize_pos_embed)")
  diffs = [(k, need[k], current[k]) for k in wuvit.geometry_diffs(need, current)]
  overrides = _model_flags(need)
  # Released weights predict the noise; our own exports record what they predict.
  prediction = (recorded or {}).get("prediction", "eps")
  if prediction != model.prediction:
    overrides.append(f"--config.model.prediction={prediction}")
    notes.append(f"these weights predict {'the noise' if prediction == 'eps' else 'velocities'} "
                 f"(config.model.prediction={prediction!r})")
  if int(config.encoders.fit_latent_stats) > 0:
    # Released weights were trained with the published latent constants, not with statistics
    # fitted by one of our runs (latent_stats.py).
    overrides.append("--config.encoders.fit_latent_stats=0")
    notes.append("imported weights use the config's fixed latent scale/shift "
                 "(encoders.fit_latent_stats=0)")
  names = [k for k, _, _ in diffs]
  if "version" in names:
    notes.append(f"the released {need['version']} model's config is "
                 f"configs/laion.py:{need['version']}")
  if "latent_size" in names:
    factor, res = config.encoders.autoencoder.factor, config.data.resolution
    if factor and res and res // factor == current["latent_size"]:  # resolution decides it
      overrides.append(f"--config.data.resolution={need['latent_size'] * factor}")
    if "num_text_tokens" not in names and current["latent_size"] % need["patch_size"] == 0:
      notes.append(f"to keep the config's latent_size {current['latent_size']} instead, resize "
                   f"the patch positions bilinearly: --config.weights.resize_pos_embed=True")
  ae = config.encoders.autoencoder
  ae_channels = 3 * ae.factor ** 2 if ae.kind == "pixel" else ae.latent_channels
  if ae_channels != need["latent_channels"]:
    notes.append(f"config.encoders.autoencoder ({ae.kind}) makes {ae_channels}-channel "
                 f"latents and these weights need {need['latent_channels']}: they need an "
                 f"autoencoder with {need['latent_channels']} latent channels")
  n_positions = config.encoders.captioner.n_positions
  positions = need["num_text_tokens"] + int(config.sample.max_caption_tokens)
  if n_positions < positions:
    notes.append(f"config.encoders.captioner.n_positions {n_positions} is too short for "
                 f"{need['num_text_tokens']} text tokens + config.sample.max_caption_tokens: the "
                 f"caption decoder needs at least {positions}")
  return dict(model=need, diffs=diffs, notes=notes, resize_from=resize_from, overrides=overrides,
              prediction=prediction)


def import_uvit_file(config, path: str) -> tuple[dict, dict]:
  """-> (params, plan_uvit_import's plan) for the released-layout U-ViT file at `path`."""
  tensors = load_tensors(path)
  plan = plan_uvit_import(config, tensors, path, load_metadata(path))
  model = uvit.from_config(config.model).clone(**plan["model"])
  if plan["resize_from"] is None:
    return wuvit.import_uvit(tensors, model), plan
  params = wuvit.import_uvit(tensors, model.clone(latent_size=plan["resize_from"]))
  return uvit.resize_pos_embed(params, plan["resize_from"], model.latent_size, model.patch_size), plan


def imported_uvit_model(path: str) -> dict | None:
  """The model config recorded by --mode=import for the U-ViT params dir `path` (import.json in
  its parent) with the `prediction` its weights make, or None where `path` was not written by
  the import (a workdir, a checkpoint)."""
  if not path:
    return None
  p = epath.Path(_abs(path).rstrip("/"))
  record = p.parent / "import.json"
  if not record.exists():
    return None
  entry = json.loads(record.read_text()).get("uvit") or {}
  if "model" not in entry or os.path.basename(entry.get("path", "").rstrip("/")) != p.name:
    return None
  return {**entry["model"], "prediction": entry.get("prediction", "eps")}


def check_imported_uvit(model, path: str, flag: str) -> None:
  """Raises WeightJobError (one line) if `model` (a UViT) cannot use the U-ViT weights imported
  at `path` (named by config.`flag`): each mismatching field and the flags that fix it. Sample,
  export and fine-tuning call it before building anything; other paths are not checked here."""
  need = imported_uvit_model(path)
  if need is None:
    return
  current = dict(_geometry(model), prediction=model.prediction)
  diffs = wuvit.geometry_diffs(need, current)
  if need["prediction"] != model.prediction:   # released weights predict the noise
    diffs.append("prediction")
  if diffs:
    what = ", ".join(f"{k} {current[k]} (the weights need {need[k]})" for k in diffs)
    raise WeightJobError(
        f"config.model does not fit the U-ViT weights imported at {path} (config.{flag}; their "
        f"model is recorded in {os.path.dirname(path.rstrip('/'))}/import.json): {what}; use "
        f"{' '.join(_model_flags(need, diffs))}")


# ============================================================== encoders

def _encoders(config):
  return encoders_lib.build(config.encoders)


def import_autoencoder(config, src: str) -> dict:
  if config.encoders.autoencoder.kind != "vae":
    raise WeightJobError(f"config.encoders.autoencoder.kind={config.encoders.autoencoder.kind!r} "
                         f"has no weights to import; use a config with kind='vae'")
  model = _encoders(config).autoencoder
  assert isinstance(model, AutoencoderKL)
  path = _file_in(src, _VAE_FILES, ("", "vae"), what="autoencoder")
  cfg_json = os.path.join(os.path.dirname(path), "config.json")
  if os.path.isfile(cfg_json):  # a diffusers dir: sizes that shapes alone may not reveal
    with open(cfg_json) as f:
      c = json.load(f)
    diffs = [(k, tuple(c[k]) if isinstance(c[k], list) else c[k], getattr(model, k))
             for k in ("block_out_channels", "layers_per_block", "latent_channels",
                       "norm_num_groups")
             if k in c and (tuple(c[k]) if isinstance(c[k], list) else c[k]) != getattr(model, k)]
    if diffs:
      raise WeightJobError(_mismatch_message(f"VAE {path}", diffs, "encoders.autoencoder"))
  return wvae.load_vae_params(model, path)


def _check_module(module, wanted: dict, what: str, flag: str) -> None:
  diffs = [(k, v, getattr(module, k)) for k, v in wanted.items()
           if hasattr(module, k) and v != getattr(module, k)]
  if diffs:
    raise WeightJobError(_mismatch_message(what, diffs, flag))


def import_clip(config, src: str, part: str) -> dict:
  """`part` "clip_text" or "clip_image": a transformers CLIP model dir / local-cache repo id."""
  what, read_config, to_params = {
      "clip_text": ("CLIP text model", wclip.text_config_from_json,
                    wclip.clip_text_params_from_tensors),
      "clip_image": ("CLIP vision model", wclip.vision_config_from_json,
                     wclip.clip_vision_params_from_tensors),
  }[part]
  d = wclip.find_model_dir(src)
  model = getattr(_encoders(config), part)
  _check_module(model, read_config(_read_json(d, "config.json")), f"{what} {d}",
                f"encoders.{part}")
  return to_params(model, wclip.load_model_tensors(d))


# Hub ids that moved: the old name's cache folder may be missing while the new one's is there.
_HUB_ALIASES = {"gpt2": "openai-community/gpt2"}


def _find_model_dir(src: str) -> str:
  try:
    return wclip.find_model_dir(src)
  except FileNotFoundError:
    if src in _HUB_ALIASES:
      try:
        return wclip.find_model_dir(_HUB_ALIASES[src])
      except FileNotFoundError:
        pass
    raise


def import_captioner(config, src: str) -> tuple[dict, str]:
  """-> (params, kind): kind 'decoder' (a trained caption decoder) or 'gpt2' (fresh start)."""
  enc = _encoders(config)
  cap = enc.captioner
  cfg_json = None
  if os.path.isfile(src):
    tensors = load_tensors(src)
  else:
    d = _find_model_dir(src)
    tensors = wclip.load_model_tensors(d)
    cfg_json = _read_json(d, "config.json")
  try:
    layout = wcap.detect_layout(tensors)
  except wcap.WeightMismatchError:
    layout = None
  if layout is not None:
    params = wcap.import_caption_decoder(tensors, _captioner_variables(enc), layout)["params"]
    return params, "decoder"
  # A hub GPT-2: the prefix layers start fresh (seeded like the stage-1 trainer's init).
  if cfg_json is not None:
    hub = {"n_embd": cap.n_embd, "n_layer": cap.n_layer, "n_head": cap.n_head,
           "n_positions": cap.n_positions}
    diffs = [(k, cfg_json[k], v) for k, v in hub.items() if k in cfg_json and cfg_json[k] != v]
    act = cfg_json.get("activation_function")
    if act is not None and act != cap.activation:
      diffs.append(("activation", act, cap.activation))
    if diffs:
      raise WeightJobError(_mismatch_message(f"GPT-2 {src}", diffs, "encoders.captioner"))
  # Only the prefix layers are initialised for real; GPT-2's shapes come from eval_shape.
  hidden = jnp.zeros((1, enc.text_length, cap.prefix_inner_dim))
  latent = jnp.zeros((1, enc.text_length, cap.prefix_hidden_dim))
  prefix = nn.meta.unbox(cap.init(rng.key_for(int(config.seed), 0, "init/captioner"), hidden,
                                  latent, method=_prefix_layers))["params"]
  init = {"params": {**prefix, "gpt": _captioner_variables(enc)["params"]["gpt"]}}
  return wcap.init_from_hub_gpt2(tensors, init)["params"], "gpt2"


def _captioner_variables(enc) -> dict:
  """The caption decoder's (unboxed) variable shapes from jax.eval_shape: nothing allocated."""
  latent = jnp.zeros((1, enc.text_length, enc.captioner.prefix_hidden_dim))
  return nn.meta.unbox(jax.eval_shape(enc.captioner.init, jax.random.key(0), latent,
                                      jnp.zeros((1, 2), jnp.int32)))


def _prefix_layers(module, hidden_bld, latent_blc):
  return module.encode_prefix(hidden_bld), module.decode_prefix(latent_blc)


# ============================================================== the import job

def _overrides(part: str, dest: str, kind: str) -> list[str]:
  if part == "clip_tokenizer":
    return [f"--config.data.tokenizer={dest}"]
  if part == "uvit":
    return [f"--config.sample.checkpoint={dest}"]  # after the model flags (plan_uvit_import)
  if part == "inception":
    return [f"--config.eval.inception={dest}"]
  if part == "captioner" and kind == "gpt2":
    return [f"--config.captioner.train.init_from={dest}"]  # fine-tune it first (train_captioner)
  return [f"--config.encoders.weights.{part}={dest}"]


def run_import(config, workdir: str) -> dict:
  """Imports every part named in config.weights; returns {part: {path, params, overrides}}
  (the U-ViT's also `model`, `diffs`, `notes`, `flagfile`).

  DIR/weights/import.json keeps one such entry per part imported into DIR (U-ViT: `model`, the
  config.model values its weights need; sample, export and fine-tuning check them), and
  DIR/weights/uvit.flags the U-ViT's flags as an absl flagfile."""
  wcfg = config.get("weights")
  if wcfg is None:
    raise WeightJobError("this config has no `weights` block; use configs/laion.py or "
                         "configs/demo.py, which have config.weights.<part>")
  todo = [(p, str(wcfg.get(p, ""))) for p in PARTS + METRIC_PARTS + TOKENIZER_PARTS
          if wcfg.get(p, "")]
  if not todo:
    raise WeightJobError(
        "nothing to import: name at least one file, e.g. --config.weights.uvit=uvit_v1.pth "
        "--config.weights.autoencoder=autoencoder_kl.pth "
        "--config.weights.clip_text=openai/clip-vit-large-patch14 "
        "--config.weights.clip_image=openai/clip-vit-base-patch32 "
        "--config.weights.captioner=caption_decoder.pth "
        "--config.weights.clip_tokenizer=bpe_simple_vocab_16e6.txt.gz")
  root = os.path.join(workdir, "weights")
  record = epath.Path(root) / "import.json"
  done = {}
  bar = tqdm.tqdm(todo, desc="import", unit="part")
  for part, src in bar:
    bar.set_postfix_str(part)
    kind, extra = part, {}
    dest = _abs(os.path.join(root, part))
    try:
      if part == "clip_tokenizer":
        params, kind = None, "tokenizer"
        write_clip_tokenizer(src, dest)
      elif part == "uvit":
        params, plan = import_uvit_file(config, src)
      elif part == "autoencoder":
        params = import_autoencoder(config, src)
      elif part in ("clip_text", "clip_image"):
        params = import_clip(config, src, part)
      elif part == "inception":
        params = winception.load_inception_params(src)
      else:
        params, kind = import_captioner(config, src)
    except WeightJobError as e:
      raise WeightJobError(f"import {part}: {e}") from None
    except (ValueError, FileNotFoundError, KeyError) as e:  # unsafe / mismatched / missing files
      raise WeightJobError(f"import {part} from {src}: {e}") from None
    overrides = _overrides(part, dest, kind)
    if part == "uvit":
      overrides = plan["overrides"] + overrides
      flagfile = _abs(os.path.join(root, UVIT_FLAGS))
      extra = dict(model=plan["model"], prediction=plan["prediction"], diffs=plan["diffs"],
                   notes=plan["notes"], flagfile=flagfile)
    if params is not None:
      save_params(dest, params)
    done[part] = dict(source=src, path=dest, params=_count(params), kind=kind,
                      overrides=overrides, **extra)
    # Written part by part, merged with earlier imports into DIR: no params dir is ever
    # described by another import's record.
    entries = json.loads(record.read_text()) if record.exists() else {}
    record.write_text(json.dumps({**entries, part: done[part]}, indent=1))
    if part == "uvit":
      epath.Path(flagfile).write_text("\n".join(overrides) + "\n")
  bar.close()
  print(_import_summary(done, config), flush=True)
  return done


def _import_summary(done: dict, config) -> str:
  lines = ["imported (float32 parameters):"]
  for part, d in done.items():
    note = " (GPT-2 + fresh prefix layers: fine-tune with --mode=train_captioner)" \
        if d["kind"] == "gpt2" else ""
    count = "tokenizer" if d["kind"] == "tokenizer" else f"{d['params']:,}"
    lines.append(f"  {part:<12} {count:>13}  {d['path']}{note}")
  lines.append(f"  {'total':<12} {sum(d['params'] for d in done.values()):>13,}")
  uvit = done.get("uvit")
  if uvit:
    lines.append("the U-ViT weights need config.model: "
                 + ", ".join(f"{k}={v}" for k, v in uvit["model"].items()))
    if uvit["diffs"]:
      lines.append("  which differs from this config in: " + "; ".join(
          f"{k} (weights {f!r}, config {c!r})" for k, f, c in uvit["diffs"]))
    lines += [f"  note: {n}" for n in uvit["notes"]]
  # One line per part; the U-ViT's line holds every flag it needs (model first).
  lines.append("use them with (sample, export; after --config=...):\n  " + " \\\n  ".join(
      " ".join(d["overrides"]) for d in done.values()))
  if uvit:
    lines.append(f"the U-ViT's flags are also in {uvit['flagfile']} (--flagfile=... after "
                 f"--config=...); fine-tune it with its model flags and "
                 f"--config.train.init_from={uvit['path']}")
  return "\n".join(lines)


# ============================================================== the export job

def _is_params_source(path: str) -> bool:
  p = epath.Path(path) if path else None
  return p is not None and any((p / n).exists()
                               for n in ("checkpoints", "_CHECKPOINT_METADATA", "_METADATA"))


def export_uvit_to(config, src: str, path: str) -> int:
  model = uvit.from_config(config.model)
  if model.prediction != "eps":
    raise WeightJobError(
        f"config.model.prediction={model.prediction!r}: the released layout (and diffusers' "
        f"UniDiffuserPipeline) assume a U-ViT that predicts the noise; this one would be sampled "
        f"wrongly there, so it is not exported")
  check_imported_uvit(model, src, "sample.checkpoint")
  params = checkpoints.load_params(src)
  if lora.is_adapters(params):   # a LoRA run, export.merge_lora: its base with them merged in
    params = lora.merged_run(src, params, config.train.init_from)
  checkpoints.check_params(params, nn.meta.unbox(uvit.abstract_variables(model))["params"],
                           "the checkpoint", "config.model")
  tensors = wuvit.export_uvit(params, model)
  save_safetensors(path, tensors, {"model": "unidiffuser-uvit", "version": model.version,
                                   "config": json.dumps(dict(config.model))})
  return _count(tensors)


def export_lora_to(config, src: str, path: str) -> int:
  """A LoRA run's EMA adapters alone, with its base's identity and LoRA config (lora.py)."""
  adapters, lcfg, base = lora.run_adapters(uvit.from_config(config.model), src)
  return lora.save_adapters(path, adapters, lcfg, base, config.model)


def export_captioner_to(config, src: str, path: str) -> int:
  params = checkpoints.load_params(src)
  checkpoints.check_params(params, _captioner_variables(_encoders(config))["params"],
                           "the checkpoint", "config.encoders.captioner")
  tensors = wcap.export_caption_decoder({"params": jax.device_get(params)}, "released")
  save_safetensors(path, tensors, {"model": "unidiffuser-caption-decoder",
                                   "config": json.dumps(dict(config.encoders.captioner))})
  return _count(tensors)


def run_export(config, workdir: str) -> dict:
  """Writes DIR/export/uvit_<version>.safetensors and caption_decoder.safetensors (those whose
  source exists); returns {name: {path, source, tensors}}."""
  out_dir = os.path.join(workdir, "export")
  uvit_src = config.sample.checkpoint or workdir
  cap_src = config.encoders.weights.captioner or os.path.join(workdir, "captioner")
  jobs = []
  if _is_params_source(uvit_src):
    if lora.is_run(uvit_src) and not config.export.merge_lora:
      name = f"uvit_{config.model.version}.lora.safetensors"
      jobs.append(("lora", uvit_src, os.path.join(out_dir, name)))
    else:
      name = f"uvit_{config.model.version}.safetensors"
      jobs.append(("uvit", uvit_src, os.path.join(out_dir, name)))
  if _is_params_source(cap_src):
    jobs.append(("captioner", cap_src, os.path.join(out_dir, "caption_decoder.safetensors")))
  if not jobs:
    raise WeightJobError(
        f"nothing to export: no U-ViT checkpoint at {uvit_src} (set --config.sample.checkpoint or "
        f"use the training workdir) and no caption decoder at {cap_src} (set "
        f"--config.encoders.weights.captioner)")
  done = {}
  for name, src, path in tqdm.tqdm(jobs, desc="export", unit="part"):
    fn = dict(uvit=export_uvit_to, lora=export_lora_to, captioner=export_captioner_to)[name]
    try:
      n = fn(config, src, path)
    except WeightJobError:
      raise
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise WeightJobError(f"export {name} from {src}: {e}") from None
    done[name] = dict(path=_abs(path), source=src, params=n)
  lines = ["exported (float32 safetensors; the U-ViT and caption decoder in the released thu-ml "
           "key layout, LoRA adapters in ours):"]
  lines += [f"  {k:<10} {d['params']:>13,}  {d['path']}  (from {d['source']})"
            for k, d in done.items()]
  skipped = {"uvit", "captioner"} - set(done) - ({"uvit"} if "lora" in done else set())
  if skipped:
    lines.append(f"  skipped (no source found): {', '.join(sorted(skipped))}")
  print("\n".join(lines), flush=True)
  return done
