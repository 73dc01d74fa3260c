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

from pyra_jax.errors import MissingExtraError

# TensorFlow and TFDS are the `data` extra: a serving install (`pip install
# pyra_jax`) builds, loads and runs models without them, and reading data
# without them ends in one sentence naming the install command.
_EXTRA_MODULES = ('tensorflow', 'tensorflow_datasets')

try:
  from pyra_jax.data.errors import DataError
  from pyra_jax.data.input_pipeline import Data, SOURCES, get_data
  from pyra_jax.data.memory import from_arrays, from_tf_dataset
  from pyra_jax.data.tasks import EXTRA_TASKS, SPLITS, TASKS, Task, get_task
except ImportError as e:
  if (e.name or '').partition('.')[0] not in _EXTRA_MODULES:
    raise
  raise MissingExtraError(
      f'Reading data (training, evaluation, the VTAB-1k and TFDS tasks) needs '
      f'TensorFlow and TFDS, which are not installed ({e}): install them with '
      "pip install 'pyra_jax[data]'.") from None

__all__ = ['Data', 'DataError', 'EXTRA_TASKS', 'SOURCES', 'SPLITS', 'TASKS',
           'Task', 'from_arrays', 'from_tf_dataset', 'get_data', 'get_task']
