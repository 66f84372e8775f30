"""caption_decoder.pth's layout (the thu-ml release) of diffusers' UniDiffuserTextDecoder."""


def to_numpy(state_dict):
  return {k: v.detach().cpu().numpy().copy() for k, v in state_dict.items()}


def released_layout(diffusers_tensors):
  """diffusers names -> thu-ml caption_decoder.pth names (module.gpt.*)."""
  out = {}
  for k, v in diffusers_tensors.items():
    k = 'gpt.' + k[len('transformer.'):] if k.startswith('transformer.') else k
    out['module.' + k] = v
  return out
