r"""Runs a grid of training runs (methods x schedules x tasks x seeds) and summarises it.

  python -m pyra_jax.experiments.study \
      --config=pyra_jax/experiments/study_small.py --outdir=/work/study_runs
  python -m pyra_jax.experiments.study \
      --config=pyra_jax/experiments/study_small.py --outdir=/work/study_runs \
      --only=stage:main_mnist --deadline=04:30 --publish=docs/study
  python -m pyra_jax.experiments.study ... --summarize_only --publish=docs/study

The grid is the `study` section of the config (study_small.py beside this file
documents it): a list of stages, each tasks x variants x schedules x seeds, run in order,
seeds outermost inside a stage, one run at a time, each in its own workdir
`<outdir>/runs/<task>-<variant>-<schedule>-s<seed>` (pyra_jax.training). Runs are
in-process, so runs that differ only in seed or data reuse the compiled step.

Resumable: a run whose workdir holds results.json is skipped; an interrupted
run resumes from its last checkpoint (pyra_jax.training). With --deadline=HH:MM
(UTC) no run is launched after that time; rerun the same command to continue.

Throughput for the accuracy-throughput plot: for every schedule of a stage with
`bench=True`, the deployed (LoRA folded, eval-mode) peft/tome/pyra models are
timed forward once (pyra_jax.throughput.run_forward, round-robin, median
images/s at the study's resolution and `study.bench_batch_size`), written to
`<outdir>/bench/<schedule>.json`. Ablation variants take the throughput of
their method (the generator's cost is negligible, Table 5); cells without a
benchmark fall back to GFLOPs (our counter) in the plot.

Outputs (`<outdir>/summary/`, and copied to --publish if given):
  summary.json / summary.md   per cell (task, variant, schedule): n seeds,
                              final test accuracy mean +- std (ddof 1), the
                              paper-protocol max, GFLOPs, images/s, and paired
                              per-seed differences for the paper's claims
  runs/<name>.json            each run's results.json
  acc_vs_throughput_<task>.png, curves_<task>.png (training loss of one setting)
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import ml_collections
from pyra_jax import recipe as recipe_lib
from pyra_jax import sweep
from pyra_jax.errors import StudyError  # pylint: disable=unused-import

MERGE_METHODS = ('tome', 'pyra')
# Paired comparisons reported for the claims: (name, a, b, schedule of a,
# schedule of b); the difference is a - b per seed.
CLAIMS = (
    ('pyra_low - peft', 'pyra', 'peft', 'low', 'none'),
    ('tome_low - peft', 'tome', 'peft', 'low', 'none'),
    ('pyra_low - tome_low', 'pyra', 'tome', 'low', 'low'),
    ('pyra_high - tome_high', 'pyra', 'tome', 'high', 'high'),
    ('pyra_high - peft', 'pyra', 'peft', 'high', 'none'),
    ('tome_high - peft', 'tome', 'peft', 'high', 'none'),
    ('pyra_wd_only_high - tome_high', 'pyra_wd_only', 'tome', 'high', 'high'),
    ('pyra_wr_only_high - tome_high', 'pyra_wr_only', 'tome', 'high', 'high'),
    ('pyra_no_sigmoid_high - tome_high', 'pyra_no_sigmoid', 'tome', 'high', 'high'),
    ('pyra_high - pyra_no_sigmoid_high', 'pyra', 'pyra_no_sigmoid', 'high', 'high'),
    ('tome_rank16_high - tome_high', 'tome_rank16', 'tome', 'high', 'high'),
    ('pyra_high - tome_rank16_high', 'pyra', 'tome_rank16', 'high', 'high'),
    # "Closes the gap to a smaller model": the merged model against a shallower
    # model of the same pretraining (first blocks, no merging) at similar FLOPs.
    ('pyra_low - peft_d6', 'pyra', 'peft_d6', 'low', 'none'),
    ('tome_low - peft_d6', 'tome', 'peft_d6', 'low', 'none'),
    ('pyra_high - peft_d4', 'pyra', 'peft_d4', 'high', 'none'),
    ('tome_high - peft_d4', 'tome', 'peft_d4', 'high', 'none'),
    # Twice the epochs at high compression (the 10-epoch models are not converged).
    ('pyra_e20_high - tome_e20_high', 'pyra_e20', 'tome_e20', 'high', 'high'),
    ('tome_e20_high - tome_high', 'tome_e20', 'tome', 'high', 'high'),
    ('pyra_e20_high - pyra_high', 'pyra_e20', 'pyra', 'high', 'high'),
    # The accuracy-throughput sweep, schedule by schedule (study_small.py).
    *((f'pyra_{s} - tome_{s}', 'pyra', 'tome', s, s)
      for s in ('f15', 'f25', 'f30', 'f40')),
)



@dataclasses.dataclass(frozen=True)
class Cell:
  """One training run of the grid."""
  stage: str
  task: str
  variant: str
  schedule: str  # a key of study.schedules
  seed: int

  @property
  def name(self) -> str:
    return f'{self.task}-{self.variant}-{self.schedule}-s{self.seed}'

  @property
  def group(self) -> tuple[str, str, str]:
    return (self.task, self.variant, self.schedule)


@dataclasses.dataclass(frozen=True)
class Bench:
  """One forward timing: peft/tome/pyra at one merging schedule, or (with
  `variant`) one no-merging variant's own model, e.g. a shallower backbone."""
  stage: str
  schedule: str
  variant: str = ''

  @property
  def name(self) -> str:
    return f'bench-{self.variant or self.schedule}'

  @property
  def key(self) -> str:
    """The benchmark file's name under <outdir>/bench/ (without .json)."""
    return self.variant or self.schedule


