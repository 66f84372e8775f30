"""The frozen encoders and decoders around the U-ViT, as one bundle.

  image    -> autoencoder moments -> (posterior sample - shift) x scale = z [B, h, w, C]
  image    -> CLIP image encoder (projected, unnormalised)              = clip [B, 1, D]
  tokens   -> CLIP text encoder -> caption decoder's encode_prefix
              -> (prefix - text_shift) x text_scale                     = text [B, L, 64]
  z / scale + shift -> autoencoder decode -> image
  text / text_scale + text_shift -> caption decoder -> caption

The shifts and text_scale are 0 and 1 for the released model (only the SD VAE's 0.18215
scale). Runs with config.encoders.fit_latent_stats > 0 fit them to the training data
(unidiffuser_jax/latent_stats.py: per-channel mean, 1 / overall std), so the latents have
the unit scale the diffusion schedule assumes whatever the images are.

The same bundle serves the real model (SD VAE, CLIP ViT-B/32 and ViT-L/14, GPT-2)
and the demo (pixel autoencoder and tiny CLIP/GPT-2 modules): only the config's
sizes and weight paths differ.
"""
import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from unidiffuser_jax import checkpoints, rng, sharding
from unidiffuser_jax.models import captioner as captioner_lib
from unidiffuser_jax.models import clip as clip_lib
from unidiffuser_jax.models import pixel_ae, vae

log = logging.getLogger(__name__)
PARTS = ("autoencoder", "clip_image", "clip_text", "captioner")


def _module_fields(cfg, drop=()) -> dict:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(cfg).items() if k not in drop}


