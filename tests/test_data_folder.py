"""The VTAB-1k folder source: generated folders in tmp_path and the real CIFAR-10.

References are independent of the pipeline: PIL decodes and resizes, numpy
normalises, and split files are parsed here with plain string handling.
"""

from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip('PIL')
from PIL import Image  # pylint: disable=g-import-not-at-top

from pyra_jax.data import DataError, get_data  # pylint: disable=g-import-not-at-top
from tests.helpers.data import (MEAN, STD, grey_id_images, image_ids,  # pylint: disable=g-import-not-at-top
                               write_split)

SHARED = Path(__file__).resolve().parents[2] / 'shared'
REAL_CIFAR10 = SHARED / 'data' / 'vtab1k' / 'cifar10'


def _unnormalise(images):
  return np.round((images * STD + MEAN) * 255.0).astype(int)


def test_exact_values_at_native_size(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            for _ in range(6)]
  labels = [3, 1, 4, 1, 5, 9]
  write_split(tmp_path / 'cifar10', 'val200', images, labels)
  for norm, expected_fn in (
      ('imagenet', lambda x: (x / 255.0 - MEAN) / STD),
      ('inception', lambda x: x / 127.5 - 1.0)):
    config = {'source': 'folder', 'task': 'cifar10', 'data_dir': str(tmp_path),
              'normalization': norm}
    data = get_data(config, 'val200', 4, image_size=16, train=False, seed=0)
    batches = list(data)
    got = np.concatenate([b['image'][b['mask']] for b in batches])
    want = np.stack([expected_fn(x.astype(np.float32)) for x in images])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_array_equal(
        np.concatenate([b['label'][b['mask']] for b in batches]), labels)


def test_resize_matches_pil_bicubic(tmp_path):
  # The authors' torchvision pipeline resizes with PIL bicubic (antialiased
  # when shrinking); ours must agree within rounding.
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((57, 40), Image.BILINEAR))
  write_split(tmp_path / 'cifar10', 'test', [image], [0])
  for size in (20, 96):
    data = get_data({'source': 'folder', 'task': 'cifar10',
                     'data_dir': str(tmp_path)}, 'test', 1, image_size=size,
                    train=False, seed=0)
    got = _unnormalise(next(iter(data))['image'][0])
    want = np.asarray(Image.fromarray(image).resize((size, size),
                                                    Image.BICUBIC)).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 2 and diff.mean() < 0.5, (size, diff.max(),
                                                   diff.mean())


def test_padding_counts_every_example_once(tmp_path):
  n, batch = 37, 8
  labels = [(7 * i) % 10 for i in range(n)]
  write_split(tmp_path / 'cifar10', 'test', grey_id_images(n), labels)
  data = get_data({'source': 'folder', 'task': 'cifar10',
                   'data_dir': str(tmp_path)}, 'test', batch, image_size=4,
                  train=False, seed=0)
  assert data.num_examples == n
  assert data.steps_per_epoch == 5  # ceil(37 / 8)
  batches = list(data)
  assert len(batches) == 5
  for b in batches:
    assert b['image'].shape == (batch, 4, 4, 3)
    assert b['label'].shape == b['mask'].shape == (batch,)
    assert b['mask'].dtype == bool and b['label'].dtype == np.int32
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks.sum() == n
  np.testing.assert_array_equal(batches[-1]['mask'], [True] * 5 + [False] * 3)
  # Padded rows: zero images, label 0 -- and dropped by the mask.
  last = batches[-1]
  assert (last['image'][~last['mask']] == 0).all()
  assert (last['label'][~last['mask']] == 0).all()
  ids = np.concatenate([image_ids(b['image'][b['mask']]) for b in batches])
  np.testing.assert_array_equal(ids, np.arange(n))  # Each once, file order.
  second_pass = list(data)
  assert len(second_pass) == 5
  for a, b in zip(batches, second_pass):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['mask'], b['mask'])
  real_labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(np.bincount(real_labels, minlength=10),
                                np.bincount(labels, minlength=10))


