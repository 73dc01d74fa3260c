"""`model.schedule = 'speedup:<x>[@<batch>]'`: the schedule chosen by measured speed-up.

A FLOPs ratio (`flops:<ratio>`) is not what a user gets: on a CPU at batch 8
the merged ViT-B/16 runs its last blocks on a few dozen rows, where a matmul
is far below its large-matrix rate, so the measured speed-up falls short of
the FLOPs ratio, by an amount that depends on the device, the backbone, the
image size and the batch. `speedup:` asks for the speed-up itself: on the
device the run is on, the deployed model (LoRA folded, eval mode) is timed for
schedules of one family against the uncompressed model in the same rounds,
and the schedule whose measured speed-up is closest to x from above is taken.

Families (`family`): PYRA (and ToFu, ATS, which take their counts from the
schedule) use the Eq. 8 family, one schedule per F/f, capped per layer as
`flops:` does; ToMe uses its own constant-r family (r = 1, 2, ..., capped at
run time as ToMe caps it).

The search (`choose`): a first pass times `config.speedup.candidates`
schedules spread evenly over the family's FLOPs ratios. The speed-up of a
candidate is paired: the median over rounds of (uncompressed time / candidate
time) within a round. If the pick (the smallest measured speed-up >= x) is
more than `config.speedup.tolerance` * x above x and the family has schedules
between it and the best candidate below x (by FLOPs ratio), those are timed in
a further pass, up to MAX_PASSES passes. So the pick's measured speed-up s
satisfies x <= s <= x * (1 + tolerance), unless the family has no schedule in
between (then the gap is printed). A target above every measured speed-up is
refused, naming the best reachable one.

Caches (`Cache`): every measured candidate is stored per (platform, device
kind, backbone, image size, batch, method, dtype), in <workdir>/speedup_cache.json
and in the user cache (`config.speedup.cache_dir`; '' means
$XDG_CACHE_HOME/pyra_jax, else ~/.cache/pyra_jax), so a second run on the same
device, or a run asking for another x, times only what is not measured yet.
The choice itself is recorded in <workdir>/speedup_schedule.json and then in
results.json ('speedup_schedule'); a resumed run (and eval/export of the
workdir) reads it back and times nothing.

The timing is injected (`Timer`) so the choice can be tested with a
deterministic fake; the real one is `speedup_timer.make_timer`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence

import ml_collections

from pyra_jax import field_ranges
from pyra_jax import schedules
from pyra_jax.errors import ScheduleError

PREFIX = 'speedup:'
# Passes of the search (the first spread over the family, then refinements).
MAX_PASSES = 4
RECORD_FILE = 'speedup_schedule.json'
CACHE_FILE = 'speedup_cache.json'
# Methods whose schedule is the Eq. 8 family's; ToMe has its own family.
EQ8_METHODS = ('pyra', 'tofu', 'ats')
METHODS = ('tome',) + EQ8_METHODS


@dataclasses.dataclass(frozen=True)
class Request:
  """A parsed 'speedup:<x>[@<batch>]': the target and the batch (None: default)."""
  spec: str
  target: float
  batch: Optional[int]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One schedule of a family: `param` is F/f (Eq. 8) or r (ToMe constant)."""
  schedule: tuple[int, ...]
  param: float
  flops_ratio: float

  @property
  def key(self) -> str:
    return ','.join(str(r) for r in self.schedule)


# What a timer returns per candidate key: {'speedup': paired speed-up over the
# uncompressed model, 'images_per_sec': ..., 'uncompressed_images_per_sec': ...}.
Measurement = dict[str, float]
Timer = Callable[[Sequence[Candidate]], Mapping[str, Measurement]]


def is_speedup(spec: Any) -> bool:
  return isinstance(spec, str) and spec.strip().startswith(PREFIX)


def parse(spec: Any) -> Optional[Request]:
  """The request in `spec`, None when it is another schedule form."""
  if not is_speedup(spec):
    return None
  body = spec.strip()[len(PREFIX):]
  target_text, _, batch_text = body.partition('@')
  how = ("config.model.schedule = {!r}: write 'speedup:<x>' or 'speedup:<x>@<batch>' "
         "with x the speed-up over the uncompressed model, e.g. 'speedup:2.5@8'.")
  try:
    target = float(target_text)
    batch = int(batch_text) if batch_text.strip() else None
  except ValueError:
    raise ScheduleError(how.format(spec)) from None
  if not field_ranges.SPEEDUP_TARGET.admits(target):
    raise ScheduleError(field_ranges.message(f'the x of config.model.schedule = {spec!r}',
                                             target, field_ranges.SPEEDUP_TARGET))
  if batch is not None and not field_ranges.SPEEDUP_BATCH.admits(batch):
    raise ScheduleError(field_ranges.message(f'the batch of config.model.schedule = {spec!r}',
                                             batch, field_ranges.SPEEDUP_BATCH))
  return Request(spec=spec.strip(), target=target, batch=batch)


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #

