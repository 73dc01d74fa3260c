r"""Accuracy against throughput (the paper's Figs. 2 and 4) from results files.

  python -m pyra_jax.experiments.plots --results='workdirs/*/results.json' \
      --benchmarks='bench/*.json' --out=plot.png

`--results` and `--benchmarks` take a file or a quoted glob pattern and may be
repeated; further results files may follow as arguments.

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

`tsne` draws the paper's Fig. 5 instead: two trained runs' class-token features
(the image embedding the head reads) on one split, each embedded in 2-D with
t-SNE (scikit-learn, the `plots` extra) and coloured by class:

  python -m pyra_jax.experiments.plots tsne --workdir_a=runs/tome \
      --label_a=ToMe --workdir_b=runs/pyra --label_b=PYRA --out=tsne.png
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pyra_jax import checkpointing
from pyra_jax import cli
from pyra_jax import errors
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
          int(c.image_size), kw['distilled'], method, tuple(kw['reducer'].schedule))


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


# The two commands' flags, each in its own FlagValues (main(argv) runs
# in-process too, beside other commands' flags).
FLAGS = flags.FlagValues()
flags.DEFINE_multi_string('results', None, 'results.json files or glob patterns '
                          '(quote them); repeat the flag for more', required=True,
                          flag_values=FLAGS)
flags.DEFINE_multi_string('benchmarks', [], 'benchmark JSONs (pyra_jax.benchmark '
                          '--out) to take images/s from', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'the PNG to write', required=True, flag_values=FLAGS)
flags.DEFINE_enum('x', 'throughput', ('throughput', 'gflops'), 'the x axis',
                  flag_values=FLAGS)
flags.DEFINE_string('title', '', 'the plot title', flag_values=FLAGS)
cli.define_verbosity(FLAGS)

TSNE_FLAGS = flags.FlagValues()
for _side, _default in (('a', 'ToMe'), ('b', 'PYRA')):
  flags.DEFINE_string(f'workdir_{_side}', None, 'a finished run (its results.json '
                      'and checkpoints)', required=True, flag_values=TSNE_FLAGS)
  flags.DEFINE_string(f'label_{_side}', _default, 'its panel\'s title',
                      flag_values=TSNE_FLAGS)
flags.DEFINE_string('out', None, 'the PNG to write', required=True,
                    flag_values=TSNE_FLAGS)
flags.DEFINE_string('split', None, "split to embed (default: each run's "
                    'data.eval_split)', flag_values=TSNE_FLAGS)
flags.DEFINE_integer('max_images', 0, 'embed only the first N images of the split '
                     '(0: all)', flag_values=TSNE_FLAGS)
flags.DEFINE_float('perplexity', 30.0, "t-SNE's perplexity", flag_values=TSNE_FLAGS)
flags.DEFINE_integer('seed', 0, "t-SNE's random state", flag_values=TSNE_FLAGS)
flags.DEFINE_string('title', '', 'the figure title', flag_values=TSNE_FLAGS)
cli.define_verbosity(TSNE_FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command (argv without the program name; None: sys.argv[1:]);
  `tsne` as the first argument draws the t-SNE figure instead."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['tsne']:
    tsne_main(argv[1:])
    return
  more = cli.parse(FLAGS, argv, prog='python -m pyra_jax.experiments.plots',
                   doc=__doc__, positional=1_000_000)
  args = FLAGS
  patterns = list(args.results) + more
  expand = lambda pats: sorted({p for pat in pats for p in (glob.glob(pat) or [pat])})
  results = expand(patterns)
  points = collect(results, benchmark_table(expand(args.benchmarks)))
  if not points:
    cli.fail(f'no usable results among {len(results)} file(s) matching '
             f'{patterns}: give results.json files of finished runs with --results.')
  x = plot(points, args.out, args.x, args.title)
  for p in points:
    ips = f"{p['images_per_sec']:.2f}" if p['images_per_sec'] else '-'
    print(f"{p['label']:40} acc {p['accuracy']:6.2f}%  runs {p['num_runs']:3d}  "
          f"img/s {ips:>8}  GFLOPs {p['gflops'] if p['gflops'] is None else round(p['gflops'], 2)}")
  print(f'wrote {args.out} (x = {x})')


# ----------------------------------------------------------------------------
# t-SNE of the class-token features (the paper's Fig. 5).
# ----------------------------------------------------------------------------

def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a finished run was trained with, from its results.json.

  Each run restores with its own config, so two runs of different methods (or
  models) need no config flags, and a config edited since cannot mismatch.
  """
  path = os.path.join(workdir, 'results.json')
  data = load_json(path) if os.path.isfile(path) else None
  if data is None or not isinstance(data.get('config'), dict):
    raise errors.UsageError(
        f'{path} is missing or holds no `config`: give the workdir of a finished '
        'training run (python -m pyra_jax.main --config=... --workdir=...).')
  return ml_collections.ConfigDict(checkpointing.stored_config(data['config']))


