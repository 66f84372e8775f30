"""`--mode=import` (released PyTorch weights in) and `--mode=export` (our weights out).

Import: each part named in config.weights is read safely (safetensors, or a
torch.save'd plain state dict through weights/tensors.py, never by unpickling
code), checked tensor by tensor against the model the config describes, and
written as a plain params tree (orbax StandardCheckpointer) to
DIR/weights/<part>. The job ends with the command-line overrides that use them.

  config.weights.uvit         uvit_v0.pth / uvit_v1.pth, or our safetensors export
                              (resize_pos_embed=True: for another latent size, bilinearly)
  config.weights.autoencoder  autoencoder_kl.pth (LDM layout), or a diffusers VAE file/dir/repo id
  config.weights.clip_text    a CLIPTextModel / CLIPModel dir or repo id in the local hub cache
  config.weights.clip_image   a CLIPVisionModelWithProjection / CLIPModel dir or repo id
  config.weights.captioner    caption_decoder.pth (released / diffusers layout), or a hub GPT-2
                              (file, dir or "gpt2") to start a fresh caption decoder
  config.weights.clip_tokenizer  CLIP's BPE merges file (bpe_simple_vocab_16e6.txt.gz) -> a
                              CLIPTokenizer directory DIR/weights/clip_tokenizer for
                              config.data.tokenizer (tokenizers.write_clip_tokenizer; no hub)

Export: the U-ViT's EMA params (config.sample.checkpoint, else the workdir's
newest checkpoint) and the caption decoder (config.encoders.weights.captioner,
else DIR/captioner) -> DIR/export/uvit_<version>.safetensors and
DIR/export/caption_decoder.safetensors in the released thu-ml key layout.

Sources are local (files, directories, the local Hugging Face cache; nothing is
downloaded); DIR may be local or remote (gs://...). Both jobs run on one host.
"""
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from etils import epath

from unidiffuser_jax import rng
from unidiffuser_jax.sharding import ConfigError
from unidiffuser_jax.tokenizers import write_clip_tokenizer


PARTS = ("uvit", "autoencoder", "clip_image", "clip_text", "captioner")
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
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(epath.Path(_abs(path)), _host_float32(params), force=True)
  ckpt.wait_until_finished()


def _abs(path: str) -> str:
  """Absolute local paths; remote ones (gs://...) as given."""
  return path if "://" in path else os.path.abspath(path)


def _hub_dir(repo_id: str, names: tuple[str, ...], subfolders=("",)) -> str | None:
  """A snapshot dir of `repo_id` in the local hub cache holding one of `names` (no download)."""
  from unidiffuser_jax.weights.clip import hub_cache_dir
  import glob
  repo = os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
  snaps = []
  ref = os.path.join(repo, "refs", "main")
  if os.path.isfile(ref):
    with open(ref) as f:
      snaps.append(os.path.join(repo, "snapshots", f.read().strip()))
  snaps += sorted(glob.glob(os.path.join(repo, "snapshots", "*")))
  for snap in snaps:
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

def uvit_config_from_tensors(tensors) -> dict:
  """The model sizes a released-layout U-ViT file implies (those it can tell; not num_heads)."""
  t = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
  out = {}
  if "token_embedding.weight" in t or "pos_embed_token" in t:
    out["version"] = "v1"
    if "token_embedding.weight" in t:
      out["num_data_types"] = int(t["token_embedding.weight"].shape[0])
  elif "pos_embed" in t:
    out["version"] = "v0"
  pe = t.get("patch_embed.proj.weight")
  if pe is not None and pe.ndim == 4:
    out.update(width=int(pe.shape[0]), latent_channels=int(pe.shape[1]),
               patch_size=int(pe.shape[2]))
  n_in = {int(m.group(1)) for k in t for m in [re.match(r"in_blocks\.(\d+)\.", k)] if m}
  n_out = {int(m.group(1)) for k in t for m in [re.match(r"out_blocks\.(\d+)\.", k)] if m}
  if n_in or n_out:
    out["depth"] = 2 * max(len(n_in), len(n_out))
  if "mid_block.mlp.fc1.weight" in t:
    out["mlp_dim"] = int(t["mid_block.mlp.fc1.weight"].shape[0])
  if "text_embed.weight" in t:
    out["text_dim"] = int(t["text_embed.weight"].shape[1])
  if "clip_img_embed.weight" in t:
    out["clip_img_dim"] = int(t["clip_img_embed.weight"].shape[1])
  if "pos_embed" in t and t["pos_embed"].ndim == 3:
    out["pos_tokens"] = int(t["pos_embed"].shape[1])  # 2 times + L text + 1 clip + patches
  return out