def family(method: str, geo: Any) -> list[Candidate]:
  """The schedules `speedup:` chooses from, by rising FLOPs ratio, deduplicated.

  geo: a `methods.base.Geometry` (depth, num_patches, num_protected, width,
  mlp_dim). Eq. 8 (PYRA, ToFu, ATS): F/f on the grid `flops:` scans (1 to 21 in
  steps of 0.005), each schedule capped per layer; ToMe: constant r from 1 up
  to the r that removes every token it can, capped as ToMe caps it.
  The all-zero schedule (the uncompressed model itself) is left out.
  """
  if method not in METHODS:
    raise ScheduleError(
        f"config.model.schedule = 'speedup:...' chooses among the schedules of "
        f"model.method in {METHODS} (Eq. 8, or ToMe's constant r), not "
        f'{method!r}: give its schedule another way.')
  n0 = geo.num_patches + geo.num_protected
  mlp_ratio = geo.mlp_dim / geo.width
  flops = lambda s: schedules.vit_flops(s, num_tokens=n0, width=geo.width,
                                        mlp_ratio=mlp_ratio)
  full = flops([0] * geo.depth)
  out: dict[tuple[int, ...], Candidate] = {}
  if method == 'tome':
    params = range(1, n0 + 1)
    make = lambda r: schedules.cap_schedule(schedules.tome_constant(r, geo.depth), n0,
                                            geo.num_protected)
  else:
    params = [1.0 + 0.005 * i for i in range(4000)]
    make = lambda e: schedules.cap_schedule(
        schedules.eq8_schedule(geo.depth, geo.num_patches, e), n0, geo.num_protected)
  for p in params:
    s = tuple(make(p))
    if any(s) and s not in out:
      out[s] = Candidate(schedule=s, param=float(p), flops_ratio=full / flops(s))
  return sorted(out.values(), key=lambda c: (c.flops_ratio, c.param))


def spread(cands: Sequence[Candidate], k: int) -> list[Candidate]:
  """k of `cands` (sorted by FLOPs ratio) spread evenly over their FLOPs ratios,
  always the first and the last; all of them when there are at most k."""
  if len(cands) <= k:
    return list(cands)
  lo, hi = cands[0].flops_ratio, cands[-1].flops_ratio
  picked: list[Candidate] = []
  for i in range(k):
    goal = lo + (hi - lo) * i / (k - 1)
    best = min((c for c in cands if c not in picked),
               key=lambda c: abs(c.flops_ratio - goal))
    picked.append(best)
  return sorted(picked, key=lambda c: c.flops_ratio)


# --------------------------------------------------------------------------- #
# The choice
# --------------------------------------------------------------------------- #

@dataclasses.dataclass
class Choice:
  """The pick, everything measured for it, and the passes that timed anything."""
  chosen: Candidate
  measurement: Measurement
  measured: dict[str, Measurement]
  passes_timed: int
  gap: bool  # the pick is above tolerance and the family has nothing in between
  exhausted: bool = False  # above tolerance after MAX_PASSES refinements


