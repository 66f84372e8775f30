"""Reading named tensors from weight files into numpy, safely.

safetensors is read directly. PyTorch .pth/.bin support (a restricted
unpickler that never executes pickled code) is added by the encoder issue.
"""
import os

import numpy as np


class UnsafeWeightsError(ValueError):
  """A weight file would need arbitrary code execution to load."""


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """Returns {name: array} from a .safetensors file."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  raise NotImplementedError(f"{path}: only .safetensors is readable so far")