def check_uvit_config(file_cfg: dict, model, config, path: str,
                      allow_resize: bool = False) -> int | None:
  """Raises WeightJobError naming each disagreement and the overrides that fix it.

  With `allow_resize`, a file whose only difference is the latent size is accepted:
  returns that size (the caller interpolates the patch position table); else None.
  """
  diffs = []
  for k in ("version", "width", "depth", "mlp_dim", "latent_channels", "patch_size", "text_dim",
            "clip_img_dim", "num_data_types"):
    if k not in file_cfg or (k == "num_data_types" and model.version != "v1"):
      continue
    if file_cfg[k] != getattr(model, k):
      diffs.append((k, file_cfg[k], getattr(model, k)))
  notes = []
  n = file_cfg.get("pos_tokens")
  want = 3 + model.num_text_tokens + model.num_patches
  if n is not None and n != want and not any(k == "patch_size" for k, _, _ in diffs):
    patches = n - 3 - model.num_text_tokens
    grid = int(round(max(patches, 0) ** 0.5))
    if patches > 0 and grid * grid == patches:
      latent = grid * model.patch_size
      factor = config.get("encoders", {}).get("autoencoder", {}).get("factor")
      res = (f" (--config.data.resolution={latent * factor} where the config derives it)"
             if factor else "")
      diffs.append(("latent_size", latent, model.latent_size))
      notes.append(f"the file's position table is for a {latent}x{latent} latent{res}; or "
                   f"keep the config's size and interpolate the patch positions bilinearly: "
                   f"--config.weights.resize_pos_embed=True")
    else:
      notes.append(f"pos_embed has {n} tokens, config.model implies {want} "
                   f"(3 + num_text_tokens {model.num_text_tokens} + {model.num_patches} patches)")
  if allow_resize and [k for k, _, _ in diffs] == ["latent_size"] and len(notes) == 1:
    return diffs[0][1]
  if diffs or notes:
    msg = _mismatch_message(f"U-ViT file {path} ({_describe_uvit(file_cfg)})", diffs, "model")
    if file_cfg.get("version") and file_cfg.get("version") != model.version:
      msg += (f"\n  for the released model: --config=configs/laion.py:{file_cfg['version']}")
    if any(k == "width" for k, _, _ in diffs):
      notes.append(f"num_heads is not stored in the file: set --config.model.num_heads too "
                   f"(the released models use 64-wide heads: {file_cfg['width'] // 64} heads "
                   f"for width {file_cfg['width']})")
    if notes:
      msg += "\n  " + "\n  ".join(notes)
    raise WeightJobError(msg)
  return None


def _describe_uvit(c: dict) -> str:
  keys = ("version", "width", "depth", "mlp_dim", "patch_size", "latent_channels")
  return ", ".join(f"{k} {c[k]}" for k in keys if k in c)


def import_uvit_file(config, path: str) -> dict:
  from unidiffuser_jax import train
  from unidiffuser_jax.weights.tensors import load_tensors
  from unidiffuser_jax.models.uvit import resize_pos_embed
  from unidiffuser_jax.weights.uvit import import_uvit
  tensors = load_tensors(path)
  model = train.make_model(config.model)
  file_latent = check_uvit_config(uvit_config_from_tensors(tensors), model, config, path,
                                  bool(config.weights.get("resize_pos_embed", False)))
  if file_latent is None:
    return import_uvit(tensors, model)
  params = import_uvit(tensors, model.clone(latent_size=file_latent))
  return resize_pos_embed(params, file_latent, model.latent_size, model.patch_size)


# ============================================================== encoders

def _encoders(config):
  from unidiffuser_jax import encoders as encoders_lib
  return encoders_lib.build(config.encoders)


def import_autoencoder(config, src: str) -> dict:
  from unidiffuser_jax.models.vae import AutoencoderKL
  from unidiffuser_jax.weights import vae as wvae
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


def import_clip_text(config, src: str) -> dict:
  from unidiffuser_jax.weights import clip as wclip
  d = wclip.find_model_dir(src)
  model = _encoders(config).clip_text
  _check_module(model, wclip.text_config_from_json(_read_json(d, "config.json")),
                f"CLIP text model {d}", "encoders.clip_text")
  return wclip.clip_text_params_from_tensors(model, wclip.load_model_tensors(d))