@dataclasses.dataclass(frozen=True)
class Encoders:
  autoencoder: nn.Module         # pixel_ae.PixelAutoencoder | vae.AutoencoderKL (same interface)
  latent_scale: float
  latent_shift: float | tuple[float, ...]   # scalar or per latent channel
  text_scale: float
  text_shift: float | tuple[float, ...]     # scalar or per text-latent feature
  clip_image: nn.Module
  clip_text: nn.Module
  captioner: nn.Module
  clip_image_size: int
  text_length: int

  # ------------------------------------------------------------ parameters

  def _init_part(self, part: str, key):
    if part == "autoencoder":
      s = 2 * self.autoencoder.downsample_factor  # any size the encoder can halve
      x = jnp.zeros((1, s, s, self.autoencoder.in_channels))
      return self.autoencoder.init(key, x).get("params", {})  # the pixel AE has none
    if part == "clip_image":
      s = self.clip_image_size
      return self.clip_image.init(key, jnp.zeros((1, s, s, 3)))["params"]
    if part == "clip_text":
      return self.clip_text.init(key, jnp.zeros((1, self.text_length), jnp.int32))["params"]
    if part == "captioner":
      latent = jnp.zeros((1, self.text_length, self.captioner.prefix_hidden_dim))
      return self.captioner.init(key, latent, jnp.zeros((1, 2), jnp.int32))["params"]
    raise KeyError(part)

  def random_part(self, part: str, seed: int):
    """Boxed params of `part` drawn from (seed, 'init/<part>'): the demo's random encoders, and
    where the demo's CLIP stage (clip_train.py) starts."""
    return self._init_part(part, rng.key_for(seed, 0, f"init/{part}"))

  def layout(self, mesh, seed: int, rules_cfg, parts=PARTS) -> dict:
    """{part: (init thunk, boxed abstract params, shardings)}: how each frozen network is
    initialised (from (seed, 'init/<part>')) and laid out by `rules_cfg` (config.sharding.rules)
    on `mesh` (a Mesh or an AbstractMesh); jax.eval_shape only, nothing allocated."""
    rules = sharding.rules_from_config(rules_cfg)
    out = {}
    for part in parts:
      init = lambda part=part: self.random_part(part, seed)
      abstract = jax.eval_shape(init)
      out[part] = (init, abstract, sharding.named_shardings(
          sharding.logical_to_specs(abstract, mesh, rules), mesh))
    return out

  def abstract_params(self, mesh, seed: int, rules_cfg, parts=PARTS) -> tuple[dict, dict]:
    """({part: ShapeDtypeStructs carrying their shardings}, {part: shardings}): what
    load_params returns, without arrays (ahead-of-time compiles)."""
    params, shards = {}, {}
    for part, (_, abstract, shardings) in self.layout(mesh, seed, rules_cfg, parts).items():
      params[part] = sharding.abstract_with(nn.unbox(abstract), shardings)
      shards[part] = shardings
    return params, shards

  def load_params(self, weights_cfg, mesh, seed: int, rules_cfg):
    """Returns ({part: params}, shardings): loaded where config.encoders.weights names a path,
    otherwise initialised from (seed, 'init/<part>') -- the demo's frozen random encoders.
    Laid out by `rules_cfg` (config.sharding.rules)."""
    params, shards = {}, {}
    for part, (init, abstract, shardings) in self.layout(mesh, seed, rules_cfg).items():
      path = weights_cfg.get(part, "") if weights_cfg else ""
      if path:
        host = checkpoints.load_params(path)
        checkpoints.check_params(host, nn.unbox(abstract), f"encoder weights {part} at {path}",
                                 f"config.encoders.{part}")
        params[part] = jax.device_put(host, shardings)
        log.info("encoders: %s loaded from %s", part, path)
      else:
        params[part] = jax.jit(lambda init=init: nn.unbox(init()), out_shardings=shardings)()
      shards[part] = shardings
    return params, shards

  # ------------------------------------------------------------ forward maps

  def image_moments(self, params, image_bhwc):
    return self.autoencoder.apply({"params": params["autoencoder"]}, image_bhwc, method="encode")

  def latent_from_moments(self, moments, key):
    shift = jnp.asarray(self.latent_shift, jnp.float32)
    return (vae.sample_latent(moments, key) - shift) * self.latent_scale

  def decode_latent(self, params, z_bhwc):
    z = z_bhwc / self.latent_scale + jnp.asarray(self.latent_shift, jnp.float32)
    return self.autoencoder.apply({"params": params["autoencoder"]}, z, method="decode")

  def clip_embedding(self, params, clip_image_bssc):
    emb_bd = self.clip_image.apply({"params": params["clip_image"]}, clip_image_bssc)
    return emb_bd[:, None, :].astype(jnp.float32)

  def text_hidden(self, params, tokens_bl):
    return self.clip_text.apply({"params": params["clip_text"]}, tokens_bl)

  def text_latent_from_hidden(self, params, hidden_blw):
    prefix = self.captioner.apply({"params": params["captioner"]}, hidden_blw,
                                  method=captioner_lib.CaptionDecoder.encode_prefix)
    return (prefix - jnp.asarray(self.text_shift, jnp.float32)) * self.text_scale

  def caption_prefix(self, text_blc):
    """A text latent as the caption decoder expects it (undoes text_scale and text_shift)."""
    return text_blc / self.text_scale + jnp.asarray(self.text_shift, jnp.float32)

  def text_latent(self, params, tokens_bl):
    return self.text_latent_from_hidden(params, self.text_hidden(params, tokens_bl))

  def batch_to_latents(self, params, batch, key):
    """A raw batch (image, clip_image, tokens) or a feature batch (moments, clip_img,
    tokens | text_hidden) -> (z0, clip0, text0). Frozen: no gradient flows back."""
    params = jax.lax.stop_gradient(params)
    moments = batch["moments"] if "moments" in batch else self.image_moments(params, batch["image"])
    z0 = self.latent_from_moments(moments, key)
    clip0 = batch["clip_img"] if "clip_img" in batch else self.clip_embedding(params, batch["clip_image"])
    if "text_hidden" in batch:
      text0 = self.text_latent_from_hidden(params, batch["text_hidden"])
    else:
      text0 = self.text_latent(params, batch["tokens"])
    return z0, clip0.astype(jnp.float32), text0.astype(jnp.float32)


def build(enc_cfg, model=None) -> Encoders:
  ae_cfg = dict(enc_cfg.autoencoder)
  kind = ae_cfg.pop("kind")
  scale = float(ae_cfg.pop("scale"))
  shift = float(ae_cfg.pop("shift"))
  factor = ae_cfg.pop("factor")
  if kind == "pixel":
    autoencoder = pixel_ae.PixelAutoencoder(factor=factor)
  elif kind == "vae":
    autoencoder = vae.AutoencoderKL(**_module_fields(ae_cfg))
  else:
    raise ValueError(f"config.encoders.autoencoder.kind={kind!r}; use 'pixel' or 'vae'")
  if autoencoder.downsample_factor != factor:
    raise ValueError(f"config.encoders.autoencoder.factor={factor} but the {kind} autoencoder "
                     f"downsamples by {autoencoder.downsample_factor}")
  ci = dict(enc_cfg.clip_image)
  ct = dict(enc_cfg.clip_text)
  return Encoders(
      autoencoder=autoencoder,
      latent_scale=scale,
      latent_shift=shift,
      text_scale=float(enc_cfg.text_scale),
      text_shift=0.0,
      clip_image=clip_lib.CLIPVisionEncoder(**_module_fields(ci)),
      clip_text=clip_lib.CLIPTextEncoder(**_module_fields(ct)),
      captioner=captioner_lib.CaptionDecoder(**_module_fields(enc_cfg.captioner)),
      clip_image_size=int(ci["image_size"]),
      text_length=int(ct["max_positions"]),
  )
