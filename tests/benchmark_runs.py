"""Runs a benchmarks/ script in a subprocess for the tests (the scripts are never imported)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
  """`python benchmarks/<script> args` from the repository root on one CPU device (XLA_FLAGS
  cleared: the suite's 8 fake devices are not the scripts' setting); with `ok`, asserts it exited
  0 and shows its stderr's tail otherwise."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  if ok:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc
