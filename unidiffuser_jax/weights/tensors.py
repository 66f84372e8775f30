"""Reading named tensors from weight files into numpy, safely.

Two formats are readable:

* ``.safetensors`` -- read directly with the safetensors library.
* PyTorch files written by ``torch.save`` (``.pth``/``.pt``/``.bin``/``.ckpt``,
  the zip format used since torch 1.6). These hold a pickle (``data.pkl``)
  plus one raw byte blob per storage (``data/<key>``). Unpickling a file from
  the internet with the stock unpickler can run arbitrary code, so we use a
  restricted unpickler: ``find_class`` resolves only the few globals that a
  plain state dict needs and maps each one to a numpy builder defined here.
  Any other global (``os.system``, a custom class, ``argparse.Namespace``...)
  raises ``UnsafeWeightsError`` naming it. torch itself is never imported.

Nested checkpoints (the rule ``load_tensors`` applies, in this order):

1. If the unpickled top level is a mapping holding a key ``"state_dict"``,
   ``"model"`` or ``"module"`` (first match in that order) whose value is a
   mapping, that value is used instead and the rest is ignored (typical
   training checkpoints: ``{"state_dict": ..., "epoch": 3}``).
2. Remaining nested mappings are flattened by joining keys with ``"."``
   (``{"a": {"b": t}}`` -> ``"a.b"``), the same convention as state dicts.
3. Leaves that are not tensors (ints, floats, strings, None, lists) are
   dropped: they are bookkeeping, not weights.

A ``"module."`` prefix (from DataParallel) is kept; stripping it is up to the
caller's key table.
"""
import collections
from collections.abc import Mapping
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath


class UnsafeWeightsError(ValueError):
  """A weight file would need arbitrary code execution to load."""


# torch storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype objects (``torch.float32`` pickles as the global torch.float32);
# only _rebuild_tensor_v3 passes one.
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


class _DtypeName:
  """Stands in for a torch global that names a dtype, inside the pickle.

  Only the name is kept; the dtype is looked up again at use time in the
  subclass's class-level table, so that a BUILD opcode aimed at this object
  cannot smuggle in another dtype (no __dict__, and the table is no slot).
  """
  __slots__ = ("name",)
  _DTYPES: dict[str, np.dtype] = {}

  def __init__(self, name: str):
    self.name = name

  @property
  def dtype(self) -> np.dtype:
    return self._DTYPES[str(self.name)]


class _StorageType(_DtypeName):
  """``torch.FloatStorage`` & co."""
  __slots__ = ()
  _DTYPES = _STORAGE_DTYPES


class _TorchDtype(_DtypeName):
  """``torch.float32`` & co. (only _rebuild_tensor_v3 passes one)."""
  __slots__ = ()
  _DTYPES = _TORCH_DTYPES


class _Storage:
  """One storage blob: a flat array of its elements."""

  def __init__(self, flat: np.ndarray):
    self.flat = flat


