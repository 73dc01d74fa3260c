"""tf.data input pipelines: VTAB-1k from TFDS, the VTAB-1k folder, offline MNIST,
any TFDS dataset, class-per-folder image trees (and, through `memory.py`,
in-memory arrays and tf.data datasets).

Sources (`config.data.source`, configs/common.py):
  * 'tfds': a VTAB-1k task from TFDS, or any TFDS dataset as the task
    'tfds:<name>[:<version>]' with TFDS split strings as splits
    (data.train_split='train[:800]', data.eval_split='test'), its image and
    label features data.image_key / data.label_key, its classes the label
    feature's (a ClassLabel);
  * 'folder': the VTAB-1k split-file folder, or one's own as 'folder:NAME'
    (folder.py);
  * 'imagefolder': a class-per-folder tree <root>/<split>/<class>/<image>, or
    <root>/<class>/<image> with a seeded held-out part (imagefolder.py);
  * 'mnist': the offline MNIST task (mnist.py).

Every source yields examples {'image': uint8 (H, W, 3), 'label': int}; the same
preprocessing then follows (the recipe of docs/algorithm.md §4, no augmentation;
the optional training augmentation of config.data, e.g. MAE's fine-tuning
recipe, is augment.py's and is described there):

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
from pyra_jax.data.tf_import import tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from pyra_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
from pyra_jax.data import folder  # pylint: disable=g-import-not-at-top
from pyra_jax.data import imagefolder
from pyra_jax.data import mnist
from pyra_jax.data.errors import DataError
from pyra_jax.data.tasks import Task, check_custom_split, check_split
from pyra_jax.data.tasks import custom_folder_name, get_task, plain_label
from pyra_jax.data.tasks import imagefolder_name, tfds_task_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ('tfds', 'folder', 'mnist', 'imagefolder')
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
    class_names: the name of each class (label i is class_names[i]) where the
      source knows them (an image tree's folders, classes.txt, a TFDS
      ClassLabel, names passed in); None where it does not (e.g. the VTAB-1k
      tasks whose labels are computed: clevr_count, dsprites_loc, ...).
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
  class_names: tuple[str, ...] | None = dataclasses.field(default=None,
                                                          repr=False)

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
      normalization, shuffle_buffer, num_parallel_calls; image_key and
      label_key (a task 'tfds:NAME'); holdout_fraction and split_seed
      (source 'imagefolder').
    split: a VTAB-1k split name: 'train800', 'val200', 'train800val200' or
      'test'; for a task 'folder:NAME' (a dataset of one's own), the name of
      any of its split files without '.txt'; for a task 'tfds:NAME', a TFDS
      split string ('train[:800]', 'test'); for source 'imagefolder', the name
      of a split folder ('train', 'test'), or 'train' / 'val' with
      data.holdout_fraction set.
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
  data_dir = _field(data_config, 'data_dir', '') or ''
  npc = int(_field(data_config, 'num_parallel_calls', -1))
  npc = tf.data.AUTOTUNE if npc < 0 else max(npc, 1)
  if source == 'imagefolder' or imagefolder_name(task_name) is not None:
    examples = _imagefolder_examples(data_config, source, task_name, split,
                                     data_dir, train, npc)
  elif tfds_task_spec(task_name) is not None:
    if source != 'tfds':
      raise DataError(f'Task {task_name!r} is a TFDS dataset: set '
                      f"data.source='tfds' (got {source!r}).")
    examples = _tfds_name_examples(task_name, split, data_dir or None,
                                   _field(data_config, 'image_key', 'image'),
                                   _field(data_config, 'label_key', 'label'))
  else:
    examples = _registered_examples(data_config, source, task_name, split,
                                    data_dir, batch_size, image_size, npc)
  return build_data(
      examples.ds, examples.num_examples, num_classes=examples.num_classes,
      batch_size=batch_size, image_size=image_size, train=train, seed=seed,
      task=examples.task, split=split,
      normalization=_field(data_config, 'normalization', 'imagenet'),
      shuffle_buffer=int(_field(data_config, 'shuffle_buffer', 1000)),
      num_parallel_calls=int(_field(data_config, 'num_parallel_calls', -1)),
      to_example=examples.to_example, locate_failure=examples.locate_failure,
      class_names=examples.class_names,
      augment=augment_lib.from_config(data_config) if train else None)


@dataclasses.dataclass(frozen=True)
class _Examples:
  """A source's examples before resizing and batching (see `build_data`)."""
  ds: tf.data.Dataset
  num_examples: int
  num_classes: int
  task: str
  to_example: Callable[[Any], dict[str, tf.Tensor]] | None = None
  locate_failure: Callable[[], str | None] | None = None
  class_names: tuple[str, ...] | None = None


