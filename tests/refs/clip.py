"""Tiny transformers CLIP towers with every weight randomised (LayerNorms included)."""
import torch
import transformers


def randomise(model, seed):
  """Random weights everywhere, LayerNorms included (HF init leaves them at 1/0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def text_model():
  cfg = transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=12, hidden_act="quick_gelu",
      pad_token_id=1, bos_token_id=0, eos_token_id=2)
  return randomise(transformers.CLIPTextModel(cfg), 0)


def vision_model():
  cfg = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
      image_size=24, patch_size=8, projection_dim=20, hidden_act="quick_gelu")
  return randomise(transformers.CLIPVisionModelWithProjection(cfg), 1)
