"""The deployed model outside pyra_jax, and the slim install.

* `--mode=export --format=stablehlo` writes a compiled program that runs in a
  process that has only jax, numpy and safetensors (and flatbuffers, which
  jax.export reads with): pyra_jax, flax, orbax and TensorFlow made
  unimportable, Python isolated with -I; at any batch size it gives the logits
  of `model.apply` of the deployed model.
* Every export holds params.safetensors (the export's own parameters) and a
  card.json describing the run.
* Serving (import, build, load and run an export) imports neither TensorFlow
  nor ONNX; a feature that needs an extra ends in one sentence naming it.

One finished tiny run (a copy of the session's) serves the module (`reference`); the demo-shaped model
(configs/demo.py's model section) has random weights of its shapes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from pyra_jax import deploy
from pyra_jax.training import export as export_lib
from pyra_jax.configs import demo
from pyra_jax.configs import tiny
from pyra_jax.models import vit
from tests.helpers.cli import ROOT, TINY, NoCapture, run_main
from tests.helpers.data import require_offline_mnist

require_offline_mnist(module_level=True)

BATCHES = (1, 7, 32)

# A prologue that makes packages unimportable as if they were not installed: a
# None in sys.modules makes `import x` (and `import x.y`) raise
# ModuleNotFoundError and `importlib.util.find_spec('x')` return None.
BLOCKER = '''
import sys
BLOCKED = set(sys.argv[1].split(','))
sys.modules.update(dict.fromkeys(BLOCKED))
del sys.argv[1]
'''

# Runs the run.py of each export folder given (as a user would import it), on
# the arrays of <folder>/inputs.npz: 'images<B>' through logits(), 'pixels'
# through predict(); writes <folder>/outputs.npz; prints what got imported.
LOADER_CHECK = BLOCKER + '''
import json, os, runpy
import numpy as np
for name in BLOCKED:
  try:
    __import__(name)
  except ImportError:
    continue
  raise SystemExit(f'the blocker let {name} import')
for folder in sys.argv[1:]:
  os.chdir(folder)
  loader = runpy.run_path('run.py', run_name='loader')
  inputs = np.load('inputs.npz')
  np.savez('outputs.npz', **{
      k: (loader['predict'] if k == 'pixels' else loader['logits'])(inputs[k])
      for k in inputs.files})
print(json.dumps(sorted({m.partition('.')[0] for m, v in sys.modules.items() if v})))
'''

# pyra_jax's dependencies (as imported) that serving must not need.
NOT_SERVING = {'pyra_jax', 'flax', 'optax', 'orbax', 'ml_collections', 'absl', 'PIL', 'tqdm',
               'tensorboardX', 'huggingface_hub', 'tensorflow', 'tensorflow_datasets',
               'onnx', 'tensorstore'}
ONLY_JAX = 'flax,tensorflow,tensorflow_datasets,pyra_jax,orbax,onnx,ml_collections,optax'


def _env() -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}


@pytest.fixture(scope='module')
def reference(tiny_workdir, tmp_path_factory):
  """The finished tiny run and its two exports: (workdir, orbax, stablehlo)."""
  root = tmp_path_factory.mktemp('deploy')
  wd, orbax, shlo = tiny_workdir, root / 'orbax', root / 'stablehlo'
  mp = pytest.MonkeyPatch()
  try:
    for args in (['--mode=export', f'--export_dir={orbax}'],
                 ['--mode=export', '--format=stablehlo', f'--export_dir={shlo}']):
      code, _, err = run_main(NoCapture(), mp, *TINY, f'--workdir={wd}', *args)
      assert code == 0, err
  finally:
    mp.undo()
  return wd, orbax, shlo


def _apply(model, params, images: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  return np.asarray(fn(params, jnp.asarray(images)))


def _demo_export(folder: Path) -> tuple:
  """configs/demo.py's deployed model (ViT-S/14, 112 px, its schedule) with
  random weights of its shapes (every one nonzero: flax's zero-initialised head
  would make all logits 0), exported as StableHLO into `folder`: (model, params)."""
  config = demo.get_config()
  config.model.num_classes = 10
  deployed = vit.deployed_config(config.model)
  model = vit.build_model(deployed)
  size = deployed.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))['params']
  rng = np.random.default_rng(1)
  params = traverse_util.unflatten_dict({
      k: ((k[-1] == 'scale') + rng.standard_normal(s.shape) * 0.05).astype(s.dtype)
      for k, s in traverse_util.flatten_dict(shapes).items()})
  card = deploy.model_card(config, config.model, workdir=str(folder.parent), step=0)
  deploy.write_stablehlo(str(folder), params, deployed, card)
  return model, params


def test_stablehlo_exports_run_with_jax_numpy_safetensors_only(reference, tmp_path):
  """The tiny run's export and the demo-shaped model, loaded by their run.py in
  an isolated Python where pyra_jax, flax, orbax and TensorFlow do not import:
  batch sizes 1, 7 and 32 give model.apply's logits to 1e-5."""
  _, orbax, shlo = reference
  params, cfg = export_lib.load_export(str(orbax))  # Today's export ...
  tiny_model = vit.build_model(cfg.model)             # ... and its model.
  demo_dir = tmp_path / 'demo'
  demo_model, demo_params = _demo_export(demo_dir)
  expected = {}
  rng = np.random.default_rng(0)
  for name, folder, model, p in (('tiny', shlo, tiny_model, params),
                                 ('demo', demo_dir, demo_model, demo_params)):
    size = json.loads((folder / 'signature.json').read_text())['input']['image_size']
    images = rng.standard_normal((max(BATCHES), size, size, 3)).astype(np.float32)
    # model.apply is per image in eval mode: one batch of 32 gives the logits
    # of its first 1 and 7 images too.
    ref = _apply(model, p, images)
    assert ref.std() > 0.1, (name, ref.std())  # Logits that tell models apart.
    inputs = {f'images{b}': images[:b] for b in BATCHES}
    expected[name] = {f'images{b}': ref[:b] for b in BATCHES}
    if name == 'tiny':  # uint8 pixels, normalised by run.py as signature.json says
      from pyra_jax import data  # pylint: disable=g-import-not-at-top
      pixels = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
      batch = next(iter(data.from_arrays(pixels, np.zeros(8, np.int32), batch_size=8,
                                         image_size=size, train=False)))
      inputs['pixels'] = pixels
      expected[name]['pixels'] = _apply(model, p, batch['image'])
    np.savez(folder / 'inputs.npz', **inputs)
  proc = subprocess.run(
      [sys.executable, '-I', '-c', LOADER_CHECK, ONLY_JAX, str(shlo), str(demo_dir)],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Nothing of pyra_jax's own dependencies beyond jax, numpy and safetensors
  # (and flatbuffers, jax.export's format) was imported.
  imported = set(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert {'jax', 'numpy', 'safetensors', 'flatbuffers'} <= imported
  assert not imported & NOT_SERVING, imported & NOT_SERVING
  for name, folder in (('tiny', shlo), ('demo', demo_dir)):
    got = np.load(folder / 'outputs.npz')
    assert sorted(got.files) == sorted(expected[name])
    for key, want in expected[name].items():
      assert got[key].shape == want.shape, (name, key)
      np.testing.assert_allclose(got[key], want, atol=1e-5, rtol=0, err_msg=f'{name} {key}')
  sig = json.loads((demo_dir / 'signature.json').read_text())
  assert sig['platforms'][0] == 'cpu' and set(sig['platforms']) == {'cpu', 'cuda', 'tpu'}
  assert sig['input']['shape'] == ['batch', 112, 112, 3]
  assert sig['output']['shape'] == ['batch', 10]


def test_weights_and_card_in_every_export(reference):
  """params.safetensors holds the export's parameters under their '/'-joined
  paths; card.json describes the run (checked against the config, results.json
  and the parameters the run trained)."""
  wd, orbax, shlo = reference
  params, cfg = export_lib.load_export(str(orbax))
  assert export_lib.is_export(str(orbax))  # The extra files keep it an export.
  flat = traverse_util.flatten_dict(params, sep='/')
  results = json.loads((wd / 'results.json').read_text())
  config = tiny.get_config()
  for folder, fmt in ((orbax, 'orbax'), (shlo, 'stablehlo')):
    weights = load_file(str(folder / 'params.safetensors'))
    assert sorted(weights) == sorted(flat) and not any('lora' in k for k in weights)
    for k, v in flat.items():
      np.testing.assert_array_equal(weights[k], v, err_msg=k)
    card = json.loads((folder / 'card.json').read_text())
    assert card['format'] == fmt and card['setting'] == 'tiny'
    assert card['method'] == 'pyra' and card['modulation'] == 'pyra'
    r = [int(v) for v in config.model.schedule.split(',')]
    assert card['schedule']['r_per_layer'] == r
    # 4x4 patches + the class token, minus r after each layer.
    assert card['schedule']['tokens_per_layer'] == [17, 17 - r[0], 17 - r[0] - r[1]]
    d, mlp, n = config.model.width, config.model.mlp_dim, [17, 13, 11]
    block = lambda n_in, n_out: 2 * (4 * n_in * d * d + 2 * n_in ** 2 * d) + 4 * n_out * mlp * d
    ratio = (block(17, 17) + block(17, 17)) / (block(n[0], n[1]) + block(n[1], n[2]))
    assert card['schedule']['flops_ratio'] == pytest.approx(ratio, rel=1e-12)
    assert card['peft'] == {'module': 'lora', 'lora_rank': config.model.lora_rank,
                            'folded': True}
    assert card['image_size'] == 32 and card['num_classes'] == 10
    assert card['class_names'] == [str(i) for i in range(10)]
    assert card['accuracy']['accuracy'] == results['final_accuracy']
    assert card['accuracy']['split'] == 'val200' and card['accuracy']['count'] == 200
    assert card['trainable_parameters'] == results['trainable_params']
    assert card['deployed_parameters'] == sum(int(np.size(v)) for v in flat.values())
    assert card['backbone']['variant'] == 'Ti/8' and card['speedup'] is None
    assert card['source']['step'] == results['steps']


def test_the_docs_show_the_loader_an_export_holds(reference):
  _, _, shlo = reference
  assert (shlo / 'run.py').read_text() == deploy.LOADER
  assert f'```python\n{deploy.LOADER}```' in (ROOT / 'docs' / 'deploy.md').read_text()


def test_card_takes_the_measured_speedup_and_only_this_steps_accuracy(reference, tmp_path,
                                                                      capsys, monkeypatch):
  wd, _, _ = reference
  copy = tmp_path / 'run'
  shutil.copytree(wd, copy)
  (copy / 'speedup.json').write_text(json.dumps({
      'settings': {'batch_size': 200}, 'machine': {'device_kind': 'cpu'},
      'models': {'peft': {'images_per_sec': 100.0},
                 'pyra': {'images_per_sec': 130.0, 'speedup': 1.3, 'flops_ratio': 1.26}}}))
  out = tmp_path / 'export'
  code, _, err = run_main(capsys, monkeypatch, *TINY, f'--workdir={copy}', '--mode=export',
                          '--checkpoint_step=25', f'--export_dir={out}')
  assert code == 0, err
  card = json.loads((out / 'card.json').read_text())
  assert card['speedup']['speedup'] == 1.3 and card['speedup']['batch_size'] == 200
  assert card['speedup']['uncompressed_images_per_sec'] == 100.0
  # results.json is of the last step (50): not this export's (25).
  assert card['accuracy'] is None and card['source']['step'] == 25


def test_format_and_stablehlo_export_refusals(reference, tmp_path, capsys, monkeypatch):
  """--format outside export, a StableHLO export given to eval: one sentence each;
  an export replaces a StableHLO export (and back)."""
  wd, _, _ = reference
  code, _, err = run_main(capsys, monkeypatch, *TINY, f'--workdir={wd}', '--mode=eval',
                          '--format=stablehlo')
  assert code == 2 and err.strip() == 'Error: --format=stablehlo applies to --mode=export.'
  target = tmp_path / 'export'
  for fmt in ('stablehlo', 'orbax', 'stablehlo'):
    code, out, err = run_main(capsys, monkeypatch, *TINY, f'--workdir={wd}',
                              '--mode=export', f'--format={fmt}', f'--export_dir={target}')
    assert code == 0, err
    assert deploy.is_stablehlo_export(str(target)) == (fmt == 'stablehlo')
    assert export_lib.is_export(str(target)) == (fmt == 'orbax')
  assert f'python {target / "run.py"}' in out
  code, _, err = run_main(capsys, monkeypatch, *TINY, '--mode=eval',
                          f'--export_dir={target}')
  lines = [l for l in err.strip().splitlines() if l.startswith('Error: ')]
  assert code == 1 and len(lines) == 1 and 'Traceback' not in err
  assert 'is a StableHLO export' in lines[0] and '--format=orbax' in lines[0]


# Serving, then the features that need an extra without it, in one process:
# first import pyra_jax (every module-level import of the serving path), build
# a model, load and run both exports, and list the TensorFlow/ONNX modules that
# got imported (none: the rest of the process then runs as if they were not
# installed, blocked as BLOCKER does); then read data and ONNX weights, export
# (which needs neither), and train through the command line.
WITHOUT_EXTRAS = """
import contextlib, io, json, runpy, sys
import numpy as np
import pyra_jax
from pyra_jax import checkpoints, deploy, errors, main
from pyra_jax.training import export
from pyra_jax.checkpoints import onnx_dinov2
from pyra_jax.configs import tiny
from pyra_jax.models import vit
orbax_dir, stablehlo_dir, workdir, target, fresh = sys.argv[1:6]
x = np.zeros((2, 32, 32, 3), np.float32)
params, cfg = export.load_export(orbax_dir)
vit.build_model(cfg.model).apply({'params': params}, x, train=False)
runpy.run_path(stablehlo_dir + '/run.py', run_name='loader')['logits'](x)
extras = ('tensorflow', 'tensorflow_datasets', 'onnx')
report = {'serving_imported': sorted(m for m in sys.modules if m.partition('.')[0] in extras)}
sys.modules.update(dict.fromkeys(extras))  # From here on, as if not installed.
try:
  from pyra_jax import data
except errors.MissingExtraError as e:
  report['data'] = str(e)
try:
  onnx_dinov2.read_onnx_state_dict('weights.onnx')
except errors.MissingExtraError as e:
  report['onnx'] = str(e)
config = tiny.get_config()
config.data.eval_split, config.log_every_steps, config.eval_batch_size = 'val200', 1, 64
export.export(config, workdir, target, export_format='stablehlo')
with open(target + '/card.json') as f:
  report['class_names'] = json.load(f)['class_names']
sys.argv = ['pyra_jax.main', '--config=configs/tiny.py', f'--workdir={fresh}']
err = io.StringIO()
with contextlib.redirect_stderr(err):
  try:
    main.run()  # python -m pyra_jax.main
  except SystemExit as e:
    report['train_exit'] = e.code
report['train_stderr'] = err.getvalue()
print(json.dumps(report))
"""


def test_serving_needs_no_extra_and_each_feature_says_what_to_install(reference, tmp_path):
  """Importing pyra_jax, building a model and running both exports imports
  neither TensorFlow nor ONNX. Without them (made unimportable), reading data
  and ONNX weights end in one sentence naming the extra, and so does training
  through the command line (exit 1, no traceback); exporting needs neither
  (the card then has no class names)."""
  wd, orbax, shlo = reference
  target = tmp_path / 'export'
  proc = subprocess.run(
      [sys.executable, '-c', WITHOUT_EXTRAS, str(orbax), str(shlo), str(wd), str(target),
       str(tmp_path / 'fresh')],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['serving_imported'] == []
  assert report['data'].startswith('Reading data (training, evaluation, the VTAB-1k and '
                                   'TFDS tasks) needs TensorFlow and TFDS')
  assert report['data'].endswith("pip install 'pyra_jax[data]'.")
  assert report['onnx'].endswith("needs the onnx package, which is not installed: "
                                 "install it with pip install 'pyra_jax[onnx]'.")
  assert report['class_names'] is None and deploy.is_stablehlo_export(str(target))
  lines = [l for l in report['train_stderr'].splitlines() if l.startswith('Error: ')]
  assert report['train_exit'] == 1 and len(lines) == 1, report['train_stderr']
  assert "pip install 'pyra_jax[data]'" in lines[0]
  assert 'Traceback' not in report['train_stderr']
