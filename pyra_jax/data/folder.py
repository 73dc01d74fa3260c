"""The VTAB-1k folder layout that NOAH, VPT and PYRA users hold on disk.

    <root>/<task>/<split>.txt          split in train800, val200, train800val200, test
    <root>/<task>/images/<split>/NNNNNN.jpg

Each line of a split file is `<path> <label>`, the path relative to
`<root>/<task>`. The task directory may carry any of the task's folder names
(`cifar` or `cifar100`, `oxford_iiit_pet` or `oxford_pet`, `kitti`, ...), and
`<root>` may also be the task directory itself.

The whole split file is parsed and checked up front (labels in range, every
image present), so a broken folder fails before training starts, naming the
file and line, rather than an hour in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import SPLITS, Task, check_split


def find_task_dir(root: str | os.PathLike, task: Task) -> Path:
  """`<root>/<folder name>`, or `root` itself if it holds the split files."""
  root = Path(root).expanduser()
  if not str(root) or not root.is_dir():
    raise DataError(
        f'VTAB-1k folder root {str(root)!r} is not a directory: set '
        f'config.data.data_dir to the folder that holds '
        f'{"/ or ".join(task.folder_names)}/.')
  for name in task.folder_names:
    if (root / name).is_dir():
      return root / name
  if any((root / f'{split}.txt').is_file() for split in SPLITS):
    return root  # Pointed at the task directory itself.
  raise DataError(
      f'No folder for task {task.name!r} in {root}: expected one of '
      f'{", ".join(str(root / n) for n in task.folder_names)}.')


def read_split_file(task_dir: Path, split: str,
                    num_classes: int) -> tuple[list[str], np.ndarray]:
  """Parses `<task_dir>/<split>.txt` into absolute paths and int32 labels."""
  check_split(split)
  split_file = task_dir / f'{split}.txt'
  if not split_file.is_file():
    raise DataError(f'Split file {split_file} does not exist.')
  paths, labels = [], []
  with open(split_file, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      parts = line.rsplit(maxsplit=1)  # Paths may contain spaces; labels not.
      where = f'{split_file}, line {line_no}'
      if len(parts) != 2:
        raise DataError(f'{where}: expected "<image path> <label>", '
                        f'got {line!r}.')
      try:
        label = int(parts[1])
      except ValueError:
        raise DataError(f'{where}: label {parts[1]!r} is not an integer.'
                        ) from None
      if not 0 <= label < num_classes:
        raise DataError(f'{where}: label {label} is outside [0, {num_classes})'
                        f' for this task.')
      path = task_dir / parts[0]
      if not path.is_file():
        raise DataError(f'{where}: image {path} does not exist.')
      paths.append(str(path))
      labels.append(label)
  if not paths:
    raise DataError(f'Split file {split_file} lists no images.')
  return paths, np.asarray(labels, np.int32)


def _load_image(path: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, 3); channels=3 turns grey into RGB.

  JPEGs use the accurate integer IDCT, which reproduces PIL's decoding (that
  of the authors' torchvision loader) exactly; TF's default fast IDCT is off
  by up to 4 levels. Other formats (PNG, ...) go through decode_image.
  """
  data = tf.io.read_file(path)
  image = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
  image.set_shape([None, None, 3])
  return image


def make_dataset(root: str | os.PathLike, task: Task, split: str,
                 num_parallel_calls: int) -> tuple[tf.data.Dataset, int]:
  """Examples {'image': uint8 (H, W, 3), 'label': int32} in file order."""
  task_dir = find_task_dir(root, task)
  paths, labels = read_split_file(task_dir, split, task.num_classes)
  ds = tf.data.Dataset.from_tensor_slices((paths, labels))
  ds = ds.map(lambda p, y: {'image': _load_image(p), 'label': y},
              num_parallel_calls=num_parallel_calls)
  return ds, len(paths)
