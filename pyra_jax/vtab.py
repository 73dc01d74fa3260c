r"""The VTAB-1k protocol end to end: `python -m pyra_jax.vtab` (docs/algorithm.md §11).

  python -m pyra_jax.vtab --config=configs/vitb_high.py:init=W --workdir=runs/vitb_high
  python -m pyra_jax.vtab ... --tasks=dtd,oxford_iiit_pet --select=none
  python -m pyra_jax.vtab ... --worker=2/4          # a quarter of the runs
  python -m pyra_jax.vtab ... --summary_only        # the table, from the workdirs

For each task (default the 19 VTAB-1k tasks): with `model.method='pyra'` and
`--select=grid`, one run per value of `config.vtab.pyra_lr_grid` trains on
train800 and is tested on val200 (`<workdir>/<task>/select/pyra_lr=<v>`); the
value with the best val200 accuracy (at the end of training, or the best
periodic evaluation with `config.headline='max'`; a tie goes to the smallest value) is recorded in `<workdir>/<task>/selection.json` and trained
on train800val200, tested on test (`<workdir>/<task>/final`). With
`--select=none`, or a method without PYRA generators, only the final run is
made, with the config's `pyra_lr`.

Every run is an ordinary training workdir of `pyra_jax.training.loop`, run in this
process: a killed command resumes each run from its last checkpoint when it is
run again, and a run that finished (it has results.json) is read, not redone,
if the config it stored is the command's (a rerun with another lr, seed or
method on the same --workdir is refused, naming the fields, before anything
trains). A selection run whose loss diverges is recorded as failed
(`diverged.json` in its folder), left out of the choice and not retrained; the
summary lists it.

Workers (`--worker=i/n`, i = 1..n): the selection runs, in task then grid
order, go round-robin to the workers; the final run of the k-th task to worker
k mod n. A worker first makes its selection runs, then each of its final runs
whose task's selection is complete; a final run whose selection still lacks
another worker's runs is left waiting, listed at the end, and the command
exits with status 3. Running the same worker again (once the others are done)
makes it; with `--wait` the worker waits for them instead. A run whose
workdir another live process holds (its lock) is left to that process. The summary is written by every invocation, from whatever the
workdirs hold, so the last worker to finish writes the complete one.

The summary (`summary.md`, `summary.json`, `summary.csv` in --workdir, and
printed) is a function of the workdirs only.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from pyra_jax import cli
from pyra_jax import errors
from pyra_jax import recipe as recipe_lib
from pyra_jax import registry
from pyra_jax import sweep
from pyra_jax.errors import ConfigError, UsageError

# Exit status of a worker that left final runs waiting on other workers.
EXIT_WAITING = 3

# The task groups of VTAB-1k (docs/algorithm.md §5), in the paper's column order.
GROUPS = registry.VTAB_GROUPS
VTAB_TASKS = registry.VTAB_TASKS
# Folder tasks beyond VTAB-1k (pyra_jax/data/tasks.py: EXTRA_TASKS but mnist,
# which is its own source), and a dataset of one's own, 'folder:NAME'.
FOLDER_EXTRA_TASKS = tuple(t for t in registry.EXTRA_TASKS if t != 'mnist')
CUSTOM_PREFIX = 'folder:'
_PLAIN_NAME = re.compile(r'[\w-][\w.-]*')  # As pyra_jax/data/tasks.py.

# The paper's VTAB-1k means over the 19 tasks (docs/algorithm.md §7), by
# (config.vtab.backbone, method, merging level); level None for PEFT.
PAPER_MEANS = {
    ('vitb', 'peft', None): 74.76, ('vitb', 'tome', 'low'): 74.10,
    ('vitb', 'pyra', 'low'): 74.69, ('vitb', 'tome', 'high'): 70.43,
    ('vitb', 'pyra', 'high'): 72.06,
    ('vitl', 'peft', None): 76.52, ('vitl', 'pyra', 'low'): 76.84,
    ('vitl', 'pyra', 'high'): 75.66,
    ('vitl_mae', 'peft', None): 75.96, ('vitl_mae', 'tome', 'low'): 74.97,
    ('vitl_mae', 'pyra', 'low'): 76.13, ('vitl_mae', 'tome', 'high'): 68.20,
    ('vitl_mae', 'pyra', 'high'): 70.33,
    ('deitb', 'peft', None): 73.76, ('deitb', 'tome', 'low'): 72.83,
    ('deitb', 'pyra', 'low'): 73.55,
    ('vits', 'peft', None): 71.85, ('deits', 'peft', None): 70.01,
}

SELECT_TIE_RULE = ('highest val200 headline accuracy (at the end of training, or '
                   'the best evaluation with headline max); a tie goes to the '
                   'smallest pyra_lr')


# ----------------------------------------------------------------------------
# The plan: which runs, where, with which config.
# ----------------------------------------------------------------------------

def format_lr(value: float) -> str:
  """A learning rate as a short, exact folder name: 3e-4, 1e-5, 2.5e-3."""
  return np.format_float_scientific(float(value), trim='-', exp_digits=1)


def task_dir_name(task: str) -> str:
  """The folder of a task in the workdir ('folder:pets' -> 'folder_pets')."""
  return task.replace(':', '_')


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the protocol."""
  task: str
  stage: str                 # 'select' | 'final'
  pyra_lr: float | None      # select: the grid value; final: set when chosen
  workdir: str

  @property
  def name(self) -> str:
    if self.stage == 'select':
      return f'{self.task} select pyra_lr={format_lr(self.pyra_lr)}'
    return f'{self.task} final'


