"""The weight jobs' test config: every part at the reference builders' tiny sizes, in the
released layouts; and torch.save of a tensor dict (the released .pth files)."""
import ml_collections as mc
import numpy as np
import torch

from configs import common
from tests.refs import uvit as uvit_ref
from tests.refs import vae as vae_ref

CAP = dict(prefix_inner_dim=32, prefix_hidden_dim=6, vocab_size=64, n_positions=64, n_embd=32,
           n_layer=2, n_head=4)
EOS = 63


def config(**weights) -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.seed = 0
  c.mesh = common.mesh()
  c.sharding = common.sharding()
  c.model = dict(version="v1", **uvit_ref.CFG, num_data_types=2, dtype="float32", remat="none")
  c.data = common.data()
  c.encoders = common.encoders(
      autoencoder=dict(kind="vae", factor=4, scale=0.18215, block_out_channels=vae_ref.CHANNELS,
                       layers_per_block=vae_ref.LAYERS, latent_channels=vae_ref.LATENT,
                       norm_num_groups=vae_ref.GROUPS),
      clip_image=dict(image_size=24, patch_size=8, width=32, num_layers=2, num_heads=4,
                      mlp_dim=40, proj_dim=20),
      clip_text=dict(width=32, num_layers=2, num_heads=4, mlp_dim=40,
                     max_positions=12),
      captioner={k: v for k, v in CAP.items() if k != "vocab_size"},
  )
  # What vocab.derive reads from the tokenizers in a job.
  c.encoders.clip_text.vocab_size = 99
  c.encoders.captioner.update(vocab_size=CAP["vocab_size"], eos_id=EOS)
  c.sample = common.sample()
  c.weights = common.weights(**weights)
  return c


def torch_save(tensors: dict, path) -> str:
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, str(path))
  return str(path)