def test_training_is_deterministic_and_reshuffles(tmp_path):
  n, batch = 37, 8
  write_split(tmp_path / 'cifar10', 'train800', grey_id_images(n), [0] * n)
  config = {'source': 'folder', 'task': 'cifar10', 'data_dir': str(tmp_path)}

  def id_stream(seed, num_batches=10):
    data = get_data(config, 'train800', batch, image_size=4, train=True,
                    seed=seed)
    assert data.steps_per_epoch == 4 and data.num_examples == n
    it = iter(data)
    batches = [next(it) for _ in range(num_batches)]
    for b in batches:
      assert b['image'].shape == (batch, 4, 4, 3) and b['mask'].all()
    return np.concatenate([image_ids(b['image']) for b in batches]), batches

  ids0, batches0 = id_stream(0)
  ids0_again, batches0_again = id_stream(0)
  for a, b in zip(batches0, batches0_again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(ids0, ids0_again)
  # Each epoch is a permutation of all examples; epochs differ in order.
  epoch1, epoch2 = ids0[:n], ids0[n:2 * n]
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(n))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(n))  # Actually shuffled.
  ids1, _ = id_stream(1)
  assert not np.array_equal(ids0, ids1)
  # A second iteration of the same Data restarts the same sequence (tf.data's
  # seeded shuffle alone would continue its random stream instead).
  data = get_data(config, 'train800', batch, image_size=4, train=True, seed=0)
  for _ in range(2):
    it = iter(data)
    again = np.concatenate([image_ids(next(it)['image']) for _ in range(10)])
    np.testing.assert_array_equal(again, ids0)


def test_folder_aliases_and_jpeg(tmp_path):
  rng = np.random.default_rng(2)
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  image = np.asarray(Image.fromarray(small).resize((16, 16), Image.BILINEAR))
  for folder_name, task, label in (('cifar', 'cifar100', 99),
                                   ('oxford_pet', 'oxford_iiit_pet', 36)):
    write_split(tmp_path / folder_name, 'train800val200', [image], [label],
                ext='jpg')
    data = get_data({'source': 'folder', 'task': task,
                     'data_dir': str(tmp_path)}, 'train800val200', 1,
                    image_size=16, train=False, seed=0)
    assert data.num_classes == (100 if task == 'cifar100' else 37)
    batch = next(iter(data))
    assert batch['label'][0] == label
    decoded = np.asarray(Image.open(
        tmp_path / folder_name / 'images/train800val200/000000.jpg')).astype(int)
    # The accurate IDCT reproduces PIL's JPEG decoding.
    assert np.abs(_unnormalise(batch['image'][0]) - decoded).max() <= 1
  # data_dir may also be the task directory itself.
  data = get_data({'source': 'folder', 'task': 'cifar100',
                   'data_dir': str(tmp_path / 'cifar')}, 'train800val200', 1,
                  image_size=8, train=False, seed=0)
  assert data.num_examples == 1


def test_folder_errors_name_the_file(tmp_path):
  task_dir = tmp_path / 'cifar10'
  write_split(task_dir, 'train800', grey_id_images(3), [1, 2, 3])
  config = {'source': 'folder', 'task': 'cifar10', 'data_dir': str(tmp_path)}

  with pytest.raises(DataError, match=str(task_dir / 'val200.txt')):
    get_data(config, 'val200', 2, image_size=8, train=False, seed=0)

  lines = (task_dir / 'train800.txt').read_text().splitlines()
  (task_dir / 'train800.txt').write_text(
      '\n'.join(lines[:2] + ['images/train800/000002.png 10']) + '\n')
  with pytest.raises(DataError) as info:
    get_data(config, 'train800', 2, image_size=8, train=True, seed=0)
  assert f'{task_dir / "train800.txt"}:3' in str(info.value)
  assert 'label 10 is outside [0, 10)' in str(info.value)

  (task_dir / 'train800.txt').write_text(
      '\n'.join(lines[:1] + ['images/train800/missing.jpg 4']) + '\n')
  with pytest.raises(DataError) as info:
    get_data(config, 'train800', 2, image_size=8, train=True, seed=0)
  assert f'{task_dir / "train800.txt"}:2' in str(info.value)
  assert str(task_dir / 'images/train800/missing.jpg') in str(info.value)

  (task_dir / 'train800.txt').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match='fewer than one batch'):
    get_data(config, 'train800', 8, image_size=8, train=True, seed=0)
  with pytest.raises(DataError, match='No folder for task'):
    get_data({**config, 'task': 'dtd'}, 'train800', 2, image_size=8,
             train=True, seed=0)
  with pytest.raises(DataError, match='Unknown split'):
    get_data(config, 'train', 2, image_size=8, train=True, seed=0)
  with pytest.raises(DataError, match='Unknown data.source'):
    get_data({**config, 'source': 'hub'}, 'train800', 2, image_size=8,
             train=True, seed=0)