# ----------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------

def _merges(study, variant: str) -> bool:
  return bool(study.variants[variant].get('merges', True))


def check_study(config: ml_collections.ConfigDict) -> None:
  """Rejects a study section that names unknown tasks, variants or schedules."""
  if 'study' not in config:
    raise StudyError('The config has no `study` section: use a study config '
                     'such as pyra_jax/experiments/study_small.py.')
  study = config.study
  for stage in study.stages:
    for field, table in (('tasks', study.tasks), ('variants', study.variants),
                         ('schedules', study.schedules)):
      unknown = [k for k in stage.get(field, ()) if k not in table]
      if unknown:
        raise StudyError(
            f'Stage {stage.get("name")!r} lists unknown {field} {unknown}; '
            f'known: {sorted(table)}. Add them to study.{field}.')
    if not stage.get('seeds'):
      raise StudyError(f'Stage {stage.get("name")!r} has no seeds.')
    for variant in stage.get('bench_variants', ()):
      if variant not in study.variants or _merges(study, variant):
        raise StudyError(
            f'Stage {stage.get("name")!r}: bench_variants lists {variant!r}, '
            'which is not a no-merging variant of study.variants.')
      if variant in study.schedules:
        raise StudyError(f'Variant {variant!r} shares its name with a schedule; '
                         'their benchmark files would collide. Rename one.')


def plan(config: ml_collections.ConfigDict) -> list[Cell | Bench]:
  """The grid in run order, without duplicates (a cell runs once)."""
  check_study(config)
  study = config.study
  items: list[Cell | Bench] = []
  seen = set()
  for stage in study.stages:
    name = stage['name']
    for seed in stage['seeds']:
      for task in stage['tasks']:
        for variant in stage['variants']:
          scheds = (stage['schedules'] if _merges(study, variant) else ('none',))
          for sched in scheds:
            cell = Cell(name, task, variant, sched, int(seed))
            if cell.name not in seen:
              seen.add(cell.name)
              items.append(cell)
    benches = []
    if stage.get('bench'):
      benches += [Bench(name, sched) for sched in stage['schedules']
                  if study.schedules[sched] != 'none']
    benches += [Bench(name, 'none', v) for v in stage.get('bench_variants', ())]
    for bench in benches:
      if bench.name not in seen:
        seen.add(bench.name)
        items.append(bench)
  return items


