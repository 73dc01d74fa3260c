"""A dataset of one's own: the task 'folder:NAME', any split names, its classes
read from classes.txt or counted from the labels.

Expected class counts and labels are derived here from what the test writes
(plain string handling of the split files), not from the pipeline.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('PIL')  # The split files' images are written with it.
from pyra_jax.data import DataError, get_data  # pylint: disable=g-import-not-at-top
from tests.helpers.data import grey_id_images, image_ids, write_split  # pylint: disable=g-import-not-at-top


def _config(root: Path, name: str = 'shapes', **kw) -> dict:
  return {'source': 'folder', 'task': f'folder:{name}', 'data_dir': str(root), **kw}


def _labels_in(split_file: Path) -> list[int]:
  return [int(line.rsplit(maxsplit=1)[1])
          for line in split_file.read_text().splitlines() if line.strip()]


def test_class_count_comes_from_classes_txt_and_any_split_name_works(tmp_path):
  task_dir = tmp_path / 'shapes'
  labels = [2, 0, 1, 2, 0]
  write_split(task_dir, 'train', grey_id_images(5), labels)
  # Five classes listed (blank lines ignored), only three of them with images.
  (task_dir / 'classes.txt').write_text('circle\nsquare\n\ntriangle\nstar\nhexagon\n')
  data = get_data(_config(tmp_path), 'train', 5, image_size=8, train=False, seed=0)
  assert data.num_classes == 5 and data.num_examples == 5
  assert data.task == 'folder:shapes'
  batch = next(iter(data))
  np.testing.assert_array_equal(batch['label'], _labels_in(task_dir / 'train.txt'))
  np.testing.assert_array_equal(image_ids(batch['image']), np.arange(5))  # File order.
  # data_dir may be the dataset's folder itself.
  data = get_data(_config(task_dir), 'train', 5, image_size=8, train=False, seed=0)
  assert data.num_classes == 5


def test_without_classes_txt_every_split_file_counts(tmp_path):
  task_dir = tmp_path / 'shapes'
  write_split(task_dir, 'train', grey_id_images(4), [0, 1, 1, 0])
  write_split(task_dir, 'holdout', grey_id_images(3), [3, 2, 0])
  want = 1 + max(_labels_in(task_dir / 'train.txt') + _labels_in(task_dir / 'holdout.txt'))
  assert want == 4
  # The train split alone has labels 0..1, yet its head must fit the holdout's.
  for split in ('train', 'holdout'):
    data = get_data(_config(tmp_path), split, 2, image_size=8, train=False, seed=0)
    assert data.num_classes == want, split


@pytest.mark.parametrize('problem,config_kw,message', [
    ('labels_from_one', {}, 'has label 0, yet labels go up to 3: labels are class indices '
     'counted from 0'),
    ('negative', {}, 'train.txt:2: label -1 is negative'),
    ('empty_classes', {}, 'classes.txt lists no classes'),
    ('no_folder', {'task': 'folder:nope'}, 'No folder '),
    ('bad_name', {'task': 'folder:../up'}, "after 'folder:' give the name"),
    ('bad_split', {'split': 'classes'}, "Split 'classes' of task 'folder:shapes'"),
    ('tfds_source', {'source': 'tfds'}, "set data.source='folder'"),
])
def test_errors_say_what_to_do(problem, config_kw, message, tmp_path):
  task_dir = tmp_path / 'shapes'
  labels = {'labels_from_one': [1, 2, 3], 'negative': [0, -1, 1]}.get(problem, [0, 1, 2])
  write_split(task_dir, 'train', grey_id_images(3), labels)
  if problem == 'empty_classes':
    (task_dir / 'classes.txt').write_text('\n\n')
  split = config_kw.pop('split', 'train')
  with pytest.raises(DataError, match=re.escape(message)):
    get_data(_config(tmp_path, **config_kw), split, 1, image_size=8, train=False, seed=0)


def test_registered_task_lookup_explains_folder_tasks():
  from pyra_jax.data import get_task  # pylint: disable=g-import-not-at-top
  with pytest.raises(DataError, match='set --config.model.num_classes'):
    get_task('folder:shapes')


# --- Through the command line ---------------------------------------------------

def _three_class_folder(root: Path) -> Path:
  """40 training and 6 test PNGs of 3 classes, split files train.txt / test.txt."""
  task_dir = root / 'shapes'
  write_split(task_dir, 'train', grey_id_images(40), [i % 3 for i in range(40)])
  write_split(task_dir, 'test', grey_id_images(6), [0, 1, 2, 2, 1, 0])
  return task_dir


def _run(capsys, monkeypatch, root: Path, workdir: Path, *extra: str):
  from tests.helpers.cli import reset_flags, run_main  # pylint: disable=g-import-not-at-top
  code, out, err = run_main(
      capsys, monkeypatch,
      f'--config=configs/tiny.py:source=folder,data_dir={root},task=folder:shapes,'
      'method=peft',  # No merging: compiles faster; merging is not what is tested.
      '--config.data.train_split=train', '--config.data.eval_split=test',
      '--config.num_epochs=1', '--config.warmup_epochs=0', '--config.eval_batch_size=8',
      f'--workdir={workdir}', *extra)
  reset_flags()
  return code, out, err.strip()


def test_cli_trains_on_a_folder_of_ones_own(tmp_path, capsys, monkeypatch):
  _three_class_folder(tmp_path / 'data')
  code, out, err = _run(capsys, monkeypatch, tmp_path / 'data', tmp_path / 'run')
  assert code == 0, err
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['num_test_images'] == 6 and results['steps'] == 1
  assert results['trainable_params']['head'] == 32 * 3 + 3  # A 3-way head on width 32.
  assert 'final accuracy (test, 6 images)' in out


@pytest.mark.parametrize('damage,message', [
    ('no_folder', 'No folder {root}/shapes for task \'folder:shapes\': set '
     'config.data.data_dir'),
    ('bad_label', '{task}/test.txt:4: label 7 is outside [0, 3) for the 3 classes of '
     '{task}/classes.txt.'),
    ('labels_from_one', 'No image listed in {task}/*.txt has label 0, yet labels go up to 3'),
    ('missing_split', 'Split file {task}/train.txt does not exist: create it, or choose '
     'among the splits of {task} (test)'),
])
def test_cli_folder_errors_are_one_sentence(damage, message, tmp_path, capsys,
                                            monkeypatch):
  root = tmp_path / 'data'
  task_dir = _three_class_folder(root)
  if damage == 'no_folder':
    root = tmp_path / 'elsewhere'
    root.mkdir()
  elif damage == 'bad_label':
    (task_dir / 'classes.txt').write_text('dark\nmid\nbright\n')
    lines = (task_dir / 'test.txt').read_text().splitlines()
    lines[3] = lines[3].rsplit(maxsplit=1)[0] + ' 7'
    (task_dir / 'test.txt').write_text('\n'.join(lines) + '\n')
  elif damage == 'labels_from_one':
    for split in ('train', 'test'):
      split_file = task_dir / f'{split}.txt'
      split_file.write_text(''.join(
          f'{path} {int(label) + 1}\n' for path, label in
          (line.rsplit(maxsplit=1) for line in split_file.read_text().splitlines())))
  elif damage == 'missing_split':
    (task_dir / 'train.txt').unlink()
  code, out, err = _run(capsys, monkeypatch, root, tmp_path / 'run')
  assert code == 1 and 'Traceback' not in err and len(err.splitlines()) == 1, err
  assert err.startswith('Error: ')
  assert message.format(root=root, task=task_dir) in err
  assert not (tmp_path / 'run' / 'results.json').exists()