def choose(request: Request, cands: Sequence[Candidate], timer: Timer, *,
           per_pass: int, tolerance: float,
           measured: Optional[dict[str, Measurement]] = None,
           describe: str = '') -> Choice:
  """Picks the candidate whose measured speed-up is closest to the target from above.

  `measured`: what earlier runs measured (the caches), reused as it is; the
  timer runs only for candidates not in it, and only when they can improve the
  pick. `describe` names the device and batch in the refusal.
  """
  x = request.target
  measured = dict(measured or {})
  by_key = {c.key: c for c in cands}
  measured = {k: v for k, v in measured.items() if k in by_key}
  passes = 0

  def run(batch: Sequence[Candidate]) -> None:
    nonlocal passes
    todo = [c for c in batch if c.key not in measured]
    if todo:
      passes += 1
      got = timer(todo)
      for c in todo:
        measured[c.key] = dict(got[c.key])

  def refuse() -> ScheduleError:
    done = [by_key[k] for k in measured]
    best = max(done, key=lambda c: measured[c.key]['speedup'])
    s = measured[best.key]['speedup']
    if math.floor(s * 100) / 100 <= 1:
      return ScheduleError(
          f'config.model.schedule = {request.spec!r} is out of reach: no schedule of '
          f'the family is faster than the uncompressed model{describe} (the best '
          f'measures {s:.2f}x), so merging does not pay here: time a larger batch '
          "('speedup:<x>@<batch>') or keep model.schedule='none'.")
    return ScheduleError(
        f'config.model.schedule = {request.spec!r} is out of reach: the fastest '
        f'schedule of the family measures {s:.2f}x{describe} (FLOPs ratio '
        f'{best.flops_ratio:.2f}x), so ask for at most speedup:{math.floor(s * 100) / 100:g}.')

  def pick_above() -> Optional[Candidate]:
    above = [by_key[k] for k, m in measured.items() if m['speedup'] >= x]
    return min(above, key=lambda c: (measured[c.key]['speedup'], c.flops_ratio),
               default=None)

  if not measured:
    run(spread(cands, per_pass))
  for _ in range(MAX_PASSES):
    pick = pick_above()
    if pick is None:
      # The family's fastest end (largest FLOPs ratio) must have been timed
      # before a target is declared out of reach.
      if cands[-1].key in measured:
        raise refuse()
      run([cands[-1]])
      continue
    s = measured[pick.key]['speedup']
    if s - x <= tolerance * x:
      return Choice(pick, measured[pick.key], measured, passes, gap=False)
    floor = max((by_key[k].flops_ratio for k, m in measured.items() if m['speedup'] < x),
                default=1.0)
    between = [c for c in cands if floor < c.flops_ratio < pick.flops_ratio
               and c.key not in measured]
    if not between:
      return Choice(pick, measured[pick.key], measured, passes, gap=True)
    run(spread(between, per_pass))
  pick = pick_above()
  if pick is None:
    raise refuse()
  return Choice(pick, measured[pick.key], measured, passes, gap=False,
                exhausted=measured[pick.key]['speedup'] - x > tolerance * x)


# --------------------------------------------------------------------------- #
# Caches and the workdir record
# --------------------------------------------------------------------------- #

def user_cache_dir(configured: str = '') -> str:
  """`config.speedup.cache_dir`, or $XDG_CACHE_HOME/pyra_jax, or ~/.cache/pyra_jax."""
  if configured:
    return os.path.expanduser(configured)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'pyra_jax')


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError):
    return {}
  return out if isinstance(out, dict) else {}


def _write_json(path: str, obj: dict) -> None:
  """Atomic (a kill leaves the old file or the new one)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=os.path.basename(path) + '.')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class Cache:
  """Measured candidates per key, in one JSON file: {key: {schedule: measurement}}."""

  def __init__(self, path: str):
    self.path = path

  def get(self, key: str) -> dict[str, Measurement]:
    entry = _read_json(self.path).get(key, {})
    return dict(entry.get('measured', {})) if isinstance(entry, dict) else {}

  def put(self, key: str, measured: Mapping[str, Measurement], about: Mapping[str, Any]) -> None:
    """Adds `measured` under `key`; what the file held for other keys stays."""
    data = _read_json(self.path)
    entry = data.get(key) if isinstance(data.get(key), dict) else {}
    entry = {**entry, **about, 'measured': {**entry.get('measured', {}), **measured}}
    data[key] = entry
    try:
      _write_json(self.path, data)
    except OSError:
      pass  # A read-only cache costs a re-measurement later, not this run.


def cache_key(about: Mapping[str, Any]) -> str:
  """The cache key: the fields that decide the speeds, as sorted JSON."""
  return json.dumps(dict(about), sort_keys=True)


def read_record(workdir: Optional[str]) -> Optional[dict]:
  """<workdir>/speedup_schedule.json, or None."""
  if not workdir:
    return None
  rec = _read_json(os.path.join(workdir, RECORD_FILE))
  return rec or None


def schedule_text(method: str, cand: Candidate) -> str:
  """What model.schedule becomes: ToMe's constant r as its int form (capped at
  run time exactly as the candidate is), Eq. 8 schedules as one int per layer."""
  if method == 'tome':
    return str(int(cand.param))
  return cand.key


# --------------------------------------------------------------------------- #
# The whole resolution
# --------------------------------------------------------------------------- #

def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.speedup with its defaults (an older config may lack the section)."""
  s = config.get('speedup') or {}
  out = {'rounds': 10, 'candidates': 6, 'tolerance': 0.05, 'cache_dir': ''}
  out.update({k: s[k] for k in out if k in s})
  field_ranges.check_fields(out, field_ranges.SPEEDUP_FIELDS, 'config.speedup.')
  return out