def select(items: Sequence[Cell | Bench], only: str) -> list[Cell | Bench]:
  """Items matching any comma-separated pattern of --only.

  A pattern is `stage:<glob>` (the stage name) or a glob over the run name
  `<task>-<variant>-<schedule>-s<seed>` (e.g. 'mnist-pyra-*', '*-s0',
  'bench-*'); empty: everything.
  """
  patterns = [p.strip() for p in (only or '').split(',') if p.strip()]
  if not patterns:
    return list(items)
  out = []
  for item in items:
    for p in patterns:
      if p.startswith('stage:'):
        hit = fnmatch.fnmatchcase(item.stage, p[len('stage:'):])
      else:
        hit = fnmatch.fnmatchcase(item.name, p)
      if hit:
        out.append(item)
        break
  if not out:
    raise StudyError(f'--only={only!r} matches nothing. Run names look like '
                     f'{items[0].name!r}; stages: '
                     f'{sorted({i.stage for i in items})}.')
  return out


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config without its study section (what pyra_jax.training sees)."""
  d = config.to_dict()
  d.pop('study', None)
  return ml_collections.ConfigDict(d)


def cell_config(config: ml_collections.ConfigDict, cell: Cell
                ) -> ml_collections.ConfigDict:
  """The training config of one cell: base recipe + task + variant + schedule."""
  study = config.study
  c = base_config(config)
  for key, value in study.tasks[cell.task].items():
    c.data[key] = value
  merges = apply_variant(c, study, cell.variant)
  c.model.schedule = study.schedules[cell.schedule] if merges else 'none'
  c.seed = cell.seed
  # Resolved as a run resolves it, so a finished run's stored config compares equal.
  recipe_lib.apply(c)
  return c


def apply_variant(c: ml_collections.ConfigDict, study: ml_collections.ConfigDict,
                  name: str) -> bool:
  """Sets a variant's fields on `c` (model fields, and top-level ones under
  its `config` key, e.g. model_init_first_blocks); returns whether it merges."""
  variant = dict(study.variants[name])
  merges = variant.pop('merges', True)
  for key, value in dict(variant.pop('config', {})).items():
    c[key] = value
  for key, value in variant.items():
    c.model[key] = value
  return merges


def workdir_of(outdir: str, cell: Cell) -> str:
  return os.path.join(outdir, 'runs', cell.name)


def _plain(obj: Any) -> Any:
  """JSON round trip: tuples -> lists, as in a results file."""
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  """Dotted names of the fields where two plain config dicts differ."""
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key, '<missing>'), b.get(key, '<missing>')
    if isinstance(va, dict) and isinstance(vb, dict):
      out += config_diff(va, vb, f'{prefix}{key}.')
    elif va != vb:
      out.append(f'{prefix}{key}: {vb!r} -> {va!r}')
  return out


def is_done(outdir: str, item: Cell | Bench,
            config: Optional[ml_collections.ConfigDict] = None) -> bool:
  """Whether the item finished; with `config`, a finished run must match it.

  A results.json written by another recipe (e.g. the study config was edited
  after some runs) must not be averaged with the new ones: that is an error.
  """
  if isinstance(item, Bench):
    return os.path.isfile(bench_path(outdir, item.key))
  if os.path.isfile(failed_path(outdir, item)):
    return True  # Diverged: deterministic, rerunning would diverge again.
  path = os.path.join(workdir_of(outdir, item), 'results.json')
  if not os.path.isfile(path):
    return False
  if config is not None:
    with open(path) as f:
      stored = json.load(f).get('config', {})
    check_recipe(config, item, stored, path)
  return True


def check_recipe(config: ml_collections.ConfigDict, cell: Cell, stored: dict,
                 path: str) -> None:
  """Refuses a finished run (its results.json at `path`, its stored config)
  trained with another config than the study asks for (`is_done`)."""
  # A field added since the run counts as its default (as when resuming).
  from pyra_jax import checkpointing  # pylint: disable=g-import-not-at-top
  diff = config_diff(_plain(cell_config(config, cell).to_dict()),
                     checkpointing.stored_config(_plain(stored)))
  if diff:
    raise StudyError(
        f'{path} was trained with another config than the study asks for '
        f'({"; ".join(diff[:5])}). Use a fresh --outdir for a changed '
        'recipe, or delete that workdir to rerun it.')


def failed_path(outdir: str, cell: Cell) -> str:
  """Written when a run stops with a TrainingError (e.g. a non-finite loss)."""
  return os.path.join(workdir_of(outdir, cell), 'failed.json')


def bench_path(outdir: str, key: str) -> str:
  """key: a schedule name (peft/tome/pyra at it) or a no-merging variant."""
  return os.path.join(outdir, 'bench', f'{key}.json')


# ----------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------

def parse_deadline(text: str, now: Optional[datetime.datetime] = None
                   ) -> Optional[datetime.datetime]:
  """'HH:MM' (UTC, today; tomorrow if already past by > 12 h) -> datetime."""
  if not text:
    return None
  now = now or datetime.datetime.now(datetime.timezone.utc)
  try:
    hh, mm = (int(v) for v in text.split(':'))
  except ValueError:
    raise StudyError(f'--deadline={text!r}: use HH:MM in UTC, e.g. 04:30.') from None
  when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
  if (now - when).total_seconds() > 12 * 3600:
    when += datetime.timedelta(days=1)
  return when


def run_bench(config: ml_collections.ConfigDict, bench: Bench) -> dict:
  """Forward images/s of the deployed peft/tome/pyra at one schedule, or of
  one no-merging variant's model (as 'peft')."""
  from pyra_jax import throughput  # pylint: disable=g-import-not-at-top
  c = base_config(config)
  reference = None
  if bench.variant:
    # The full model in the same rounds: the variant's speed-up over it is
    # paired, as the merged models' speed-ups over peft are.
    reference = base_config(config).model
    apply_variant(c, config.study, bench.variant)
    c.model.schedule = 'none'
    methods = ('peft',)
  else:
    c.model.schedule = config.study.schedules[bench.schedule]
    c.model.method = 'pyra'
    c.model.modulation = 'pyra'
    methods = ('peft', 'tome', 'pyra')
  return throughput.run_forward(
      c, batch_size=int(config.study.get('bench_batch_size', 8)),
      image_size=int(c.model.image_size),
      num_iters=int(config.study.get('bench_iters', 10)),
      matmul_size=int(config.study.get('bench_matmul_size', 256)),
      methods=methods, num_classes=10, reference_model=reference)


