"""diffusers' AutoencoderKL, tiny and randomised, and the diffusers -> CompVis/LDM key table."""
import re

import diffusers
import torch

CHANNELS = (8, 16, 16)  # three levels: f = 4; the 16 -> 16 level has no shortcut conv
LAYERS = 2
LATENT = 3
GROUPS = 4


def torch_vae():
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=CHANNELS, layers_per_block=LAYERS,
      latent_channels=LATENT, norm_num_groups=GROUPS,
      down_block_types=("DownEncoderBlock2D",) * len(CHANNELS),
      up_block_types=("UpDecoderBlock2D",) * len(CHANNELS)).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if "norm" in name and name.endswith("weight"):  # GroupNorm scale away from 1
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) * 1.2 / fan_in ** 0.5)
  return vae


def ldm_name(k: str, num_levels: int = len(CHANNELS)) -> tuple[str, bool]:
  """diffusers name -> (CompVis/LDM name, stored as a 1x1 conv?): the test's own table."""
  n = num_levels
  k2 = k
  k2 = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", k2)
  k2 = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", r"down.\1.downsample.conv", k2)
  k2 = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)",
              lambda m: f"up.{n - 1 - int(m.group(1))}.block.{m.group(2)}", k2)
  k2 = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
              lambda m: f"up.{n - 1 - int(m.group(1))}.upsample.conv", k2)
  k2 = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", k2)
  k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k2)
  if m:
    k2 = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
    return k2, m.group(2) != "group_norm" and m.group(3) == "weight"
  return k2, False


def to_ldm(sd: dict) -> dict:
  out = {}
  for k, v in sd.items():
    k2, is_1x1 = ldm_name(k)
    v = v.numpy()
    out[k2] = v[:, :, None, None] if is_1x1 else v  # LDM stores these as 1x1 convs
  return out
