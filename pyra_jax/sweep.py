"""One resumable sweep runner: a plan of runs -> each made once -> a summary.

`pyra_jax.vtab` (the VTAB-1k protocol) and `pyra_jax.experiments.study` (a
grid of methods x schedules x tasks x seeds) are both a plan of training runs,
each in its own workdir, made one after another by a command that may be
killed and run again. `Sweep.run` is what they share for each run:

  * finished (its record, e.g. results.json, exists): read, not redone; the
    caller's `check` may refuse a record written with another config, so that
    results of another recipe are never reported as this command's;
  * failed before (its failure file exists, e.g. a loss that diverged): not
    retried, since it would fail the same way from its last checkpoint;
  * held by another live process (its workdir lock): left to that process;
  * out of budget (a deadline passed, a maximum of launches reached): not
    started, for a later call;
  * else made: a killed run resumes from its last checkpoint (the training
    loop does that by itself), and a run that ends in one of `failure_errors`
    is recorded in its failure file and the sweep goes on.

The outcome of every run is an `Outcome` (its status and record); the summary
is a function of the workdirs alone and written with `write_summary` (each
file atomically, JSON by `training.records.write_json`), so the last call of
any worker writes the complete one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Callable, Generic, Mapping, Optional, Protocol, Sequence, TypeVar

from pyra_jax import errors

# The statuses of `Outcome`.
DONE = 'done'                # made now
SKIPPED = 'skipped'          # finished or failed before: read, not redone
FAILED = 'failed'            # made now, ended in a failure error: recorded
BUSY = 'busy'                # another live process holds its workdir
NOT_STARTED = 'not_started'  # the budget (deadline, max_runs) is spent


class Item(Protocol):
  """A run of a plan: a name for the log (and a workdir, for its records)."""

  @property
  def name(self) -> str: ...


ItemT = TypeVar('ItemT', bound=Item)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What became of one run."""
  name: str
  status: str
  record: Optional[dict] = None  # results, or the failure record
  failed: bool = False           # the record is a failure's (now or before)
  seconds: float = 0.0

  def as_dict(self) -> dict:
    out = {'name': self.name, 'status': self.status}
    if self.status in (DONE, FAILED):
      out['seconds'] = self.seconds
    return out


@dataclasses.dataclass
class Budget:
  """How many more runs may be launched: until `deadline` (aware datetime),
  at most `max_runs` (-1: no limit)."""
  deadline: Optional[datetime.datetime] = None
  max_runs: int = -1
  launched: int = 0

  def spent(self) -> bool:
    now = datetime.datetime.now(datetime.timezone.utc)
    return ((self.deadline is not None and now >= self.deadline)
            or 0 <= self.max_runs <= self.launched)


def write_json(path: str, obj: Any) -> None:
  """A record or summary, written atomically (a kill leaves the old or the new
  file, never half), its folder created."""
  from pyra_jax.training import records  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  records.write_json(path, obj)


def write_text(path: str, text: str) -> None:
  """A text file (a markdown table, a CSV), written atomically as `write_json`."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_summary(folder: str, summary: Mapping[str, Any],
                  texts: Mapping[str, str] = ()) -> None:
  """<folder>/summary.json and the given text files (name -> contents)."""
  write_json(os.path.join(folder, 'summary.json'), dict(summary))
  for name, text in dict(texts).items():
    write_text(os.path.join(folder, name), text)


def read_json(path: str) -> Optional[dict]:
  """A JSON object written by a sweep, or None when the file does not exist."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


class Sweep(Generic[ItemT]):
  """Makes the runs of a plan, each at most once (module doc).

  finished(item): its record if it finished, else None.
  failure_file(item): the path of its failure record (None, or a None path
    for an item: its failures are not recorded, they propagate).
  failure_errors: the exceptions that are a result of the run (recorded,
    the sweep goes on), e.g. a diverged loss; any other error propagates.
  failure_record(item, error): the failure file's contents.
  check(item, record, failed): raises when a finished (or failed) run's
    record was written by another config than the plan's.
  leave_busy: a run whose workdir another live process holds (its lock) is
    left to it (BUSY) instead of stopping the sweep with WorkdirInUseError.
  """

  def __init__(self, *, finished: Callable[[ItemT], Optional[dict]],
               failure_file: Optional[Callable[[ItemT], str]] = None,
               failure_errors: tuple[type[BaseException], ...] = (),
               failure_record: Callable[[ItemT, BaseException], dict] = (
                   lambda item, e: {'error': str(e)}),
               read_failure: Callable[[str], Optional[dict]] = read_json,
               check: Optional[Callable[[ItemT, dict, bool], None]] = None,
               budget: Optional[Budget] = None, leave_busy: bool = False,
               log: Callable[[str], None] = lambda m: print(m, flush=True)):
    self.finished = finished
    self.failure_file = failure_file
    self.failure_errors = failure_errors
    self.failure_record = failure_record
    self.read_failure = read_failure
    self.check = check
    self.budget = budget or Budget()
    self.leave_busy = leave_busy
    self.log = log

  def _failure_path(self, item: ItemT) -> Optional[str]:
    return None if self.failure_file is None else self.failure_file(item)

  def recorded(self, item: ItemT) -> Optional[Outcome]:
    """The outcome of a run made before (finished or failed), else None."""
    record = self.finished(item)
    failed = False
    failure_path = self._failure_path(item)
    if record is None and failure_path is not None:
      record = self.read_failure(failure_path)
      failed = record is not None
    if record is None:
      return None
    if self.check is not None:
      self.check(item, record, failed)
    return Outcome(item.name, SKIPPED, record, failed)

  def run(self, item: ItemT, make: Callable[[ItemT], dict],
          announce: Optional[Callable[[], None]] = None) -> Outcome:
    """The run's outcome: read when made before, else made by `make(item)`
    (`announce()` first)."""
    before = self.recorded(item)
    if before is not None:
      return before
    if self.budget.spent():
      return Outcome(item.name, NOT_STARTED)
    self.budget.launched += 1
    if announce is not None:
      announce()
    t0 = time.time()
    try:
      record = make(item)
    except errors.WorkdirInUseError as e:
      if not self.leave_busy:
        raise
      self.log(f'{item.name}: left to the process that holds it: {e}')
      return Outcome(item.name, BUSY)
    except self.failure_errors as e:  # pylint: disable=catching-non-exception
      failure_path = self._failure_path(item)
      if failure_path is None:
        raise
      record = self.failure_record(item, e)
      write_json(failure_path, record)
      return Outcome(item.name, FAILED, record, True, time.time() - t0)
    return Outcome(item.name, DONE, record, False, time.time() - t0)

  def run_all(self, items: Sequence[ItemT], make: Callable[[ItemT], dict],
              announce: Optional[Callable[[int, ItemT], None]] = None) -> list[Outcome]:
    """`run` for every item, in order; `announce(i, item)` before one is made."""
    return [self.run(item, make, None if announce is None else
                     (lambda i=i, item=item: announce(i, item)))
            for i, item in enumerate(items)]
