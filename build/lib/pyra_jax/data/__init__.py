"""VTAB-1k data: the task registry and tf.data pipelines (TFDS, folder, MNIST).

TensorFlow is imported only inside this package; the rest of pyra_jax sees
numpy batches. Entry point: `get_data(config.data, split, batch_size, *,
image_size, train, seed) -> Data` (docs/architecture.md, "Data batches").
"""

from pyra_jax.data.errors import DataError
from pyra_jax.data.input_pipeline import Data, get_data
from pyra_jax.data.tasks import EXTRA_TASKS, SPLITS, TASKS, Task, get_task

__all__ = ['Data', 'DataError', 'EXTRA_TASKS', 'SPLITS', 'TASKS', 'Task',
           'get_data', 'get_task']