def default_tasks(config: ml_collections.ConfigDict) -> list[str]:
  return ['mnist'] if config.data.source == 'mnist' else list(VTAB_TASKS)


def check_tasks(tasks: Sequence[str], source: str) -> None:
  """Refuses a task the source cannot provide, in one sentence.

  By name only (no TensorFlow import), so a typo fails in a second.
  """
  if not tasks:
    raise UsageError('--tasks is empty: give task names separated by commas, '
                     'or leave it out for all 19 VTAB-1k tasks.')
  dupes = sorted({t for t in tasks if list(tasks).count(t) > 1})
  if dupes:
    raise UsageError(f'--tasks names {", ".join(dupes)} more than once: give each task once.')
  for t in tasks:
    if source == 'mnist':
      if t != 'mnist':
        raise UsageError(f'--tasks={t}: data.source=mnist has the one task mnist; '
                         'for VTAB-1k tasks set source=tfds or source=folder.')
      continue
    if t.startswith(CUSTOM_PREFIX):
      if source != 'folder':
        raise UsageError(f'--tasks={t}: a dataset of your own needs data.source=folder.')
      if not _PLAIN_NAME.fullmatch(t[len(CUSTOM_PREFIX):]):
        raise UsageError(f'--tasks={t}: after {CUSTOM_PREFIX!r} give the name of '
                         "your dataset's folder inside data.data_dir (letters, "
                         'digits, _ . -), e.g. folder:pets.')
      continue
    if t not in VTAB_TASKS and not (source == 'folder' and t in FOLDER_EXTRA_TASKS):
      extra = f', {", ".join(FOLDER_EXTRA_TASKS)} or folder:NAME' if source == 'folder' else ''
      raise UsageError(
          f'Unknown task {t!r} in --tasks for data.source={source}: use VTAB-1k '
          f'names ({", ".join(VTAB_TASKS)}){extra}.')


def check_grid(grid: Sequence[float]) -> list[float]:
  """The grid as floats; refuses an empty grid, non-positive or repeated values."""
  try:
    values = [float(v) for v in grid]
  except (TypeError, ValueError):
    raise ConfigError(f'config.vtab.pyra_lr_grid = {grid!r}: give numbers, e.g. '
                      '--config.vtab.pyra_lr_grid="(1e-4,1e-3)".') from None
  if not values:
    raise ConfigError('config.vtab.pyra_lr_grid is empty: give at least one '
                      'learning rate, or use --select=none to train the config\'s pyra_lr.')
  bad = [v for v in values if not (math.isfinite(v) and v > 0)]
  if bad:
    raise ConfigError(f'config.vtab.pyra_lr_grid holds {bad[0]!r}: every value '
                      'must be a positive learning rate.')
  names = [format_lr(v) for v in values]
  if len(set(names)) != len(names):
    raise ConfigError(f'config.vtab.pyra_lr_grid = {tuple(values)} repeats a value: '
                      'give each learning rate once.')
  return values


def parse_worker(spec: str) -> tuple[int, int]:
  """'i/n' -> (i, n) with 1 <= i <= n."""
  try:
    i, n = (int(x) for x in spec.split('/'))
  except ValueError:
    raise UsageError(f'--worker={spec!r}: use i/n, e.g. --worker=2/4 for the '
                     'second of four workers.') from None
  if n < 1 or not 1 <= i <= n:
    raise UsageError(f'--worker={spec}: i/n needs n >= 1 and 1 <= i <= n.')
  return i, n


def selects(config: ml_collections.ConfigDict, select: str) -> bool:
  """Whether the lr-selection stage runs: only PYRA has generators to tune."""
  return select == 'grid' and config.model.method == 'pyra'


def plan(config: ml_collections.ConfigDict, workdir: str, tasks: Sequence[str],
         select: str) -> tuple[list[RunSpec], list[RunSpec]]:
  """(selection runs in task then grid order, final runs in task order)."""
  grid = check_grid(config.vtab.pyra_lr_grid) if selects(config, select) else []
  sel, fin = [], []
  for t in tasks:
    root = os.path.join(workdir, task_dir_name(t))
    for v in grid:
      sel.append(RunSpec(t, 'select', v, os.path.join(root, 'select',
                                                       f'pyra_lr={format_lr(v)}')))
    fin.append(RunSpec(t, 'final', None, os.path.join(root, 'final')))
  return sel, fin


