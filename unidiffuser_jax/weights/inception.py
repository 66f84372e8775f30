"""Key table and safe loader for pytorch-fid's FID Inception weights.

The standard file is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``:
a torch state dict of torchvision's ``Inception3`` modules with the FID
patches (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
``fc.weight`` ...). It is read with the restricted unpickler of
weights/tensors.py (no pickled code runs; torch is not needed) or from a
``.safetensors`` file with the same names. ``*.num_batches_tracked`` buffers
are ignored; ``AuxLogits.*`` tensors (present in torchvision's own, non-FID
checkpoints) are not, so such a file is rejected.

Nothing is downloaded: the caller passes a local path.
"""
from collections.abc import Mapping
import os

import jax
import jax.numpy as jnp
import numpy as np

from unidiffuser_jax.models.inception import FID_SIZE, FIDInception
from unidiffuser_jax.weights import convert
from unidiffuser_jax.weights.tensors import load_tensors

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# Our leaf name -> torch's (for each BasicConv: conv + bn; and fc).
_BN_LEAF = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def inception_template() -> dict:
  """ShapeDtypeStruct tree of FIDInception's params (no compute)."""
  x = jax.ShapeDtypeStruct((1, FID_SIZE, FID_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInception().init, jax.random.key(0), x)["params"]


def _conv_to_theirs(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def inception_entries(template: Mapping) -> list[convert.Entry]:
  """One Entry per FIDInception parameter, derived from the template's paths."""
  entries = []
  for path in convert.flatten(template):
    module, leaf = ".".join(path[:-1]), path[-1]
    if path[-2] == "conv":
      entries.append(convert.Entry(path, f"{module}.weight", convert.conv_kernel,
                                   _conv_to_theirs))
    elif path[-2] == "bn":
      entries.append(convert.Entry(path, f"{module}.{_BN_LEAF[leaf]}"))
    elif path == ("fc", "kernel"):
      entries.append(convert.Entry(path, "fc.weight", convert.linear_kernel,
                                   convert.linear_kernel))
    elif path == ("fc", "bias"):
      entries.append(convert.Entry(path, "fc.bias"))
    else:
      raise ValueError(f"no key rule for parameter {'/'.join(path)}")
  return entries


def inception_params_from_tensors(tensors: Mapping[str, np.ndarray], where: str = "tensors"
                                  ) -> dict:
  """{torch name: array} -> FIDInception params.

  Raises WeightMismatchError with a one-line message (the count and the
  first problems) when tensors are missing, unexpected or mis-shaped.
  """
  template = inception_template()
  try:
    return convert.assign(template, tensors, inception_entries(template),
                          ignore_unexpected=lambda n: n.endswith(".num_batches_tracked"))
  except convert.WeightMismatchError as e:
    lines = str(e).splitlines()
    problems = [ln.strip() for ln in lines[1:]]
    shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
    raise convert.WeightMismatchError(
        f"{where}: not pytorch-fid's FID Inception weights ({lines[0].rstrip(':')}): "
        f"{shown}") from None


def load_inception_params(path: str) -> dict:
  """FIDInception params from a local ``.pth`` (torch state dict) or ``.safetensors`` file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path}: no such file; FID needs pytorch-fid's {FID_WEIGHTS_FILE} (nothing is "
        f"downloaded: fetch it yourself and pass its path)")
  return inception_params_from_tensors(load_tensors(path), where=path)


def export_inception(params: Mapping) -> dict[str, np.ndarray]:
  """Inverse of inception_params_from_tensors: {torch name: array}."""
  return convert.export(params, inception_entries(params))
