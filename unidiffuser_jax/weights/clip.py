"""Importing Hugging Face CLIP checkpoints (text and vision towers), never downloading.

State-dict names are transformers' ``CLIPModel`` ones, which ``CLIPTextModel``
(``text_model.*``; transformers >= 5 drops that prefix, which is then added
back) and ``CLIPVisionModelWithProjection`` (``vision_model.*`` +
``visual_projection.weight``) share, so one table reads all three; tensors of
the other tower, ``logit_scale``, ``text_projection`` and the ``position_ids``
buffers of old files are ignored. ``text_projection`` is read separately, for
CLIP score only, into models/clip.py's ``CLIPTextProjection``
(``load_clip_text_projection``).

Files are found in a local directory or in the local Hugging Face hub cache
(``data_pipelines.hub_cache``), preferring ``model.safetensors`` over
``pytorch_model.bin`` (read by the safe loader). The module config comes from
the directory's ``config.json``.
"""
from collections.abc import Mapping
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import hub_cache
from unidiffuser_jax.models.clip import CLIPTextEncoder, CLIPTextProjection, CLIPVisionEncoder
from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.tensors import load_tensors

TEXT_REPO = "openai/clip-vit-large-patch14"
VISION_REPO = "openai/clip-vit-base-patch32"

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for keys a config.json omits.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      layer_norm_eps=1e-5, hidden_act="quick_gelu")
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=32,
                        layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=512)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


# ----------------------------------------------------------------------------- configs

def text_config_from_json(cfg: Mapping) -> dict:
  """config.json of a CLIPModel or CLIPTextModel -> CLIPTextEncoder kwargs."""
  sub = cfg.get("text_config") if "text_config" in cfg else cfg
  c = {**_TEXT_DEFAULTS, **(sub or {})}
  return dict(vocab_size=c["vocab_size"], width=c["hidden_size"],
              num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
              mlp_dim=c["intermediate_size"], max_positions=c["max_position_embeddings"],
              layer_norm_eps=c["layer_norm_eps"], hidden_act=c["hidden_act"])


def text_projection_config_from_json(cfg: Mapping) -> dict:
  """config.json of a CLIPModel (or CLIPTextModelWithProjection) -> CLIPTextProjection kwargs."""
  sub = cfg.get("text_config") if "text_config" in cfg else cfg
  return dict(proj_dim=cfg.get("projection_dim", 512),
              eos_token_id=(sub or {}).get("eos_token_id", 49407))


def vision_config_from_json(cfg: Mapping) -> dict:
  """config.json of a CLIPModel or CLIPVisionModelWithProjection -> CLIPVisionEncoder kwargs.

  For a CLIPModel the projection width is the top-level ``projection_dim``.
  """
  if "vision_config" in cfg:
    c = {**_VISION_DEFAULTS, **(cfg["vision_config"] or {})}
    if "projection_dim" in cfg:
      c["projection_dim"] = cfg["projection_dim"]
  else:
    c = {**_VISION_DEFAULTS, **cfg}
  return dict(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
              num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
              mlp_dim=c["intermediate_size"], proj_dim=c["projection_dim"],
              layer_norm_eps=c["layer_norm_eps"], hidden_act=c["hidden_act"])


# ----------------------------------------------------------------------------- key tables

def _template(model: nn.Module, x: jax.ShapeDtypeStruct) -> dict:
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])


def text_template(model: CLIPTextEncoder) -> dict:
  return _template(model, jax.ShapeDtypeStruct((1, model.max_positions), jnp.int32))


def vision_template(model: CLIPVisionEncoder) -> dict:
  s = model.image_size
  return _template(model, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))