def share(runs: Sequence[RunSpec], worker: tuple[int, int]) -> list[RunSpec]:
  """The runs of worker i of n: every n-th, starting at the (i-1)-th."""
  i, n = worker
  return [r for k, r in enumerate(runs) if k % n == i - 1]


def run_config(config: ml_collections.ConfigDict, task: str, stage: str,
               pyra_lr: float | None) -> ml_collections.ConfigDict:
  """The base config for one run: its task, splits and (when set) pyra_lr."""
  cfg = copy.deepcopy(config)
  cfg.data.task = task
  if stage == 'select':
    cfg.data.train_split, cfg.data.eval_split = 'train800', 'val200'
  else:
    cfg.data.train_split, cfg.data.eval_split = 'train800val200', 'test'
  if pyra_lr is not None:
    cfg.pyra_lr = float(pyra_lr)
  return cfg


# ----------------------------------------------------------------------------
# Reading the workdirs.
# ----------------------------------------------------------------------------

def _read_json(path: str, what: str, needs: Sequence[str] = ()) -> dict | None:
  """A JSON record the protocol wrote, None if absent; a damaged one is one
  sentence naming the file (a traceback would say nothing about what to do)."""
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict) or any(k not in data for k in needs):
      raise ValueError(f'not {what}')
  except (OSError, UnicodeDecodeError, ValueError) as e:
    reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    raise errors.PyraError(
        f'{path} cannot be read ({reason}): delete it and rerun the same command; the '
        'run is then resumed from its checkpoints, which write it again.') from None
  return data


def read_results(workdir: str) -> dict | None:
  """results.json of a finished run, or None."""
  return _read_json(os.path.join(workdir, 'results.json'), 'the results of a run',
                    ('final_accuracy', 'config'))


# A selection run whose loss diverged (a pyra_lr too large for the task) is
# recorded as failed in this file of its workdir, left out of the choice, and
# not retrained by a rerun.
DIVERGED_FILE = 'diverged.json'


def read_diverged(workdir: str) -> dict | None:
  """The record of a selection run that diverged, or None."""
  return _read_json(os.path.join(workdir, DIVERGED_FILE), 'a divergence record',
                    ('config', 'error'))


# A training workdir may resume with another model_init path because the
# frozen weights' fingerprint is checked on restore; a finished run is read
# without loading them, so here the path itself must match.
_WEIGHTS = frozenset({'model_init'})


def check_same_config(spec: RunSpec, cfg: ml_collections.ConfigDict, record: dict,
                      *, ignore: Sequence[str] = ()) -> None:
  """Refuses a finished (or diverged) run whose stored config differs from `cfg`.

  Its results would otherwise be read and reported as this command's, e.g.
  after a rerun with another lr, seed or method on the same --workdir. The
  fields a training workdir may change on resume (`RESUMABLE_FIELDS`: eval
  batch size, logging, the data folder, ...) but model_init, and `ignore`,
  may differ.
  """
  from pyra_jax import checkpointing  # pylint: disable=g-import-not-at-top
  changed = checkpointing.changed_fields(
      checkpointing.stored_config(record['config']), checkpointing.config_to_dict(cfg),
      ignore=(checkpointing.RESUMABLE_FIELDS - _WEIGHTS) | set(ignore))
  if changed:
    shown = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in list(changed.items())[:8])
    more = '; ...' if len(changed) > 8 else ''
    raise errors.CheckpointMismatchError(
        f'{spec.workdir} holds a finished run ({spec.name}) of a different config '
        f'({shown}{more}), whose results would be reported as this command\'s: use a '
        'new --workdir for these settings, or rerun with the config of that run.')


def check_finished_runs(config: ml_collections.ConfigDict, sel: Sequence[RunSpec],
                        fin: Sequence[RunSpec], select: str) -> None:
  """`check_same_config` for every finished run of the plan, every worker's,
  before anything trains. A final run's pyra_lr comes from the selection, so it
  is compared when the choice is made (`train_one`)."""
  chosen = ['pyra_lr'] if selects(config, select) else []
  for spec in list(sel) + list(fin):
    record = read_results(spec.workdir) or read_diverged(spec.workdir)
    if record is not None:
      cfg = run_config(config, spec.task, spec.stage, spec.pyra_lr)
      check_same_config(spec, cfg, record, ignore=chosen if spec.stage == 'final' else ())


def headline_of(res: dict) -> str:
  """Which accuracy a run reports first: 'final' or 'max' (its config's
  `headline`; results written before the field existed: 'final')."""
  return res.get('headline') or (res.get('config') or {}).get('headline', 'final')


def headline_accuracy(res: dict) -> float:
  """The accuracy a run reports first: the final evaluation's, or with
  headline 'max' (recipe=authors_code) the best periodic one."""
  key = 'max_accuracy_paper_protocol' if headline_of(res) == 'max' else 'final_accuracy'
  return float(res[key])


