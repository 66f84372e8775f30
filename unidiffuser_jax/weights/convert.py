"""Generic helpers for moving named tensors into and out of Flax parameter trees.

A converter is a list of (our_path, their_name, transform) entries built by a
model-specific module (weights/uvit.py, ...). `assign` applies it to a template
tree (from jax.eval_shape) and reports every missing, unexpected or mis-shaped
tensor by name in one error; nothing is silently skipped.
"""
from collections.abc import Callable, Mapping
import dataclasses

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_kernel(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> flax Dense kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out]."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple[str, ...]          # path in our (unboxed) params tree
  name: str                      # their tensor name
  to_ours: Transform = identity  # their layout -> ours
  to_theirs: Transform = identity  # ours -> their layout


class WeightMismatchError(ValueError):
  """Missing, unexpected or mis-shaped tensors; the message names each one."""


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def assign(template: Mapping, tensors: Mapping[str, np.ndarray], entries: list[Entry],
           ignore_unexpected: Callable[[str], bool] = lambda name: False) -> dict:
  """Builds a params tree shaped like `template` from `tensors` via `entries`.

  `template` leaves need `.shape` and `.dtype` (ShapeDtypeStruct is fine).
  Raises WeightMismatchError naming every problem at once.
  """
  flat_template = flatten(template)
  problems = []
  covered = {e.path for e in entries}
  for path in flat_template:
    if path not in covered:
      problems.append(f"no source tensor mapped for parameter {'/'.join(path)}")
  out = {}
  used = set()
  for e in entries:
    if e.path not in flat_template:
      problems.append(f"mapping names unknown parameter {'/'.join(e.path)}")
      continue
    if e.name not in tensors:
      problems.append(f"missing tensor {e.name!r} (for {'/'.join(e.path)})")
      continue
    used.add(e.name)
    value = e.to_ours(np.asarray(tensors[e.name]))
    want = flat_template[e.path]
    if tuple(value.shape) != tuple(want.shape):
      problems.append(
          f"tensor {e.name!r} has shape {tuple(np.shape(tensors[e.name]))}, "
          f"which gives {tuple(value.shape)} but {'/'.join(e.path)} needs {tuple(want.shape)}")
      continue
    out[e.path] = value.astype(want.dtype)
  for name in tensors:
    if name not in used and not ignore_unexpected(name):
      problems.append(f"unexpected tensor {name!r}")
  if problems:
    raise WeightMismatchError(
        f"{len(problems)} weight problem(s):\n  " + "\n  ".join(sorted(problems)))
  return unflatten(out)


def export(params: Mapping, entries: list[Entry]) -> dict[str, np.ndarray]:
  """Inverse of `assign`: our params tree -> {their_name: array}."""
  flat = flatten(params)
  return {e.name: np.ascontiguousarray(e.to_theirs(np.asarray(flat[e.path]))) for e in entries}
