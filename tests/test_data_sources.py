"""Data of one's own through every entry: a class-per-folder image tree
(source=imagefolder), any TFDS dataset (task 'tfds:NAME'), in-memory arrays and
tf.data datasets (`from_arrays`, `from_tf_dataset`).

The references are independent of the routes under test: the split-file
folder route (tests/test_data_folder.py checks it against PIL and numpy) for
the same images written here, class names and labels from what the test
wrote and the documented rules (sorted folder names; round(f * n) held out per
class), and TFDS's own fake examples, normalised here in numpy.
"""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

PIL = pytest.importorskip('PIL')
tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')
from PIL import Image  # pylint: disable=g-import-not-at-top
from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top

from pyra_jax.data import DataError, from_arrays, from_tf_dataset, get_data  # pylint: disable=g-import-not-at-top
from tests.helpers.cli import ROOT  # pylint: disable=g-import-not-at-top
from tests.helpers.data import MEAN, STD, image_ids  # pylint: disable=g-import-not-at-top

# Written in this order; torchvision numbers classes by sorted name, and
# Python sorts capitals first: C_emu, a_cat, b_dog.
CLASSES = ('b_dog', 'a_cat', 'C_emu')
SORTED = ('C_emu', 'a_cat', 'b_dog')


def _random_images(n, seed):
  """n random RGB images of assorted sizes (so that resizing matters)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (9 + i % 4, 11 - i % 3, 3), dtype=np.uint8)
          for i in range(n)]


def _grey_id(i, size=8):
  """Image i is uniformly grey with value 10 + 6 i: its id survives resizing."""
  return np.full((size, size, 3), 10 + 6 * i, np.uint8)


def _save(path: Path, image) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path)


def _tree_with_twin_folder(tmp_path):
  """A 3-class image tree and a split-file folder of the same PNG files.

  Tree: <tree>/{train,test}/<class>/..., one image of a_cat in a sub-folder
  (torchvision walks class folders to any depth), plus files to skip (hidden,
  not images). The split files list the same files in torchvision's order
  (sorted class, then path), labelled by sorted class index.
  """
  tree, twin = tmp_path / 'tree', tmp_path / 'twin' / 'same'
  counts = {'train': {'b_dog': 4, 'a_cat': 3, 'C_emu': 5},
            'test': {'b_dog': 2, 'a_cat': 1, 'C_emu': 2}}
  seed = 0
  for split, per_class in counts.items():
    for name in CLASSES:
      for i, image in enumerate(_random_images(per_class[name], seed)):
        sub = 'deeper/' if (name == 'a_cat' and i == 0) else ''
        _save(tree / split / name / f'{sub}img{i}.png', image)
      seed += 1
      (tree / split / name / '.DS_Store').write_bytes(b'\0junk')
      (tree / split / name / 'notes.txt').write_text('not an image')
      (tree / split / name / '._img0.png').write_bytes(b'\0macOS fork')
  # Hidden folders: not a class, not images of a class.
  _save(tree / 'train' / '.ipynb_checkpoints' / 'x.png', _random_images(1, 99)[0])
  _save(tree / 'train' / 'a_cat' / '.cache' / 'x.png', _random_images(1, 98)[0])
  lines = {'train': [], 'test': []}
  for split in lines:
    for label, name in enumerate(SORTED):
      class_dir = tree / split / name
      files = sorted((str(p.parent), p.name) for p in class_dir.rglob('*.png')
                     if not any(part.startswith('.')
                                for part in p.relative_to(class_dir).parts))
      for parent, file in files:
        rel = Path(parent, file).relative_to(tree)
        (twin / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree / rel, twin / rel)
        lines[split].append(f'{rel} {label}')
    (twin / f'{split}.txt').write_text('\n'.join(lines[split]) + '\n')
  (twin / 'classes.txt').write_text('\n'.join(SORTED) + '\n')
  return tree, twin, counts


def _same_batches(a, b, n):
  for x, y in zip(a, b):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  assert len(a) == len(b) == n


def _take(data, n):
  it = iter(data)
  return [next(it) for _ in range(n)]


# --- Image trees ---------------------------------------------------------------

def test_imagefolder_equals_the_split_file_folder(tmp_path):
  tree, twin, counts = _tree_with_twin_folder(tmp_path)
  image_cfg = {'source': 'imagefolder', 'data_dir': str(tree)}
  folder_cfg = {'source': 'folder', 'task': 'folder:same',
                'data_dir': str(twin.parent)}
  for split, train, steps in (('test', False, 2), ('train', True, 5)):
    a = get_data(image_cfg, split, 3, image_size=8, train=train, seed=3)
    b = get_data(folder_cfg, split, 3, image_size=8, train=train, seed=3)
    assert a.class_names == b.class_names == SORTED
    assert a.num_classes == 3 and a.num_examples == sum(counts[split].values())
    assert a.task == 'imagefolder:tree' and a.split == split
    assert (a.steps_per_epoch, a.num_examples) == (b.steps_per_epoch, b.num_examples)
    if train:  # Same seed, same files in the same order: the same stream.
      _same_batches(_take(a, steps), _take(b, steps), steps)
    else:
      _same_batches(list(a), list(b), steps)
  # The labels, from what was written: sorted class index.
  test = get_data(image_cfg, 'test', 5, image_size=8, train=False, seed=0)
  labels = np.concatenate([x['label'][x['mask']] for x in test])
  want = [SORTED.index(c) for c in SORTED for _ in range(counts['test'][c])]
  np.testing.assert_array_equal(labels, want)
  # 'imagefolder:NAME' reads <data_dir>/NAME.
  named = get_data({'source': 'imagefolder', 'task': 'imagefolder:tree',
                    'data_dir': str(tmp_path)}, 'test', 5, image_size=8,
                   train=False, seed=0)
  assert named.num_examples == test.num_examples and named.class_names == SORTED


def _grey_class_tree(root, sizes):
  """<root>/<class>/<id>.png with grey id images; returns {class: [ids]}."""
  ids, next_id = {}, 0
  for name, n in sizes.items():
    ids[name] = list(range(next_id, next_id + n))
    for i in ids[name]:
      _save(root / name / f'{i:03d}.png', _grey_id(i))
    next_id += n
  return ids


def _split_ids(cfg, split, batch=4):
  data = get_data(cfg, split, batch, image_size=4, train=False, seed=0)
  batches = list(data)
  got = np.concatenate([image_ids(b['image'][b['mask']]) for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  return data, got, labels


def test_class_folders_hold_out_a_seeded_part_of_each_class(tmp_path):
  sizes = {'owl': 5, 'ant': 1, 'bee': 10}
  ids = _grey_class_tree(tmp_path / 'flat', sizes)
  cfg = {'source': 'imagefolder', 'data_dir': str(tmp_path / 'flat'),
         'holdout_fraction': 0.2}
  train, train_ids, train_labels = _split_ids(cfg, 'train')
  val, val_ids, val_labels = _split_ids(cfg, 'val')
  assert train.class_names == val.class_names == ('ant', 'bee', 'owl')
  assert set(train_ids).isdisjoint(val_ids)
  assert sorted([*train_ids, *val_ids]) == list(range(16))
  label_of = {i: sorted(sizes).index(c) for c, members in ids.items() for i in members}
  assert [label_of[i] for i in train_ids] == list(train_labels)
  assert [label_of[i] for i in val_ids] == list(val_labels)
  for name, n in sizes.items():  # round(0.2 n) held out, at most n - 1.
    held = [i for i in val_ids if i in ids[name]]
    assert len(held) == min(n - 1, int(np.floor(0.2 * n + 0.5))), name
  # The split depends on split_seed, not on the run's seed.
  again = _split_ids(cfg, 'val')[1]
  np.testing.assert_array_equal(again, val_ids)
  other = _split_ids(dict(cfg, split_seed=1), 'val')[1]
  assert sorted(other) != sorted(val_ids)
  with pytest.raises(DataError, match=r"its splits are 'train' and 'val'"):
    get_data(cfg, 'test', 4, image_size=4, train=False, seed=0)


def _one_line(error):
  text = str(error)
  assert '\n' not in text and text.endswith('.'), text
  return text


# (how the tree is damaged, split read, train?, config, words of the sentence)
BAD_TREES = [
    ('empty_class', 'train', True, {}, 'Class folder {tree}/train/C_emu holds no '
     'image (.jpg .jpeg .png .gif .bmp .webp): add its images or remove the folder.'),
    ('no_class_folders', 'train', True, {}, 'No class folders in {tree}: put the '
     'images in one folder per class'),
    ('class_only_in_test', 'train', True, {}, "Class 'zebra' has a folder in "
     '{tree}/test but none in the training split {tree}/train: the model could not '
     'learn it'),
    ('flat_without_fraction', 'train', True, {}, 'looks like class folders without '
     'split folders (<root>/<class>/<image>): set data.holdout_fraction'),
    ('split_with_fraction', 'train', True, {'holdout_fraction': 0.2},
     'holds split folders (test, train), not class folders: set '
     'data.holdout_fraction=0'),
    ('loose_image', 'test', False, {}, 'Image {tree}/test/stray.png lies outside '
     'any class folder: move it into the folder of its class'),
    ('not_an_image', 'train', True, {}, 'Image {tree}/train/a_cat/img1.png is not '
     'an image file (its first bytes match no image format): replace the file or '
     'remove it.'),
    ('two_cut_short', 'train', True, {}, '2 images under {tree}/train cannot be '
     'read, e.g. {tree}/train/a_cat/img1.png is cut short (no PNG end marker)'),
    ('tiff', 'train', True, {}, 'Image {tree}/train/b_dog/scan.tif is in a format '
     'TensorFlow does not decode (.tif .tiff .ppm .pgm): convert it to PNG'),
    ('missing_split', 'val', False, {}, 'Split folder {tree}/val does not exist: '
     'choose among the split folders of {tree} (test, train) with '
     'config.data.train_split / eval_split.'),
    ('not_utf8', 'train', True, {}, 'is not UTF-8 text: rename it'),
    ('wrong_source', 'train', True, {'source': 'folder', 'task': 'imagefolder:tree'},
     "Task 'imagefolder:tree' is an image tree of your own: set "
     "data.source='imagefolder' (got 'folder')."),
]


@pytest.mark.parametrize('damage,split,train,cfg,message', BAD_TREES,
                         ids=[b[0] for b in BAD_TREES])
def test_bad_trees_are_one_sentence(damage, split, train, cfg, message, tmp_path):
  tree = tmp_path / 'tree'
  for s, n in (('train', 2), ('test', 1)):
    for name in SORTED:
      for i in range(n):
        _save(tree / s / name / f'img{i}.png', _grey_id(i))
  if damage == 'empty_class':
    shutil.rmtree(tree / 'train' / 'C_emu')
    (tree / 'train' / 'C_emu').mkdir()
    (tree / 'train' / 'C_emu' / 'readme.txt').write_text('no images here')
  elif damage == 'no_class_folders':
    shutil.rmtree(tree)
    (tree / 'train').mkdir(parents=True)
    (tree / 'test').mkdir()
  elif damage == 'class_only_in_test':
    _save(tree / 'test' / 'zebra' / 'z.png', _grey_id(0))
  elif damage == 'flat_without_fraction':
    shutil.rmtree(tree)
    for name in SORTED:
      _save(tree / name / 'img0.png', _grey_id(0))
  elif damage == 'loose_image':
    _save(tree / 'test' / 'stray.png', _grey_id(0))
  elif damage == 'not_an_image':
    (tree / 'train' / 'a_cat' / 'img1.png').write_bytes(b'GIF? no: text ' * 20)
  elif damage == 'two_cut_short':
    for name in ('a_cat', 'b_dog'):
      path = tree / 'train' / name / 'img1.png'
      path.write_bytes(path.read_bytes()[:60])
  elif damage == 'tiff':
    Image.fromarray(_grey_id(0)).save(tree / 'train' / 'b_dog' / 'scan.tif')
  elif damage == 'not_utf8':
    (tree / 'train' / 'a_cat' / os.fsdecode(b'caf\xe9.png')).write_bytes(
        (tree / 'train' / 'a_cat' / 'img0.png').read_bytes())
  config = {'source': 'imagefolder', 'data_dir': str(tree), **cfg}
  if damage == 'wrong_source':
    config['data_dir'] = str(tmp_path)
  with pytest.raises(DataError) as info:
    get_data(config, split, 2, image_size=4, train=train, seed=0)
  assert message.format(tree=tree) in _one_line(info.value)


def test_a_class_missing_from_an_eval_split_keeps_every_index(tmp_path):
  tree = tmp_path / 'tree'
  for name in SORTED:
    _save(tree / 'train' / name / 'a.png', _grey_id(1))
  _save(tree / 'test' / 'b_dog' / 'a.png', _grey_id(2))  # Only the last class.
  test = get_data({'source': 'imagefolder', 'data_dir': str(tree)}, 'test', 2,
                  image_size=4, train=False, seed=0)
  assert test.num_classes == 3 and test.class_names == SORTED
  batch = next(iter(test))
  assert batch['label'][0] == 2 and list(batch['mask']) == [True, False]


def test_image_damaged_inside_is_named_when_decoding_fails(tmp_path):
  """A PNG whose header and end marker are intact but whose compressed pixels
  are not: the checks before reading pass it, the decoder fails on it, and the
  error names the file (found by decoding each image again)."""
  tree = tmp_path / 'tree'
  for name in SORTED:
    _save(tree / 'test' / name / 'a.png', _grey_id(1))
  bad = tree / 'test' / 'a_cat' / 'a.png'
  data = bytearray(bad.read_bytes())
  data[data.index(b'IDAT') + 6] ^= 0xFF
  bad.write_bytes(bytes(data))
  test = get_data({'source': 'imagefolder', 'data_dir': str(tree)}, 'test', 2,
                  image_size=4, train=False, seed=0)
  with pytest.raises(DataError) as info:
    list(test)
  assert _one_line(info.value).startswith(
      f"Class 'a_cat': image {bad} cannot be decoded (")
  assert str(info.value).endswith('): replace the file or remove it.')


def test_registry_lookup_explains_tasks_read_from_their_data():
  from pyra_jax.data import get_task  # pylint: disable=g-import-not-at-top
  for task in ('tfds:oxford_flowers102', 'imagefolder:pets'):
    with pytest.raises(DataError, match='set --config.model.num_classes'):
      get_task(task)


# --- Any TFDS dataset ------------------------------------------------------------

NUM_FAKE = 5


def _fake_examples(features):
  return list(mocking.RandomFakeGenerator(
      features, num_examples=NUM_FAKE, constant_dynamic_shape=True, seed=0))


@pytest.fixture
def fake_tfds():
  """TFDS mocked with fixed fake examples; records each as_dataset split."""
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


def test_any_tfds_name_on_mock_data(fake_tfds):
  cfg = {'source': 'tfds', 'task': 'tfds:oxford_flowers102'}
  train = get_data(dict(cfg), 'train[:800]', 2, image_size=10, train=True, seed=0)
  assert fake_tfds[-1] == ('oxford_flowers102', 'train[:800]')
  info = tfds.builder('oxford_flowers102').info.features['label']
  assert train.num_classes == 102 and train.class_names == tuple(info.names)
  assert train.task == 'tfds:oxford_flowers102' and train.num_examples == NUM_FAKE
  assert next(iter(train))['image'].shape == (2, 10, 10, 3)
  test = get_data(dict(cfg), 'test', 2, image_size=10, train=False, seed=0)
  assert fake_tfds[-1] == ('oxford_flowers102', 'test')
  batches = list(test)
  assert [int(b['mask'].sum()) for b in batches] == [2, 2, 1]
  # At the fake images' own size (10 x 10) the pixels are the fake ones.
  fakes = _fake_examples(tfds.builder('oxford_flowers102').info.features)
  want = np.stack([(f['image'] / 255.0 - MEAN) / STD for f in fakes])
  got = np.concatenate([b['image'][b['mask']] for b in batches])
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]),
                                [f['label'] for f in fakes])
  # Other keys; a grey dataset (mnist's 28 x 28 x 1) comes out RGB.
  coarse = get_data({'task': 'tfds:cifar100:3.*.*', 'label_key': 'coarse_label'},
                    'test', 5, image_size=8, train=False, seed=0)
  assert coarse.num_classes == 20
  assert fake_tfds[-1] == ('cifar100', 'test')
  grey = next(iter(get_data({'task': 'tfds:mnist'}, 'train', 5, image_size=28,
                            train=False, seed=0)))
  fakes = _fake_examples(tfds.builder('mnist').info.features)
  pixels = np.round((grey['image'] * STD + MEAN) * 255.0)
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel], [f['image'][..., 0] for f in fakes])


@pytest.mark.parametrize('cfg,message', [
    ({'task': 'tfds:no_such_dataset_xyz'}, "TFDS has no dataset 'no_such_dataset_xyz'"),
    ({'task': 'tfds:Not A Name'}, "after 'tfds:' give a TFDS dataset name"),
    ({'task': 'tfds:oxford_flowers102', 'label_key': 'file_name'},
     "feature 'file_name' is not a ClassLabel, so its classes are not known: set "
     'data.label_key to a ClassLabel feature (its features: image, label, file_name).'),
    ({'task': 'tfds:oxford_flowers102', 'image_key': 'picture'},
     "TFDS oxford_flowers102 has no feature 'picture': set data.image_key"),
    ({'task': 'tfds:oxford_flowers102', 'source': 'imagefolder'},
     "Task 'tfds:oxford_flowers102' is a TFDS dataset: set data.source='tfds'"),
])
def test_tfds_name_errors_are_one_sentence(cfg, message, fake_tfds):
  with pytest.raises(DataError) as info:
    get_data(cfg, 'train', 2, image_size=8, train=False, seed=0)
  assert message in _one_line(info.value)


def test_unprepared_tfds_name_says_how_to_prepare_it(tmp_path):
  with pytest.raises(DataError) as info:
    get_data({'task': 'tfds:oxford_flowers102', 'data_dir': str(tmp_path)},
             'test', 8, image_size=32, train=False, seed=0)
  msg = _one_line(info.value)
  assert 'TFDS dataset oxford_flowers102 (task tfds:oxford_flowers102) is not prepared' in msg
  assert (f"tfds.builder('oxford_flowers102', data_dir='{tmp_path}')"
          '.download_and_prepare()') in msg
  assert f'tfds build oxford_flowers102 --data_dir={tmp_path}' in msg


# --- Arrays and tf.data ----------------------------------------------------------

@pytest.fixture(scope='module')
def seven_pngs(tmp_path_factory):
  """7 random images with labels, as arrays and as a split-file folder of PNGs."""
  root = tmp_path_factory.mktemp('pngs')
  images = _random_images(7, seed=5)
  images = [np.asarray(Image.fromarray(x).resize((12, 10))) for x in images]
  labels = [2, 0, 1, 1, 2, 0, 2]
  lines = []
  for i, (image, label) in enumerate(zip(images, labels)):
    _save(root / 'seven' / f'{i}.png', image)
    lines.append(f'{i}.png {label}')
  (root / 'seven' / 'all.txt').write_text('\n'.join(lines) + '\n')
  return root, np.stack(images), np.asarray(labels)


def test_arrays_and_tf_data_equal_the_folder_route(seven_pngs):
  root, images, labels = seven_pngs
  folder_cfg = {'source': 'folder', 'task': 'folder:seven', 'data_dir': str(root)}
  floats = images.astype(np.float32) / 255.0  # Float in [0, 1]: the same uint8 back.
  for train, n in ((False, 3), (True, 6)):
    kw = dict(batch_size=3, image_size=8, train=train, seed=7)
    want = get_data(folder_cfg, 'all', 3, image_size=8, train=train, seed=7)
    routes = [
        from_arrays(images, labels, **kw),
        from_arrays(floats, labels, num_classes=3, **kw),
        from_tf_dataset(tf.data.Dataset.from_tensor_slices((images, labels)),
                        num_classes=3, **kw),
        from_tf_dataset(tf.data.Dataset.from_tensor_slices(
            {'image': floats, 'label': labels, 'id': np.arange(7)}),
            num_classes=3, **kw),
        # Unknown cardinality (a filter keeping everything): counted once.
        from_tf_dataset(tf.data.Dataset.from_tensor_slices((images, labels)).filter(
            lambda x, y: y >= 0), num_classes=3, **kw),
    ]
    expected = list(want) if not train else _take(want, n)
    for data in routes:
      assert data.num_examples == 7 and data.num_classes == 3
      assert data.steps_per_epoch == want.steps_per_epoch
      _same_batches(list(data) if not train else _take(data, n), expected, n)
  names = from_arrays(images, labels, batch_size=2, image_size=8, train=False,
                      class_names=['x', 'y', 'z'])
  assert names.class_names == ('x', 'y', 'z') and names.num_classes == 3


@pytest.mark.parametrize('make,message', [
    (lambda x, y: from_arrays(x.astype(np.float32), y, batch_size=2, image_size=8,
                              train=False),
     'float images must lie in [0, 1], these span ['),
    (lambda x, y: from_arrays(x, np.eye(3)[y], batch_size=2, image_size=8, train=False),
     'labels have shape (7, 3); give one integer label per image (7,).'),
    (lambda x, y: from_arrays(x, y, num_classes=2, batch_size=2, image_size=8,
                              train=False),
     'label 2 of image 0 is outside [0, 2)'),
    (lambda x, y: from_arrays(x, y, class_names=['a', 'b'], num_classes=3,
                              batch_size=2, image_size=8, train=False),
     'num_classes = 3 but 2 class_names'),
    (lambda x, y: from_tf_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(2),
                                  num_classes=3, batch_size=2, image_size=8, train=False),
     'a batch: give single images (ds.unbatch()).'),
    (lambda x, y: from_tf_dataset(tf.data.Dataset.from_tensor_slices((x, y)).repeat(),
                                  num_classes=3, batch_size=2, image_size=8, train=True),
     'the dataset is infinite'),
    (lambda x, y: list(from_tf_dataset(tf.data.Dataset.from_tensor_slices((x, y)),
                                       num_classes=2, batch_size=2, image_size=8,
                                       train=False)),
     'label outside [0, 2)'),
])
def test_memory_errors_are_one_sentence(make, message, seven_pngs):
  _, images, labels = seven_pngs
  with pytest.raises(DataError) as info:
    make(images, labels)
  assert message in str(info.value)


def test_eval_pads_and_masks_each_image_once_on_every_route(tmp_path):
  n, batch = 7, 3
  grey = np.stack([_grey_id(i) for i in range(n)])
  labels = np.arange(n) % 3
  for i in range(n):
    _save(tmp_path / 'tree' / 'test' / 'abc'[labels[i]] / f'{i}.png', grey[i])
  routes = {
      'imagefolder': get_data({'source': 'imagefolder',
                               'data_dir': str(tmp_path / 'tree')},
                              'test', batch, image_size=4, train=False, seed=0),
      'arrays': from_arrays(grey, labels, batch_size=batch, image_size=4, train=False),
      'tf.data': from_tf_dataset(tf.data.Dataset.from_tensor_slices((grey, labels)),
                                 num_classes=3, batch_size=batch, image_size=4,
                                 train=False),
  }
  for route, data in routes.items():
    assert data.steps_per_epoch == 3, route
    for _ in range(2):  # Every pass the same, each image exactly once.
      batches = list(data)
      assert [list(b['mask']) for b in batches] == [[True] * 3, [True] * 3,
                                                    [True, False, False]], route
      ids = np.concatenate([image_ids(b['image'][b['mask']]) for b in batches])
      assert sorted(ids) == list(range(n)), route
      assert (batches[-1]['image'][1:] == 0).all() and (batches[-1]['label'][1:] == 0).all()
      got = dict(zip(ids, np.concatenate([b['label'][b['mask']] for b in batches])))
      assert got == {i: labels[i] for i in range(n)}, route
  train = from_arrays(grey, labels, batch_size=batch, image_size=4, train=True, seed=1)
  assert train.steps_per_epoch == 2  # drop_remainder
  epoch = np.concatenate([image_ids(b['image']) for b in _take(train, 2)])
  assert len(set(epoch)) == 6  # Six different images in the first epoch's two batches.


def test_class_names_where_the_source_knows_them(fake_tfds):
  assert get_data({'source': 'mnist', 'task': 'mnist'}, 'val200', 8, image_size=8,
                  train=False, seed=0).class_names == tuple('0123456789')
  dtd = get_data({'task': 'dtd'}, 'test', 2, image_size=8, train=False, seed=0)
  assert dtd.class_names == tuple(tfds.builder('dtd').info.features['label'].names)
  assert len(dtd.class_names) == 47
  assert get_data({'task': 'clevr_count'}, 'test', 2, image_size=8, train=False,
                  seed=0).class_names is None  # Labels computed from the scene.


# --- Through the command line ----------------------------------------------------

# One process for two checks, as starting one costs seconds: reading trees with
# an unreadable image and an unreadable class folder (printing the sentences),
# then `python -m pyra_jax.main` (runpy runs it as -m does) on the arguments after
# '--'.
DRIVER = r'''
import runpy, sys
from pyra_jax.data import DataError, get_data
split = sys.argv.index('--')
for root in sys.argv[1:split]:
  try:
    get_data({'source': 'imagefolder', 'data_dir': root}, 'train', 1,
             image_size=4, train=True, seed=0)
    print('accepted')
  except DataError as e:
    print(e)
sys.argv = ['pyra_jax.main', *sys.argv[split + 1:]]
runpy.run_module('pyra_jax.main', run_name='__main__', alter_sys=True)
'''


def _unprivileged(cmd):
  """(`cmd` run so that mode 000 denies it, whether it does).

  A user other than root: as it is. Root reads anything, so as root `cmd` runs
  under setpriv without the capabilities that allow that (still uid 0).
  """
  if os.geteuid() != 0:
    return cmd, True
  drop = [shutil.which('setpriv') or 'setpriv',
          '--bounding-set=-dac_override,-dac_read_search']
  try:
    ok = subprocess.run([*drop, 'true'], capture_output=True, timeout=30).returncode == 0
  except OSError:
    ok = False
  return ([*drop, *cmd], True) if ok else (cmd, False)


def test_cli_trains_on_an_image_tree_and_unreadable_files_are_one_sentence(tmp_path):
  tree = tmp_path / 'tree'
  for split, n in (('train', 14), ('test', 2)):
    for c, name in enumerate(SORTED):
      for i, image in enumerate(_random_images(n, seed=10 * c + n)):
        _save(tree / split / name / f'{i}.png', image)
  denied = []
  for kind in ('image', 'folder'):
    for name in SORTED:
      _save(tmp_path / kind / 'train' / name / 'a.png', _grey_id(1))
    denied.append(tmp_path / kind)
  (denied[0] / 'train' / 'a_cat' / 'a.png').chmod(0)
  (denied[1] / 'train' / 'b_dog').chmod(0)
  cmd, denies = _unprivileged([
      sys.executable, '-c', DRIVER, *map(str, denied), '--',
      '--config=configs/tiny.py:method=peft',
      '--config.data.source=imagefolder', f'--config.data.data_dir={tree}',
      '--config.data.train_split=train', '--config.data.eval_split=test',
      '--config.num_epochs=1', '--config.warmup_epochs=0',
      '--config.eval_batch_size=8', f'--workdir={tmp_path / "run"}'])
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  finally:
    (denied[0] / 'train' / 'a_cat' / 'a.png').chmod(0o644)
    (denied[1] / 'train' / 'b_dog').chmod(0o755)
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['num_test_images'] == 6 and results['steps'] == 1  # 42 // 40
  assert results['trainable_params']['head'] == 32 * 3 + 3  # A 3-way head.
  assert 'final accuracy (test, 6 images)' in proc.stdout
  if not denies:
    pytest.skip('root without a setpriv that drops CAP_DAC_OVERRIDE: mode 000 does '
                'not deny root (the training run passed)')
  image_line, folder_line = proc.stdout.splitlines()[:2]
  assert image_line.startswith(f'Image {denied[0]}/train/a_cat/a.png cannot be read: '
                               'permission denied'), image_line
  assert f'make the images readable (e.g. chmod -R a+rX {denied[0]}/train)' in image_line
  assert folder_line.startswith(f'Folder {denied[1]}/train/b_dog cannot be listed by '
                                'this user'), folder_line