def choose(accuracies: dict[float, float]) -> float:
  """The selected pyra_lr: best accuracy, a tie to the smallest value."""
  return min(accuracies, key=lambda v: (-accuracies[v], v))


def selection(task_runs: Sequence[RunSpec]) -> dict | None:
  """The choice from a task's finished selection runs, or None if any is missing.

  A run that diverged counts as finished and failed: it is listed under
  'diverged' and left out of the choice. When every run diverged there is
  nothing to choose: 'chosen_pyra_lr' is None.
  """
  acc, diverged = {}, []
  for r in task_runs:
    res = read_results(r.workdir)
    if res is None:
      if read_diverged(r.workdir) is None:
        return None
      diverged.append(r.pyra_lr)
      continue
    acc[r.pyra_lr] = headline_accuracy(res)
  chosen = choose(acc) if acc else None
  return {'grid': [{'pyra_lr': v, 'val200_accuracy': a} for v, a in acc.items()],
          'diverged': diverged,
          'chosen_pyra_lr': chosen,
          'chosen_val200_accuracy': acc[chosen] if acc else None,
          'rule': SELECT_TIE_RULE}


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------

_write_json = sweep.write_json


def _benchmark(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """speedup.json of a final run: the deployed method vs uncompressed.

  Only when the config asks for it (`benchmark_after_training`) and the
  method merges; random weights of the run's shapes (speed does not depend
  on their values).
  """
  path = os.path.join(workdir, 'speedup.json')
  if (not cfg.get('benchmark_after_training', False) or cfg.model.method == 'peft'
      or os.path.isfile(path)):
    return
  from pyra_jax import throughput  # pylint: disable=g-import-not-at-top
  method = cfg.model.method
  print(f'  measuring inference throughput: uncompressed vs {method} '
        f'(batch {throughput.after_training_batch(cfg)}, deployed models) ...', flush=True)
  res = throughput.speedup_after_training(cfg)
  _write_json(path, res)


def train_one(spec: RunSpec, cfg: ml_collections.ConfigDict) -> dict | None:
  """Trains (or resumes, or reads) one run; returns its results.json.

  None when another live process trains in that workdir (its lock, e.g. a
  worker started twice): the run is being made elsewhere. A finished run is
  read only if its stored config is `cfg` (`check_same_config`). A selection
  run that diverges is recorded in its DIVERGED_FILE and returns that record
  (with 'diverged': True), so the choice goes to the other grid values.
  The rules are the sweep runner's (`pyra_jax.sweep`).
  """

  def make(s: RunSpec) -> dict:
    from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
    print(f'[vtab] {s.name}: training in {s.workdir} '
          f'({cfg.data.train_split} -> {cfg.data.eval_split}, '
          f'pyra_lr {cfg.pyra_lr:g})', flush=True)
    os.makedirs(s.workdir, exist_ok=True)
    return loop.train_and_evaluate(cfg, s.workdir)

  runner = sweep.Sweep(
      finished=lambda s: read_results(s.workdir),
      # Only a selection run's divergence is a result (a failed candidate);
      # a final run that diverges stops the protocol.
      failure_file=lambda s: (os.path.join(s.workdir, DIVERGED_FILE)
                              if s.stage == 'select' else None),
      read_failure=lambda path: read_diverged(os.path.dirname(path)),
      failure_errors=(errors.DivergedError,),
      failure_record=lambda s, e: divergence_record(s, cfg, e),
      check=lambda s, record, failed: check_same_config(s, cfg, record),
      leave_busy=True, log=lambda m: print(f'[vtab] {m}', flush=True))
  out = runner.run(spec, make)
  if out.status == sweep.BUSY:
    return None
  if out.failed:
    if out.status == sweep.SKIPPED:
      print(f'[vtab] {spec.name}: diverged earlier ({spec.workdir}/{DIVERGED_FILE}), '
            'left out of the choice', flush=True)
    else:
      first = out.record['error'].split(': training stopped')[0]
      print(f'[vtab] {spec.name}: diverged ({first}); recorded in '
            f'{spec.workdir}/{DIVERGED_FILE} and left out of the choice (delete that '
            'folder to try this value again)', flush=True)
    return out.record
  done = out.record
  if out.status == sweep.SKIPPED:
    print(f'[vtab] {spec.name}: finished earlier, read {spec.workdir}/results.json',
          flush=True)
  what = 'max accuracy' if headline_of(done) == 'max' else 'accuracy'
  print(f'[vtab] {spec.name}: {done["eval_split"]} {what} '
        f'{100 * headline_accuracy(done):.2f}%', flush=True)
  if spec.stage == 'final':
    _benchmark(cfg, spec.workdir)
  return done


def divergence_record(spec: RunSpec, cfg: ml_collections.ConfigDict,
                      error: BaseException) -> dict:
  """The DIVERGED_FILE of a selection run whose loss became non-finite.

  The grid value is then a failed candidate, like one with a poor val200
  accuracy: the protocol goes on with the others, and a rerun does not train
  it again (which would diverge again from its last checkpoint).
  """
  from pyra_jax import checkpointing  # pylint: disable=g-import-not-at-top
  return {'diverged': True, 'pyra_lr': spec.pyra_lr, 'error': str(error),
          'config': checkpointing.config_to_dict(cfg)}


def _sleep(seconds: float) -> None:
  """time.sleep, by a name tests can replace."""
  time.sleep(seconds)


def run_protocol(config: ml_collections.ConfigDict, workdir: str,
                 tasks: Sequence[str] | None = None, select: str = 'grid',
                 worker: tuple[int, int] = (1, 1), wait: bool = False,
                 poll_seconds: float = 60.0) -> dict:
  """Makes this worker's runs of the protocol; returns what it did.

  With `wait`, a final run whose selection lacks other processes' runs is
  waited for (checked every `poll_seconds`) instead of left waiting.

  A selection run that diverges is recorded as failed and left out of its
  task's choice (`train_one`); a task whose every grid value diverged gets
  no final run and is listed under 'failed'.

  Returns {'waiting': [tasks whose final run waits on other workers'
  selection runs], 'failed': [tasks whose every selection run diverged],
  'summary': the summary dict}.
  """
  check_workdir(workdir, must_exist=False)
  recipe_lib.apply(config)  # Before the per-run copies; idempotent.
  tasks = list(tasks) if tasks else default_tasks(config)
  check_tasks(tasks, config.data.source)
  if selects(config, select):
    check_grid(config.vtab.pyra_lr_grid)
  from pyra_jax.training import checks, setup  # pylint: disable=g-import-not-at-top
  checks.check_config(config)
  setup.check_model_init(config)
  sel, fin = plan(config, workdir, tasks, select)
  check_finished_runs(config, sel, fin, select)
  if select == 'grid' and not selects(config, select):
    print(f'[vtab] method={config.model.method} has no PYRA generators: the '
          'pyra_lr selection stage is skipped (final runs only).', flush=True)
  by_task = {t: [r for r in sel if r.task == t] for t in tasks}
  mine_sel, mine_fin = share(sel, worker), share(fin, worker)
  t0 = time.time()
  for spec in mine_sel:
    train_one(spec, run_config(config, spec.task, 'select', spec.pyra_lr))
  pending = list(mine_fin)
  failed: list[str] = []  # Tasks whose every selection run diverged.
  while True:
    ready = []
    for spec in pending:
      if not by_task[spec.task]:
        ready.append((spec, None))
        continue
      choice = selection(by_task[spec.task])
      if choice is not None:
        ready.append((spec, choice))
    if not ready:
      if not pending or not wait:
        break
      print(f'[vtab] waiting for other workers\' selection runs of '
            f'{", ".join(s.task for s in pending)} (checking every {poll_seconds:g} s)',
            flush=True)
      _sleep(poll_seconds)
      continue
    for spec, choice in ready:
      pending.remove(spec)
      lr = None
      if choice is not None:
        lr = choice['chosen_pyra_lr']
        _write_json(os.path.join(os.path.dirname(spec.workdir), 'selection.json'),
                    choice)
        left_out = (f'; left out, diverged: '
                    f'{", ".join(format_lr(v) for v in choice["diverged"])}'
                    if choice['diverged'] else '')
        if lr is None:
          print(f'[vtab] {spec.task}: every pyra_lr of the grid diverged in its '
                'selection run: no final run for this task (use a grid of smaller '
                'values in a new --workdir)', flush=True)
          failed.append(spec.task)
          continue
        print(f'[vtab] {spec.task}: chose pyra_lr={format_lr(lr)} (val200 '
              f'{100 * choice["chosen_val200_accuracy"]:.2f}%; {SELECT_TIE_RULE}'
              f'{left_out})', flush=True)
      # A final run that finished with another pyra_lr (a grid changed since) is
      # refused by train_one, naming the field, rather than reported as chosen.
      train_one(spec, run_config(config, spec.task, 'final', lr))
  elapsed = time.time() - t0
  summ = write_summary(workdir, tasks, command_wall_time_s=elapsed)
  if pending:
    print(f'[vtab] worker {worker[0]}/{worker[1]}: {len(pending)} final run(s) wait '
          'on other workers\' selection runs: '
          f'{", ".join(s.task for s in pending)}. Run this worker again once '
          'they are done.', flush=True)
  return {'waiting': [s.task for s in pending], 'failed': failed, 'summary': summ}


# ----------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------

def _found_tasks(workdir: str) -> list[str]:
  """Task folders in the workdir that hold a run (for --summary_only)."""
  if not os.path.isdir(workdir):
    return []
  out = []
  for name in sorted(os.listdir(workdir)):
    d = os.path.join(workdir, name)
    if os.path.isdir(os.path.join(d, 'final')) or os.path.isdir(os.path.join(d, 'select')):
      out.append(name)
  order = {t: i for i, t in enumerate(VTAB_TASKS)}  # The paper's order, then the rest.
  return sorted(out, key=lambda t: (order.get(t, len(order)), t))


def _task_row(workdir: str, task: str) -> dict:
  root = os.path.join(workdir, task_dir_name(task))
  row: dict[str, Any] = {'task': task, 'group': next(
      (g for g, ts in GROUPS.items() if task in ts), 'other')}
  sel_root = os.path.join(root, 'select')
  grid, diverged = {}, []
  wall = 0.0
  if os.path.isdir(sel_root):
    for name in sorted(os.listdir(sel_root)):
      res = read_results(os.path.join(sel_root, name))
      if res is not None:
        grid[float(res['config']['pyra_lr'])] = headline_accuracy(res)
        wall += float(res.get('wall_time_s') or 0.0)
      elif (bad := read_diverged(os.path.join(sel_root, name))) is not None:
        diverged.append(float(bad['config']['pyra_lr']))
  row['select_val200'] = {format_lr(v): a for v, a in sorted(grid.items())}
  row['select_diverged'] = [format_lr(v) for v in sorted(diverged)]
  fin = read_results(os.path.join(root, 'final'))
  row['done'] = fin is not None
  if fin is None:
    row['status'] = ('selection diverged' if diverged and not grid else
                     'selecting' if grid or diverged else 'not started')
    row['select_wall_time_s'] = wall
    return row
  cfg = fin['config']
  tp = fin.get('trainable_params') or {}
  has_gen = cfg['model']['method'] == 'pyra'
  pyra_lr = float(cfg['pyra_lr'])
  row.update({
      'status': 'done',
      'test_accuracy': float(fin['final_accuracy']),
      'max_accuracy_paper_protocol': float(fin['max_accuracy_paper_protocol']),
      'headline': headline_of(fin),
      'headline_accuracy': headline_accuracy(fin),
      'num_test_images': fin['num_test_images'],
      'method': cfg['model']['method'],
      'pyra_lr': (pyra_lr if pyra_lr >= 0 else float(cfg['lr'])) if has_gen else None,
      'pyra_lr_source': ('selected' if grid and has_gen else
                         'config' if has_gen else None),
      'trainable_percent': tp.get('trainable_percent_of_backbone'),
      'lora_generators_percent': tp.get('lora_generators_percent_of_backbone'),
      'train_images_per_sec': fin.get('train_images_per_sec'),
      'final_wall_time_s': float(fin['wall_time_s']),
      'select_wall_time_s': wall,
  })
  sp = _read_json(os.path.join(root, 'final', 'speedup.json'),
                  'a throughput measurement', ('models',))
  if sp is not None:
    m = sp['models'].get(row['method'], {})
    row['inference_images_per_sec'] = m.get('images_per_sec')
    row['inference_speedup'] = m.get('speedup')
  return row


def _mean(rows: Sequence[dict]) -> float:
  """The mean of the rows' headline accuracies (`headline_accuracy`)."""
  return float(np.mean([r['headline_accuracy'] for r in rows]))


def _paper_key(config_dict: dict) -> tuple | None:
  vtab = config_dict.get('vtab') or {}
  backbone = vtab.get('backbone') or ''
  method = config_dict['model']['method']
  schedule = str(config_dict['model']['schedule'])
  level = None
  for lv in ('low', 'high'):
    if schedule.endswith('_' + lv):
      level = lv
  if method == 'peft':
    level = None
  return (backbone, method, level) if backbone else None


def summarize(workdir: str, tasks: Sequence[str] | None = None) -> dict:
  """The summary dict, from the workdirs alone."""
  names = list(tasks or [])
  for t in _found_tasks(workdir):
    if t not in [task_dir_name(n) for n in names]:
      names.append(t)
  rows = [_task_row(workdir, t) for t in names]
  done = {r['task']: r for r in rows if r['done']}
  groups = {}
  for g, ts in GROUPS.items():
    have = [done[t] for t in ts if t in done]
    groups[g] = {'tasks_done': len(have), 'tasks': len(ts),
                 'mean': _mean(have) if len(have) == len(ts) else None}
  vtab_done = [done[t] for t in VTAB_TASKS if t in done]
  methods = sorted({r['method'] for r in done.values()})
  paper = None
  keys = set()
  for t in done:
    keys.add(_paper_key(read_results(os.path.join(workdir, task_dir_name(t), 'final'))
                        ['config']))
  if len(keys) == 1 and None not in keys:
    paper = PAPER_MEANS.get(keys.pop())
  return {
      'workdir': os.path.abspath(workdir),
      'tasks': rows,
      'groups': groups,
      'vtab_mean': {'tasks_done': len(vtab_done), 'tasks': len(VTAB_TASKS),
                    'mean': _mean(vtab_done) if len(vtab_done) == len(VTAB_TASKS) else None,
                    'paper': paper},
      'mean_of_tasks_done': _mean(list(done.values())) if done else None,
      'tasks_done': len(done),
      'methods': methods,
      'total_run_wall_time_s': sum(r.get('final_wall_time_s', 0.0)
                                   + r.get('select_wall_time_s', 0.0) for r in rows),
      'selection_rule': SELECT_TIE_RULE,
      # What the means average: 'final' | 'max' | 'mixed' (runs of both kinds).
      'headline': (lambda h: h.pop() if len(h) == 1 else 'mixed' if h else 'final')(
          {r['headline'] for r in done.values()}),
  }


def _pct(x: float | None) -> str:
  return '–' if x is None else f'{100 * x:.2f}'


def _num(x: float | None, fmt: str) -> str:
  return '–' if x is None else format(x, fmt)


CSV_FIELDS = ('group', 'task', 'status', 'method', 'test_accuracy',
              'max_accuracy_paper_protocol', 'headline', 'num_test_images', 'pyra_lr',
              'pyra_lr_source', 'trainable_percent', 'lora_generators_percent',
              'train_images_per_sec', 'inference_images_per_sec',
              'inference_speedup', 'select_wall_time_s', 'final_wall_time_s')


HEADLINE_WORDS = {
    'final': 'the test accuracy after the last epoch (config.headline=\'final\')',
    'max': 'the best of the periodic test evaluations, as the authors\' code reports '
           '(config.headline=\'max\', recipe=authors_code)',
    'mixed': 'each run\'s own headline, final for some tasks and max for others '
             '(config.headline differs between the runs)'}


def to_markdown(s: dict) -> str:
  out = ['| group | task | test acc. % | max acc. % (paper protocol) | pyra_lr | '
         'trainable % (LoRA+gen.) | train img/s | inference img/s (speed-up) | '
         'wall time (select + final) |',
         '|---|---|---|---|---|---|---|---|---|']
  for r in s['tasks']:
    if not r['done']:
      out.append(f'| {r["group"]} | {r["task"]} | {r["status"]} | – | – | – | – | – | – |')
      continue
    lr = '–' if r['pyra_lr'] is None else (
        format_lr(r['pyra_lr']) + (' (config)' if r['pyra_lr_source'] == 'config' else ''))
    inf = ('–' if r.get('inference_images_per_sec') is None else
           f'{r["inference_images_per_sec"]:.1f} ({r["inference_speedup"]:.2f}x)')
    wall = f'{r["select_wall_time_s"]:.0f} s + {r["final_wall_time_s"]:.0f} s'
    out.append(
        f'| {r["group"]} | {r["task"]} | {_pct(r["test_accuracy"])} | '
        f'{_pct(r["max_accuracy_paper_protocol"])} | {lr} | '
        f'{_num(r["trainable_percent"], ".3f")} ({_num(r["lora_generators_percent"], ".3f")}) | '
        f'{_num(r["train_images_per_sec"], ".1f")} | {inf} | {wall} |')
  out.append('')
  out.append('| mean | ours % | paper % |')
  out.append('|---|---|---|')
  for g, v in s['groups'].items():
    ours = (_pct(v['mean']) if v['mean'] is not None
            else f'partial ({v["tasks_done"]}/{v["tasks"]} tasks)')
    out.append(f'| {g} ({v["tasks"]}) | {ours} | – |')
  v = s['vtab_mean']
  ours = (_pct(v['mean']) if v['mean'] is not None
          else f'partial ({v["tasks_done"]}/{v["tasks"]} tasks)')
  paper = '–' if v['paper'] is None else f'{v["paper"]:.2f}'
  out.append(f'| VTAB-1k, 19 tasks | {ours} | {paper} |')
  if s['mean_of_tasks_done'] is not None:
    out.append(f'| all {s["tasks_done"]} finished task(s) listed | '
               f'{_pct(s["mean_of_tasks_done"])} | – |')
  out.append('')
  out.append(f'Means of: {HEADLINE_WORDS.get(s.get("headline", "final"))}.')
  out.append(f'pyra_lr selection: {s["selection_rule"]}. Total wall time of the '
             f'runs: {s["total_run_wall_time_s"]:.0f} s.')
  diverged = [f'{r["task"]} pyra_lr={", ".join(r["select_diverged"])}'
              for r in s['tasks'] if r.get('select_diverged')]
  if diverged:
    out.append('')
    out.append('Selection runs that diverged (recorded as failed, left out of the '
               f'choice): {"; ".join(diverged)}.')
  return '\n'.join(out) + '\n'


def to_csv(s: dict) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction='ignore',
                     lineterminator='\n')
  w.writeheader()
  for r in s['tasks']:
    w.writerow({k: r.get(k, '') for k in CSV_FIELDS})
  for g, v in s['groups'].items():
    w.writerow({'group': g, 'task': 'mean', 'status': 'done' if v['mean'] is not None
                else f'partial {v["tasks_done"]}/{v["tasks"]}',
                'test_accuracy': '' if v['mean'] is None else v['mean'],
                'headline': s.get('headline', 'final')})
  v = s['vtab_mean']
  w.writerow({'group': 'VTAB-1k', 'task': 'mean', 'status': 'done' if v['mean'] is not None
              else f'partial {v["tasks_done"]}/{v["tasks"]}',
              'test_accuracy': '' if v['mean'] is None else v['mean'],
              'headline': s.get('headline', 'final')})
  return buf.getvalue()