def run_study(config: ml_collections.ConfigDict, outdir: str, *, only: str = '',
              deadline: Optional[datetime.datetime] = None,
              max_runs: int = -1,
              train_fn: Optional[Callable[..., dict]] = None,
              log: Callable[[str], None] = lambda m: print(m, flush=True)
              ) -> list[dict]:
  """Runs the selected, unfinished items in order; returns one status per item.

  Status: 'done' (ran now), 'skipped' (finished or failed before), 'failed'
  (a TrainingError, e.g. a non-finite loss: recorded in failed.json, listed in
  the summary), 'not_started' (deadline or max_runs reached). Any other error
  propagates: a broken setup should stop the study loudly.
  """
  from pyra_jax import errors  # pylint: disable=g-import-not-at-top
  if train_fn is None:
    from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
    train_fn = loop.train_and_evaluate
  items = select(plan(config), only)

  def finished(item: Cell | Bench) -> Optional[dict]:
    if isinstance(item, Bench):
      return sweep.read_json(bench_path(outdir, item.key))
    return sweep.read_json(os.path.join(workdir_of(outdir, item), 'results.json'))

  def check(item: Cell | Bench, record: dict, failed: bool) -> None:
    # Diverged: deterministic, rerunning would diverge again. A finished run
    # must be of this recipe (is_done).
    if isinstance(item, Cell) and not failed:
      check_recipe(config, item, record.get('config', {}),
                   os.path.join(workdir_of(outdir, item), 'results.json'))

  def failed(item: Cell | Bench, error: BaseException) -> dict:
    # A diverged run is a result of the recipe (reported in the summary),
    # not a reason to stop the grid; any other error stops it loudly.
    log(f'    FAILED: {error}')
    return {'error': str(error)}

  def make(item: Cell | Bench) -> dict:
    t0 = time.time()
    if isinstance(item, Bench):
      result = run_bench(config, item)
      sweep.write_json(bench_path(outdir, item.key), result)
      summary = {m: round(v['images_per_sec'], 1)
                 for m, v in result['models'].items()}
      log(f'    images/s {summary}')
      return result
    workdir = workdir_of(outdir, item)
    result = train_fn(cell_config(config, item), workdir)
    if config.study.get('delete_checkpoints', False):
      shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
    log(f'    accuracy {100 * result["final_accuracy"]:.2f}% '
        f'in {time.time() - t0:.0f} s')
    return result

  def announce(i: int, item: Cell | Bench) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    log(f'[{now:%H:%M:%S}] ({i + 1}/{len(items)}) {item.name}')

  runner = sweep.Sweep(
      finished=finished, check=check,
      failure_file=lambda item: failed_path(outdir, item) if isinstance(item, Cell) else None,
      failure_errors=(errors.TrainingError,), failure_record=failed,
      budget=sweep.Budget(deadline, max_runs), log=log)
  outcomes = runner.run_all(items, make, announce)
  return [dict(o.as_dict(), stage=item.stage) for o, item in zip(outcomes, items)]