def _layer_entries(num_layers: int, theirs: str) -> list[convert.Entry]:
  e = []
  lin = convert.linear_kernel
  for i in range(num_layers):
    p, t = f"layers_{i}", f"{theirs}.encoder.layers.{i}"
    for ln in ("layer_norm1", "layer_norm2"):
      e += [convert.Entry((p, ln, "scale"), f"{t}.{ln}.weight"),
            convert.Entry((p, ln, "bias"), f"{t}.{ln}.bias")]
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      e += [convert.Entry((p, "self_attn", proj, "kernel"), f"{t}.self_attn.{proj}.weight",
                          lin, lin),
            convert.Entry((p, "self_attn", proj, "bias"), f"{t}.self_attn.{proj}.bias")]
    for fc in ("fc1", "fc2"):
      e += [convert.Entry((p, fc, "kernel"), f"{t}.mlp.{fc}.weight", lin, lin),
            convert.Entry((p, fc, "bias"), f"{t}.mlp.{fc}.bias")]
  return e


def text_entries(num_layers: int) -> list[convert.Entry]:
  t = "text_model"
  return [
      convert.Entry(("token_embedding", "embedding"), f"{t}.embeddings.token_embedding.weight"),
      convert.Entry(("position_embedding",), f"{t}.embeddings.position_embedding.weight"),
      *_layer_entries(num_layers, t),
      convert.Entry(("final_layer_norm", "scale"), f"{t}.final_layer_norm.weight"),
      convert.Entry(("final_layer_norm", "bias"), f"{t}.final_layer_norm.bias"),
  ]


def text_projection_entries() -> list[convert.Entry]:
  lin = convert.linear_kernel
  return [convert.Entry(("text_projection", "kernel"), "text_projection.weight", lin, lin)]


def _conv_to_theirs(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def vision_entries(num_layers: int) -> list[convert.Entry]:
  v = "vision_model"
  lin = convert.linear_kernel
  return [
      convert.Entry(("patch_embedding", "kernel"), f"{v}.embeddings.patch_embedding.weight",
                    convert.conv_kernel, _conv_to_theirs),
      convert.Entry(("class_embedding",), f"{v}.embeddings.class_embedding"),
      convert.Entry(("position_embedding",), f"{v}.embeddings.position_embedding.weight"),
      convert.Entry(("pre_layrnorm", "scale"), f"{v}.pre_layrnorm.weight"),
      convert.Entry(("pre_layrnorm", "bias"), f"{v}.pre_layrnorm.bias"),
      *_layer_entries(num_layers, v),
      convert.Entry(("post_layernorm", "scale"), f"{v}.post_layernorm.weight"),
      convert.Entry(("post_layernorm", "bias"), f"{v}.post_layernorm.bias"),
      convert.Entry(("visual_projection", "kernel"), "visual_projection.weight", lin, lin),
  ]


def _is_position_ids(name: str) -> bool:
  return name.endswith("embeddings.position_ids")


def _with_tower_prefix(tensors: Mapping[str, np.ndarray], prefix: str,
                       roots: tuple[str, ...]) -> Mapping[str, np.ndarray]:
  """Adds `prefix` when a file stores one tower without it.

  transformers >= 5 saves CLIPTextModel as ``embeddings.*``/``encoder.*``
  (no ``text_model.``); older files and CLIPModel keep the prefix.
  """
  if any(k.startswith(prefix) for k in tensors):
    return tensors
  return {(prefix + k if k.startswith(roots) else k): v for k, v in tensors.items()}


def clip_text_params_from_tensors(model: CLIPTextEncoder,
                                  tensors: Mapping[str, np.ndarray]) -> dict:
  """{HF name: array} -> CLIPTextEncoder params; other towers' tensors are ignored."""
  tensors = _with_tower_prefix(tensors, "text_model.",
                               ("embeddings.", "encoder.", "final_layer_norm."))
  return convert.assign(
      text_template(model), tensors, text_entries(model.num_layers),
      ignore_unexpected=lambda n: not n.startswith("text_model.") or _is_position_ids(n))


def clip_vision_params_from_tensors(model: CLIPVisionEncoder,
                                    tensors: Mapping[str, np.ndarray]) -> dict:
  """{HF name: array} -> CLIPVisionEncoder params; other towers' tensors are ignored."""
  tensors = _with_tower_prefix(tensors, "vision_model.",
                               ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))
  return convert.assign(
      vision_template(model), tensors, vision_entries(model.num_layers),
      ignore_unexpected=lambda n: (not n.startswith(("vision_model.", "visual_projection."))
                                   or _is_position_ids(n)))