def _registered_examples(data_config: Any, source: str, task_name: str,
                         split: str, data_dir: str, batch_size: int,
                         image_size: int, npc: int) -> _Examples:
  """A VTAB-1k (or extra) task, or a split-file folder 'folder:NAME'."""
  custom_name = custom_folder_name(task_name)
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
  _normaliser(_field(data_config, 'normalization', 'imagenet'))  # Checked now.
  to_example = None
  locate_failure = None
  class_names = None
  if source == 'tfds':
    ds, num_examples, to_example, class_names = _tfds_examples(
        task, split, data_dir or None)
  elif source == 'folder':
    try:
      ds, num_examples, listed = folder.make_dataset(data_dir, task, split, npc)
      class_names = folder.class_names(data_dir, task)
    except PermissionError as e:  # A folder on the way one may not enter.
      raise DataError(folder.unreadable_message(e.filename, 'The folder or file')
                      ) from None
    locate_failure = lambda: folder.locate_unreadable(listed)
  elif source == 'mnist':
    if task.name != 'mnist':
      raise DataError(f"data.source='mnist' reads the offline MNIST task; set "
                      f"data.task='mnist' (got {task.name!r}).")
    ds, num_examples = mnist.make_dataset(split)
    class_names = tuple(str(digit) for digit in range(10))
  else:
    raise DataError(f'Unknown data.source {source!r}: use one of '
                    f'{", ".join(SOURCES)}.')
  return _Examples(ds, num_examples, task.num_classes, task.name, to_example,
                   locate_failure, class_names)


def _imagefolder_examples(data_config: Any, source: str, task_name: str,
                          split: str, data_dir: str, train: bool,
                          npc: int) -> _Examples:
  """A class-per-folder tree (imagefolder.py)."""
  if source != 'imagefolder':
    raise DataError(f'Task {task_name!r} is an image tree of your own: set '
                    f"data.source='imagefolder' (got {source!r}).")
  if custom_folder_name(task_name) is not None:
    raise DataError(
        f'Task {task_name!r} is a folder of split files: set '
        "data.source='folder', or for a class-per-folder tree set data.task "
        "to 'imagefolder' or 'imagefolder:NAME'.")
  if tfds_task_spec(task_name) is not None:
    raise DataError(f'Task {task_name!r} is a TFDS dataset: set '
                    f"data.source='tfds' (got {source!r}).")
  try:
    holdout = float(_field(data_config, 'holdout_fraction', 0.0))
    split_seed = int(_field(data_config, 'split_seed', 0))
  except (TypeError, ValueError):
    raise DataError('data.holdout_fraction must be a number and '
                    'data.split_seed an integer.') from None
  try:
    tree = imagefolder.scan(imagefolder.find_root(data_dir, task_name), holdout)
    listed = imagefolder.list_split(tree, split, train=train,
                                    holdout_fraction=holdout,
                                    split_seed=split_seed)
  except PermissionError as e:  # A folder on the way one may not enter.
    raise DataError(folder.unreadable_message(e.filename, 'The folder or file')
                    ) from None
  return _Examples(
      imagefolder.make_dataset(listed, npc), len(listed),
      len(tree.class_names), tree.task,
      locate_failure=lambda: folder.locate_unreadable(
          listed, 'replace the file or remove it'),
      class_names=tree.class_names)