def _strided_copy(storage: _Storage, offset, size, stride, dtype=None) -> np.ndarray:
  """Copies the (offset, size, stride) view of a storage into a fresh array.

  Bounds are checked first: a crafted file must not make as_strided read
  memory outside the storage.
  """
  if not isinstance(storage, _Storage):
    raise UnsafeWeightsError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  flat = storage.flat
  if dtype is not None and dtype != flat.dtype:
    # _rebuild_tensor_v3 over an untyped (byte) storage: reinterpret.
    if flat.dtype != np.uint8:
      raise UnsafeWeightsError(f"dtype {dtype} requested from a {flat.dtype} storage")
    usable = flat.size - flat.size % dtype.itemsize
    flat = flat[:usable].view(dtype)
    offset = int(offset)  # v3 offsets are in elements of `dtype`
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise UnsafeWeightsError(f"bad tensor geometry: offset {offset} size {size} stride {stride}")
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise UnsafeWeightsError(
        f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element {last} "
        f"of a storage with {flat.size} elements")
  base = flat[offset:]
  item = flat.itemsize
  view = np.lib.stride_tricks.as_strided(
      base, shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks  # irrelevant for numpy
  if metadata:  # conj/neg bits: only meaningful for complex tensors
    raise UnsafeWeightsError(f"tensor metadata {metadata!r} is not supported")
  return _strided_copy(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks
  if metadata:
    raise UnsafeWeightsError(f"tensor metadata {metadata!r} is not supported")
  if not isinstance(dtype, _TorchDtype):
    raise UnsafeWeightsError(f"tensor dtype {dtype!r} is not a known torch dtype")
  return _strided_copy(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state  # python attributes set on a Parameter
  return data


# (module, name) -> what the pickle gets instead. Nothing here can run code
# chosen by the file: each entry is a plain container or one of our builders.
_ALLOWED_FUNCTIONS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for torch's data.pkl that resolves only allow-listed globals."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str, byteorder: str, where: str):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._byteorder = byteorder
    self._where = where
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_FUNCTIONS:
      return _ALLOWED_FUNCTIONS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return _TorchDtype(name)
    raise UnsafeWeightsError(
        f"{self._where}: refusing to load global '{module}.{name}'; only plain tensor state "
        f"dicts can be read safely (a pickle that references other globals could run code). "
        f"Re-save the file as safetensors or as a plain state dict.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise UnsafeWeightsError(f"{self._where}: unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not (isinstance(storage_type, _StorageType) and storage_type.name in _STORAGE_DTYPES):
      raise UnsafeWeightsError(f"{self._where}: storage of unknown type {storage_type!r}")
    key = key.decode() if isinstance(key, bytes) else str(key)
    if key not in self._storages:
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      entry = f"{self._prefix}data/{key}"
      nbytes = int(numel) * dtype.itemsize
      try:
        with self._zf.open(entry) as f:
          raw = f.read(nbytes)  # never more than the pickle claims (no zip-bomb reads)
      except KeyError:
        raise UnsafeWeightsError(f"{self._where}: storage {entry!r} is missing") from None
      if len(raw) < nbytes:
        raise UnsafeWeightsError(
            f"{self._where}: storage {entry!r} holds {len(raw)} bytes, expected {nbytes}")
      flat = np.frombuffer(raw, dtype=dtype, count=int(numel))
      if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
      self._storages[key] = _Storage(flat)
    return self._storages[key]


def _load_torch_zip(path: str) -> object:
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f"{path}: not a zip-format PyTorch file (legacy torch<1.6 pickles are not supported; "
        f"re-save it with a recent torch or as safetensors)")
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    prefix = pkls[0][:-len("data.pkl")]
    if f"{prefix}constants.pkl" in names:
      raise UnsafeWeightsError(f"{path}: TorchScript archives are not supported")
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = zf.read(f"{prefix}byteorder").decode()
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), zf, prefix, byteorder, path)
    return unpickler.load()


def _select_state_dict(obj: object, path: str) -> dict[str, np.ndarray]:
  """Applies the nesting rule of the module docstring."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: top level is a {type(obj).__name__}, not a dict of tensors")
  for wrapper in ("state_dict", "model", "module"):
    if isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
      break
  out: dict[str, np.ndarray] = {}

  def visit(node: Mapping, prefix: str):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, Mapping):
        visit(v, name + ".")
      elif isinstance(v, np.ndarray):
        out[name] = v

  visit(obj, "")
  return out


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """Returns {name: array} from a .safetensors file or a torch.save'd state dict.

  PyTorch files are read without executing pickled code (see module docs);
  anything beyond a plain state dict raises UnsafeWeightsError.
  """
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    return dict(safetensors.numpy.load_file(path))
  return _select_state_dict(_load_torch_zip(path), path)


def load_metadata(path: str) -> dict[str, str]:
  """The string metadata of a .safetensors file's header ({} for other formats)."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    return {}
  with safetensors.safe_open(path, framework="np") as f:
    return dict(f.metadata() or {})


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, object] | None = None) -> None:
  """Writes {name: array} to a .safetensors file, local or remote (gs://...); dtypes are kept.

  `metadata`: header strings (values are str()-ed) besides "format": "pt", which PyTorch
  loaders (transformers, diffusers) look for.
  """
  arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
  data = safetensors.numpy.save(
      arrays, metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_bytes(data)
