"""Shared pytest setup: keep JAX on the CPU, compile quickly.

The repository root is importable because tests/ is a package (pytest puts the
first folder above it without an __init__.py on the import path).
"""

import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Tests compile many small programs once each: XLA's backend optimisations cost
# more compile time (3x for a train step) than they save in run time here.
# Numerics are unchanged up to float32 round-off; benchmarks never run with this.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

# One JAX persistent compilation cache for the whole run, shared by both xdist
# workers and every subprocess the tests start: many tests compile the same
# small programs (initialisers, the tiny model's steps, the CLI's runs), and a
# program compiled once is then read back. The first process (pytest itself, or
# xdist's controller) makes it; workers and subprocesses inherit the variable,
# so they neither make nor remove one. A cache the user set is left alone.
_OWN_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix='pyra_jax_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """The process that made the run's compilation cache removes it."""
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The modules holding the longest tests (a minute or more each on a 2-core CPU:
# the notebooks, the multi-host run, the VTAB protocol, the killed DiffRate
# search), run first. pytest-xdist hands out the first quarter of the tests
# round-robin to its workers and the rest as workers free up, so long tests at
# the end of the order leave one worker idle while the other finishes them;
# first, they are shared out and the short tests fill in behind. Whole modules
# move, keeping each module's tests together (module-scoped fixtures are made
# once).
LONG_MODULES = ('test_notebooks.py', 'test_multihost.py', 'test_vtab.py',
                'test_methods_ltmp_diffrate.py')


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable
