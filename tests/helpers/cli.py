"""Running the command line from tests: in this process, or in a subprocess.

In-process runs (`run_main`) go through `pyra_jax.main`'s own flag parsing and
error handling, the path a user's command takes, without a new interpreter and
its JAX start-up; a subprocess (`cli`) is used where exiting, the absence of a
traceback or a second process is the point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from pyra_jax import main as main_lib

ROOT = Path(__file__).resolve().parents[2]

# The tiny run (configs/tiny.py on the offline MNIST digits) that most command
# line tests train or read: 50 steps, checkpoints at 25 and 50, evaluations on
# val200 in batches of 64 (200 = 3 * 64 + 8: the last batch is padded).
TINY = ['--config=configs/tiny.py', '--config.data.eval_split=val200',
        '--config.log_every_steps=1', '--config.eval_batch_size=64']


def cli(*args: str, module: str = 'pyra_jax.main', timeout: float = 180,
        privileged: bool = True) -> tuple[int, str, str]:
  """`python -m <module> *args` in a subprocess: (status, stdout, stderr).

  privileged=False: as root, without the capabilities that bypass file
  permissions (so a chmod applies to it as to any user).
  """
  command = [sys.executable, '-m', module, *args]
  if not privileged and os.geteuid() == 0:
    setpriv = shutil.which('setpriv')
    if setpriv is None:
      pytest.skip('running as root without setpriv: cannot drop the capability '
                  'that ignores file permissions')
    command = [setpriv, '--bounding-set=-dac_override,-dac_read_search', *command]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  return proc.returncode, proc.stdout, proc.stderr


def one_sentence(code: int, err: str, status: int = 1) -> bool:
  """A user error: its exit status, one 'Error: ...' line, no traceback."""
  lines = [l for l in err.strip().splitlines() if l.startswith('Error: ')]
  return code == status and len(lines) == 1 and 'Traceback' not in err


def reset_flags() -> None:
  """Forgets a previous parse, including the --config.<field> flags that
  ml_collections registered for it (a second parse would define them twice)."""
  for name in list(flags.FLAGS):
    if name.startswith('config.'):
      delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def run_main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
  """Parses flags and runs main in this process; returns (exit code, out, err)."""
  reset_flags()
  # ml_collections reads --config.<field> overrides from sys.argv itself.
  monkeypatch.setattr(sys, 'argv', ['main', *args])
  main_lib.parse_flags(['main', *args])
  code = 0
  try:
    main_lib.main(['main'])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def run_tiny(capsys, monkeypatch, workdir, *args: str) -> tuple[int, str, str]:
  """`run_main` on the TINY command line in `workdir`, plus `args`."""
  return run_main(capsys, monkeypatch, *TINY, f'--workdir={workdir}', *args)


def copy_of(workdir: Path, parent: Path, name: str = 'wd') -> Path:
  """A copy of a finished workdir as `parent / name`, for a test to change."""
  dst = Path(parent) / name
  shutil.copytree(workdir, dst)
  return dst


class NoCapture:
  """capsys for module- and session-scoped fixtures (pytest's is function-scoped)."""

  def readouterr(self) -> tuple[str, str]:
    return '', ''