def import_clip_image(config, src: str) -> dict:
  from unidiffuser_jax.weights import clip as wclip
  d = wclip.find_model_dir(src)
  model = _encoders(config).clip_image
  _check_module(model, wclip.vision_config_from_json(_read_json(d, "config.json")),
                f"CLIP vision model {d}", "encoders.clip_image")
  return wclip.clip_vision_params_from_tensors(model, wclip.load_model_tensors(d))


# Hub ids that moved: the old name's cache folder may be missing while the new one's is there.
_HUB_ALIASES = {"gpt2": "openai-community/gpt2"}


def _find_model_dir(src: str) -> str:
  from unidiffuser_jax.weights import clip as wclip
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
  from unidiffuser_jax.weights import captioner as wcap
  from unidiffuser_jax.weights import clip as wclip
  from unidiffuser_jax.weights.tensors import load_tensors
  enc = _encoders(config)
  cap = enc.captioner
  cfg_json = None
  if os.path.isfile(src):
    tensors = load_tensors(src)
  else:
    d = _find_model_dir(src)
    tensors = wclip.load_model_tensors(d)
    cfg_json = _read_json(d, "config.json")
  latent = jnp.zeros((1, enc.text_length, cap.prefix_hidden_dim))
  ids = jnp.zeros((1, 2), jnp.int32)
  try:
    layout = wcap.detect_layout(tensors)
  except wcap.WeightMismatchError:
    layout = None
  if layout is not None:
    template = jax.eval_shape(cap.init, jax.random.key(0), latent, ids)
    return wcap.import_caption_decoder(tensors, template, layout)["params"], "decoder"
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
  prefix = nn.meta.unbox(cap.init(rng.key_for(int(config.seed), 0, "init/captioner"), hidden,
                                  latent, method=_prefix_layers))["params"]
  template = nn.meta.unbox(jax.eval_shape(cap.init, jax.random.key(0), latent, ids))["params"]
  init = {"params": {**prefix, "gpt": template["gpt"]}}
  return wcap.init_from_hub_gpt2(tensors, init)["params"], "gpt2"


def _prefix_layers(module, hidden_bld, latent_blc):
  return module.encode_prefix(hidden_bld), module.decode_prefix(latent_blc)


# ============================================================== the import job

def _overrides(part: str, dest: str, kind: str) -> list[str]:
  if part == "clip_tokenizer":
    return [f"--config.data.tokenizer={dest}"]
  if part == "uvit":
    return [f"--config.sample.checkpoint={dest}"]
  if part == "captioner" and kind == "gpt2":
    return [f"--config.captioner.train.init_from={dest}"]  # fine-tune it first (train_captioner)
  return [f"--config.encoders.weights.{part}={dest}"]


def run_import(config, workdir: str) -> dict:
  """Imports every part named in config.weights; returns {part: {path, params, overrides}}."""
  wcfg = config.get("weights")
  if wcfg is None:
    raise WeightJobError("this config has no `weights` block; use configs/laion.py or "
                         "configs/demo.py, which have config.weights.<part>")
  todo = [(p, str(wcfg.get(p, ""))) for p in PARTS + TOKENIZER_PARTS if wcfg.get(p, "")]
  if not todo:
    raise WeightJobError(
        "nothing to import: name at least one file, e.g. --config.weights.uvit=uvit_v1.pth "
        "--config.weights.autoencoder=autoencoder_kl.pth "
        "--config.weights.clip_text=openai/clip-vit-large-patch14 "
        "--config.weights.clip_image=openai/clip-vit-base-patch32 "
        "--config.weights.captioner=caption_decoder.pth "
        "--config.weights.clip_tokenizer=bpe_simple_vocab_16e6.txt.gz")
  root = os.path.join(workdir, "weights")
  done = {}
  bar = tqdm.tqdm(todo, desc="import", unit="part")
  for part, src in bar:
    bar.set_postfix_str(part)
    kind = part
    dest = _abs(os.path.join(root, part))
    try:
      if part == "clip_tokenizer":
        params, kind = None, "tokenizer"
        write_clip_tokenizer(src, dest)
      elif part == "uvit":
        params = import_uvit_file(config, src)
      elif part == "autoencoder":
        params = import_autoencoder(config, src)
      elif part == "clip_text":
        params = import_clip_text(config, src)
      elif part == "clip_image":
        params = import_clip_image(config, src)
      else:
        params, kind = import_captioner(config, src)
    except WeightJobError as e:
      raise WeightJobError(f"import {part}: {e}") from None
    except (ValueError, FileNotFoundError, KeyError) as e:  # unsafe / mismatched / missing files
      raise WeightJobError(f"import {part} from {src}: {e}") from None
    if params is not None:
      save_params(dest, params)
    done[part] = dict(source=src, path=dest, params=_count(params), kind=kind,
                      overrides=_overrides(part, dest, kind))
  bar.close()
  (epath.Path(root) / "import.json").write_text(json.dumps(done, indent=1))
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
  flags = [o for d in done.values() for o in d["overrides"]]
  lines.append("use them with:\n  " + " \\\n  ".join(flags))
  return "\n".join(lines)


