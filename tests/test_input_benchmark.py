"""The input-pipeline benchmark (pyra_jax.experiments.input_benchmark) as a user runs it.

Counts are checked against the split definitions (train800: 800 images; batches
of 100 drop no remainder; an eval pass pads to whole batches), not against the
pipeline's own numbers; the rates are timings and only need to be positive.
"""

import re

from pyra_jax.experiments import input_benchmark
from tests.helpers.cli import cli


def benchmark_cli(*args):
  return cli(*args, module='pyra_jax.experiments.input_benchmark')


def test_times_training_and_eval_on_the_offline_mnist(capsys):
  input_benchmark.main(['--root=unused', '--source=mnist', '--task=mnist',
                        '--split=train800', '--image_size=28', '--batch_size=100',
                        '--steps=3', '--eval_split=val200'])
  lines = capsys.readouterr().out.strip().split('\n')
  assert lines[0] == 'task mnist split train800: 800 images, 28 px, batch 100, 8 steps/epoch'
  assert lines[1].startswith('train, first epoch (decode + resize + cache): ')
  assert lines[2].startswith('train, steady state (3 batches): ')
  assert lines[3].startswith('eval val200 (200 images, padded to 200): ')
  rates = [float(m.replace(',', '')) for m in re.findall(r'([\d,]+) images/s', '\n'.join(lines))]
  assert len(rates) == 3 and min(rates) > 0


def test_a_missing_root_says_what_to_pass(tmp_path):
  rc, _, err = benchmark_cli(f'--root={tmp_path / "nowhere"}')
  assert rc != 0 and 'Traceback' not in err
  # (TensorFlow's own start-up lines may come first on stderr.)
  assert err.strip().split('\n')[-1] == (f'Error: --root {tmp_path / "nowhere"} is not a directory: '
                         'pass a VTAB-1k root (with --task) or one task folder.')


def test_a_folder_that_is_no_task_ends_in_one_sentence(tmp_path):
  # The folder exists but is neither a known task's folder nor holds split files.
  rc, _, err = benchmark_cli(f'--root={tmp_path}', '--task=cifar10')
  assert rc != 0 and 'Traceback' not in err
  last = err.strip().split('\n')[-1]
  assert last.startswith('Error: ') and 'cifar10' in last
