"""The console/notebook progress bar: on in a notebook kernel, off in logs."""

import sys
import types

import tqdm.auto

from pyra_jax import metrics


def test_progress_bar_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: False, raising=False)
  monkeypatch.delitem(sys.modules, 'IPython', raising=False)
  bar = metrics.progress_bar(10, 0)
  assert bar.disable
  bar.close()


def test_progress_bar_shows_in_a_notebook_kernel(monkeypatch):
  """Colab/Jupyter: stderr is no tty, yet the bar must show (tqdm.auto)."""
  monkeypatch.setattr(sys.stderr, 'isatty', lambda: False, raising=False)
  shell = types.SimpleNamespace(config={'IPKernelApp': {}})
  fake = types.ModuleType('IPython')
  fake.get_ipython = lambda: shell
  monkeypatch.setitem(sys.modules, 'IPython', fake)
  assert metrics.in_notebook()
  bar = metrics.progress_bar(10, 3)
  assert isinstance(bar, tqdm.auto.tqdm) and not bar.disable and bar.n == 3
  bar.close()
  # A plain IPython terminal shell is not a notebook kernel.
  shell.config = {}
  assert not metrics.in_notebook()
  assert metrics.progress_bar(10, 0, enabled=False).disable
