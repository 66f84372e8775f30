"""Layering: the library and the tests never import benchmarks/ (scripts that measure, never
imported); what they share lives in unidiffuser_jax/ (e.g. perf.py under benchmarks/bench_train.py).
Imports sit at the top of the library's files; one inside a function says why on its line
(`# local: <reason>`: an optional or heavy dependency such as torch or TensorFlow). The library's
modules import each other without a cycle."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("unidiffuser_jax", "data_pipelines", "configs", "tests")
LIBRARY = ("unidiffuser_jax", "data_pipelines")


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


def unexplained_local_imports(source: str) -> list[str]:
  """The import statements inside a function of `source` without `# local:` on their line."""
  lines = source.splitlines()
  found = []
  for fn in ast.walk(ast.parse(source)):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    for node in ast.walk(fn):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and \
          "# local:" not in lines[node.lineno - 1]:
        found.append(f"line {node.lineno}: {lines[node.lineno - 1].strip()}")
  return sorted(set(found))  # nested functions are walked twice


def _python_files(packages=PACKAGES):
  for package in packages:
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


def _offenders(files, scan) -> dict[str, list[str]]:
  """{path relative to the repo: what scan(source) found} for the files where it found any."""
  bad = {}
  for path in files:
    with open(path, encoding="utf-8") as f:
      hits = scan(f.read())
    if hits:
      bad[os.path.relpath(path, REPO)] = hits
  return bad


def test_no_library_or_test_module_imports_benchmarks():
  files = list(_python_files())
  assert any(f.endswith(os.path.join("unidiffuser_jax", "aot.py")) for f in files)
  bad = _offenders(files, benchmark_imports)
  assert not bad, f"modules importing benchmarks/ (move what they need into the package): {bad}"


@pytest.mark.parametrize("source, hits", [
    ("import os\ndef f():\n  return os\n", 0),
    ("def f():\n  import torch\n", 1),
    ("def f():\n  import torch  # local: optional heavy dependency\n", 0),
    ("class A:\n  def f(self):\n    def g():\n      from a import b\n", 1),
    ("def f():\n  try:\n    import pyarrow  # local: optional\n  except ImportError:\n"
     "    from x import y\n", 1),
    ("try:\n  import pyarrow\nexcept ImportError:\n  pyarrow = None\n", 0),
])
def test_scan_finds_function_local_imports(source, hits):
  assert len(unexplained_local_imports(source)) == hits


def test_library_imports_are_at_the_top_or_say_why():
  files = list(_python_files(LIBRARY))
  assert any(f.endswith(os.path.join("unidiffuser_jax", "train.py")) for f in files)
  bad = _offenders(files, unexplained_local_imports)
  assert not bad, f"function-local imports without '# local: <reason>' (move them up): {bad}"


@pytest.mark.slow
def test_the_entry_point_loads_neither_torch_nor_tensorflow(tmp_path):
  """What the `# local:` imports keep out of `python -m unidiffuser_jax.main` at startup, and
  out of the trainer's TensorBoard writing (TensorFlow's import alone is ~4 s per process)."""
  code = ("import sys, unidiffuser_jax.main, unidiffuser_jax.train, unidiffuser_jax.evaluate\n"
          "from unidiffuser_jax import metrics\n"
          f"log = metrics.MetricLogger({str(tmp_path)!r}, total_steps=1, start_step=0, every=1,"
          " examples_per_step=1)\n"
          "log.step(1, {'loss': 1.0}); log.close()\n"
          "print(sorted(m for m in ('torch', 'tensorflow', 'transformers') if m in sys.modules))")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip().splitlines()[-1] == "[]"


def _module_level_imports(path: str, modules: set[str]) -> set[str]:
  """The library modules a file imports at module level (`from pkg import mod` names mod)."""
  with open(path) as f:
    body = ast.parse(f.read(), path).body
  found = set()
  for node in body:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                   else node.module for a in node.names)
  return found & modules


def _a_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle of `graph` ({module: modules it imports}) as a path, or []."""
  state = {}   # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt, path + [nxt])):
        return cycle
    state[node] = 2
    return []

  for start in sorted(graph):
    if start not in state and (cycle := visit(start, [start])):
      return cycle
  return []


def test_the_cycle_finder_finds_a_cycle():
  assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _a_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) == []


def test_library_modules_import_each_other_without_a_cycle():
  files = {os.path.relpath(p, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__"): p
           for p in _python_files(("unidiffuser_jax",))}
  assert "unidiffuser_jax.train" in files and "unidiffuser_jax.models.uvit" in files
  graph = {m: _module_level_imports(p, set(files)) - {m} for m, p in files.items()}
  assert len(graph["unidiffuser_jax.train"]) > 5   # the scan sees the imports
  assert _a_cycle(graph) == []