def class_token_features(run, trainable, eval_data, max_images: int = 0
                         ) -> dict[str, Any]:
  """The class-token features, labels and top-1 accuracy of `eval_data`.

  One jitted pass over the split in its order (the first `max_images` images
  if > 0). The features are `apply(..., features=True)`, what the head reads;
  the logits come from the same jitted call (XLA's common-subexpression pass
  runs the encoder once for both), so the accuracy in a picture's title belongs
  to exactly the points drawn. Padded rows of the last batch are dropped by
  their mask.
  """
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top

  model = run.model

  def step(trainable, frozen, batch):
    variables = {'params': optim.merge_params(trainable, frozen)}
    feats = model.apply(variables, batch['image'], train=False, features=True)
    logits = model.apply(variables, batch['image'], train=False)
    return feats, jnp.argmax(logits, -1) == batch['label']

  step = jax.jit(step, out_shardings=run.replicated)
  wanted = eval_data.num_examples if max_images <= 0 else min(
      max_images, eval_data.num_examples)
  feats, labels, hits = [], [], []
  count = 0
  for batch in iter(eval_data):
    f, hit = jax.device_get(step(trainable, run.frozen,
                                 setup.shard(batch, run.batch_sharding)))
    keep = np.asarray(batch['mask'], bool)
    feats.append(np.asarray(f)[keep])
    labels.append(np.asarray(batch['label'])[keep])
    hits.append(np.asarray(hit)[keep])
    count += int(keep.sum())
    if count >= wanted:
      break
  features = np.concatenate(feats)[:wanted]
  hit = np.concatenate(hits)[:wanted]
  if len(features) != wanted:
    raise errors.TrainingError(
        f'The pass over split {eval_data.split!r} gave {len(features)} images '
        f'but it has {wanted}: the data pipeline must pad and mask the last '
        'batch so every image counts exactly once.')
  return {'features': features, 'labels': np.concatenate(labels)[:wanted],
          'accuracy': float(hit.sum()) / max(wanted, 1)}


def embed_tsne(features, perplexity: float = 30.0, seed: int = 0):
  """2-D t-SNE of (N, D) features with scikit-learn (PCA init, fixed seed).

  t-SNE needs perplexity < N; a smaller split gets (N - 1) / 3, about three
  neighbours' worth of points on each side, and the caller reports it.

  scikit-learn's Barnes-Hut gradient runs in OpenMP threads, which spin while
  waiting for each other: with the cores busy (another job, or the tests' other
  worker) 200 points took 43 s with them and 0.75 s on one thread (2-core AMD
  EPYC, both cores loaded). So it runs on one thread: 2,000 points take ~10 s.
  """
  try:
    from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
    from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UsageError(
        'The t-SNE plot needs scikit-learn: pip install "pyra_jax[plots]" (or '
        'pip install scikit-learn).') from e
  x = np.asarray(features, np.float64)
  perplexity = min(float(perplexity), (len(x) - 1) / 3)
  tsne = TSNE(n_components=2, perplexity=perplexity, init='pca',
              random_state=seed)
  with threadpool_limits(limits=1, user_api='openmp'):
    return tsne.fit_transform(x), perplexity


