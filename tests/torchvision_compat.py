"""Makes `import torchvision` work when its compiled ops cannot load.

pytorch-fid and torchmetrics (test-only references) import torchvision but use only its
pure-Python parts. When torchvision's C++ ops (_C.so) fail to load -- e.g. PyPI's CUDA
torchvision wheel beside a CPU-only torch, whose libtorch_cuda.so it links -- torchvision's
own import dies registering fake kernels for those missing ops (RuntimeError "operator
torchvision::nms does not exist"). Then its two op-registration modules are replaced by
empty ones and the import is retried; detection models, nms & co. stay unusable, nothing
else changes. With a working torchvision this does nothing but import it.
"""
import importlib.util
import sys
import types


def import_torchvision() -> None:
  if importlib.util.find_spec("torchvision") is None:
    return
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401,F811
