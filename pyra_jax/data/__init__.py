"""Input data: the VTAB-1k task registry and tf.data pipelines.

TensorFlow is imported only inside this package; the rest of pyra_jax sees
numpy batches. Four ways in, each returning the same `Data` (iterate it for
numpy batch dicts; docs/architecture.md, "Data batches"):

  * `get_data(config.data, split, batch_size, *, image_size, train, seed)`
    for a configured source: a VTAB-1k task from TFDS or its split-file folder
    (`source='tfds'|'folder'`), any TFDS dataset (`task='tfds:NAME'`), a
    class-per-folder image tree (`source='imagefolder'`), offline MNIST;
  * `from_arrays(images, labels, *, batch_size, image_size, train, ...)`;
  * `from_tf_dataset(ds, *, num_classes, batch_size, image_size, train, ...)`.
"""

import importlib
import importlib.util
from typing import Any

from pyra_jax.errors import MissingExtraError

# TensorFlow and TFDS are the `data` extra: a serving install (`pip install
# pyra_jax`) builds, loads and runs models without them, and reading data
# without them ends in one sentence naming the install command. Whether they
# are installed is checked here without importing them: the names below are
# imported on first use, so `pyra_jax.data.tasks` (the task table: names,
# class counts, splits) is read without loading TensorFlow (param_counts).
_EXTRA_MODULES = ('tensorflow', 'tensorflow_datasets')


def _missing_extra() -> str | None:
  for name in _EXTRA_MODULES:
    try:
      if importlib.util.find_spec(name) is None:
        return name
    except (ImportError, ValueError):  # A None entry in sys.modules: blocked.
      return name
  return None


if (_missing := _missing_extra()) is not None:
  raise MissingExtraError(
      f'Reading data (training, evaluation, the VTAB-1k and TFDS tasks) needs '
      f'TensorFlow and TFDS, which are not installed (no module named '
      f"{_missing!r}): install them with pip install 'pyra_jax[data]'.")

# name -> the module that defines it.
_EXPORTS = {
    'DataError': 'pyra_jax.data.errors',
    'Data': 'pyra_jax.data.input_pipeline',
    'SOURCES': 'pyra_jax.data.input_pipeline',
    'get_data': 'pyra_jax.data.input_pipeline',
    'from_arrays': 'pyra_jax.data.memory',
    'from_tf_dataset': 'pyra_jax.data.memory',
    'EXTRA_TASKS': 'pyra_jax.data.tasks',
    'SPLITS': 'pyra_jax.data.tasks',
    'TASKS': 'pyra_jax.data.tasks',
    'Task': 'pyra_jax.data.tasks',
    'get_task': 'pyra_jax.data.tasks',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
