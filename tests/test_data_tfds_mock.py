"""All 19 VTAB-1k tasks through the TFDS source, on `tfds.testing.mock_data`.

Mock data ignores split slicing (every split yields the same fake examples),
so absolute slices such as dsprites' `train[663552:]` cannot be read for real.
We therefore check (a) that the registry's split strings (checked against the
reference table in test_data_tasks.py) reach `as_dataset` unchanged, and (b) that the pipeline runs on the fake examples:
images of the configured shape, labels equal to an independent numpy
re-implementation of the task's label definition and within range.

The fake examples come from TFDS's own random generator with constant
dynamic shapes (10x10 images, 10 objects per scene), through mock_data's
documented `as_dataset_fn` hook; the default generator draws 5..50 objects
per CLEVR scene, which would put clevr_count (3..10 objects) out of range.
"""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from pyra_jax.data import TASKS, DataError, get_data  # pylint: disable=g-import-not-at-top
from tests.helpers.data import fake_tfds_examples  # pylint: disable=g-import-not-at-top

NUM_FAKE = 6
IMAGE_SIZE = 32
BATCH = 4


def _fake_examples(features):
  return fake_tfds_examples(features, num_examples=NUM_FAKE)


def _numpy_label(task_name, ex):
  """The label definitions of docs/algorithm.md §5, in numpy, written independently."""
  if task_name == 'clevr_count':
    return len(ex['objects']['size']) - 3
  if task_name == 'clevr_dist':
    d = ex['objects']['pixel_coords'][:, 2].min()
    thr = [0, 8, 8.5, 9, 9.5, 10, 100]
    return max(i for i, t in enumerate(thr) if t < d)
  if task_name == 'kitti_dist':
    z = [loc[2] for t, loc in zip(ex['objects']['type'],
                                  ex['objects']['location']) if t < 3]
    d = min(z + [1000.0])
    thr = [-100, 8, 20, 999]
    return max(i for i, t in enumerate(thr) if t < d)
  if task_name == 'dsprites_loc':
    return int(ex['label_x_position']) // 2
  if task_name == 'dsprites_ori':
    return int(np.floor(int(ex['label_orientation']) / 2.5))
  if task_name == 'smallnorb_azi':
    return int(ex['label_azimuth'])
  if task_name == 'smallnorb_ele':
    return int(ex['label_elevation'])
  return int(ex['label'])


@pytest.fixture
def fake_tfds():
  """Mocks TFDS; records (dataset name, split) of every as_dataset call."""
  calls = []

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    calls.append((self.name, split))
    features = self.info.features
    examples = _fake_examples(features)
    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype), features.get_tensor_info())
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(len(examples)))

  with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn):
    yield calls


def test_all_19_tasks_on_mock_data(fake_tfds):
  assert len(TASKS) == 19
  for name, task in TASKS.items():
    config = {'source': 'tfds', 'task': name, 'data_dir': ''}
    train = get_data(config, 'train800val200', BATCH, image_size=IMAGE_SIZE,
                     train=True, seed=0)
    builder_name = fake_tfds[-1][0]
    assert builder_name == task.tfds_name.split('/')[0], name
    assert fake_tfds[-1][1] == (
        f"{task.tfds_split('train800')}+{task.tfds_split('val200')}"), name
    batch = next(iter(train))
    assert batch['image'].shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), name
    assert batch['image'].dtype == np.float32
    assert np.isfinite(batch['image']).all()
    assert batch['mask'].all()
    assert ((0 <= batch['label']) & (batch['label'] < task.num_classes)).all()

    evaluation = get_data(config, 'test', BATCH, image_size=IMAGE_SIZE,
                          train=False, seed=0)
    assert fake_tfds[-1] == (builder_name, task.tfds_split('test')), name
    assert evaluation.num_examples == NUM_FAKE
    batches = list(evaluation)
    assert len(batches) == evaluation.steps_per_epoch == 2
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    for b in batches:
      assert b['image'].shape == (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), name
    # The fake generator is deterministic: regenerate and label in numpy.
    builder = tfds.builder(task.tfds_specs[-1])
    expected = [_numpy_label(name, ex)
                for ex in _fake_examples(builder.info.features)]
    np.testing.assert_array_equal(labels, expected, err_msg=name)
    assert ((0 <= labels) & (labels < task.num_classes)).all(), name

  for split, expected in (('train800', 'train[:800]'),
                          ('val200', 'train[589824:590024]')):
    get_data({'task': 'dsprites_loc'}, split, 2, image_size=8, train=False,
             seed=0)
    assert fake_tfds[-1] == ('dsprites', expected)


def test_default_mock_generator_and_label_check():
  # TFDS's default mock (encoded images, random shapes) for a plain task.
  with tfds.testing.mock_data(num_examples=5):
    data = get_data({'task': 'dtd'}, 'test', 4, image_size=16, train=False,
                    seed=0)
    batches = list(data)
  assert data.num_examples == 5
  assert sum(int(b['mask'].sum()) for b in batches) == 5
  assert batches[0]['image'].shape == (4, 16, 16, 3)
  # The default generator gives CLEVR scenes 5..50 objects, most of them out
  # of clevr_count's 8 classes: the pipeline must refuse, not pass them on.
  with tfds.testing.mock_data(num_examples=8):
    data = get_data({'task': 'clevr_count'}, 'test', 8, image_size=16,
                    train=False, seed=0)
    with pytest.raises(DataError, match=r'label outside \[0, 8\)'):
      list(data)


def test_unprepared_dataset_names_the_command(tmp_path):
  with pytest.raises(DataError) as info:
    get_data({'task': 'cifar100', 'data_dir': str(tmp_path)}, 'test', 8,
             image_size=32, train=False, seed=0)
  msg = str(info.value)
  assert 'not prepared' in msg
  assert (f"tfds.builder('cifar100:3.*.*', data_dir='{tmp_path}')"
          '.download_and_prepare()') in msg
  assert f'tfds build cifar100 --data_dir={tmp_path}' in msg
  for task in ('resisc45', 'diabetic_retinopathy'):
    with pytest.raises(DataError) as info:
      get_data({'task': task, 'data_dir': str(tmp_path)}, 'train800', 8,
               image_size=32, train=True, seed=0)
    assert f'{tmp_path}/downloads/manual/' in str(info.value)
  with pytest.raises(DataError, match="no TFDS source"):
    get_data({'task': 'cifar10'}, 'test', 8, image_size=32, train=False,
             seed=0)
