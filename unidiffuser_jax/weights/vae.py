"""Key tables for the KL autoencoder: diffusers' layout and the original LDM one.

Two PyTorch layouts hold the same weights:

* ``diffusers`` -- ``AutoencoderKL.state_dict()`` as on the hub
  (``vae/diffusion_pytorch_model.safetensors``): ``encoder.down_blocks.{i}.
  resnets.{j}``, ``mid_block.attentions.0.to_q`` (Linear), ... Older hub files
  name the attention ``query/key/value/proj_attn``; both are accepted.
* ``ldm`` -- the CompVis/LDM ``AutoencoderKL`` (thu-ml's ``autoencoder_kl.pth``,
  SD ``first_stage_model.*``): ``encoder.down.{i}.block.{j}``, ``nin_shortcut``,
  ``mid.block_1/attn_1/block_2`` with q/k/v/proj_out as 1x1 convs, ``norm_out``,
  and ``decoder.up.{k}`` numbered from the HIGHEST resolution, i.e. in the
  reverse order of diffusers' ``up_blocks`` (our ``up_{i}`` is ``up.{n-1-i}``).

Our parameter names are in models/vae.py. Entries are derived from the
template's own paths, so any configured size works.
"""
from collections.abc import Mapping
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unidiffuser_jax.models.vae import AutoencoderKL
from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.tensors import load_tensors

LAYOUTS = ("diffusers", "ldm")

# Older diffusers attention names -> current ones.
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0"}
_ATTN_LDM = {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj": "proj_out"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# Training-only parts of LDM checkpoints (LPIPS + discriminator) that a first stage can ignore.
_LDM_IGNORED_PREFIXES = ("loss.",)


def vae_template(model: AutoencoderKL) -> dict:
  """Unboxed ShapeDtypeStruct tree of `model`'s params (no compute, no memory)."""
  f = model.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return nn.meta.unbox(variables["params"])


def _their_module(path: tuple[str, ...], layout: str, num_levels: int) -> str:
  """Our module path (without the leaf) -> their dotted module name."""
  top = path[0]
  if top in ("quant_conv", "post_quant_conv"):
    return top
  rest = list(path[1:])
  ldm = layout == "ldm"
  name = rest[0]
  if name == "mid":
    sub = rest[1]
    if sub.startswith("res_"):
      k = int(sub[4:])
      inner = f"mid.block_{k + 1}" if ldm else f"mid_block.resnets.{k}"
      tail = rest[2:]
    else:  # attention
      table = _ATTN_LDM if ldm else _ATTN_DIFFUSERS
      inner = ("mid.attn_1." if ldm else "mid_block.attentions.0.") + table[rest[2]]
      tail = []
  elif name in ("conv_in", "conv_out"):
    inner, tail = name, []
  elif name == "norm_out":
    inner, tail = ("norm_out" if ldm else "conv_norm_out"), []
  else:
    m = re.fullmatch(r"(down|up)_(\d+)_(res_(\d+)|downsample|upsample)", name)
    if m is None:
      raise ValueError(f"no key rule for parameter {'/'.join(path)}")
    kind, i = m.group(1), int(m.group(2))
    if ldm:
      level = f"down.{i}" if kind == "down" else f"up.{num_levels - 1 - i}"
      what = (f"block.{m.group(4)}" if m.group(4) is not None
              else f"{m.group(3)}.conv")
    else:
      level = f"down_blocks.{i}" if kind == "down" else f"up_blocks.{i}"
      sampler = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv"}
      what = (f"resnets.{m.group(4)}" if m.group(4) is not None else sampler[m.group(3)])
    inner, tail = f"{level}.{what}", rest[1:]
  if tail:
    (sub,) = tail
    if sub == "shortcut":
      sub = "nin_shortcut" if ldm else "conv_shortcut"
    inner = f"{inner}.{sub}"
  return f"{top}.{inner}"


def _dense_from_1x1(w: np.ndarray) -> np.ndarray:
  """LDM attention 1x1 conv weight [out, in, 1, 1] -> Dense kernel [in, out]."""
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    raise ValueError(f"expected a 1x1 conv weight [out, in, 1, 1], got shape {w.shape}")
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def _dense_to_1x1(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.T[:, :, None, None])


def vae_entries(template: Mapping, layout: str) -> list[convert.Entry]:
  """One Entry per parameter of `template` for the given layout."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown VAE layout {layout!r}; expected one of {LAYOUTS}")
  flat = convert.flatten(template)
  num_levels = 1 + max(int(m.group(1)) for p in flat
                       for m in [re.fullmatch(r"up_(\d+)_res_\d+", p[1])] if m)
  entries = []
  for path, leaf in flat.items():
    name = f"{_their_module(path[:-1], layout, num_levels)}.{_LEAF[path[-1]]}"
    to_ours, to_theirs = convert.identity, convert.identity
    if path[-1] == "kernel" and len(leaf.shape) == 4:
      to_ours = convert.conv_kernel
      to_theirs = lambda k: np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))
    elif path[-1] == "kernel":  # attention Dense
      if layout == "ldm":
        to_ours, to_theirs = _dense_from_1x1, _dense_to_1x1
      else:
        to_ours, to_theirs = convert.linear_kernel, convert.linear_kernel
    entries.append(convert.Entry(path, name, to_ours, to_theirs))
  return entries


def normalize_vae_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips an SD ``first_stage_model.`` prefix and renames deprecated attention keys."""
  out = {}
  prefix = "first_stage_model."
  has_prefix = any(k.startswith(prefix) for k in tensors)
  for k, v in tensors.items():
    if has_prefix:
      if not k.startswith(prefix):
        continue  # the rest of a full SD checkpoint (unet, text encoder)
      k = k[len(prefix):]
    m = re.fullmatch(
        r"(.*\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", k)
    if m:
      k = f"{m.group(1)}{_DEPRECATED_ATTENTION[m.group(2)]}.{m.group(3)}"
    out[k] = v
  return out


def detect_layout(tensors: Mapping[str, np.ndarray]) -> str:
  if any(k.startswith("encoder.down_blocks.") for k in tensors):
    return "diffusers"
  if any(k.startswith("encoder.down.") for k in tensors):
    return "ldm"
  raise ValueError("cannot tell the VAE layout: no 'encoder.down_blocks.*' (diffusers) or "
                   "'encoder.down.*' (LDM) tensors; first keys: " + ", ".join(list(tensors)[:5]))


def vae_params_from_tensors(model: AutoencoderKL, tensors: Mapping[str, np.ndarray],
                            layout: str = "auto") -> dict:
  """{their name: array} -> our params tree (float32 numpy), checking every tensor."""
  tensors = normalize_vae_tensors(tensors)
  if layout == "auto":
    layout = detect_layout(tensors)
  template = vae_template(model)
  ignore = (lambda n: n.startswith(_LDM_IGNORED_PREFIXES)) if layout == "ldm" else (
      lambda n: False)
  return convert.assign(template, tensors, vae_entries(template, layout), ignore_unexpected=ignore)


def load_vae_params(model: AutoencoderKL, path: str, layout: str = "auto") -> dict:
  """Reads a diffusers or LDM VAE weight file (safetensors or torch zip) into our params."""
  return vae_params_from_tensors(model, load_tensors(path), layout)


def export_vae_tensors(params: Mapping, model: AutoencoderKL, layout: str = "diffusers"
                       ) -> dict[str, np.ndarray]:
  """Our params -> {their name: array} in the given layout (used by tests)."""
  return convert.export(params, vae_entries(vae_template(model), layout))
