"""Profiler traces and the persistent compilation cache, for every job.

  --config.train.profile_steps=(A,B)   jax.profiler trace of train steps A..B (1-based, as logged)
                                       into <workdir>/profile (TensorBoard's profile plugin, Perfetto)
  --config.sample.profile=True         a trace of the whole --mode=sample job, same place
  --config.compile.cache_dir=PATH      jax's persistent compilation cache; "" = <workdir>/compile_cache,
                                       "none" = off; a re-run or a resumed job loads its programs
                                       instead of compiling them again
"""
import contextlib
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from unidiffuser_jax import errors


def profile_dir(workdir: str) -> str:
  return os.path.join(workdir, "profile")


class StepProfiler:
  """Starts a trace before step A is dispatched and stops it once step B's outputs are ready
  (the only sync it adds, at step B)."""

  def __init__(self, workdir: str, steps):
    steps = tuple(int(s) for s in (steps or ()))
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
      raise errors.ConfigError(f"config.train.profile_steps={steps}; use (first, last) with "
                               f"1 <= first <= last, or () for no trace")
    self._steps, self._dir, self._on = steps, profile_dir(workdir), False

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self._dir)
      self._on = True

  def after(self, step: int, outputs) -> None:
    if self._on and step == self._steps[1]:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if self._on:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self._on = False


@contextlib.contextmanager
def trace(workdir: str, enabled: bool):
  """A jax.profiler trace of the block into <workdir>/profile when `enabled`."""
  if not enabled:
    yield
    return
  with jax.profiler.trace(profile_dir(workdir)):
    yield


def enable_compilation_cache(cache_dir: str, workdir: str) -> str:
  """Points jax's persistent compilation cache at `cache_dir` ("" = jax's own
  $JAX_COMPILATION_CACHE_DIR when it is set, else <workdir>/compile_cache; "none" = off);
  returns the directory used ("" when off). Programs that took at least 0.2 s to compile are
  kept."""
  if cache_dir == "none":
    return ""
  path = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      workdir, "compile_cache")
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()   # a second job in this process uses its own directory
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