def build_data(ds: tf.data.Dataset, num_examples: int, *, num_classes: int,
               batch_size: int, image_size: int, train: bool, seed: int,
               task: str, split: str, normalization: str = 'imagenet',
               shuffle_buffer: int = 1000, num_parallel_calls: int = -1,
               to_example: Callable[[Any], dict[str, tf.Tensor]] | None = None,
               locate_failure: Callable[[], str | None] | None = None,
               class_names: tuple[str, ...] | None = None,
               augment: augment_lib.Augment | None = None) -> Data:
  """Resizes, batches and normalises a source's examples into a `Data`.

  Every source ends here, so all share the preprocessing and the iteration
  contract of the module docstring.

  Args:
    ds: a finite dataset of examples; with `to_example` None each is
      {'image': uint8 (H, W, 3), 'label': int32}, else `to_example` maps it to
      one (inside tf.data, so plain tf code).
    num_examples: how many examples `ds` holds.
    num_classes: labels lie in [0, num_classes).
    batch_size, image_size, train, seed: as in `get_data`.
    task, split: names shown in errors and kept on the `Data`.
    normalization: 'imagenet' or 'inception'.
    shuffle_buffer: training shuffle buffer (capped at num_examples).
    num_parallel_calls: tf.data parallelism, -1 for AUTOTUNE.
    locate_failure, class_names: kept on the `Data`.
    augment: the training augmentation (`augment.from_config`); None: none.
      Each example's draws come from (seed, its position in the repeated
      stream), so they are the same on every iteration and after a resume.
      With a random resized crop the crop replaces the resize, so the
      original images are cached (when they fit) rather than resized ones.

  Returns:
    A `Data`.
  """
  if batch_size <= 0 or image_size <= 0:
    raise DataError(f'batch_size ({batch_size}) and image_size ({image_size}) '
                    'must be positive.')
  normalise = _normaliser(normalization)
  npc = tf.data.AUTOTUNE if num_parallel_calls < 0 else max(num_parallel_calls, 1)
  if num_examples <= 0:
    raise DataError(f'Task {task!r} split {split!r} has no examples.')

  def resize(example):
    if to_example is not None:
      example = to_example(example)
    return {'image': resize_image(example['image'], image_size),
            'label': example['label']}

  def decode(example):  # A random resized crop reads the original image.
    if to_example is not None:
      example = to_example(example)
    return {'image': example['image'], 'label': example['label']}

  def augmented(index, example):
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])
    image = augment.uint8_ops(example['image'], image_size, key)
    image = augment.float_ops(normalise(image), key)
    image.set_shape([image_size, image_size, 3])
    return {'image': image, 'label': example['label']}

  if train and num_examples < batch_size:
    raise DataError(f'Task {task!r} split {split!r} has {num_examples} '
                    f'examples, fewer than one batch of {batch_size}.')
  cache = num_examples * image_size * image_size * 3 <= MAX_CACHE_BYTES
  buffer = max(1, min(int(shuffle_buffer), num_examples))

  def train_finish(batch):
    image = batch['image'] if augment is not None else normalise(batch['image'])
    return {'image': image, 'label': batch['label'],
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
    crops = augment is not None and augment.crops
    out = ds.map(decode if crops else resize,
                 num_parallel_calls=train_npc if train else npc)
    if train:
      if cache:
        out = out.cache()
      out = out.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
      out = out.repeat()
      if augment is not None:
        out = out.enumerate().map(augmented, num_parallel_calls=train_npc)
      out = out.batch(batch_size, drop_remainder=True)
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
              num_classes=num_classes, steps_per_epoch=steps,
              batch_size=batch_size, image_size=image_size, train=train,
              task=task, split=split, locate_failure=locate_failure,
              class_names=None if class_names is None else tuple(class_names))


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
  """(TFDS examples, their number, fn -> {'image': uint8, 'label': int32},
  class names or None)."""
  builder, ds = _tfds_load(task, task.tfds_split(split), data_dir)
  num_examples = int(ds.cardinality())
  if num_examples < 0:  # Unknown cardinality: ask the dataset info.
    num_examples = builder.info.splits[task.tfds_split(split)].num_examples

  def to_example(example):
    return {'image': task.image_fn(example),
            'label': checked_label(task.label_fn(example), task.num_classes,
                                   task.name)}

  class_names = None
  if task.label_fn is plain_label:  # Else the labels are computed, unnamed.
    feature = _feature(builder, 'label')
    if (isinstance(feature, tfds.features.ClassLabel)
        and feature.num_classes == task.num_classes):
      class_names = tuple(feature.names)
  return ds, num_examples, to_example, class_names


