"""Every random draw comes from a key derived from (seed, step, purpose).

Deriving instead of splitting a carried key means a resumed run needs no RNG
state in the checkpoint and still draws bit-identical numbers.
"""
import zlib

import jax


def purpose_id(purpose: str) -> int:
  """A stable 31-bit id for a purpose name (crc32 is stable across runs and hosts)."""
  return zlib.crc32(purpose.encode()) & 0x7FFFFFFF


def key_for(seed: int, step, purpose: str) -> jax.Array:
  """Key for `purpose` at `step` (a Python int or a traced int32 scalar)."""
  key = jax.random.fold_in(jax.random.key(seed), purpose_id(purpose))
  return jax.random.fold_in(key, step)
