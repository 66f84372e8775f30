"""diffusers' UniDiffuserModel as the released post-LN U-ViT, tiny and randomised, and the
key tables between the released thu-ml layout and diffusers' (facts from the two codebases)."""
import numpy as np
import torch
from diffusers.pipelines.deprecated.unidiffuser import modeling_uvit

from unidiffuser_jax.weights import uvit as wuvit

HEADS, HEAD_DIM, DEPTH = 4, 8, 4  # depth 4: two in-blocks, so LIFO skip order is exercised
CFG = dict(latent_size=8, latent_channels=4, patch_size=2, width=HEADS * HEAD_DIM, depth=DEPTH,
           num_heads=HEADS, mlp_dim=4 * HEADS * HEAD_DIM, text_dim=6, num_text_tokens=5,
           clip_img_dim=7)


def torch_model(version: str, seed: int = 0, cfg: dict = CFG):
  """diffusers' UniDiffuserModel configured as the released post-LN network, random weights.

  `cfg`: our UViT fields (CFG's keys); its depth is diffusers' num_layers."""
  torch.manual_seed(seed)
  model = modeling_uvit.UniDiffuserModel(
      text_dim=cfg['text_dim'], clip_img_dim=cfg['clip_img_dim'],
      num_text_tokens=cfg['num_text_tokens'], num_attention_heads=cfg['num_heads'],
      attention_head_dim=cfg['width'] // cfg['num_heads'], in_channels=cfg['latent_channels'],
      out_channels=cfg['latent_channels'], num_layers=cfg['depth'], dropout=0.0,
      attention_bias=False, sample_size=cfg['latent_size'], patch_size=cfg['patch_size'],
      activation_fn='gelu',
      norm_type='layer_norm', block_type='unidiffuser', pre_layer_norm=False,
      use_timestep_embedding=False, norm_elementwise_affine=True, use_patch_pos_embed=False,
      ff_final_dropout=True, use_data_type_embedding=(version == 'v1'))
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('norm.weight') or name.endswith('norm1.weight') or \
         name.endswith('norm3.weight') or name.endswith('norm_out.weight'):
        p.copy_(1.0 + 0.2 * noise)  # LayerNorm scales: away from the init value 1
      elif p.ndim >= 2 and 'pos_embed' not in name and 'embedding' not in name:
        p.copy_(noise / np.sqrt(p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1)))
      else:
        p.copy_(0.3 * noise)  # biases, pos tables, embeddings, pos_embed_token
  return model.eval()


# -- diffusers <-> the released thu-ml layout: the library's table (weights/uvit.py), torch here --

def diffusers_to_released(state: dict, version: str, depth: int = DEPTH) -> dict:
  return wuvit.diffusers_to_released({k: v.numpy() for k, v in state.items()}, version, depth)


def released_to_diffusers(tensors: dict, version: str, depth: int = DEPTH) -> dict:
  return {k: torch.from_numpy(np.array(v))
          for k, v in wuvit.released_to_diffusers(tensors, version, depth).items()}


# -- running both --

def inputs(version: str, b: int = 3, seed: int = 7):
  rng = np.random.default_rng(seed)
  x = dict(z=rng.normal(size=(b, CFG['latent_size'], CFG['latent_size'], CFG['latent_channels'])),
           clip_img=rng.normal(size=(b, 1, CFG['clip_img_dim'])),
           text=rng.normal(size=(b, CFG['num_text_tokens'], CFG['text_dim'])),
           t_img=np.array([0.0, 371.25, 1000.0]),  # fractional, as the sampler feeds
           t_text=np.array([1000.0, 12.5, 0.0]))
  x = {k: v.astype(np.float32) for k, v in x.items()}
  x['data_type'] = np.array([0, 1, 1], np.int32) if version == 'v1' else None
  return x


def run_torch(model, x):
  with torch.no_grad():
    z, clip, text = model(
        torch.from_numpy(x['z']).permute(0, 3, 1, 2), torch.from_numpy(x['clip_img']),
        torch.from_numpy(x['text']), torch.from_numpy(x['t_img']), torch.from_numpy(x['t_text']),
        data_type=torch.from_numpy(x['data_type']) if x['data_type'] is not None else None)
  return z.permute(0, 2, 3, 1).numpy(), clip.numpy(), text.numpy()