def enable_compilation_cache(cache_dir: str) -> None:
  """Turns on JAX's on-disk compilation cache for this process.

  Results do not depend on it (the cache holds compiled executables keyed by
  the program and the compiler flags); it only saves the compile time that
  dominates short runs on a CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


# ----------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; nan for a single value)."""
  values = list(values)
  if not values:
    return math.nan, math.nan
  mean = sum(values) / len(values)
  std = statistics.stdev(values) if len(values) > 1 else math.nan
  return mean, std


def _gflops(config: ml_collections.ConfigDict) -> Optional[float]:
  from pyra_jax.experiments import plots  # pylint: disable=g-import-not-at-top
  key = plots.model_key(config.model.to_dict())
  return plots.gflops_of(key) if key else None


def load_results(config: ml_collections.ConfigDict, outdir: str
                 ) -> dict[Cell, dict]:
  """results.json of every finished (not failed) cell of the plan."""
  out = {}
  for item in plan(config):
    if (isinstance(item, Cell) and is_done(outdir, item, config)
        and not os.path.isfile(failed_path(outdir, item))):
      with open(os.path.join(workdir_of(outdir, item), 'results.json')) as f:
        out[item] = json.load(f)
  return out


def load_bench(outdir: str) -> dict[str, dict]:
  """schedule or variant -> benchmark JSON, for every timing done."""
  out = {}
  bdir = os.path.join(outdir, 'bench')
  if os.path.isdir(bdir):
    for name in sorted(os.listdir(bdir)):
      if name.endswith('.json'):
        with open(os.path.join(bdir, name)) as f:
          out[name[:-len('.json')]] = json.load(f)
  return out


def _is_full_model(study, variant: str) -> bool:
  """The uncompressed model of the base recipe (no other field changed)."""
  fields = study.variants[variant]
  return fields['method'] == 'peft' and not set(fields) - {'method', 'merges'}


def timings_of(config, variant: str, schedule: str,
               bench: dict[str, dict]) -> list[dict]:
  """The benchmark entries that time a cell's deployed model (empty: untimed).

  A variant timed on its own (a shallower model): its file's entry. The full
  uncompressed model: its entry in every schedule's file (timed in each round).
  A merging variant: its method's entry in its schedule's file (an ablation runs
  at its method's speed).
  """
  method = config.study.variants[variant]['method']
  if variant in bench:
    return [bench[variant]['models']['peft']]
  if method == 'peft':
    if not _is_full_model(config.study, variant):
      return []  # Another model than the one timed (e.g. another depth).
    return [b['models']['peft'] for s, b in bench.items()
            if s in config.study.schedules and 'peft' in b.get('models', {})]
  models = bench.get(schedule, {}).get('models', {})
  return [models[method]] if method in models else []


def throughput_of(config, variant: str, schedule: str,
                  bench: dict[str, dict]) -> Optional[float]:
  """Forward images/s of a cell's deployed model (the median over its timings)."""
  values = [t['images_per_sec'] for t in timings_of(config, variant, schedule, bench)]
  return statistics.median(values) if values else None


def speedup_of(config, variant: str, schedule: str,
               bench: dict[str, dict]) -> Optional[float]:
  """A cell's forward speed-up over the uncompressed model, paired within the
  benchmark's rounds (steadier than a ratio of images/s timed a minute apart)."""
  if variant in bench:
    if 'reference' not in bench[variant]['models']:
      return None  # Timed alone: nothing to pair it with.
  elif _is_full_model(config.study, variant):
    return 1.0  # The baseline itself, timed or not.
  values = [t['speedup'] for t in timings_of(config, variant, schedule, bench)]
  return statistics.median(values) if values else None


