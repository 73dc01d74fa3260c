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
# workers and every subprocess the tests start (they inherit the environment):
# many tests compile the same small programs (initialisers, the tiny model's
# steps, the CLI's runs), and a program compiled once is then read back. It
# lives in the temp dir under this run's id and is removed when the run ends.
_RUN_ID = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
_CACHE = os.path.join(tempfile.gettempdir(), f'pyra_jax_tests_jax_cache_{_RUN_ID}')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """The controller (not an xdist worker) removes the run's compilation cache."""
  if not hasattr(session.config, 'workerinput'):
    shutil.rmtree(_CACHE, ignore_errors=True)