def write_summary(workdir: str, tasks: Sequence[str] | None = None, *,
                  command_wall_time_s: float | None = None) -> dict:
  """Writes summary.{md,json,csv} in `workdir`, prints the table, returns it."""
  s = summarize(workdir, tasks)
  if command_wall_time_s is not None:
    s['last_command_wall_time_s'] = command_wall_time_s
  os.makedirs(workdir, exist_ok=True)
  md = to_markdown(s)
  sweep.write_summary(workdir, s, {'summary.md': md, 'summary.csv': to_csv(s)})
  print(md, flush=True)
  return s


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

def check_workdir(workdir: str, *, must_exist: bool) -> None:
  """Refuses a --workdir that is a file, or (must_exist, for --summary_only,
  which reads and creates nothing) one that does not exist, e.g. mistyped."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f'--workdir={workdir} is a file, not a folder: give the '
                     "protocol's folder (new, or the --workdir of an earlier run).")
  if must_exist and not os.path.isdir(workdir):
    raise UsageError(f'--workdir={workdir} does not exist: --summary_only reads the '
                     'runs of an earlier protocol there; check the path.')


_fail = cli.fail


class _QuietOrbax:
  """Drops Orbax's INFO chatter (a dozen lines per save); keeps its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def define_flags() -> dict[str, Any]:
  """The command's flags, defined when the command runs (not on import, so that
  importing this module beside `pyra_jax.main`, which has its own --config, works)."""
  fl: dict[str, Any] = {}
  fl['config'] = config_flags.DEFINE_config_file(
      'config', None,
      'A setting file, e.g. configs/vitb_high.py:init=W (the task in it is '
      'replaced by each task of --tasks). Override fields with '
      '--config.<field>=<value>, e.g. --config.vtab.pyra_lr_grid="(1e-4,1e-3)".',
      lock_config=True)
  fl['workdir'] = flags.DEFINE_string(
      'workdir', None, 'Root of the protocol: <workdir>/<task>/select/pyra_lr=<v>, '
      '<workdir>/<task>/final, and the summary files.')
  fl['tasks'] = flags.DEFINE_list(
      'tasks', None, 'Comma-separated tasks (default: the 19 VTAB-1k tasks; with '
      'data.source=mnist, mnist).')
  fl['select'] = flags.DEFINE_enum(
      'select', 'grid', ['grid', 'none'],
      "grid: choose pyra_lr per task on val200 from config.vtab.pyra_lr_grid "
      "(method=pyra only); none: train the config's pyra_lr directly.")
  fl['worker'] = flags.DEFINE_string(
      'worker', '1/1', 'i/n: this process makes the i-th of n deterministic '
      'shares of the runs (module doc).')
  fl['wait'] = flags.DEFINE_bool(
      'wait', False, 'A final run whose selection runs belong to other workers '
      '(or are being trained by another process) is waited for, checking every '
      'minute, instead of left for a later call (exit status 3).')
  fl['summary_only'] = flags.DEFINE_bool(
      'summary_only', False, 'Write and print the summary from the workdirs; '
      'train nothing.')
  return fl