def checked_label(label: tf.Tensor, num_classes: int, task: str) -> tf.Tensor:
  """int32 `label`, failing the pipeline if outside [0, num_classes)."""
  label = tf.cast(label, tf.int32)
  where = f'task {task}: label outside [0, {num_classes})'
  checks = [tf.debugging.assert_non_negative(label, message=where),
            tf.debugging.assert_less(label, num_classes, message=where)]
  with tf.control_dependencies(checks):
    return tf.identity(label)


def _feature(builder: Any, key: str) -> Any:
  """The builder's feature `key`, None if it has none."""
  features = builder.info.features
  try:
    return features[key] if key in features.keys() else None
  except (AttributeError, TypeError):
    return None


def _one_line(error: BaseException, limit: int = 300) -> str:
  """An exception's text on one line, cut to `limit` characters."""
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _tfds_name_examples(task_name: str, split: str, data_dir: str | None,
                        image_key: str, label_key: str) -> _Examples:
  """Any TFDS dataset, as the task 'tfds:<name>[:<version>]'.

  The split is a TFDS split string; the image is the Image feature
  `image_key` (grey tiled to RGB, an alpha channel dropped), the label the
  ClassLabel feature `label_key`, whose class count and names are the task's.
  """
  name, version = tfds_task_spec(task_name)
  spec = f'{name}:{version}' if version else name
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DataError(
        f'TFDS has no dataset {name.split("/")[0]!r} (task {task_name!r}): '
        'check the name in the TFDS catalog '
        '(https://www.tensorflow.org/datasets/catalog/overview), e.g. '
        'tfds:oxford_flowers102, or tfds:eurosat/rgb for a config.') from None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'TFDS cannot build {spec} (task {task_name!r}): '
                    f'{_one_line(e)}') from None
  keys = ', '.join(builder.info.features.keys())
  image = _feature(builder, image_key)
  channels = image.shape[-1] if isinstance(image, tfds.features.Image) else None
  if (not isinstance(image, tfds.features.Image) or len(image.shape) != 3
      or channels not in (1, 3, 4) or image.np_dtype != np.uint8):
    if image is None:
      what = f' has no feature {image_key!r}'
    elif isinstance(image, tfds.features.Image):
      what = (f': feature {image_key!r} is not an 8-bit (H, W, 1|3|4) image '
              f'(shape {image.shape}, {np.dtype(image.np_dtype).name})')
    else:
      what = f': feature {image_key!r} is not an image'
    raise DataError(f'TFDS {spec}{what}: set data.image_key to its image '
                    f'feature (its features: {keys}).')
  label = _feature(builder, label_key)
  if not isinstance(label, tfds.features.ClassLabel):
    what = (f' has no feature {label_key!r}' if label is None
            else f': feature {label_key!r} is not a ClassLabel')
    raise DataError(
        f'TFDS {spec}{what}, so its classes are not known: set '
        f'data.label_key to a ClassLabel feature (its features: {keys}).')
  task = Task(name=task_name, num_classes=label.num_classes, tfds_name=name,
              tfds_versions=(version,) if version else (),
              manual_download=bool(getattr(builder,
                                           'MANUAL_DOWNLOAD_INSTRUCTIONS', None)))
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:
    if 'could not find data' not in str(e):
      raise DataError(f'TFDS {spec} split {split!r}: {_one_line(e)}') from None
    raise DataError(prepare_message(task, spec, builder)) from None
  except Exception as e:  # pylint: disable=broad-except
    splits = ', '.join(builder.info.splits) or 'see its catalog page'
    raise DataError(
        f'TFDS {spec} cannot read split {split!r} ({_one_line(e)}): set '
        'data.train_split / data.eval_split to TFDS split strings of its '
        f"splits ({splits}), e.g. 'train[:800]' or 'test'.") from None
  num_examples = int(ds.cardinality())
  if num_examples < 0:  # Unknown cardinality: ask the dataset info.
    num_examples = builder.info.splits[split].num_examples

  def to_example(example):
    pixels = example[image_key]
    if channels == 1:
      pixels = tf.tile(pixels, [1, 1, 3])
    elif channels == 4:
      pixels = pixels[..., :3]
    return {'image': pixels,
            'label': checked_label(example[label_key], task.num_classes,
                                   task_name)}

  return _Examples(ds, num_examples, task.num_classes, task_name,
                   to_example=to_example, class_names=tuple(label.names))


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
