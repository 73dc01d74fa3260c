"""Data held in Python: numpy arrays or a `tf.data.Dataset`, as a `Data`.

`from_arrays` and `from_tf_dataset` return the same `Data` that `get_data`
returns for a configured source, through the same resize, normalisation and
batching (input_pipeline.py), so a model trained or evaluated on them sees
exactly what it would see had the same images come from a folder: training
iterators are infinite, shuffled with the seed and drop the remainder;
evaluation makes one pass with the last batch padded and masked.

Images are uint8 (0..255), or floats in [0, 1] (what
`tf.image.convert_image_dtype` and torchvision's ToTensor give), which are
rounded to uint8 first (round(x * 255)) so that they follow the uint8 path of
every other source; floats outside [0, 1] are refused, since they usually
mean 0..255 floats (Keras's `image_dataset_from_directory` gives those: cast
them to uint8). Grey images, (H, W) or (H, W, 1), are tiled to RGB.
Labels are integer class indices in [0, num_classes).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from pyra_jax.data.tf_import import tf

from pyra_jax.data.errors import DataError
from pyra_jax.data.input_pipeline import Data, build_data, checked_label

_FLOAT_RANGE = 'float images must lie in [0, 1]'


def _class_count(num_classes: int | None, class_names: Sequence[str] | None,
                 max_label: int | None, what: str) -> int:
  """num_classes, else len(class_names), else max_label + 1; checked."""
  if class_names is not None and num_classes is not None and (
      len(class_names) != num_classes):
    raise DataError(f'{what}: num_classes = {num_classes} but {len(class_names)} '
                    'class_names: give one name per class.')
  if num_classes is None and class_names is not None:
    num_classes = len(class_names)
  if num_classes is None:
    if max_label is None:
      raise DataError(f'{what}: pass num_classes (the labels are not scanned).')
    num_classes = max_label + 1
  if int(num_classes) < 1:
    raise DataError(f'{what}: num_classes = {num_classes}; use 1 or more.')
  return int(num_classes)


def from_arrays(images: Any, labels: Any, *, batch_size: int, image_size: int,
                train: bool, seed: int = 0, normalization: str = 'imagenet',
                num_classes: int | None = None,
                class_names: Sequence[str] | None = None,
                shuffle_buffer: int = 1000, num_parallel_calls: int = -1,
                name: str = 'arrays') -> Data:
  """A `Data` over in-memory images and labels.

  Args:
    images: (N, H, W, 3) uint8 or float in [0, 1]; (N, H, W) or (N, H, W, 1)
      grey images are tiled to RGB.
    labels: (N,) integer class indices.
    batch_size: examples per batch (padded batches too, when evaluating).
    image_size: output height and width (bicubic resize, as every source).
    train: infinite, shuffled, drop_remainder iterator; else one padded pass.
    seed: the training shuffle's seed.
    normalization: 'imagenet' mean/std or 'inception' ([-1, 1]).
    num_classes: the head's class count; default len(class_names), else
      max(labels) + 1. Pass it for an evaluation split that may lack the
      highest class, so that it agrees with the training split.
    class_names: the name of each class (kept as `Data.class_names`).
    shuffle_buffer: training shuffle buffer (config.data.shuffle_buffer).
    num_parallel_calls: tf.data parallelism, -1 for AUTOTUNE.
    name: the task name shown in errors and kept as `Data.task`.

  Returns:
    A `Data` with split 'train' or 'eval'.
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  what = f'from_arrays ({name})'
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f'{what}: images have shape {images.shape}; give (N, H, W, 3) '
                    'RGB or (N, H, W) / (N, H, W, 1) grey images.')
  if images.dtype == np.uint8:
    pass
  elif np.issubdtype(images.dtype, np.floating):
    if images.size and not (np.isfinite(images).all() and images.min() >= 0.0
                            and images.max() <= 1.0):
      raise DataError(
          f'{what}: {_FLOAT_RANGE}, these span [{np.nanmin(images)}, '
          f'{np.nanmax(images)}]: pass uint8 images (e.g. images.astype('
          'np.uint8) for 0..255 floats), or divide by 255.')
    images = np.round(images.astype(np.float64) * 255.0).astype(np.uint8)
  else:
    raise DataError(f'{what}: images are {images.dtype}; give uint8 (0..255) '
                    'or float (0..1) images.')
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataError(f'{what}: labels have shape {labels.shape}; give one '
                    f'integer label per image ({len(images)},).')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{what}: labels are {labels.dtype}; give integer class '
                    'indices (not one-hot vectors or names).')
  if not len(labels):
    raise DataError(f'{what}: no images.')
  num_classes = _class_count(num_classes, class_names, int(labels.max()), what)
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    i = int(np.argmax(bad))
    raise DataError(f'{what}: label {int(labels[i])} of image {i} is outside '
                    f'[0, {num_classes}): labels are class indices counted from 0.')
  ds = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels.astype(np.int32)})
  return build_data(ds, len(labels), num_classes=num_classes,
                    batch_size=batch_size, image_size=image_size, train=train,
                    seed=seed, task=name, split='train' if train else 'eval',
                    normalization=normalization, shuffle_buffer=shuffle_buffer,
                    num_parallel_calls=num_parallel_calls,
                    class_names=class_names)


