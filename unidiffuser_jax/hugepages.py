"""malloc on transparent huge pages for the entry point's process (Linux, glibc >= 2.35).

XLA:CPU allocates its buffers with malloc; with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc
asks the kernel for transparent huge pages for that memory (madvise), and the train step runs
faster: 10% at both benchmarked sizes in session 11; the demo's step in its training loop 5-12%
on average in session 18, the weights bit-identical (benchmarks/README.md, README). glibc reads
its tunables once, at process start, so `python -m unidiffuser_jax.main` re-executes itself once
with the variable added. Nothing is done when the user set GLIBC_TUNABLES (any value, e.g.
`glibc.malloc.hugetlb=0` to opt out), off Linux / glibc, on glibc < 2.35, or when the kernel's
transparent huge pages are off. No JAX import here: this runs before anything heavy.
"""
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted(environ, platform: str, libc: str | None, thp_mode: str | None) -> bool:
  """Whether to restart with TUNABLE: `libc` as os.confstr('CS_GNU_LIBC_VERSION') gives it
  ('glibc 2.36'), `thp_mode` the kernel's THP_MODE_FILE text ('always [madvise] never')."""
  if "GLIBC_TUNABLES" in environ or not platform.startswith("linux"):
    return False
  if not libc or not libc.startswith("glibc "):
    return False
  try:
    major, minor = (int(x) for x in libc.split()[1].split(".")[:2])
  except ValueError:
    return False
  if (major, minor) < (2, 35):
    return False
  return bool(thp_mode) and ("[always]" in thp_mode or "[madvise]" in thp_mode)


def _libc() -> str | None:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION")
  except (ValueError, OSError, AttributeError):
    return None


def _thp_mode() -> str | None:
  try:
    with open(THP_MODE_FILE) as f:
      return f.read()
  except OSError:
    return None


def reexec_if_wanted() -> None:
  """Restarts this process (same pid, same command line) with TUNABLE in its environment, when
  `wanted`; returns otherwise. Call it before importing anything heavy."""
  if not wanted(os.environ, sys.platform, _libc(), _thp_mode()):
    return
  env = {**os.environ, "GLIBC_TUNABLES": TUNABLE}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