# ============================================================== the export job

def _is_params_source(path: str) -> bool:
  p = epath.Path(path) if path else None
  return p is not None and any((p / n).exists()
                               for n in ("checkpoints", "_CHECKPOINT_METADATA", "_METADATA"))


def _check_tree(params, template, what: str, src: str, flag: str) -> None:
  leaves = jax.tree_util.tree_leaves_with_path
  want = {jax.tree_util.keystr(p): x.shape for p, x in leaves(template)}
  got = {jax.tree_util.keystr(p): np.shape(x) for p, x in leaves(params)}
  problems = [f"missing {k}" for k in want if k not in got]
  problems += [f"unexpected {k}" for k in got if k not in want]
  problems += [f"{k}: shape {got[k]}, config.{flag} needs {want[k]}"
               for k in want if k in got and tuple(got[k]) != tuple(want[k])]
  if problems:
    raise WeightJobError(f"{what} at {src} does not match config.{flag}:\n  "
                         + "\n  ".join(problems[:20]))


def _save_safetensors(path: str, tensors: dict, metadata: dict) -> None:
  from safetensors.numpy import save
  data = save({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()},
              metadata={"format": "pt", **{k: str(v) for k, v in metadata.items()}})
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)  # local or remote (gs://) workdirs alike


def export_uvit_to(config, src: str, path: str) -> int:
  from unidiffuser_jax import checkpoints, train
  from unidiffuser_jax.models.uvit import abstract_variables
  from unidiffuser_jax.weights.uvit import export_uvit
  model = train.make_model(config.model)
  params = checkpoints.load_params(src)
  _check_tree(params, nn.meta.unbox(abstract_variables(model))["params"], "U-ViT params", src,
              "model")
  tensors = export_uvit(params, model)
  _save_safetensors(path, tensors, {"model": "unidiffuser-uvit", "version": model.version,
                                    "config": json.dumps(dict(config.model))})
  return _count(tensors)


def export_captioner_to(config, src: str, path: str) -> int:
  from unidiffuser_jax import checkpoints
  from unidiffuser_jax.weights import captioner as wcap
  enc = _encoders(config)
  cap = enc.captioner
  params = checkpoints.load_params(src)
  template = jax.eval_shape(cap.init, jax.random.key(0),
                            jnp.zeros((1, enc.text_length, cap.prefix_hidden_dim)),
                            jnp.zeros((1, 2), jnp.int32))
  _check_tree(params, nn.meta.unbox(template)["params"], "caption decoder params", src,
              "encoders.captioner")
  tensors = wcap.export_caption_decoder({"params": jax.device_get(params)}, "released")
  _save_safetensors(path, tensors, {"model": "unidiffuser-caption-decoder",
                                    "config": json.dumps(dict(config.encoders.captioner))})
  return _count(tensors)


def run_export(config, workdir: str) -> dict:
  """Writes DIR/export/uvit_<version>.safetensors and caption_decoder.safetensors (those whose
  source exists); returns {name: {path, source, tensors}}."""
  out_dir = os.path.join(workdir, "export")
  uvit_src = config.sample.get("checkpoint", "") or workdir
  cap_src = config.encoders.weights.get("captioner", "") or os.path.join(workdir, "captioner")
  jobs = []
  if _is_params_source(uvit_src):
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
    fn = export_uvit_to if name == "uvit" else export_captioner_to
    try:
      n = fn(config, src, path)
    except WeightJobError:
      raise
    except (ValueError, FileNotFoundError, KeyError) as e:
      raise WeightJobError(f"export {name} from {src}: {e}") from None
    done[name] = dict(path=_abs(path), source=src, params=n)
  lines = ["exported (released thu-ml key layout, float32 safetensors):"]
  lines += [f"  {k:<10} {d['params']:>13,}  {d['path']}  (from {d['source']})"
            for k, d in done.items()]
  skipped = {"uvit", "captioner"} - set(done)
  if skipped:
    lines.append(f"  skipped (no source found): {', '.join(sorted(skipped))}")
  print("\n".join(lines), flush=True)
  return done
