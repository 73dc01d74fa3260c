r"""Accuracy against throughput (the paper's Figs. 2 and 4) from results files.

  python -m pyra_jax.experiments.plots --results 'workdirs/*/results.json' \
      --benchmarks 'bench/*.json' --out plot.png

Inputs (JSON; every key is optional unless said otherwise, files that cannot be
used are skipped with a message naming them):

  results files (written by the training loop, `<workdir>/results.json`):
    final_accuracy   required; top-1 as a fraction (<= 1) or a percentage
    config           the run's config as a dict; `config.model` (variant,
                     method, schedule, image_size, width, ...) identifies the
                     model, `config.data.task` the task
    throughput       images/s of this model: a number, or a dict with
                     `images_per_sec` (e.g. a benchmark's per-model entry)

  benchmark files (`python -m pyra_jax.benchmark --out=...`): every entry of
    `models` gives images/s for a model identified by the benchmark config and
    that entry's method; a results file without `throughput` takes the
    images/s of the benchmark entry of the same model (same width, depth,
    patch, image size, distillation, method and resolved schedule).

Runs of one model on several tasks are averaged into one point (the paper plots
the VTAB-1k mean); the point's label gives the number of tasks. `--x=gflops`
plots against our FLOPs counter instead (no benchmark needed); with
`--x=throughput`, models with no throughput are left out and listed, and if no
model has one the plot falls back to GFLOPs and says so.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import sys
from typing import Any, Optional, Sequence

import ml_collections

from pyra_jax import checkpointing
from pyra_jax import schedules
from pyra_jax.models import vit

MARKERS = {'peft': 's', 'tome': 'o', 'pyra': '*'}
COLORS = {'peft': 'tab:gray', 'tome': 'tab:blue', 'pyra': 'tab:red'}


def _warn(msg: str) -> None:
  print(f'plots: {msg}', file=sys.stderr)


def model_key(model: dict[str, Any], method: Optional[str] = None
              ) -> Optional[tuple]:
  """A hashable identity of a model: architecture, method, resolved schedule.

  Resolved through `vit.model_kwargs`, so 'vitb_high' and its explicit list
  are the same model. None when the model section cannot be resolved.
  """
  c = ml_collections.ConfigDict(checkpointing.stored_model_config(dict(model)))
  if method is not None:
    c.method = method
    if method == 'peft':
      c.schedule = 'none'
  try:
    kw = vit.model_kwargs(c, num_classes=1)  # The head does not change the key.
  except (ValueError, KeyError, TypeError) as e:
    _warn(f'cannot resolve model {dict(model)}: {e}')
    return None
  method = c.method
  return (kw['width'], kw['depth'], kw['mlp_dim'], kw['patch_size'],
          int(c.image_size), kw['distilled'], method, tuple(kw['schedule']))


def gflops_of(key: tuple) -> float:
  """GFLOPs per image of a model key (our counter, blocks only)."""
  width, _, mlp_dim, patch, image, distilled, _, schedule = key
  n0 = (image // patch) ** 2 + 1 + int(distilled)
  return schedules.vit_flops(schedule, num_tokens=n0, width=width,
                             mlp_ratio=mlp_dim / width) / 1e9


def _throughput(value: Any) -> Optional[float]:
  if isinstance(value, dict):
    value = value.get('images_per_sec')
  if isinstance(value, (int, float)) and value > 0 and math.isfinite(value):
    return float(value)
  return None


def load_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    _warn(f'skipping {path}: {e}')
    return None
  if not isinstance(data, dict):
    _warn(f'skipping {path}: not a JSON object')
    return None
  return data


def benchmark_table(paths: Sequence[str]) -> dict[tuple, float]:
  """model key -> images/s from benchmark JSONs (the last file wins on repeats)."""
  table = {}
  for path in paths:
    data = load_json(path)
    if data is None:
      continue
    model_cfg, models = data.get('config'), data.get('models')
    if not isinstance(model_cfg, dict) or not isinstance(models, dict):
      _warn(f'skipping {path}: no `config` and `models` (not a benchmark JSON?)')
      continue
    image = data.get('settings', {}).get('image_size')
    for name, entry in models.items():
      ips = _throughput(entry)
      cfg = dict(model_cfg, **({'image_size': image} if image else {}))
      key = model_key(cfg, method=entry.get('method', name))
      if ips is not None and key is not None:
        table[key] = ips
  return table


def _label(model: dict[str, Any], key: Optional[tuple]) -> str:
  method = key[6] if key else model.get('method', '?')
  sched = model.get('schedule', '')
  if method == 'peft' or (key and not any(key[7])):
    sched = 'no merging'
  return f"{model.get('variant', '?')} {method} {sched}".strip()


def collect(result_paths: Sequence[str], bench: dict[tuple, float]) -> list[dict]:
  """One point per model: mean accuracy over its runs, throughput, GFLOPs."""
  groups: dict[Any, dict] = collections.OrderedDict()
  for path in result_paths:
    data = load_json(path)
    if data is None:
      continue
    acc = data.get('final_accuracy')
    if not isinstance(acc, (int, float)) or not math.isfinite(acc):
      _warn(f'skipping {path}: no numeric `final_accuracy`')
      continue
    acc = 100.0 * acc if acc <= 1.0 else float(acc)
    config = data.get('config') if isinstance(data.get('config'), dict) else {}
    model = config.get('model') if isinstance(config.get('model'), dict) else {}
    key = model_key(model) if model else None
    gid = key if key is not None else ('file', path)
    g = groups.setdefault(gid, {'label': _label(model, key), 'key': key,
                                'method': key[6] if key else model.get('method', '?'),
                                'accuracies': [], 'tasks': [], 'throughputs': []})
    g['accuracies'].append(acc)
    g['tasks'].append(config.get('data', {}).get('task', '?')
                      if isinstance(config.get('data'), dict) else '?')
    ips = _throughput(data.get('throughput'))
    if ips is not None:
      g['throughputs'].append(ips)
  points = []
  for g in groups.values():
    key = g['key']
    ips = (sum(g['throughputs']) / len(g['throughputs']) if g['throughputs']
           else bench.get(key) if key else None)
    points.append({'label': g['label'], 'method': g['method'],
                   'accuracy': sum(g['accuracies']) / len(g['accuracies']),
                   'num_runs': len(g['accuracies']), 'tasks': sorted(set(g['tasks'])),
                   'images_per_sec': ips,
                   'gflops': gflops_of(key) if key else None})
  return points


def plot(points: list[dict], out: str, x: str = 'throughput', title: str = '') -> str:
  """Draws accuracy (%) against images/s (or GFLOPs); returns the x used."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  field = 'images_per_sec' if x == 'throughput' else 'gflops'
  usable = [p for p in points if p[field] is not None]
  if x == 'throughput' and not usable:
    _warn('no model has a throughput (give --benchmarks or a `throughput` key); '
          'plotting against GFLOPs instead.')
    x, field = 'gflops', 'gflops'
    usable = [p for p in points if p['gflops'] is not None]
  for p in points:
    if p not in usable:
      _warn(f"left out of the plot (no {field}): {p['label']}")
  if not usable:
    raise ValueError('Nothing to plot: no results file had both an accuracy and a '
                     f'{field}. Check the --results pattern and the files.')
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  by_method = collections.defaultdict(list)
  for p in usable:
    by_method[p['method']].append(p)
  for method, pts in by_method.items():
    pts = sorted(pts, key=lambda p: p[field])
    ax.plot([p[field] for p in pts], [p['accuracy'] for p in pts],
            marker=MARKERS.get(method, 'x'), color=COLORS.get(method), label=method,
            markersize=9 if method == 'pyra' else 6,
            linestyle='-' if len(pts) > 1 else 'none')
    for p in pts:
      ax.annotate(f"{p['label']} ({p['num_runs']})", (p[field], p['accuracy']),
                  textcoords='offset points', xytext=(4, 4), fontsize=7)
  ax.set_xlabel('throughput (images/s)' if x == 'throughput'
                else 'GFLOPs per image (blocks, our counter)')
  ax.set_ylabel('mean top-1 accuracy (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return x


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--results', required=True, nargs='+',
                      help="results.json files or glob patterns (quote them)")
  parser.add_argument('--benchmarks', nargs='*', default=[],
                      help='benchmark JSONs (pyra_jax.benchmark --out) to take '
                           'images/s from')
  parser.add_argument('--out', required=True, help='the PNG to write')
  parser.add_argument('--x', choices=('throughput', 'gflops'), default='throughput')
  parser.add_argument('--title', default='')
  args = parser.parse_args(argv)
  expand = lambda pats: sorted({p for pat in pats for p in (glob.glob(pat) or [pat])})
  results = expand(args.results)
  points = collect(results, benchmark_table(expand(args.benchmarks)))
  if not points:
    raise SystemExit(f'plots: no usable results among {len(results)} file(s) '
                     f'matching {args.results}.')
  x = plot(points, args.out, args.x, args.title)
  for p in points:
    ips = f"{p['images_per_sec']:.2f}" if p['images_per_sec'] else '-'
    print(f"{p['label']:40} acc {p['accuracy']:6.2f}%  runs {p['num_runs']:3d}  "
          f"img/s {ips:>8}  GFLOPs {p['gflops'] if p['gflops'] is None else round(p['gflops'], 2)}")
  print(f'wrote {args.out} (x = {x})')


if __name__ == '__main__':
  main()
