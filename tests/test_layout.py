"""The package's layering: the library never imports the experiment tooling.

pyra_jax/experiments/ (study runner, plots, input benchmark, k-NN probe) is built
on the library; if a library module imported it, training and deployment would
drag in the tooling and its dependencies. Every library module is imported in a
fresh interpreter, so nothing a test imported earlier can hide or fake an import.

matplotlib (the plots' dependency, an optional extra) is made unimportable there:
every library module must import without it. (It cannot simply be absent from
sys.modules: TensorFlow, which pyra_jax.data imports, loads Keras, which imports
matplotlib whenever it is installed.)
"""

import json
import subprocess
import sys
from pathlib import Path
from tests.helpers.cli import ROOT

PACKAGE = ROOT / 'pyra_jax'
TOOLING = 'pyra_jax.experiments'

# Imports the modules named on the command line with matplotlib blocked (a None
# entry in sys.modules makes `import matplotlib` raise ImportError), then prints
# the tooling modules that got loaded, as JSON.
_PROBE = """
import importlib, json, sys
sys.modules['matplotlib'] = None
for name in sys.argv[1:]:
  importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules
                        if m == 'pyra_jax.experiments'
                        or m.startswith('pyra_jax.experiments.'))))
"""


def module_names(package_dir: Path) -> list[str]:
  """Dotted names of every module and package under `package_dir`, from the files."""
  names = []
  for path in sorted(package_dir.rglob('*.py')):
    parts = path.relative_to(package_dir.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    names.append('.'.join(parts))
  return names


def library_modules() -> list[str]:
  return [n for n in module_names(PACKAGE)
          if n != TOOLING and not n.startswith(TOOLING + '.')]


def imported_by(modules: list[str]) -> list[str]:
  proc = subprocess.run([sys.executable, '-c', _PROBE, *modules], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_library_modules_are_found():
  # The discovery itself: it must see the library's modules, subpackages
  # included, and none of the tooling (else the test below checks nothing).
  found = library_modules()
  for name in ('pyra_jax', 'pyra_jax.training.loop', 'pyra_jax.main', 'pyra_jax.benchmark',
               'pyra_jax.models.vit', 'pyra_jax.data.input_pipeline',
               'pyra_jax.checkpoints.loader', 'pyra_jax.configs.common'):
    assert name in found, name
  assert not [n for n in found if 'experiments' in n]
  assert {'pyra_jax.experiments.study', 'pyra_jax.experiments.plots',
          'pyra_jax.experiments.input_benchmark', 'pyra_jax.experiments.knn_probe',
          'pyra_jax.experiments.study_small'} <= set(module_names(PACKAGE))


def test_library_imports_neither_the_tooling_nor_matplotlib():
  # A failed import (matplotlib needed) fails inside imported_by.
  assert imported_by(library_modules()) == []


def test_the_probe_sees_the_tooling_and_the_blocked_matplotlib():
  # The same probe reports a tooling module (plots imports matplotlib only when
  # drawing, so it imports here) ...
  assert imported_by(['pyra_jax.experiments.plots']) == [
      'pyra_jax.experiments', 'pyra_jax.experiments.plots']
  # ... and a module that needs matplotlib at import fails: both checks above
  # can fail.
  proc = subprocess.run([sys.executable, '-c', _PROBE, 'matplotlib.pyplot'],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  last_line = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode != 0 and 'Error' in last_line and 'matplotlib' in last_line
