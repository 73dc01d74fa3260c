"""The sweep runner (pyra_jax/sweep.py) on its own: skip, resume, fail, budget, summary.

No training: each run is a small function that counts its calls and writes a
results.json into its workdir, as the training loop does, so what the runner
decides (make, read, leave, record) is seen directly.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import pytest

from pyra_jax import errors
from pyra_jax import sweep


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str


def make_plan(root, names):
  return [Run(n, os.path.join(root, n)) for n in names]


def results_of(run):
  path = os.path.join(run.workdir, 'results.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


class Trainer:
  """A stand-in for the training loop: a run takes `steps` calls of `step`;
  progress is kept in its workdir (like checkpoints), so a killed run goes on
  where it stopped; at the end it writes results.json."""

  def __init__(self, steps=3, kill_at=None, diverge=(), busy=()):
    self.steps, self.kill_at = steps, kill_at
    self.diverge, self.busy = set(diverge), set(busy)
    self.calls = []  # (name, first step of this call)

  def __call__(self, run):
    if run.name in self.busy:
      raise errors.WorkdirInUseError(f'{run.workdir} is held by process 123')
    os.makedirs(run.workdir, exist_ok=True)
    progress = os.path.join(run.workdir, 'progress')
    step = int(open(progress).read()) if os.path.exists(progress) else 0
    self.calls.append((run.name, step))
    if run.name in self.diverge:
      raise errors.DivergedError(f'{run.name}: the loss became nan at step {step}')
    while step < self.steps:
      if self.kill_at == (run.name, step):
        self.kill_at = None
        raise KeyboardInterrupt  # Killed: the progress so far is kept.
      step += 1
      with open(progress, 'w') as f:
        f.write(str(step))
    result = {'name': run.name, 'steps': step}
    sweep.write_json(os.path.join(run.workdir, 'results.json'), result)
    return result


def runner(**kw):
  return sweep.Sweep(finished=results_of,
                     failure_file=lambda r: os.path.join(r.workdir, 'failed.json'),
                     failure_errors=(errors.TrainingError,), log=lambda _: None, **kw)


def test_finished_runs_are_read_and_a_killed_run_resumes(tmp_path):
  plan = make_plan(tmp_path, ['a', 'b', 'c'])
  train = Trainer(steps=3, kill_at=('b', 2))
  with pytest.raises(KeyboardInterrupt):
    runner().run_all(plan, train)
  assert train.calls == [('a', 0), ('b', 0)]
  assert not (tmp_path / 'c').exists()
  # The same command again: a is read, b goes on from its step 2, c is made.
  outcomes = runner().run_all(plan, train)
  assert [o.status for o in outcomes] == ['skipped', 'done', 'done']
  assert train.calls == [('a', 0), ('b', 0), ('b', 2), ('c', 0)]
  assert [o.record for o in outcomes] == [{'name': n, 'steps': 3} for n in 'abc']
  # And once more: nothing is made.
  outcomes = runner().run_all(plan, train)
  assert [o.status for o in outcomes] == ['skipped'] * 3 and len(train.calls) == 4


def test_a_failed_run_is_recorded_not_retried_and_the_sweep_goes_on(tmp_path):
  plan = make_plan(tmp_path, ['a', 'b'])
  train = Trainer(diverge={'a'})
  outcomes = runner().run_all(plan, train)
  assert [(o.status, o.failed) for o in outcomes] == [('failed', True), ('done', False)]
  with open(tmp_path / 'a' / 'failed.json') as f:
    assert json.load(f) == {'error': 'a: the loss became nan at step 0'}
  outcomes = runner().run_all(plan, train)
  assert [(o.status, o.failed) for o in outcomes] == [('skipped', True), ('skipped', False)]
  assert train.calls == [('a', 0), ('b', 0)]
  # An error that is no failure of the run (a bug, a bad setting) stops the sweep.
  with pytest.raises(errors.ConfigError):
    runner().run_all(make_plan(tmp_path, ['z']),
                     lambda r: (_ for _ in ()).throw(errors.ConfigError('bad')))
  assert not (tmp_path / 'z' / 'failed.json').exists()


def test_a_record_of_another_config_is_refused(tmp_path):
  plan = make_plan(tmp_path, ['a'])
  Trainer()(plan[0])

  def check(run, record, failed):
    if record['steps'] != 5:
      raise errors.CheckpointMismatchError(f'{run.workdir}: steps {record["steps"]} != 5')

  with pytest.raises(errors.CheckpointMismatchError, match='steps 3 != 5'):
    runner(check=check).run_all(plan, Trainer())


def test_budget_and_busy_runs(tmp_path):
  plan = make_plan(tmp_path, ['a', 'b', 'c'])
  train = Trainer(busy={'a'})
  # Another process holds a: left to it with leave_busy, else the sweep stops.
  with pytest.raises(errors.WorkdirInUseError):
    runner().run_all(plan, train)
  outcomes = runner(leave_busy=True, budget=sweep.Budget(max_runs=2)).run_all(plan, train)
  # The busy run counts as launched: the budget of two makes a and b only.
  assert [o.status for o in outcomes] == ['busy', 'done', 'not_started']
  past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
  announced = []
  outcomes = runner(budget=sweep.Budget(deadline=past)).run_all(
      plan[1:], train, announce=lambda i, r: announced.append(r.name))
  assert [o.status for o in outcomes] == ['skipped', 'not_started'] and not announced
  assert [c[0] for c in train.calls] == ['b']


def test_summary_files_are_written_whole(tmp_path):
  folder = tmp_path / 'new' / 'summary'
  sweep.write_summary(str(folder), {'runs': 2, 'mean': 0.5},
                      {'summary.md': '| a |\n', 'summary.csv': 'a,b\n1,2\n'})
  assert sorted(os.listdir(folder)) == ['summary.csv', 'summary.json', 'summary.md']
  assert json.loads((folder / 'summary.json').read_text()) == {'runs': 2, 'mean': 0.5}
  assert (folder / 'summary.csv').read_text() == 'a,b\n1,2\n'
  sweep.write_summary(str(folder), {'runs': 3})  # Rewritten in place, no leftovers.
  assert json.loads((folder / 'summary.json').read_text()) == {'runs': 3}
  assert sorted(os.listdir(folder)) == ['summary.csv', 'summary.json', 'summary.md']
