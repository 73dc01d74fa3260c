"""The VTAB-1k protocol command (`python -m pyra_jax.vtab`, docs/algorithm.md §11).

Tiny model (configs/tiny.py, 1 epoch), 2-value pyra_lr grids. What each run
reports is read back from its own results.json and the protocol's choices are
recomputed here from their definition (the paper's: best val200 accuracy; our
stated tie rule: the smallest lr), never taken from the summary under test.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyra_jax import vtab
from tests.helpers.cli import ROOT
from tests.helpers.data import fake_tfds_examples, require_offline_mnist
from tests.helpers.models import VTAB_QUICK, quick_vtab_config

NATURAL = ('caltech101', 'cifar100', 'dtd', 'oxford_flowers102',
           'oxford_iiit_pet', 'svhn', 'sun397')
SPECIALIZED = ('patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy')
STRUCTURED = ('clevr_count', 'clevr_dist', 'dmlab', 'kitti_dist', 'dsprites_loc',
              'dsprites_ori', 'smallnorb_azi', 'smallnorb_ele')
QUICK = VTAB_QUICK
GRID = QUICK['vtab.pyra_lr_grid']  # (1e-3, 3e-2)


def results(path) -> dict:
  with open(os.path.join(path, 'results.json')) as f:
    return json.load(f)


def expected_choice(workdir, task) -> float:
  """Best val200 accuracy over the grid, a tie to the smallest lr: by definition."""
  best = None
  for v in sorted(GRID):
    acc = results(os.path.join(workdir, task, 'select', f'pyra_lr={vtab.format_lr(v)}')
                  )['final_accuracy']
    if best is None or acc > best[0]:
      best = (acc, v)
  return best[1]


def check_protocol(workdir, tasks, summary):
  """Every run, split and choice of the protocol, and the summary's numbers."""
  finals = {}
  for t in tasks:
    for v in GRID:
      r = results(os.path.join(workdir, t, 'select', f'pyra_lr={vtab.format_lr(v)}'))
      assert r['config']['pyra_lr'] == v
      assert (r['config']['data']['train_split'], r['eval_split']) == ('train800', 'val200')
      assert r['config']['data']['task'] == t
    fin = results(os.path.join(workdir, t, 'final'))
    assert (fin['config']['data']['train_split'], fin['eval_split']) == (
        'train800val200', 'test')
    assert fin['config']['pyra_lr'] == expected_choice(workdir, t)
    with open(os.path.join(workdir, t, 'selection.json')) as f:
      assert json.load(f)['chosen_pyra_lr'] == fin['config']['pyra_lr']
    finals[t] = fin
  rows = {r['task']: r for r in summary['tasks']}
  for t, fin in finals.items():
    assert rows[t]['test_accuracy'] == fin['final_accuracy']
    assert rows[t]['max_accuracy_paper_protocol'] == fin['max_accuracy_paper_protocol']
    assert rows[t]['pyra_lr'] == fin['config']['pyra_lr']
  return finals


# ----------------------------------------------------------------------------
# All 19 tasks on TFDS mock data.
# ----------------------------------------------------------------------------