def from_tf_dataset(ds: tf.data.Dataset, *, num_classes: int, batch_size: int,
                    image_size: int, train: bool, seed: int = 0,
                    num_examples: int | None = None,
                    normalization: str = 'imagenet',
                    class_names: Sequence[str] | None = None,
                    shuffle_buffer: int = 1000, num_parallel_calls: int = -1,
                    name: str = 'tf.data') -> Data:
  """A `Data` over a finite, unbatched `tf.data.Dataset`.

  Args:
    ds: elements (image, label) or {'image': ..., 'label': ...} (other keys
      ignored); images (H, W, 3) uint8 or float in [0, 1], or grey (H, W) /
      (H, W, 1); labels integer scalars. Each iteration of the `Data` reads
      `ds` afresh, so it must give the same elements in the same order each
      time (do not shuffle it; the `Data` shuffles with `seed`).
    num_classes: labels lie in [0, num_classes); checked while reading.
    batch_size, image_size, train, seed, normalization, class_names,
      shuffle_buffer, num_parallel_calls, name: as in `from_arrays`.
    num_examples: how many elements `ds` holds; default its cardinality, or,
      when that is unknown (after a filter, say), one counting pass over it.

  Returns:
    A `Data` with split 'train' or 'eval'.
  """
  what = f'from_tf_dataset ({name})'
  if not isinstance(ds, tf.data.Dataset):
    raise DataError(f'{what}: expected a tf.data.Dataset, got '
                    f'{type(ds).__name__}.')
  spec = ds.element_spec
  if isinstance(spec, dict) and 'image' in spec and 'label' in spec:
    image_spec, label_spec = spec['image'], spec['label']
  elif isinstance(spec, tuple) and len(spec) == 2:
    image_spec, label_spec = spec
  else:
    raise DataError(f'{what}: elements are {spec}; give (image, label) pairs '
                    "or {'image': ..., 'label': ...} dicts.")
  if not isinstance(image_spec, tf.TensorSpec) or not isinstance(
      label_spec, tf.TensorSpec):
    raise DataError(f'{what}: image and label must be tensors, got '
                    f'{image_spec} and {label_spec}.')
  rank, channels = image_spec.shape.rank, None
  if rank == 3:
    channels = image_spec.shape[-1]
  if rank == 4:
    raise DataError(f'{what}: images have shape {image_spec.shape}, a batch: '
                    'give single images (ds.unbatch()).')
  if rank not in (2, 3) or channels not in (None, 1, 3):
    raise DataError(f'{what}: images have shape {image_spec.shape}; give '
                    '(H, W, 3) RGB or (H, W) / (H, W, 1) grey images.')
  image_dtype = image_spec.dtype
  if image_dtype != tf.uint8 and not image_dtype.is_floating:
    raise DataError(f'{what}: images are {image_dtype.name}; give uint8 '
                    '(0..255) or float (0..1) images.')
  if not label_spec.dtype.is_integer or label_spec.shape.rank != 0:
    raise DataError(f'{what}: labels are {label_spec.dtype.name} of shape '
                    f'{label_spec.shape}; give integer class indices (scalars, '
                    'not one-hot vectors).')
  num_classes = _class_count(num_classes, class_names, None, what)
  cardinality = int(ds.cardinality())
  if cardinality == int(tf.data.INFINITE_CARDINALITY):
    raise DataError(f'{what}: the dataset is infinite (a .repeat()?): give one '
                    'pass; the training Data repeats it itself.')
  if num_examples is None:
    if cardinality >= 0:
      num_examples = cardinality
    else:  # Unknown: count once.
      num_examples = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  elif cardinality >= 0 and cardinality != num_examples:
    raise DataError(f'{what}: num_examples = {num_examples} but the dataset '
                    f'holds {cardinality}.')

  if isinstance(spec, tuple):  # tf.data passes a tuple's parts as arguments.
    ds = ds.map(lambda image, label: {'image': image, 'label': label})

  def to_example(element):
    image, label = element['image'], element['label']
    if image.dtype != tf.uint8:
      image = tf.cast(image, tf.float32)
      checks = [tf.debugging.assert_greater_equal(
                    image, 0.0, message=f'{what}: {_FLOAT_RANGE}'),
                tf.debugging.assert_less_equal(
                    image, 1.0, message=f'{what}: {_FLOAT_RANGE}')]
      with tf.control_dependencies(checks):
        image = tf.cast(tf.round(image * 255.0), tf.uint8)
    if image.shape.rank == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = tf.tile(image, [1, 1, 3])
    image = tf.ensure_shape(image, [None, None, 3])
    return {'image': image, 'label': checked_label(label, num_classes, name)}

  return build_data(ds, num_examples, num_classes=num_classes,
                    batch_size=batch_size, image_size=image_size, train=train,
                    seed=seed, task=name, split='train' if train else 'eval',
                    normalization=normalization, shuffle_buffer=shuffle_buffer,
                    num_parallel_calls=num_parallel_calls,
                    to_example=to_example, class_names=class_names)
