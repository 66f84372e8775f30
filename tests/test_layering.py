"""data_pipelines is a leaf package: it imports nothing from unidiffuser_jax."""
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