def test_all_19_tasks_on_tfds_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    del split, decoders, read_config, kwargs
    features = self.info.features
    examples = fake_tfds_examples(features)
    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), features.get_tensor_info())
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(len(examples)))

  # 6 fake examples per split: batches of 2. One head size for all tasks (the
  # largest, sun397's 397 classes) so the 19 tasks share compiled steps. ToMe:
  # no pyra_lr selection stage, one run per task (the selection on VTAB splits
  # is checked by the folder-layout and killed-grid tests below; each task's
  # train800 / val200 / test split strings by test_data_tfds_mock.py).
  config = quick_vtab_config('source=tfds,method=tome', batch_size=2, eval_batch_size=4,
                             checkpoint_every_steps=1000, **{'model.num_classes': 397})
  workdir = str(tmp_path / 'vtab')
  with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn):
    out = vtab.run_protocol(config, workdir)
  assert out['waiting'] == []
  tasks = NATURAL + SPECIALIZED + STRUCTURED
  s = out['summary']
  rows = {r['task']: r for r in s['tasks']}
  assert sorted(rows) == sorted(tasks)
  finals = {}
  for t in tasks:
    assert not os.path.exists(os.path.join(workdir, t, 'select'))
    fin = finals[t] = results(os.path.join(workdir, t, 'final'))
    assert fin['config']['data']['task'] == t
    assert (fin['config']['data']['train_split'], fin['eval_split']) == (
        'train800val200', 'test')
    assert rows[t]['test_accuracy'] == fin['final_accuracy']
    assert rows[t]['pyra_lr'] is None and rows[t]['method'] == 'tome'
  for group, members in (('Natural', NATURAL), ('Specialized', SPECIALIZED),
                         ('Structured', STRUCTURED)):
    assert s['groups'][group]['tasks_done'] == len(members)
    assert s['groups'][group]['mean'] == pytest.approx(
        np.mean([finals[t]['final_accuracy'] for t in members]), abs=1e-12)
  assert s['vtab_mean']['mean'] == pytest.approx(
      np.mean([finals[t]['final_accuracy'] for t in tasks]), abs=1e-12)
  assert s['vtab_mean']['paper'] is None  # tiny is no paper setting.
  # The three files agree with the returned summary.
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['vtab_mean']['mean'] == s['vtab_mean']['mean']
  csv_lines = Path(workdir, 'summary.csv').read_text().splitlines()
  assert len(csv_lines) == 1 + 19 + 3 + 1
  md = Path(workdir, 'summary.md').read_text()
  assert f'| VTAB-1k, 19 tasks | {100 * s["vtab_mean"]["mean"]:.2f} | – |' in md
  # Re-generated from the workdirs alone: the same numbers.
  again = vtab.summarize(workdir)
  assert again['tasks'] == s['tasks'] and again['groups'] == s['groups']


# ----------------------------------------------------------------------------
# The VTAB-1k folder layout (and a dataset of one's own in it).
# ----------------------------------------------------------------------------

def _write_folder(task_dir: Path, num_classes: int, sizes: dict, seed: int):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, n in sizes.items():
    (task_dir / 'images' / split).mkdir(parents=True)
    lines = []
    for i in range(n):
      label = i % num_classes
      image = np.full((8, 8, 3), 22 * label, np.uint8) + rng.integers(0, 20, (8, 8, 3),
                                                                       dtype=np.uint8)
      rel = f'images/{split}/{i:06d}.png'
      Image.fromarray(image).save(task_dir / rel)
      lines.append(f'{rel} {label}')
    (task_dir / f'{split}.txt').write_text('\n'.join(lines) + '\n')


def test_folder_layout_with_a_vtab_task_and_an_own_dataset(tmp_path):
  pytest.importorskip('PIL')
  sizes = {'train800': 8, 'val200': 4, 'train800val200': 12, 'test': 6}
  _write_folder(tmp_path / 'data' / 'eurosat', 10, sizes, 0)
  _write_folder(tmp_path / 'data' / 'mine', 3, sizes, 1)
  config = quick_vtab_config(f'source=folder,data_dir={tmp_path / "data"}', batch_size=4,
                             eval_batch_size=4, checkpoint_every_steps=1000)
  workdir = str(tmp_path / 'vtab')
  out = vtab.run_protocol(config, workdir, ['eurosat', 'folder:mine'])
  tasks_dirs = ['eurosat', 'folder_mine']
  for t in tasks_dirs:
    assert os.path.isdir(os.path.join(workdir, t, 'final'))
  s = out['summary']
  rows = {r['task']: r for r in s['tasks']}
  assert rows['eurosat']['group'] == 'Specialized'
  assert rows['folder:mine']['group'] == 'other'
  assert results(os.path.join(workdir, 'folder_mine', 'final'))['num_test_images'] == 6
  assert s['groups']['Specialized'] == {'tasks_done': 1, 'tasks': 4, 'mean': None}
  assert s['vtab_mean']['mean'] is None
  assert 'partial (1/4 tasks)' in Path(workdir, 'summary.md').read_text()
  for t, d in zip(['eurosat', 'folder:mine'], tasks_dirs):
    fin = results(os.path.join(workdir, d, 'final'))
    assert fin['config']['pyra_lr'] == expected_choice(workdir, d)
    assert rows[t]['test_accuracy'] == fin['final_accuracy']
  assert s['mean_of_tasks_done'] == pytest.approx(np.mean(
      [results(os.path.join(workdir, d, 'final'))['final_accuracy'] for d in tasks_dirs]))