def resolve_config(config: ml_collections.ConfigDict, workdir: Optional[str], *,
                   geometry: Any, about: Mapping[str, Any], default_batch: int,
                   make_timer: Callable[[int, int], Timer],
                   log: Callable[[str], None] = print) -> Optional[dict]:
  """Replaces a 'speedup:' model.schedule by the schedule it chooses; returns the record.

  Returns None (and changes nothing) for any other schedule. `about`: what,
  besides the batch, decides the speeds (device, backbone, image size,
  method, dtype): the cache key. `make_timer(batch, rounds)` builds the timer,
  only if something must be timed. The workdir's record wins when it answers
  the same request on the same key: a resumed run times nothing.
  """
  req = parse(config.model.schedule)
  if req is None:
    return None
  opts = settings(config)
  batch = req.batch or default_batch
  key_fields = {**about, 'batch': batch}
  key = cache_key(key_fields)
  method = config.model.method
  cands = family(method, geometry)
  rec = read_record(workdir)
  if rec and rec.get('request') == req.spec and rec.get('key') == key:
    config.model.schedule = rec['schedule']
    log(f"{req.spec}: the schedule chosen earlier in this workdir, measured "
        f"{rec['chosen']['speedup']:.2f}x (FLOPs ratio {rec['chosen']['flops_ratio']:.2f}x): "
        f"{rec['schedule']}")
    return {**rec, 'source': 'workdir record'}
  caches = [Cache(os.path.join(user_cache_dir(opts['cache_dir']), CACHE_FILE))]
  if workdir:
    caches.insert(0, Cache(os.path.join(workdir, CACHE_FILE)))
  known: dict[str, Measurement] = {}
  for c in reversed(caches):  # the workdir's own measurements win
    known.update(c.get(key))
  timer_box: list[Timer] = []

  def timer(todo: Sequence[Candidate]) -> Mapping[str, Measurement]:
    if not timer_box:
      timer_box.append(make_timer(batch, opts['rounds']))
    log(f'{req.spec}: timing {len(todo)} schedules against the uncompressed model '
        f'(batch {batch}, {opts["rounds"]} rounds) ...')
    return timer_box[0](todo)

  where = f" on {about.get('device_kind', 'this device')} at batch {batch}"
  choice = choose(req, cands, timer, per_pass=opts['candidates'],
                  tolerance=opts['tolerance'], measured=known, describe=where)
  new = {k: v for k, v in choice.measured.items() if k not in known}
  if new:
    for c in caches:
      c.put(key, new, {'about': key_fields})
  chosen = choice.chosen
  text = schedule_text(method, chosen)
  rec = {
      'request': req.spec, 'target': req.target, 'batch': batch, 'key': key,
      'about': key_fields, 'method': method,
      'family': 'tome_constant_r' if method == 'tome' else 'eq8',
      'schedule': text,
      'chosen': {'schedule': list(chosen.schedule), 'param': chosen.param,
                 'flops_ratio': chosen.flops_ratio, **choice.measurement},
      'tolerance': opts['tolerance'], 'gap': choice.gap, 'exhausted': choice.exhausted,
      'source': 'measured' if choice.passes_timed else 'cache',
      'passes_timed': choice.passes_timed,
      'measured': sorted(({'schedule': k, **v, 'flops_ratio': next(
          c.flops_ratio for c in cands if c.key == k)} for k, v in choice.measured.items()),
                         key=lambda m: m['flops_ratio']),
  }
  if workdir:
    try:
      _write_json(os.path.join(workdir, RECORD_FILE), rec)
    except OSError:
      pass
  config.model.schedule = text
  note = (f' (nothing in the family lies between it and the next one below {req.target:g}x)'
          if choice.gap else f' (more than {opts["tolerance"]:.0%} above the target after '
          f'{MAX_PASSES} refinements)' if choice.exhausted else '')
  log(f"{req.spec}: measured {choice.measurement['speedup']:.2f}x{where} "
      f"(FLOPs ratio {chosen.flops_ratio:.2f}x, from {rec['source']}){note}: "
      f'schedule {text}')
  return rec
