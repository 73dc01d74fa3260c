"""A workdir's results.json: read, changed and written under a lock, atomically.

The training run's final write, two-stage evaluations and the sweeps each
change results.json through `update_results` (a read-modify-write under
`checkpointing.ResultsLock`, written by `write_json`), so none loses another's
part. A rerun of a finished run reports what is recorded (`finished_results`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from absl import logging
import jax

from pyra_jax import checkpointing


def write_json(path: str, obj: dict) -> None:
  """Writes JSON atomically: a kill leaves the old file or the new, never half."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_results(workdir: str) -> dict | None:
  """<workdir>/results.json, or None when there is none (or it is not a JSON object)."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:
    return None
  return results if isinstance(results, dict) else None


def update_results(workdir: str, update: Callable[[dict | None], dict]) -> str:
  """Writes `update(current results.json or None)` as results.json; returns its path.

  The read, the change and the write happen under `checkpointing.ResultsLock`,
  so concurrent writers (two-stage evaluations, the training run's final
  write) each see the others' parts and none is lost; the write itself is
  atomic (`write_json`). A results.json that exists but cannot be parsed is
  kept beside the new one as results.json.unreadable, never dropped.
  """
  path = os.path.join(workdir, 'results.json')
  with checkpointing.ResultsLock(workdir):
    current = read_results(workdir)
    if current is None and os.path.exists(path):
      os.replace(path, f'{path}.unreadable')
      logging.warning('%s could not be parsed: kept as %s.unreadable.', path, path)
    write_json(path, update(current))
  return path


def finished_results(workdir: str, progress: Any,  # A loop.Progress: its step is read.
                     total_steps: int) -> dict | None:
  """The recorded results of a run that already finished, else None.

  Rerunning the training command on a finished workdir reports the run, it
  does not redo its end: nothing is trained, evaluated or written
  (results.json keeps its timings and the 'two_stage' entries added since,
  metrics.jsonl gets no second final line). Finished means the restored
  checkpoint is the last step and results.json records that many steps; a
  run killed between its last checkpoint and results.json is finished now,
  as before.
  """
  if progress.step != total_steps:
    return None
  recorded = read_results(workdir)
  if recorded is None or recorded.get('steps') != total_steps:
    return None
  if jax.process_index() == 0:
    print(f'{workdir} holds a finished run ({total_steps} steps): reporting its '
          f'results.json as recorded; nothing was trained or rewritten.', flush=True)
  return recorded


def keep_recorded(old: dict | None, results: dict) -> dict:
  """The new results.json: `results`, plus what earlier commands recorded
  there that the training run does not compute (the 'two_stage' entries of
  `--mode=eval --two_stage`, kept when a run is continued or its end redone)."""
  out = dict(results)
  if old and old.get('two_stage'):
    out['two_stage'] = old['two_stage']
  return out