def test_tome_skips_the_selection_stage(tmp_path):
  require_offline_mnist()
  out = vtab.run_protocol(quick_vtab_config('method=tome'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'mnist' / 'select')
  row = out['summary']['tasks'][0]
  assert row['task'] == 'mnist' and row['pyra_lr'] is None and row['method'] == 'tome'


# ----------------------------------------------------------------------------
# Kill and resume; workers. The reference: one uninterrupted worker on MNIST.
# ----------------------------------------------------------------------------

def _comparable(summary):
  """What must not depend on how the runs were scheduled: accuracies, choices."""
  return [{k: r.get(k) for k in ('task', 'status', 'test_accuracy',
                                 'max_accuracy_paper_protocol', 'pyra_lr',
                                 'select_val200')} for r in summary['tasks']]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  require_offline_mnist()
  workdir = str(tmp_path_factory.mktemp('reference'))
  out = vtab.run_protocol(quick_vtab_config(checkpoint_every_steps=5), workdir)
  check_protocol(workdir, ['mnist'], out['summary'])
  return out['summary']


def test_killed_in_the_middle_of_the_grid_then_rerun_gives_the_same_summary(
    reference, tmp_path):
  workdir = tmp_path / 'killed'
  second = workdir / 'mnist' / 'select' / f'pyra_lr={vtab.format_lr(GRID[1])}'
  args = [sys.executable, '-m', 'pyra_jax.vtab', '--config=configs/tiny.py',
          f'--workdir={workdir}', '--config.checkpoint_every_steps=5']
  args += [f'--config.{k}={v}' for k, v in QUICK.items() if k != 'vtab.pyra_lr_grid']
  args += [f'--config.vtab.pyra_lr_grid=({GRID[0]},{GRID[1]})']
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 600
    # Killed once the second grid value has saved a checkpoint: the first run
    # finished, the second half-way, the final not started.
    while not (second / 'checkpoints').is_dir() or not any(
        p.name.isdigit() for p in (second / 'checkpoints').iterdir()):
      assert proc.poll() is None, 'the command ended before it could be killed'
      assert time.time() < deadline
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not (second / 'results.json').exists()
  assert not (workdir / 'mnist' / 'final' / 'results.json').exists()
  out = vtab.run_protocol(quick_vtab_config(checkpoint_every_steps=5), str(workdir))
  assert _comparable(out['summary']) == _comparable(reference)


def test_two_workers_give_the_same_summary_as_one(reference, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'workers')
  config = quick_vtab_config(checkpoint_every_steps=5)
  # Worker 1 of 2 has the first grid value and the final run, whose selection
  # waits on worker 2's value: it says so (the command exits with status 3).
  first = vtab.run_protocol(config, workdir, worker=(1, 2))
  assert first['waiting'] == ['mnist']
  assert os.path.isfile(os.path.join(workdir, 'mnist', 'select',
                                     f'pyra_lr={vtab.format_lr(GRID[0])}', 'results.json'))
  assert not os.path.exists(os.path.join(workdir, 'mnist', 'select',
                                         f'pyra_lr={vtab.format_lr(GRID[1])}'))
  assert not os.path.exists(os.path.join(workdir, 'mnist', 'final'))
  # Called again with --wait, it waits; worker 2 makes its run meanwhile.
  slept = []

  def worker_2_meanwhile(seconds):
    slept.append(seconds)
    assert vtab.run_protocol(config, workdir, worker=(2, 2))['waiting'] == []

  monkeypatch.setattr(vtab, '_sleep', worker_2_meanwhile)
  last = vtab.run_protocol(config, workdir, worker=(1, 2), wait=True, poll_seconds=7)
  assert slept == [7] and last['waiting'] == []
  assert _comparable(last['summary']) == _comparable(reference)


def test_worker_shares_are_disjoint_and_cover_every_run():
  config = quick_vtab_config('source=tfds')
  sel, fin = vtab.plan(config, '/w', list(NATURAL + SPECIALIZED + STRUCTURED), 'grid')
  assert len(sel) == 19 * len(GRID) and len(fin) == 19
  for n in (1, 2, 3, 7):
    shares = [vtab.share(sel, (i, n)) + vtab.share(fin, (i, n)) for i in range(1, n + 1)]
    flat = [r.workdir for s in shares for r in s]
    assert sorted(flat) == sorted(r.workdir for r in sel + fin)  # Each run once.


# ----------------------------------------------------------------------------
# Small parts: the tie rule, folder names, the paper's numbers.
# ----------------------------------------------------------------------------

def test_choice_takes_the_best_and_a_tie_goes_to_the_smallest_lr():
  assert vtab.choose({1e-3: 0.5, 3e-4: 0.7, 1e-5: 0.6}) == 3e-4
  assert vtab.choose({3e-3: 0.7, 1e-4: 0.7, 1e-3: 0.7}) == 1e-4
  assert vtab.choose({3e-5: 0.2}) == 3e-5


def test_lr_folder_names_are_short_and_exact():
  names = [vtab.format_lr(v) for v in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 2.5e-3)]
  assert names == ['1e-5', '3e-5', '1e-4', '3e-4', '1e-3', '3e-3', '2.5e-3']
  assert [float(n) for n in names] == [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 2.5e-3]