def main(argv: Sequence[str], fl: dict[str, Any]) -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    _fail(f'Unexpected arguments: {" ".join(argv[1:])}', 2)
  if fl['workdir'].value is None:
    _fail('Give --workdir=DIR: the root of the protocol\'s runs and summary.', 2)
  workdir = fl['workdir'].value
  try:
    worker = parse_worker(fl['worker'].value)
    check_workdir(workdir, must_exist=fl['summary_only'].value)
    if fl['summary_only'].value:
      if fl['tasks'].value is not None:
        config = fl['config'].value
        check_tasks(fl['tasks'].value, config.data.source if config else 'folder')
      write_summary(fl['workdir'].value, fl['tasks'].value)
      return
    config = fl['config'].value
    if config is None:
      _fail('Give a setting with --config=configs/<setting>.py (see configs/).', 2)
    try:
      recipe_lib.check_overrides(config, sys.argv)
    except errors.PyraError as e:  # Also an unknown config.recipe.
      _fail(str(e), 2)
    out = run_protocol(config, fl['workdir'].value, fl['tasks'].value, fl['select'].value, worker,
                       wait=fl['wait'].value)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, (errors.PyraError, FileNotFoundError)):
      raise
    logging.debug('%s', traceback.format_exc())
    _fail(str(e), 1)
  if out['failed']:
    _fail(f'Every pyra_lr of config.vtab.pyra_lr_grid diverged in the selection runs '
          f'of {", ".join(out["failed"])}, so they have no final run: use a grid of '
          'smaller values in a new --workdir.', 1)
  if out['waiting']:
    sys.exit(EXIT_WAITING)


def run() -> None:
  fl = define_flags()
  app.run(lambda argv: main(argv, fl), flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