def _split_labels(split):
  lines = (REAL_CIFAR10 / f'{split}.txt').read_text().split('\n')
  return np.array([int(line.split()[1]) for line in lines if line.strip()])


@pytest.mark.skipif(not REAL_CIFAR10.is_dir(),
                    reason='shared/data/vtab1k/cifar10 is absent')
def test_real_cifar10_folder():
  config = {'source': 'folder', 'task': 'cifar10',
            'data_dir': str(REAL_CIFAR10.parent)}
  for split, count in (('train800', 800), ('val200', 200),
                       ('train800val200', 1000), ('test', 10_000)):
    data = get_data(config, split, 512, image_size=32, train=False, seed=0)
    assert data.num_examples == count, split
    assert data.num_classes == 10
    assert data.steps_per_epoch == -(-count // 512)

  test = get_data(config, 'test', 512, image_size=32, train=False, seed=0)
  total, hist, first = 0, np.zeros(10, int), None
  for batch in test:
    total += int(batch['mask'].sum())
    hist += np.bincount(batch['label'][batch['mask']], minlength=10)
    first = batch if first is None else first
  assert total == 10_000
  np.testing.assert_array_equal(hist, np.bincount(_split_labels('test'),
                                                  minlength=10))
  for i in range(3):  # Pixels agree with PIL's decoding of the same JPEGs.
    decoded = np.asarray(Image.open(
        REAL_CIFAR10 / f'images/test/{i:06d}.jpg').convert('RGB')).astype(int)
    assert np.abs(_unnormalise(first['image'][i]) - decoded).max() <= 1

  train = get_data(config, 'train800val200', 100, image_size=32, train=True,
                   seed=0)
  assert train.steps_per_epoch == 10
  it = iter(train)
  epoch = np.concatenate([next(it)['label'] for _ in range(10)])
  np.testing.assert_array_equal(
      np.bincount(epoch, minlength=10),
      np.bincount(_split_labels('train800val200'), minlength=10))


# --- Broken folders, through the command line ----------------------------------

def _cli_folder(root: Path, n_train=40, n_test=4):
  """A cifar10 task folder the tiny config can train on (batch 40, 32 px)."""
  task_dir = root / 'cifar10'
  write_split(task_dir, 'train800val200', grey_id_images(n_train),
              [i % 10 for i in range(n_train)])
  write_split(task_dir, 'test', grey_id_images(n_test), [1] * n_test,
              ext='jpg')
  return task_dir


def _run_on_folder(capsys, monkeypatch, root, workdir):
  from tests.helpers.cli import reset_flags, run_main  # pylint: disable=g-import-not-at-top
  code, out, err = run_main(
      capsys, monkeypatch,
      f'--config=configs/tiny.py:source=folder,data_dir={root}',
      '--config.data.task=cifar10', f'--workdir={workdir}')
  reset_flags()
  return code, out, err.strip()


def _png_with_bad_crc(image) -> bytes:
  """A PNG whose header and end marker are intact but whose pixel data fail
  their checksum: only a full decode notices."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'PNG')
  data = bytearray(buf.getvalue())
  idat = data.index(b'IDAT')
  data[idat + 6] ^= 0xFF  # A byte of the compressed pixels.
  return bytes(data)


@pytest.mark.parametrize('damage', ['random_bytes', 'cut_short', 'empty'])
def test_cli_corrupt_test_image_fails_before_training(damage, tmp_path, capsys,
                                                      monkeypatch):
  task_dir = _cli_folder(tmp_path / 'data')
  bad = task_dir / 'images/test/000002.jpg'  # Line 3 of test.txt.
  good = bad.read_bytes()
  bad.write_bytes({'random_bytes': np.random.default_rng(0).bytes(len(good)),
                   'cut_short': good[:len(good) // 2], 'empty': b''}[damage])
  code, out, err = _run_on_folder(capsys, monkeypatch, tmp_path / 'data',
                                  tmp_path / 'run')
  assert code == 1 and 'Traceback' not in err
  assert err.startswith(f'Error: {task_dir / "test.txt"}:3: image {bad} ')
  assert len(err.splitlines()) == 1
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()  # No step was trained.


@pytest.mark.parametrize('kind', ['dotdot', 'absolute'])
def test_cli_split_paths_must_stay_inside_the_task_folder(kind, tmp_path, capsys,
                                                         monkeypatch):
  task_dir = _cli_folder(tmp_path / 'data')
  outside = tmp_path / 'secret.png'  # Exists and is a valid image: still refused.
  Image.fromarray(grey_id_images(1)[0]).save(outside)
  listed = {'dotdot': '../../secret.png', 'absolute': str(outside)}[kind]
  split_file = task_dir / 'train800val200.txt'
  lines = split_file.read_text().splitlines()
  lines[4] = f'{listed} 4'
  split_file.write_text('\n'.join(lines) + '\n')
  code, out, err = _run_on_folder(capsys, monkeypatch, tmp_path / 'data',
                                  tmp_path / 'run')
  assert code == 1 and 'Traceback' not in err and len(err.splitlines()) == 1
  assert err.startswith(f'Error: {split_file}:5: image path {listed!r} leaves '
                        f'the task folder {task_dir}')


def test_paths_that_stay_inside_are_accepted(tmp_path):
  task_dir = tmp_path / 'cifar10'
  write_split(task_dir, 'val200', grey_id_images(2), [3, 4])
  (task_dir / 'val200.txt').write_text(
      'images/val200/../val200/000000.png 3\n./images/val200/000001.png 4\n')
  data = get_data({'source': 'folder', 'task': 'cifar10',
                   'data_dir': str(tmp_path)}, 'val200', 2, image_size=8,
                  train=False, seed=0)
  np.testing.assert_array_equal(image_ids(next(iter(data))['image']), [0, 1])


def test_cli_image_damaged_inside_is_named_when_decoding_fails(
    tmp_path, capsys, monkeypatch):
  task_dir = _cli_folder(tmp_path / 'data')
  bad = task_dir / 'images/train800val200/000007.png'  # Line 8.
  bad.write_bytes(_png_with_bad_crc(grey_id_images(8)[7]))
  with Image.open(bad) as image:  # The header is fine: the up-front check passes.
    assert image.format == 'PNG' and image.size == (8, 8)
  code, out, err = _run_on_folder(capsys, monkeypatch, tmp_path / 'data',
                                  tmp_path / 'run')
  assert code == 1 and 'Traceback' not in err and len(err.splitlines()) == 1
  assert err.startswith(f'Error: {task_dir / "train800val200.txt"}:8: image '
                        f'{bad} cannot be decoded')


def test_doubtful_but_decodable_images_are_accepted(tmp_path):
  """An image the cheap checks doubt (here: data after the JPEG end marker,
  beyond the bytes they look at) is decoded in full and kept if it decodes."""
  task_dir = tmp_path / 'cifar10'
  images = grey_id_images(2)
  write_split(task_dir, 'val200', images, [0, 1], ext='jpg')
  padded = task_dir / 'images/val200/000001.jpg'
  padded.write_bytes(padded.read_bytes() + b'\0' * 10_000)  # E.g. camera trailers.
  data = get_data({'source': 'folder', 'task': 'cifar10',
                   'data_dir': str(tmp_path)}, 'val200', 2, image_size=8,
                  train=False, seed=0)
  np.testing.assert_array_equal(image_ids(next(iter(data))['image']), [0, 1])


def test_every_unreadable_image_is_counted_in_one_message(tmp_path):
  task_dir = tmp_path / 'cifar10'
  write_split(task_dir, 'val200', grey_id_images(6), [0] * 6)
  (task_dir / 'images/val200/000001.png').write_bytes(b'')
  (task_dir / 'images/val200/000004.png').unlink()
  with pytest.raises(DataError) as info:
    get_data({'source': 'folder', 'task': 'cifar10', 'data_dir': str(tmp_path)},
             'val200', 2, image_size=8, train=False, seed=0)
  message, split_file = str(info.value), task_dir / 'val200.txt'
  assert message.startswith(f'2 images listed in {split_file} cannot be read')
  assert f'{split_file}:2: image {task_dir / "images/val200/000001.png"} is empty' in message
  assert f'{split_file}:5: image {task_dir / "images/val200/000004.png"} does not exist' in message