@pytest.mark.parametrize('setting,arg,paper', [
    # docs/algorithm.md §7, VTAB-1k means over the 19 tasks.
    ('vitb_high', '', 72.06), ('vitb_high', 'method=tome', 70.43),
    ('vitb_low', '', 74.69), ('vitl_mae_low', 'method=tome', 74.97),
    ('vitl_mae_high', '', 70.33), ('deitb_low', 'method=peft', 73.76),
    ('vits_peft', '', 71.85), ('vitl_high', 'method=tome', None), ('demo', '', None),
])
def test_paper_number_per_setting(setting, arg, paper):
  import importlib  # pylint: disable=g-import-not-at-top
  from pyra_jax import checkpointing  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'pyra_jax.configs.{setting}').get_config(arg)
  key = vtab._paper_key(checkpointing.config_to_dict(config))  # pylint: disable=protected-access
  assert vtab.PAPER_MEANS.get(key) == paper


def test_mae_grid_is_the_papers_lower_range():
  from pyra_jax.configs import vitl_mae_high, vitb_high  # pylint: disable=g-import-not-at-top
  assert tuple(vitl_mae_high.get_config().vtab.pyra_lr_grid) == (1e-6, 3e-6, 1e-5, 3e-5)
  assert tuple(vitb_high.get_config().vtab.pyra_lr_grid) == (
      1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


# ----------------------------------------------------------------------------
# Bad input through the command line: one sentence, no traceback.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize('args,message', [
    (['--tasks=dtd,nosuch'], "Unknown task 'nosuch' in --tasks"),
    (['--tasks=dtd,dtd'], 'more than once'),
    (['--worker=3/2'], '1 <= i <= n'),
    (['--worker=two'], 'use i/n'),
    (['--config.vtab.pyra_lr_grid=()'], 'pyra_lr_grid is empty'),
    (['--config.vtab.pyra_lr_grid=(1e-3,-1)'], 'must be a positive learning rate'),
    (['--config.vtab.pyra_lr_grd=(1e-3,)'], "Did you mean 'pyra_lr_grid'"),
    (['--select=best'], 'grid|none'),
    (['--tasks=folder:x'], 'needs data.source=folder'),
])
def test_bad_command_lines_fail_with_one_sentence(args, message, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.vtab', '--config=configs/tiny.py:source=tfds',
       f'--workdir={tmp_path}', *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_task_names_agree_with_the_data_registry():
  from pyra_jax.data import tasks  # pylint: disable=g-import-not-at-top
  assert sorted(vtab.VTAB_TASKS) == sorted(tasks.TASKS)
  assert set(vtab.FOLDER_EXTRA_TASKS) == set(tasks.EXTRA_TASKS) - {'mnist'}
  assert vtab.CUSTOM_PREFIX == tasks.CUSTOM_PREFIX
  assert vtab._PLAIN_NAME.pattern == tasks._PLAIN_NAME.pattern  # pylint: disable=protected-access


def _fake_run(path, accuracy, pyra_lr, *, max_accuracy=None, backbone='vitb'):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'results.json'), 'w') as f:
    json.dump({'final_accuracy': accuracy,
               'max_accuracy_paper_protocol': max_accuracy or accuracy,
               'num_test_images': 100, 'wall_time_s': 10.0,
               'train_images_per_sec': 5.0, 'eval_split': 'test',
               'trainable_params': {'trainable_percent_of_backbone': 0.5,
                                    'lora_generators_percent_of_backbone': 0.4},
               'config': {'pyra_lr': pyra_lr, 'lr': 1e-3,
                          'model': {'method': 'pyra', 'schedule': 'vitb_high'},
                          'vtab': {'backbone': backbone}}}, f)