def plot_tsne(panels: Sequence[dict], out: str, title: str = '') -> None:
  """Draws each panel's 2-D points side by side, coloured by class.

  Every panel uses the same colour per class; the legend names the classes
  (a colour bar instead when there are more than 20, e.g. CIFAR-100).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  num_classes = int(max(int(p['labels'].max()) for p in panels)) + 1
  cmap = plt.get_cmap('tab10' if num_classes <= 10 else
                      'tab20' if num_classes <= 20 else 'turbo', num_classes)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 1.2, 5.0))
  for ax, p in zip(np.atleast_1d(axes), panels):
    points = ax.scatter(p['xy'][:, 0], p['xy'][:, 1], c=p['labels'], s=6,
                        cmap=cmap, vmin=-0.5, vmax=num_classes - 0.5,
                        linewidths=0)
    ax.set_title(p['title'], fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
  if num_classes <= 20:
    handles = [plt.Line2D([], [], marker='o', linestyle='none', markersize=6,
                          color=cmap(c), label=str(c)) for c in range(num_classes)]
    fig.legend(handles=handles, title='class', loc='center right', fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.0 / fig.get_figwidth(), 0.95 if title else 1))
  else:
    fig.colorbar(points, ax=list(np.atleast_1d(axes)), label='class')
  if title:
    fig.suptitle(title)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def tsne_panel(workdir: str, label: str, split: Optional[str], max_images: int,
               perplexity: float, seed: int) -> dict:
  """Restores one run, computes its features on `split` and embeds them."""
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = run_config(workdir)
  split = split or config.data.eval_split
  run, trainable, step = setup.restore_run(config, workdir)
  data = setup.get_data(config.data, split, config.eval_batch_size,
                        image_size=config.model.image_size, train=False,
                        seed=config.seed)
  out = class_token_features(run, trainable, data, max_images)
  out['xy'], used_perplexity = embed_tsne(out['features'], perplexity, seed)
  n = len(out['features'])
  out['task'] = config.data.task
  out['title'] = f'{label}: {100 * out["accuracy"]:.2f}% top-1 ({split}, {n} images)'
  print(f'{label}: {workdir} step {step}, {n} images of {split!r}, top-1 '
        f'{100 * out["accuracy"]:.2f}%, t-SNE perplexity {used_perplexity:g}')
  return out


def tsne_main(argv: Sequence[str]) -> None:
  """`plots tsne`: t-SNE of two runs' class-token features, side by side
  (the paper's Fig. 5)."""
  cli.parse(TSNE_FLAGS, argv, prog='python -m pyra_jax.experiments.plots tsne',
            doc="t-SNE of two runs' class-token features, side by side (the "
                "paper's Fig. 5).")
  args = TSNE_FLAGS
  if args.max_images < 0 or 0 < args.max_images < 5:
    cli.fail(f'--max_images={args.max_images}: give 0 (all) or at least 5 '
             'images, fewer cannot be embedded.', cli.USAGE_EXIT)
  if args.perplexity <= 0:
    cli.fail(f'--perplexity={args.perplexity:g}: give a positive number '
             '(scikit-learn suggests 5 to 50).', cli.USAGE_EXIT)
  folder = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(folder):
    cli.fail(f'--out={args.out}: the folder {folder} does not exist; create it '
             'or give another path.', cli.USAGE_EXIT)
  try:
    panels = [tsne_panel(wd, label, args.split, args.max_images,
                         args.perplexity, args.seed)
              for wd, label in ((args.workdir_a, args.label_a),
                                (args.workdir_b, args.label_b))]
    if panels[0]['task'] != panels[1]['task']:
      _warn(f"the runs are on different tasks ({panels[0]['task']} and "
            f"{panels[1]['task']}): a colour means a different class in each panel.")
    plot_tsne(panels, args.out, args.title)
  except (errors.PyraError, FileNotFoundError) as e:
    cli.fail(str(e), 1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