def summarize(config: ml_collections.ConfigDict, outdir: str) -> dict:
  """Per-cell mean +- std over seeds and the paired claim differences."""
  results = load_results(config, outdir)
  bench = load_bench(outdir)
  groups: dict[tuple, list[tuple[Cell, dict]]] = {}
  for cell, res in results.items():
    groups.setdefault(cell.group, []).append((cell, res))
  cells = []
  for (task, variant, sched), runs in groups.items():
    runs.sort(key=lambda cr: cr[0].seed)
    acc = [100 * r['final_accuracy'] for _, r in runs]
    mx = [100 * r['max_accuracy_paper_protocol'] for _, r in runs]
    mean, std = mean_std(acc)
    cfg = cell_config(config, runs[0][0])
    train_ips = [r['train_images_per_sec'] for _, r in runs
                 if r.get('train_images_per_sec')]
    cells.append({
        'task': task, 'variant': variant, 'schedule': sched,
        'schedule_spec': config.study.schedules[sched] if sched != 'none' else 'none',
        'method': cfg.model.method,
        'n': len(acc), 'seeds': [c.seed for c, _ in runs],
        'accuracies': acc, 'mean': mean, 'std': std,
        'max_protocol_mean': mean_std(mx)[0],
        'gflops': _gflops(cfg),
        'images_per_sec': throughput_of(config, variant, sched, bench),
        'speedup': speedup_of(config, variant, sched, bench),
        'train_images_per_sec': mean_std(train_ips)[0] if train_ips else None,
        'wall_time_s_mean': mean_std([r['wall_time_s'] for _, r in runs])[0],
    })
  by_key = {(c['task'], c['variant'], c['schedule']): c for c in cells}
  claims = []
  tasks = sorted({c['task'] for c in cells})
  for task in tasks:
    for name, a, b, sa, sb in CLAIMS:
      ca, cb = by_key.get((task, a, sa)), by_key.get((task, b, sb))
      if not ca or not cb:
        continue
      acc_b = dict(zip(cb['seeds'], cb['accuracies']))
      diffs = [x - acc_b[s] for s, x in zip(ca['seeds'], ca['accuracies'])
               if s in acc_b]
      if not diffs:
        continue
      mean, std = mean_std(diffs)
      claims.append({'task': task, 'comparison': name, 'n': len(diffs),
                     'diffs': diffs, 'mean': mean, 'std': std,
                     'wins': sum(d > 0 for d in diffs)})
  failed = [item.name for item in plan(config)
             if isinstance(item, Cell) and os.path.isfile(failed_path(outdir, item))]
  total_wall = sum(r['wall_time_s'] for r in results.values())
  m = config.model
  model = (f'{m.variant} at {m.image_size} px, LoRA r{m.lora_rank}, '
           f'{config.num_epochs} epochs')
  return {'model': model, 'cells': cells, 'claims': claims, 'num_runs': len(results),
          'failed_runs': failed,
          'total_train_wall_time_s': total_wall,
          'benchmarks': {s: {m: v['images_per_sec'] for m, v in b['models'].items()}
                         for s, b in bench.items()}}


def _fmt(x: Optional[float], nd: int = 2) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '-'
  return f'{x:.{nd}f}'