def clip_text_projection_params_from_tensors(model: CLIPTextProjection, width: int,
                                             tensors: Mapping[str, np.ndarray]) -> dict:
  """{HF name: array} -> CLIPTextProjection params for a text tower of `width`.

  Only ``text_projection.weight`` is used; every other tensor is ignored.
  """
  template = nn.meta.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1, width), jnp.float32),
      jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"])
  return convert.assign(template, tensors, text_projection_entries(),
                        ignore_unexpected=lambda n: n != "text_projection.weight")


def export_clip_text(params: Mapping, model: CLIPTextEncoder) -> dict[str, np.ndarray]:
  return convert.export(params, text_entries(model.num_layers))


def export_clip_vision(params: Mapping, model: CLIPVisionEncoder) -> dict[str, np.ndarray]:
  return convert.export(params, vision_entries(model.num_layers))


# ----------------------------------------------------------------------------- finding files

def _weight_file(directory: str) -> str | None:
  for name in _WEIGHT_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def find_model_dir(name_or_path: str) -> str:
  """A local directory holding config.json and weights, for a path or a hub repo id.

  A repo id ``org/name`` is looked up in the local hub cache only (the
  snapshot that ``refs/main`` names first, then any other snapshot with
  weights). Nothing is downloaded.
  """
  name_or_path = os.fspath(name_or_path)
  if os.path.isdir(name_or_path):
    return name_or_path
  for snap in hub_cache.snapshot_dirs(name_or_path):
    if _weight_file(snap) and os.path.isfile(os.path.join(snap, "config.json")):
      return snap
  raise FileNotFoundError(
      f"{name_or_path!r} is neither a local directory nor in the local Hugging Face cache "
      f"(looked for config.json and one of {_WEIGHT_FILES} under "
      f"{hub_cache.repo_dir(name_or_path)}/snapshots/*). "
      f"Nothing is downloaded: fetch it yourself, e.g. `huggingface-cli download {name_or_path}`, "
      f"or pass a directory.")


def load_model_tensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of the preferred weight file in `directory` (sharded indexes supported)."""
  path = _weight_file(directory)
  if path is None:
    raise FileNotFoundError(f"{directory}: none of {_WEIGHT_FILES} found")
  if not path.endswith(".index.json"):
    return load_tensors(path)
  with open(path) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out: dict[str, np.ndarray] = {}
  for shard in shards:
    out.update(load_tensors(os.path.join(directory, shard)))
  return out


def _read_config(directory: str) -> dict:
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def load_clip_text(name_or_path: str = TEXT_REPO, dtype=jnp.float32
                   ) -> tuple[CLIPTextEncoder, dict]:
  """(module, params) for a CLIP text tower from a directory or the local hub cache."""
  directory = find_model_dir(name_or_path)
  model = CLIPTextEncoder(**text_config_from_json(_read_config(directory)), dtype=dtype)
  return model, clip_text_params_from_tensors(model, load_model_tensors(directory))


def load_clip_text_projection(name_or_path: str = TEXT_REPO, dtype=jnp.float32
                              ) -> tuple[CLIPTextProjection, dict]:
  """(module, params) for the text embedding head of a CLIPModel (CLIP score), as load_clip_text."""
  directory = find_model_dir(name_or_path)
  cfg = _read_config(directory)
  model = CLIPTextProjection(**text_projection_config_from_json(cfg), dtype=dtype)
  return model, clip_text_projection_params_from_tensors(
      model, text_config_from_json(cfg)["width"], load_model_tensors(directory))


def load_clip_vision(name_or_path: str = VISION_REPO, dtype=jnp.float32
                     ) -> tuple[CLIPVisionEncoder, dict]:
  """(module, params) for a CLIP vision tower + projection, as load_clip_text."""
  directory = find_model_dir(name_or_path)
  model = CLIPVisionEncoder(**vision_config_from_json(_read_config(directory)), dtype=dtype)
  return model, clip_vision_params_from_tensors(model, load_model_tensors(directory))
