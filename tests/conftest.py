"""Shared pytest setup: keep JAX on the CPU, compile quickly, train the tiny run once.

The repository root is importable because tests/ is a package (pytest puts the
first folder above it without an __init__.py on the import path). Helpers the
test modules share live in tests/helpers/; fixtures they share are here.
"""

import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
# the notebooks, the multi-host run, the StableHLO export, the three-stage
# pipelines, the VTAB protocol, the killed DiffRate search, the benchmark), run first. pytest-xdist hands out the first quarter of the tests
# round-robin to its workers and the rest as workers free up, so long tests at
# the end of the order leave one worker idle while the other finishes them;
# first, they are shared out and the short tests fill in behind. Whole modules
# move, keeping each module's tests together (module-scoped fixtures are made
# once).
LONG_MODULES = ('test_notebooks.py', 'test_multihost.py', 'test_deploy.py',
                'test_stages.py', 'test_vtab.py', 'test_methods_ltmp_diffrate.py',
                'test_benchmark.py')


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable


@dataclasses.dataclass(frozen=True)
class TinyRun:
  """A finished run of the TINY command line (tests/helpers/cli.py)."""
  workdir: Path  # Read only: shared by every module of the session.
  stdout: str  # What `--mode=train` printed.


@contextlib.contextmanager
def _exclusive(lock_path: Path):
  """Holds an exclusive lock on `lock_path` (both xdist workers may ask at once)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not POSIX: each worker trains its own run.
    yield False
    return
  with open(lock_path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield True
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _train_tiny_run(workdir: Path) -> str:
  """Trains the TINY command line in this process (as a user's command: flag
  parsing, main's error handling); returns what it printed."""
  from tests.helpers import cli  # pylint: disable=g-import-not-at-top
  out, err = io.StringIO(), io.StringIO()
  mp = pytest.MonkeyPatch()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code, _, _ = cli.run_tiny(cli.NoCapture(), mp, workdir)
  finally:
    mp.undo()
    cli.reset_flags()
  assert code == 0, err.getvalue()
  return out.getvalue()


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory) -> TinyRun:
  """The tiny run (50 steps, checkpoints at 25 and 50), trained once per session.

  Under pytest-xdist the workers share one: the first to ask trains it in the
  run's common temporary folder while holding a lock, the other waits and reads
  it. Training is deterministic (seed 0, CPU), so a copy of it is what each
  module used to train for itself. Never change it: take `tiny_workdir`.
  """
  from tests.helpers.data import require_offline_mnist  # pylint: disable=g-import-not-at-top
  require_offline_mnist()
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'tiny_run'
  root.mkdir(exist_ok=True)
  with _exclusive(root / 'lock') as shared:
    if not shared:
      root = tmp_path_factory.mktemp('tiny_run')
    workdir, printed = root / 'workdir', root / 'stdout.txt'
    if not printed.exists():
      if workdir.exists():  # A worker that failed mid-run: start again.
        shutil.rmtree(workdir)
      printed.write_text(_train_tiny_run(workdir))
    return TinyRun(workdir, printed.read_text())


@pytest.fixture(scope='module')
def tiny_workdir(tiny_run, tmp_path_factory) -> Path:
  """This module's own copy of the finished tiny run, to read, evaluate and
  export from; a test that damages or continues a run copies it again
  (tests.helpers.cli.copy_of)."""
  from tests.helpers.cli import copy_of  # pylint: disable=g-import-not-at-top
  return copy_of(tiny_run.workdir, tmp_path_factory.mktemp('tiny_workdir'), 'reference')