def summary_markdown(summary: dict) -> str:
  """The summary as two markdown tables (cells, paired claim differences)."""
  lines = ['| task | variant | schedule | n | final acc % (mean +- std) | '
           'max acc % (paper protocol) | GFLOPs | fwd speed-up | fwd images/s | '
           'train images/s | wall s/run |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  order = {'peft': 0, 'tome': 1, 'pyra': 2}
  for c in sorted(summary['cells'], key=lambda c: (
      c['task'], c['gflops'] is None, -(c['gflops'] or 0),
      order.get(c['variant'], 9), c['variant'])):
    lines.append(
        f"| {c['task']} | {c['variant']} | {c['schedule']} ({c['schedule_spec']}) "
        f"| {c['n']} | {_fmt(c['mean'])} +- {_fmt(c['std'])} | "
        f"{_fmt(c['max_protocol_mean'])} | {_fmt(c['gflops'], 3)} | "
        f"{_fmt(c['speedup'], 2)} | {_fmt(c['images_per_sec'], 1)} | "
        f"{_fmt(c['train_images_per_sec'], 1)} | {_fmt(c['wall_time_s_mean'], 0)} |")
  lines += ['', '| task | paired difference (points, same seed) | n | mean +- std '
            '| a > b in | per seed |', '|---|---|---|---|---|---|']
  for d in summary['claims']:
    per_seed = ', '.join(f'{v:+.2f}' for v in d['diffs'])
    lines.append(f"| {d['task']} | {d['comparison']} | {d['n']} | "
                 f"{d['mean']:+.2f} +- {_fmt(d['std'])} | {d['wins']}/{d['n']} | "
                 f"{per_seed} |")
  if summary.get('failed_runs'):
    lines += ['', 'Runs that stopped with a TrainingError (not in the means): '
              + ', '.join(summary['failed_runs'])]
  return '\n'.join(lines) + '\n'


def plot_accuracy(summary: dict, task: str, out: str) -> str:
  """Accuracy (mean +- std over seeds) against forward images/s (or GFLOPs)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells = [c for c in summary['cells'] if c['task'] == task]
  # The paired speed-up where every cell has one (throughput a minute apart
  # drifts more than the differences between schedules), else images/s, else
  # our FLOPs count.
  x_field = next((f for f in ('speedup', 'images_per_sec')
                  if cells and all(c[f] for c in cells)), 'gflops')
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  styles = {'peft': ('s', 'black'), 'tome': ('o', 'tab:blue'),
            'pyra': ('*', 'tab:red'), 'peft_d4': ('D', 'tab:green'),
            'peft_d6': ('D', 'tab:olive')}
  for variant in sorted({c['variant'] for c in cells}):
    pts = sorted((c for c in cells if c['variant'] == variant),
                 key=lambda c: c[x_field])
    marker, color = styles.get(variant, ('x', None))
    ax.errorbar([c[x_field] for c in pts], [c['mean'] for c in pts],
                yerr=[0 if math.isnan(c['std']) else c['std'] for c in pts],
                marker=marker, color=color, capsize=3, label=variant,
                markersize=10 if variant == 'pyra' else 6,
                linestyle='-' if len(pts) > 1 and variant in styles else 'none')
    for c in pts:
      ax.annotate(f"{c['schedule']} (n={c['n']})", (c[x_field], c['mean']),
                  textcoords='offset points', xytext=(4, 4), fontsize=7)
  ax.set_xlabel({
      'speedup': 'forward speed-up over the uncompressed model (paired, this CPU)',
      'images_per_sec': 'forward throughput (images/s, deployed model, this CPU)',
      'gflops': 'GFLOPs per image (blocks, our counter)'}[x_field])
  ax.set_ylabel('final test accuracy (%), mean +- std over seeds')
  ax.set_title(f'{task}: {summary.get("model", "")}')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return x_field


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def curve_plots(study: ml_collections.ConfigDict) -> dict[str, dict]:
  """The loss-curve plots to draw: `study.curve_plots` (file stem ->
  dict(schedules, variants)), by default peft/tome/pyra at low and high."""
  default = {'curves': dict(schedules=('low', 'high'),
                            variants=('peft', 'tome', 'pyra'))}
  plots = study.get('curve_plots') or default
  return {name: dict(spec) for name, spec in dict(plots).items()}


def plot_curves(config, outdir: str, task: str, schedules: Sequence[str],
                seed: int, out: str,
                variants: Sequence[str] = ('peft', 'tome', 'pyra')) -> bool:
  """Training loss against epoch of `variants` at the given schedules (a
  no-merging variant at 'none'), seed `seed`.

  Drawn only when every variant has a run with metrics (returns False and
  writes nothing otherwise): a comparison with a side missing, e.g. a study
  stopped before its longer-training stage, would read as if it were complete.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lines = []
  for variant in variants:
    if variant not in config.study.variants:
      return False
    merges = _merges(config.study, variant)
    for sched in (schedules if merges else ('none',)):
      cell = Cell('', task, variant, sched, seed)
      rows = [r for r in read_metrics(workdir_of(outdir, cell)) if 'loss' in r]
      if rows:
        lines.append((variant, sched, rows))
  if {v for v, _, _ in lines} != set(variants):
    return False
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for variant, sched, rows in lines:
    ax.plot([r['epoch'] for r in rows], [r['loss'] for r in rows],
            label=f'{variant} ({sched})',
            linestyle='--' if sched == 'low' else '-')
  if lines:
    ax.set_xlabel('epoch')
    ax.set_ylabel(f'training loss (mean over {config.log_every_steps} steps)')
    ax.set_title(f'{task}, seed {seed}')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
  plt.close(fig)
  return bool(lines)


def write_summary(config: ml_collections.ConfigDict, outdir: str,
                  publish: str = '') -> dict:
  """Writes summary.{json,md}, the plots and the per-run results; returns it."""
  summary = summarize(config, outdir)
  targets = [os.path.join(outdir, 'summary')] + ([publish] if publish else [])
  for target in targets:
    os.makedirs(os.path.join(target, 'runs'), exist_ok=True)
    sweep.write_summary(target, summary, {'summary.md': summary_markdown(summary)})
    for cell in load_results(config, outdir):
      shutil.copyfile(os.path.join(workdir_of(outdir, cell), 'results.json'),
                      os.path.join(target, 'runs', f'{cell.name}.json'))
    bench = load_bench(outdir)
    if bench:
      os.makedirs(os.path.join(target, 'bench'), exist_ok=True)
      for key in bench:
        shutil.copyfile(bench_path(outdir, key),
                        os.path.join(target, 'bench', f'{key}.json'))
    for task in sorted({c['task'] for c in summary['cells']}):
      plot_accuracy(summary, task, os.path.join(target, f'acc_vs_throughput_{task}.png'))
      for name, spec in curve_plots(config.study).items():
        plot_curves(config, outdir, task, spec['schedules'], 0,
                    os.path.join(target, f'{name}_{task}.png'),
                    variants=spec['variants'])
  return summary


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------

def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pyra_jax import cli  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      'config', None, 'A study config, e.g. pyra_jax/experiments/study_small.py.',
      lock_config=False)
  flags.DEFINE_string('outdir', None, 'Where the run workdirs, benchmark '
                      'timings and the summary go (keep it outside the repo).')
  flags.DEFINE_string('only', '', "Comma-separated: 'stage:<glob>' or globs over "
                      "run names '<task>-<variant>-<schedule>-s<seed>'.")
  flags.DEFINE_string('deadline', '', 'HH:MM UTC: launch no run after this.')
  flags.DEFINE_integer('max_runs', -1, 'Launch at most this many (-1: all).')
  flags.DEFINE_bool('summarize_only', False, 'Only write the summary.')
  flags.DEFINE_bool('dry_run', False, 'Print the plan with done/to-do; run nothing.')
  flags.DEFINE_string('xla_cache_dir', 'default', "JAX's persistent compilation "
                      'cache: seeds of one cell compile the same programs, so '
                      "the 2nd and 3rd seed skip ~30 s of compilation each. "
                      "'default': <outdir>/xla_cache; '': off.")
  flags.DEFINE_string('publish', '', 'Also copy the summary, plots and per-run '
                      'results.json here (e.g. docs/study).')

  def _main(args):
    cli.no_arguments(args)
    fl = flags.FLAGS
    if not fl.outdir:
      raise app.UsageError('--outdir is required (e.g. /work/study_runs).')
    config = fl.config
    if config is None:
      raise app.UsageError(
          '--config is required (e.g. pyra_jax/experiments/study_small.py).')
    if fl.dry_run:
      for item in select(plan(config), fl.only):
        print(('done ' if is_done(fl.outdir, item) else 'todo ') + item.name)
      return
    if not fl.summarize_only:
      cache_dir = (os.path.join(fl.outdir, 'xla_cache')
                   if fl.xla_cache_dir == 'default' else fl.xla_cache_dir)
      if cache_dir:
        enable_compilation_cache(cache_dir)
      statuses = run_study(config, fl.outdir, only=fl.only,
                           deadline=parse_deadline(fl.deadline),
                           max_runs=fl.max_runs)
      counts = {}
      for s in statuses:
        counts[s['status']] = counts.get(s['status'], 0) + 1
      print(f'study: {counts}')
    summary = write_summary(config, fl.outdir, fl.publish)
    print(summary_markdown(summary))

  app.run(cli.guarded(_main), argv=argv, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  main(sys.argv)
