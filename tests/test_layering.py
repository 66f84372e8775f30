"""data_pipelines is a leaf package: it imports nothing from unidiffuser_jax; and the library's
modules import each other without a cycle."""
import ast
import os
import pkgutil
import subprocess
import sys

import pytest

import data_pipelines

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PKG = os.path.join(_ROOT, 'data_pipelines')


def _imported_modules(path: str) -> set[str]:
  """Every module an import statement anywhere in the file names (function-local ones too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.add(node.module or '')
  return names


def test_no_import_statement_names_the_library():
  files = sorted(f for f in os.listdir(_PKG) if f.endswith('.py'))
  assert len(files) > 10  # the scan sees the package
  bad = {f: sorted(m for m in _imported_modules(os.path.join(_PKG, f))
                   if m.split('.')[0] == 'unidiffuser_jax')
         for f in files}
  assert not {f: m for f, m in bad.items() if m}


@pytest.mark.slow
def test_importing_every_module_loads_no_library_module():
  modules = sorted(m.name for m in pkgutil.iter_modules(data_pipelines.__path__))
  assert 'transforms' in modules and 'iterators' in modules
  code = (f'import importlib, sys\n'
          f'for m in {modules!r}:\n'
          f'  importlib.import_module("data_pipelines." + m)\n'
          f'print(sorted(m for m in sys.modules if m.split(".")[0] == "unidiffuser_jax"))\n')
  res = subprocess.run([sys.executable, '-c', code], cwd=_ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip().splitlines()[-1] == '[]'


def _module_level_imports(path: str, modules: set[str]) -> set[str]:
  """The library modules a file imports at module level (`from pkg import mod` names mod)."""
  with open(path) as f:
    body = ast.parse(f.read(), path).body
  found = set()
  for node in body:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.update(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
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
  assert _a_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _a_cycle({'a': {'b'}, 'b': {'c'}, 'd': {'a', 'c'}}) == []


def test_library_modules_import_each_other_without_a_cycle():
  files = {}
  for dirpath, _, names in os.walk(os.path.join(_ROOT, 'unidiffuser_jax')):
    for name in names:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(dirpath, name), _ROOT)[:-3]
        files[rel.replace(os.sep, '.').removesuffix('.__init__')] = os.path.join(dirpath, name)
  assert 'unidiffuser_jax.train' in files and 'unidiffuser_jax.models.uvit' in files
  graph = {m: _module_level_imports(p, set(files)) - {m} for m, p in files.items()}
  assert len(graph['unidiffuser_jax.train']) > 5   # the scan sees the imports
  assert _a_cycle(graph) == []
