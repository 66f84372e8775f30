"""Layering: the library and the tests never import benchmarks/ (scripts that measure, never
imported); what they share lives in unidiffuser_jax/ (e.g. aot.py under benchmarks/aot_tpu.py)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("unidiffuser_jax", "data_pipelines", "configs", "tests")


def benchmark_imports(source: str) -> list[str]:
  """The import statements of `source` that reach the benchmarks package, as written."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module]
    else:
      continue
    found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
  return found


def _python_files():
  for package in PACKAGES:
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for name in sorted(files):
        if name.endswith(".py"):
          yield os.path.join(root, name)


@pytest.mark.parametrize("source, hits", [
    ("import benchmarks.aot_tpu", 1),
    ("from benchmarks import aot_tpu", 1),
    ("def f():\n  from benchmarks.bench_train import main\n", 1),
    ("import os, benchmarks", 1),
    ("from unidiffuser_jax import aot\nimport benchmarking", 0),
])
def test_scan_finds_every_form_of_import(source, hits):
  assert len(benchmark_imports(source)) == hits


def test_no_library_or_test_module_imports_benchmarks():
  files = list(_python_files())
  assert any(f.endswith(os.path.join("unidiffuser_jax", "aot.py")) for f in files)
  bad = {}
  for path in files:
    with open(path, encoding="utf-8") as f:
      hits = benchmark_imports(f.read())
    if hits:
      bad[os.path.relpath(path, REPO)] = hits
  assert not bad, f"modules importing benchmarks/ (move what they need into the package): {bad}"
