"""hugepages.py: when the entry point restarts itself with glibc's malloc on huge pages."""
import os
import subprocess
import sys

import pytest

from unidiffuser_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADVISE = "always [madvise] never"


@pytest.mark.parametrize("environ, platform, libc, thp, expected", [
    ({}, "linux", "glibc 2.36", MADVISE, True),
    ({}, "linux", "glibc 2.35", "[always] madvise never", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", "glibc 2.36", MADVISE, False),  # the user's
    ({}, "darwin", None, None, False),
    ({}, "linux", None, MADVISE, False),           # musl: no CS_GNU_LIBC_VERSION
    ({}, "linux", "glibc 2.34", MADVISE, False),   # before the hugetlb tunable
    ({}, "linux", "glibc 2.36", "always madvise [never]", False),
    ({}, "linux", "glibc 2.36", None, False),      # no THP file
    ({}, "linux", "glibc x.y", MADVISE, False),
])
def test_wanted_only_on_glibc_2_35_with_huge_pages_on_and_no_tunables_set(
    environ, platform, libc, thp, expected):
  assert hugepages.wanted(environ, platform, libc, thp) is expected


def _child_tunables(env: dict) -> str:
  code = ("from unidiffuser_jax import hugepages; hugepages.reexec_if_wanted(); "
          "import os; print(os.environ.get('GLIBC_TUNABLES'))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout.strip()


def test_the_process_restarts_itself_with_the_tunable_and_leaves_a_users_value_alone():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  here = hugepages.wanted(env, sys.platform, hugepages._libc(), hugepages._thp_mode())
  assert _child_tunables(env) == (hugepages.TUNABLE if here else "None")
  assert _child_tunables({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == \
      "glibc.malloc.hugetlb=0"
