"""The Python API: what `import pyra_jax` offers, and the README's example run as written.

Each function must do what the command line does on the same config: the
settings and their argument, the model the trainer builds, its training,
evaluation and export.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import pyra_jax
from pyra_jax import errors
from pyra_jax.configs import tiny
from pyra_jax.models import vit
from pyra_jax.training import setup
from tests.helpers.cli import ROOT


def readme_api_example() -> str:
  text = (ROOT / 'README.md').read_text()
  block = text.split('<!-- api -->', 1)[1].split('<!-- /api -->', 1)[0]
  return re.search(r'```python\n(.*?)```', block, re.S).group(1)


def test_the_package_lists_its_api_and_imports_nothing_heavy():
  names = set(dir(pyra_jax))
  assert {'__version__', 'get_config', 'create_model', 'train', 'evaluate', 'export',
          'load_export', 'split_params', 'make_optimizer', 'bipartite_soft_matching',
          'merge_wavg', 'log_size_bias', 'PyraGenerator', 'data', 'registry'} <= names
  for name in pyra_jax.__all__:
    if name != 'data':  # The data pipeline needs TensorFlow (the [data] extra).
      assert getattr(pyra_jax, name) is not None, name
  with pytest.raises(AttributeError):
    pyra_jax.no_such_name  # pylint: disable=pointless-statement
  # `import pyra_jax` alone loads neither JAX nor TensorFlow.
  code = ('import sys, pyra_jax; print(sorted(m for m in sys.modules '
          "if m.split('.')[0] in ('jax', 'flax', 'tensorflow')))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == '[]'


def test_the_version_is_the_packages():
  meta = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  assert meta['tool']['setuptools']['dynamic']['version'] == {'attr': 'pyra_jax.__version__'}
  assert re.fullmatch(r'\d+\.\d+\.\d+', pyra_jax.__version__)


def test_get_config_is_the_command_lines_config():
  """A setting by name with keywords = the setting file with its argument."""
  got = pyra_jax.get_config('tiny', method='tome', overrides={'model.lora_rank': 2,
                                                            'num_epochs': 5})
  want = tiny.get_config('method=tome')
  want.model.lora_rank, want.num_epochs = 2, 5
  assert got.to_dict() == want.to_dict()
  assert pyra_jax.get_config(str(ROOT / 'configs' / 'tiny.py')).to_dict() == \
      tiny.get_config().to_dict()
  with pytest.raises(errors.ConfigError, match=r"Unknown config field 'model.lora_rnk'"):
    pyra_jax.get_config('tiny', overrides={'model.lora_rnk': 2})
  with pytest.raises(errors.PyraError, match='Bad config argument'):
    pyra_jax.get_config('tiny', methd='tome')
  with pytest.raises(errors.PyraError, match='not found'):
    pyra_jax.get_config('no_such_setting')


def test_create_model_is_the_model_a_run_starts_from():
  """The module and parameters the trainer builds for the same config and seed."""
  config = pyra_jax.get_config('tiny')
  model, params = pyra_jax.create_model(config, num_classes=10, weights='random')
  mc = setup.resolve_model_config(config, 10)
  want = setup.init_params(config, mc, setup.build_model(mc))
  flat = lambda t: traverse_util.flatten_dict(jax.device_get(t), sep='/')
  got_flat, want_flat = flat(params), flat(want)
  assert got_flat.keys() == want_flat.keys()
  for k in want_flat:
    np.testing.assert_array_equal(got_flat[k], want_flat[k], err_msg=k)
  assert model.method == 'pyra' and model.schedule == (4, 2)
  # Model fields as keywords; the head from num_classes.
  tome, tp = pyra_jax.create_model('tiny', method='tome', schedule='3,3', num_classes=4,
                                   weights='random')
  assert (tome.method, tome.schedule, tp['head']['kernel'].shape[-1]) == ('tome', (3, 3), 4)
  trainable, frozen = pyra_jax.split_params(tp, 'tiny')
  assert set(trainable) == {'Transformer', 'head'} and 'head' not in frozen
  with pytest.raises(errors.ConfigError, match="has no field 'lora_rnk'"):
    pyra_jax.create_model('tiny', lora_rnk=2, num_classes=3, weights='random')


def test_given_data_must_match_the_configs_batches():
  data_lib = pytest.importorskip('pyra_jax.data')
  config = pyra_jax.get_config('tiny')
  images = np.zeros((50, 32, 32, 3), np.uint8)
  wrong = data_lib.from_arrays(images, np.arange(50) % 10, batch_size=16, image_size=32,
                               train=True)
  with pytest.raises(errors.ConfigError, match=r'batches of 16 images but '
                     r'config.batch_size = 40: build it with batch_size=40'):
    pyra_jax.train(config, '/nonexistent/never/written', data=wrong)


def test_the_readme_example_runs_as_written(tmp_path):
  """Trains, evaluates, exports: the README's code, verbatim, in a fresh process."""
  pytest.importorskip('pyra_jax.data')
  proc = subprocess.run([sys.executable, '-c', readme_api_example()], cwd=tmp_path,
                        capture_output=True, text=True, timeout=600,
                        env={**__import__('os').environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  accuracy, path = proc.stdout.split()[-2:]
  assert 0.0 <= float(accuracy) <= 1.0
  assert Path(path, 'run.py').is_file() and Path(path, 'params.safetensors').is_file()
  results = tmp_path / 'runs' / 'api' / 'results.json'
  assert results.is_file()
  # The run's own evaluation and the API's evaluation of its checkpoint agree.
  config = pyra_jax.get_config('tiny', method='pyra')
  images = np.random.default_rng(0).integers(0, 256, (80, 32, 32, 3), np.uint8)
  r = pyra_jax.evaluate(config, tmp_path / 'runs' / 'api',
                        eval_data=(images, np.arange(80) % 10))
  assert r['count'] == 80 and r['accuracy'] == pytest.approx(float(accuracy))
  model, params = pyra_jax.load_export(pyra_jax.export(config, tmp_path / 'runs' / 'api'))
  assert isinstance(model, vit.VisionTransformer) and model.peft.lora_rank == 0