def test_summary_from_workdirs_alone(tmp_path):
  """Group means, partial groups and the paper's number, on hand-made results."""
  rng = np.random.default_rng(0)
  acc = {t: float(rng.uniform(0.2, 0.9)) for t in NATURAL + SPECIALIZED + STRUCTURED}
  for t in sorted(acc, reverse=True):  # Written in another order than the paper's.
    _fake_run(tmp_path / t / 'final', acc[t], 3e-4, max_accuracy=acc[t] + 0.01)
    _fake_run(tmp_path / t / 'select' / 'pyra_lr=3e-4', 0.5, 3e-4)
  s = vtab.summarize(str(tmp_path))
  assert [r['task'] for r in s['tasks']] == list(NATURAL + SPECIALIZED + STRUCTURED)
  for group, members in (('Natural', NATURAL), ('Specialized', SPECIALIZED),
                         ('Structured', STRUCTURED)):
    want = sum(acc[t] for t in members) / len(members)
    assert s['groups'][group]['mean'] == pytest.approx(want, abs=1e-12)
  assert s['vtab_mean']['mean'] == pytest.approx(sum(acc.values()) / 19, abs=1e-12)
  assert s['vtab_mean']['paper'] == 72.06  # ViT-B/16 PYRA high, docs/algorithm.md §7.
  row = s['tasks'][0]
  assert row['max_accuracy_paper_protocol'] == pytest.approx(acc['caltech101'] + 0.01)
  assert row['select_wall_time_s'] == 10.0 and row['final_wall_time_s'] == 10.0
  # One task fewer: its group and the 19-task mean become partial.
  os.remove(tmp_path / 'dmlab' / 'final' / 'results.json')
  s = vtab.summarize(str(tmp_path))
  assert s['groups']['Structured'] == {'tasks_done': 7, 'tasks': 8, 'mean': None}
  assert s['groups']['Natural']['mean'] is not None
  assert s['vtab_mean']['mean'] is None
  md = vtab.to_markdown(s)
  assert '| Structured (8) | partial (7/8 tasks) | – |' in md
  assert '| VTAB-1k, 19 tasks | partial (18/19 tasks) | 72.06 |' in md
  assert [r['status'] for r in s['tasks'] if r['task'] == 'dmlab'] == ['selecting']
