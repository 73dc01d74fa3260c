"""tf.data input pipelines: VTAB-1k from TFDS, the VTAB-1k folder, offline MNIST.

Every source yields examples {'image': uint8 (H, W, 3), 'label': int}; the same
preprocessing then follows (the recipe of docs/algorithm.md §4, no augmentation):

  1. resize to image_size x image_size, bicubic, no crop, aspect ratio not kept;
     `antialias=True`, so downscaling filters like PIL's bicubic resize that
     the authors' torchvision pipeline uses (upscaling is unaffected), and the
     result is rounded to uint8 as PIL's is;
  2. (training) cache the resized uint8 images in memory (VTAB-1k train splits
     hold <= 1,000 images), shuffle with the seed, repeat forever, batch with
     drop_remainder;
  3. cast to float32 and normalise: 'imagenet' mean/std (default) or
     'inception' ([-1, 1]);
  4. (evaluation) one pass; the last batch is padded to batch_size with zero
     images, label 0 and mask=False, so every image counts exactly once.

Batches reach JAX as numpy dicts {'image': float32 (B, H, W, 3), 'label':
int32 (B,), 'mask': bool (B,)} (docs/architecture.md, "Data batches").

Determinism: tf.data runs with `deterministic=True` and the shuffle is seeded,
so the same seed gives the same batches, and each epoch is reshuffled
differently but reproducibly. A seeded tf.data shuffle continues its random
stream when a second iterator is opened on the same dataset object, so every
`iter(data)` builds the tf.data pipeline afresh (the checked source is reused):
each iteration restarts exactly the same batch sequence.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF's first import.

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from pyra_jax.data import folder  # pylint: disable=g-import-not-at-top
from pyra_jax.data import mnist
from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import Task, check_custom_split, check_split
from pyra_jax.data.tasks import custom_folder_name, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ('tfds', 'folder', 'mnist')
# Training splits whose resized uint8 images fit in this many bytes are cached.
MAX_CACHE_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
  """A batched split. Iterating yields numpy batch dicts.

  Attributes:
    make_dataset: builds the batched tf.data pipeline (a fresh one per call).
    num_examples: real images in the split (padding excluded).
    num_classes: the task's number of classes.
    steps_per_epoch: num_examples // batch_size when training (drop_remainder),
      ceil(num_examples / batch_size) for evaluation (= batches per pass).
    batch_size, image_size, train, task, split: as requested.
    locate_failure: for sources whose pipeline errors do not say which file
      failed (an image that decodes badly), finds it and returns a sentence
      naming it; None if not found or the source has none.
  """
  make_dataset: Callable[[], tf.data.Dataset] = dataclasses.field(repr=False)
  num_examples: int
  num_classes: int
  steps_per_epoch: int
  batch_size: int
  image_size: int
  train: bool
  task: str
  split: str
  locate_failure: Callable[[], str | None] | None = dataclasses.field(
      default=None, repr=False)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """A fresh pass: infinite when training, one epoch when evaluating.

    Each call restarts from the beginning on a freshly built pipeline, so two
    iterations of the same Data give identical batches.
    """
    it = self.make_dataset().as_numpy_iterator()
    while True:
      try:
        batch = next(it)
      except StopIteration:
        return
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
              tf.errors.PermissionDeniedError,
              tf.errors.FailedPreconditionError) as e:
        # Undecodable, vanished or unreadable images and the label range check.
        located = self.locate_failure() if self.locate_failure else None
        raise DataError(located or f'Reading task {self.task!r} split '
                        f'{self.split!r} failed: {e.message.strip()}') from e
      yield batch


def _field(config: Any, name: str, default: Any) -> Any:
  """config[name] for a ConfigDict or a plain dict, `default` if absent."""
  try:
    return config[name]
  except (KeyError, AttributeError, TypeError):
    return default


def get_data(data_config: Any, split: str, batch_size: int, *,
             image_size: int, train: bool, seed: int) -> Data:
  """Builds the input pipeline of one split.

  Args:
    data_config: `config.data` (configs/common.py): source, task, data_dir,
      normalization, shuffle_buffer, num_parallel_calls.
    split: a VTAB-1k split name: 'train800', 'val200', 'train800val200' or
      'test'; for a task 'folder:NAME' (a dataset of one's own), the name of
      any of its split files without '.txt'.
    batch_size: examples per batch (padded batches too, when evaluating).
    image_size: output height and width.
    train: infinite, shuffled, drop_remainder iterator; else one padded pass.
    seed: shuffle seed (training only).

  Returns:
    A `Data`.

  Raises:
    DataError: a missing or unprepared dataset, a malformed folder, bad config.
  """
  source = _field(data_config, 'source', 'tfds')
  task_name = _field(data_config, 'task', '')
  custom_name = custom_folder_name(task_name)
  data_dir = _field(data_config, 'data_dir', '') or ''
  npc = int(_field(data_config, 'num_parallel_calls', -1))
  npc = tf.data.AUTOTUNE if npc < 0 else max(npc, 1)
  if custom_name is None:
    check_split(split)
  else:
    check_custom_split(task_name, split)
    if source != 'folder':
      raise DataError(f'Task {task_name!r} is a folder of your own: set '
                      f"data.source='folder' (got {source!r}).")
  if source == 'folder' and not data_dir:
    raise DataError(
        "config.data.data_dir is not set: with data.source='folder' it is the "
        'VTAB-1k root that holds <task>/train800.txt, <task>/test.txt, ... '
        '(e.g. source=folder,data_dir=/data/vtab-1k).')
  try:
    task = (get_task(task_name) if custom_name is None
            else folder.custom_task(data_dir, custom_name))
  except PermissionError as e:  # A folder on the way one may not enter.
    raise DataError(folder.unreadable_message(e.filename, 'The folder or file')
                    ) from None
  if batch_size <= 0 or image_size <= 0:
    raise DataError(f'batch_size ({batch_size}) and image_size ({image_size}) '
                    'must be positive.')

  normalise = _normaliser(_field(data_config, 'normalization', 'imagenet'))
  to_example = lambda example: example  # Source example -> image, label.
  locate_failure = None
  if source == 'tfds':
    ds, num_examples, to_example = _tfds_examples(task, split, data_dir or None)
  elif source == 'folder':
    try:
      ds, num_examples, listed = folder.make_dataset(data_dir, task, split, npc)
    except PermissionError as e:  # A folder on the way one may not enter.
      raise DataError(folder.unreadable_message(e.filename, 'The folder or file')
                      ) from None
    locate_failure = lambda: folder.locate_unreadable(listed)
  elif source == 'mnist':
    if task.name != 'mnist':
      raise DataError(f"data.source='mnist' reads the offline MNIST task; set "
                      f"data.task='mnist' (got {task.name!r}).")
    ds, num_examples = mnist.make_dataset(split)
  else:
    raise DataError(f'Unknown data.source {source!r}: use one of '
                    f'{", ".join(SOURCES)}.')
  if num_examples <= 0:
    raise DataError(f'Task {task.name!r} split {split!r} has no examples.')

  def resize(example):
    example = to_example(example)
    return {'image': resize_image(example['image'], image_size),
            'label': example['label']}

  if train and num_examples < batch_size:
    raise DataError(f'Task {task.name!r} split {split!r} has {num_examples} '
                    f'examples, fewer than one batch of {batch_size}.')
  cache = num_examples * image_size * image_size * 3 <= MAX_CACHE_BYTES
  buffer = max(1, min(int(_field(data_config, 'shuffle_buffer', 1000)),
                      num_examples))

  def train_finish(batch):
    return {'image': normalise(batch['image']), 'label': batch['label'],
            'mask': tf.ones([batch_size], tf.bool)}

  def eval_finish(batch):
    return _pad_batch({'image': normalise(batch['image']),
                       'label': batch['label']}, batch_size)

  # Training iterators are infinite and dropped mid-stream; with tf.data's
  # autotuner on, dropping one waits (seconds, intermittently) for its sleeping
  # autotune thread. So training runs without the autotuner, at a fixed
  # parallelism of one call per core and a prefetch of two batches.
  train_npc = (os.cpu_count() or 1) if npc == tf.data.AUTOTUNE else npc

  def make_dataset() -> tf.data.Dataset:
    out = ds.map(resize, num_parallel_calls=train_npc if train else npc)
    if train:
      if cache:
        out = out.cache()
      out = out.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
      out = out.repeat().batch(batch_size, drop_remainder=True)
      out = out.map(train_finish, num_parallel_calls=train_npc)
    else:
      out = out.batch(batch_size).map(eval_finish, num_parallel_calls=npc)
    options = tf.data.Options()
    options.deterministic = True
    if train:
      options.autotune.enabled = False
      return out.prefetch(2).with_options(options)
    return out.prefetch(tf.data.AUTOTUNE).with_options(options)

  if train:
    steps = num_examples // batch_size
  else:
    steps = math.ceil(num_examples / batch_size)
  return Data(make_dataset=make_dataset, num_examples=num_examples,
              num_classes=task.num_classes, steps_per_epoch=steps,
              batch_size=batch_size, image_size=image_size, train=train,
              task=task.name, split=split, locate_failure=locate_failure)


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize to (size, size, 3), no crop; uint8 out (see module doc)."""
  image = tf.image.resize(image, [size, size], method='bicubic',
                          antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _normaliser(kind: str):
  """uint8 images -> float32, normalised."""
  if kind == 'imagenet':
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0
    return lambda x: (tf.cast(x, tf.float32) - mean) / std
  if kind == 'inception':
    return lambda x: tf.cast(x, tf.float32) / 127.5 - 1.0
  raise DataError(f"Unknown data.normalization {kind!r}: use 'imagenet' or "
                  "'inception'.")


def _pad_batch(batch: dict[str, tf.Tensor],
               batch_size: int) -> dict[str, tf.Tensor]:
  """Pads a possibly short batch to batch_size; padded rows get mask=False."""
  n = tf.shape(batch['label'])[0]
  pad = batch_size - n

  def pad_rows(x):
    widths = [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, widths)  # Zeros: zero images, label 0.

  out = {k: pad_rows(v) for k, v in batch.items()}
  out['mask'] = tf.range(batch_size) < n
  out['image'].set_shape([batch_size, *batch['image'].shape[1:]])
  out['label'].set_shape([batch_size])
  return out


# --- TFDS. -----------------------------------------------------------------

def _tfds_examples(task: Task, split: str, data_dir: str | None):
  """(TFDS examples, their number, fn -> {'image': uint8, 'label': int32})."""
  builder, ds = _tfds_load(task, task.tfds_split(split), data_dir)
  num_examples = int(ds.cardinality())
  if num_examples < 0:  # Unknown cardinality: ask the dataset info.
    num_examples = builder.info.splits[task.tfds_split(split)].num_examples

  def to_example(example):
    label = tf.cast(task.label_fn(example), tf.int32)
    where = f'task {task.name}: label outside [0, {task.num_classes})'
    checks = [tf.debugging.assert_non_negative(label, message=where),
              tf.debugging.assert_less(label, task.num_classes, message=where)]
    with tf.control_dependencies(checks):
      label = tf.identity(label)
    return {'image': task.image_fn(example), 'label': label}

  return ds, num_examples, to_example


def _tfds_load(task: Task, tfds_split: str, data_dir: str | None):
  """(builder, dataset) for the first prepared version of the task's dataset."""
  if task.tfds_name is None:
    raise DataError(f"Task {task.name!r} has no TFDS source: use "
                    f"data.source='folder' (or 'mnist').")
  failures, unprepared = [], None
  for spec in task.tfds_specs:
    try:
      builder = tfds.builder(spec, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f'{spec}: {e}')  # E.g. a version this TFDS can't build.
      continue
    try:
      ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
    except AssertionError as e:
      if 'could not find data' not in str(e):
        raise DataError(f'TFDS {spec} split {tfds_split!r}: {e}') from e
      unprepared = unprepared or (spec, builder)
      continue
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'TFDS {spec} split {tfds_split!r}: {e}') from e
    return builder, ds
  if unprepared is not None:
    raise DataError(prepare_message(task, *unprepared))
  raise DataError(f'TFDS cannot load task {task.name!r}: '
                  + '; '.join(failures))


def prepare_message(task: Task, spec: str, builder: Any) -> str:
  """What to run to prepare an unprepared TFDS dataset (and manual steps)."""
  root = str(builder.data_dir_root)
  msg = (f'TFDS dataset {spec} (task {task.name}) is not prepared in {root}. '
         f'Prepare it once with: python -c "import tensorflow_datasets as '
         f"tfds; tfds.builder('{spec}', data_dir='{root}')"
         f'.download_and_prepare()" (or: tfds build {task.tfds_name} '
         f'--data_dir={root}).')
  if task.manual_download:
    how = ' '.join(str(getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '')
                       ).split())  # TFDS's own instructions, on one line.
    msg += (f' {task.tfds_name} cannot be downloaded automatically: first '
            f'put its original files in {root}/downloads/manual/ (the '
            f'manual_dir). TFDS says: {how}')
  return msg
