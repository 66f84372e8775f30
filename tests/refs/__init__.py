"""PyTorch reference builders shared by the tests: tiny random torch models in the released
layouts and the key tables between layouts (the tests' own, independent of the importers).

  clip       transformers CLIP text / vision towers with every weight randomised
  uvit       diffusers' UniDiffuserModel (released post-LN U-ViT) and the thu-ml <-> diffusers
             key tables
  vae        diffusers' AutoencoderKL and the diffusers -> CompVis/LDM key table
  captioner  caption_decoder.pth's layout (module.gpt.*) of diffusers' text decoder
  released   the weight jobs' test config (every part at these tiny sizes), torch.save
"""
