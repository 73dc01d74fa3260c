"""Metrics: JSON lines + TensorBoard in the workdir, a tqdm bar on the console.

`metrics.jsonl` holds one JSON object per logged step ({'step': ..., name:
value}); it is the file to plot from. TensorBoard event files go to
`<workdir>/tensorboard`. Only process 0 writes, so multi-host runs produce one
copy.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from typing import Any

from absl import logging
import tqdm
import tqdm.auto


# OSErrors (a full disk) raised in tensorboardX's writer thread, which would
# otherwise print a traceback from that thread and leave the run going with
# its TensorBoard log silently cut; `MetricWriter` raises them in the main
# thread at its next call instead. One writer logs at a time in a process,
# so a new writer starts with an empty list.
_THREAD_ERRORS: list[OSError] = []
_previous_excepthook = threading.excepthook


def _thread_hook(args) -> None:
  if (isinstance(args.exc_value, OSError)
      and type(args.thread).__module__.startswith('tensorboardX')):
    _THREAD_ERRORS.append(args.exc_value)
    return
  _previous_excepthook(args)


def _install_thread_hook() -> None:
  """Puts `_thread_hook` in front of whatever hook is current (a test runner
  may have replaced ours since the last writer)."""
  global _previous_excepthook
  if threading.excepthook is not _thread_hook:
    _previous_excepthook = threading.excepthook
    threading.excepthook = _thread_hook


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard.

  A write that fails (a full disk) raises in the caller's thread, also when
  it failed in TensorBoard's background writer: the run stops at its next
  logged step with the OSError, its last checkpoint intact.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if tensorboard:
      import tensorboardX  # Heavy import: only when a run really logs.
      _install_thread_hook()
      _THREAD_ERRORS.clear()
      # A queue that cannot fill: if the writer thread died, a bounded one
      # would block the training loop forever on the next scalar.
      self._tb = tensorboardX.SummaryWriter(self._tb_dir, max_queue=1 << 20)

  def _raise_thread_error(self) -> None:
    if _THREAD_ERRORS:
      e = _THREAD_ERRORS[0]
      raise OSError(e.errno, e.strerror, e.filename or self._tb_dir) from e

  def truncate_after(self, step: int) -> None:
    """Drops records logged after `step`: a resumed run recomputes them.

    Also drops lines that are not JSON: a run killed in the middle of a write
    leaves a torn last line, which must not stop the resume (the record it
    held is recomputed, since it came after the checkpoint).
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    records = _parse_lines(lines, self.path)
    kept = [json.dumps(r) + '\n' for r in records if r.get('step', 0) <= step]
    if kept != lines:
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, **scalars: Any) -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    for k, v in scalars.items():
      v = float(v) if not isinstance(v, (int, str)) else v
      record[k] = v if not (isinstance(v, float) and not math.isfinite(v)) else str(v)
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      self._raise_thread_error()
      for k, v in scalars.items():
        if not isinstance(v, str):
          self._tb.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._raise_thread_error()
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      tb, self._tb = self._tb, None
      tb.close()
      if _THREAD_ERRORS:
        e = _THREAD_ERRORS[0]
        raise OSError(e.errno, e.strerror, e.filename or self._tb_dir) from e


def read_metrics(workdir: str) -> list[dict]:
  """Reads back `metrics.jsonl` (for tests and notebooks)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return _parse_lines(f.readlines(), path)


def _parse_lines(lines: list[str], path: str) -> list[dict]:
  """The JSON records of `lines`; a line that is not one is skipped, with a warning."""
  out = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict):
      logging.warning('%s:%d is not a JSON record (a run killed while writing '
                      'it?); skipped.', path, number)
      continue
    out.append(record)
  return out


def in_notebook() -> bool:
  """Whether this runs inside a Jupyter/Colab kernel (stderr is no tty there)."""
  ipython = sys.modules.get('IPython')
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and 'IPKernelApp' in getattr(shell, 'config', {})


def progress_bar(total: int, initial: int, *, enabled: bool = True,
                 desc: str = 'train') -> tqdm.tqdm:
  """A step progress bar with ETA.

  On a terminal: tqdm on stderr. In a notebook: tqdm.auto's widget (Colab
  shows it; stderr there is not a tty). Otherwise (logs, CI) silent, so log
  files do not fill with carriage returns.
  """
  if enabled and in_notebook():
    return tqdm.auto.tqdm(total=total, initial=initial, desc=desc, unit='step',
                          leave=True)
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit='step',
                   dynamic_ncols=True, leave=True,
                   disable=not (enabled and sys.stderr.isatty()))
