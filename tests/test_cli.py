"""Every command: absl flags, --help, one error style, quiet by default.

The commands are found from the files (every pyra_jax module with a top-level
`if __name__ == '__main__':`), so a new command is checked without being
listed here. Each runs in a fresh interpreter, as a user starts it, with
TF_CPP_MIN_LOG_LEVEL removed from its environment: the quiet default must not
depend on it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'pyra_jax'

# What the libraries print when nobody quiets them (TensorFlow's C++ start-up
# lines, XLA's TPU and GPU probing, Orbax's notices), as they appear on a terminal.
BANNERS = ('oneDNN', 'TF_ENABLE_ONEDNN_OPTS', 'cpu_feature_guard',
           'This TensorFlow binary is optimized', 'libtpu', 'TPU', 'is read only',
           'Unable to initialize backend', 'absl::InitializeLog', 'CUDA')


def command_modules() -> list[str]:
  """pyra_jax modules that run as a command (`if __name__ == '__main__':`)."""
  out = []
  for path in sorted(PACKAGE.rglob('*.py')):
    tree = ast.parse(path.read_text())
    for node in tree.body:
      if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__'):
        parts = path.relative_to(ROOT).with_suffix('').parts
        if parts[-1] == '__main__':  # A package run as `python -m package`.
          parts = parts[:-1]
        out.append('.'.join(parts))
  return out


def quiet_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  return env


def run(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT,
                        env=quiet_env(), capture_output=True, text=True,
                        timeout=timeout)


def test_the_commands_are_found():
  found = command_modules()
  assert {'pyra_jax.main', 'pyra_jax.vtab', 'pyra_jax.benchmark', 'pyra_jax.param_counts',
          'pyra_jax.convert', 'pyra_jax.experiments.study', 'pyra_jax.experiments.plots',
          'pyra_jax.experiments.input_benchmark', 'pyra_jax.experiments.knn_probe',
          'pyra_jax.experiments.pedist_speed'} <= set(found), found
  # The serving loader's template (a string inside deploy.py) is no command.
  assert 'pyra_jax.deploy' not in found


@pytest.mark.parametrize('module', command_modules())
def test_help_exits_0_and_a_bad_flag_is_one_error_line(module):
  shown = run(module, '--help')
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert 'Traceback' not in shown.stderr
  assert re.search(r'^\s*--\w+', shown.stdout, re.M), shown.stdout[:2000]  # Its flags.
  bad = run(module, '--no_such_flag=1')
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert bad.stdout == ''
  assert bad.stderr.splitlines() == ["Error: Unknown command line flag 'no_such_flag'"]


def test_positional_arguments_are_refused_in_the_same_style():
  # pedist_speed took its numbers as arguments before it took flags.
  proc = run('pyra_jax.experiments.pedist_speed', '56', '64', '20')
  assert proc.returncode == 2
  [line] = proc.stderr.splitlines()
  assert re.fullmatch(r'Error: --(image_size|batch|rounds) is required: give '
                      r'--\1=\.\.\. \(--help lists the flags\)\.', line), line
  proc = run('pyra_jax.convert', '--src=a.npz', '--out=b.npz', 'c.npz')
  assert proc.returncode == 2
  [line] = proc.stderr.splitlines()
  assert line.startswith('Error: Unexpected arguments: c.npz'), line


def test_param_counts_reads_no_tensorflow_and_prints_no_banner():
  # As `python -m pyra_jax.param_counts`, then asks which modules got loaded.
  code = ('import runpy, sys\n'
          "sys.argv = ['pyra_jax.param_counts', '--config=configs/tiny.py']\n"
          'try:\n'
          "  runpy.run_module('pyra_jax.param_counts', run_name='__main__', alter_sys=True)\n"
          'except SystemExit as e:\n'
          '  assert not e.code, e.code\n'
          "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=quiet_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[-1] == 'tensorflow loaded: False'
  assert 'This config (pyra (pyra))' in proc.stdout  # It did count.
  assert proc.stderr == '', proc.stderr[-2000:]
