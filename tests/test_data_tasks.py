"""The VTAB-1k task registry against docs/algorithm.md §5, written by hand.

Label functions are checked on hand-computed cases from its
definitions; split strings against a transcription of its table.
"""

import numpy as np
import pytest

from pyra_jax.data import tasks as tasks_lib
from pyra_jax.data.errors import DataError

# Transcribed by hand from docs/algorithm.md §5:
# task: (TFDS name:version, classes, train800, val200, test).
REFERENCE_TABLE = {
    'caltech101': ('caltech101:3.*.*', 102, 'train[:800]', 'train[2754:2954]', 'test'),
    'cifar100': ('cifar100:3.*.*', 100, 'train[:800]', 'train[45000:45200]', 'test'),
    'dtd': ('dtd:3.*.*', 47, 'train[:800]', 'validation[:200]', 'test'),
    'oxford_flowers102': ('oxford_flowers102:2.*.*', 102, 'train[:800]', 'validation[:200]', 'test'),
    'oxford_iiit_pet': ('oxford_iiit_pet:3.*.*', 37, 'train[:800]', 'train[2944:3144]', 'test'),
    'sun397': ('sun397/tfds:4.*.*', 397, 'train[:800]', 'validation[:200]', 'test'),
    'svhn': ('svhn_cropped:3.*.*', 10, 'train[:800]', 'train[65931:66131]', 'test'),
    'patch_camelyon': ('patch_camelyon:2.*.*', 2, 'train[:800]', 'validation[:200]', 'test'),
    'eurosat': ('eurosat/rgb:2.*.*', 10, 'train[:800]', 'train[16200:16400]', 'train[21600:]'),
    'resisc45': ('resisc45:3.*.*', 45, 'train[:800]', 'train[18900:19100]', 'train[25200:]'),
    'diabetic_retinopathy': ('diabetic_retinopathy_detection/btgraham-300:3.*.*', 5, 'train[:800]', 'validation[:200]', 'test'),
    'clevr_count': ('clevr:3.*.*', 8, 'train[:800]', 'train[63000:63200]', 'validation'),
    'clevr_dist': ('clevr:3.*.*', 6, 'train[:800]', 'train[63000:63200]', 'validation'),
    'dmlab': ('dmlab:2.0.1', 6, 'train[:800]', 'validation[:200]', 'test'),
    'kitti_dist': ('kitti:3.*.*', 4, 'train[:800]', 'validation[:200]', 'test'),
    'dsprites_loc': ('dsprites:2.*.*', 16, 'train[:800]', 'train[589824:590024]', 'train[663552:]'),
    'dsprites_ori': ('dsprites:2.*.*', 16, 'train[:800]', 'train[589824:590024]', 'train[663552:]'),
    'smallnorb_azi': ('smallnorb:2.*.*', 18, 'train[:800]', 'test[:200]', 'test[50%:]'),
    'smallnorb_ele': ('smallnorb:2.*.*', 9, 'train[:800]', 'test[:200]', 'test[50%:]'),
}


def test_registry_matches_reference_table():
  assert set(tasks_lib.TASKS) == set(REFERENCE_TABLE)
  assert len(tasks_lib.TASKS) == 19
  for name, (spec, classes, train, val, test) in REFERENCE_TABLE.items():
    task = tasks_lib.TASKS[name]
    assert task.tfds_specs[0] == spec, name
    assert task.num_classes == classes, name
    assert task.tfds_split('train800') == train, name
    assert task.tfds_split('val200') == val, name
    assert task.tfds_split('train800val200') == f'{train}+{val}', name
    assert task.tfds_split('test') == test, name
    assert task.manual_download == (name in ('resisc45',
                                             'diabetic_retinopathy')), name


def test_folder_names_and_aliases():
  # docs/algorithm.md §5: folder names; cifar/cifar100 and oxford_iiit_pet/oxford_pet.
  assert tasks_lib.get_task('cifar').name == 'cifar100'
  assert tasks_lib.get_task('cifar100').name == 'cifar100'
  assert tasks_lib.get_task('oxford_pet').name == 'oxford_iiit_pet'
  assert tasks_lib.get_task('kitti').name == 'kitti_dist'
  assert tasks_lib.get_task('cifar10').num_classes == 10
  assert tasks_lib.get_task('cifar10').tfds_name is None
  for name in ('caltech101', 'dtd', 'oxford_flowers102', 'patch_camelyon',
               'sun397', 'svhn', 'eurosat', 'resisc45', 'diabetic_retinopathy',
               'clevr_count', 'clevr_dist', 'dmlab', 'dsprites_loc',
               'dsprites_ori', 'smallnorb_azi', 'smallnorb_ele'):
    assert name in tasks_lib.TASKS[name].folder_names
  with pytest.raises(DataError, match='Unknown task'):
    tasks_lib.get_task('imagenet')
  with pytest.raises(DataError, match='Unknown split'):
    tasks_lib.TASKS['dtd'].tfds_split('train')


def _kitti(types, z):
  n = len(types)
  location = np.zeros((n, 3), np.float32)
  location[:, 2] = z
  return {'objects': {'type': np.asarray(types, np.int64).reshape(n),
                      'location': location}}


@pytest.mark.parametrize('types, z, expected', [
    ([0, 0], [12.0, 7.0], 0),        # closest vehicle at 7 m: -100 < 7 <= 8
    ([0, 1], [12.0, 25.0], 1),       # 12 m: 8 < 12 <= 20
    ([2], [30.0], 2),                # truck at 30 m: 20 < 30 <= 999
    ([3, 0], [5.0, 25.0], 2),        # type 3 (pedestrian) ignored -> 25 m
    ([4, 7], [1.0, 2.0], 3),         # no car/van/truck: 1000 -> class 3
    ([], [], 3),                     # empty scene
    ([1], [8.0], 0),                 # exactly on a threshold: strict '<'
    ([0], [8.01], 1),
])
def test_kitti_distance(types, z, expected):
  label = tasks_lib.kitti_dist_label(_kitti(types, z))
  assert int(label) == expected


def _clevr(depths):
  coords = np.zeros((len(depths), 3), np.float32)
  coords[:, 2] = depths
  return {'objects': {'pixel_coords': coords,
                      'size': np.zeros(len(depths), np.int64)}}


@pytest.mark.parametrize('depths, expected', [
    ([12.0, 7.0, 9.3], 0),     # min 7: 0 < 7 <= 8
    ([8.7, 11.0, 13.0], 2),    # 8.5 < 8.7 <= 9
    ([9.5, 12.0, 9.9], 3),     # exactly 9.5: thr 9.5 not < 9.5 -> 9 -> 3
    ([9.7, 10.5, 11.0], 4),
    ([10.2, 13.0, 14.0], 5),   # 10 < 10.2 <= 100
    ([8.2, 30.0, 20.0], 1),
])
def test_clevr_distance(depths, expected):
  assert int(tasks_lib.clevr_dist_label(_clevr(depths))) == expected


@pytest.mark.parametrize('num_objects', [3, 4, 7, 10])
def test_clevr_count(num_objects):
  example = _clevr([10.0] * num_objects)
  assert int(tasks_lib.clevr_count_label(example)) == num_objects - 3


@pytest.mark.parametrize('x_position, expected', [
    (0, 0), (1, 0), (2, 1), (17, 8), (31, 15)])  # 32 positions // 2
def test_dsprites_location(x_position, expected):
  example = {'label_x_position': np.int64(x_position)}
  assert int(tasks_lib.dsprites_loc_label(example)) == expected


@pytest.mark.parametrize('orientation, expected', [
    (0, 0), (2, 0), (3, 1), (4, 1), (5, 2), (12, 4), (13, 5), (39, 15)])
def test_dsprites_orientation(orientation, expected):
  # 40 orientations in 16 bins: floor(v / 2.5).
  example = {'label_orientation': np.int64(orientation)}
  assert int(tasks_lib.dsprites_ori_label(example)) == expected


def test_dsprites_and_smallnorb_images():
  mask = np.zeros((64, 64, 1), np.uint8)
  mask[10:20, 30:40] = 1
  image = np.asarray(tasks_lib.dsprites_image({'image': mask}))
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], mask[..., 0] * 255)
  grey = np.arange(96 * 96, dtype=np.int64).reshape(96, 96, 1) % 256
  rgb = np.asarray(tasks_lib.grey_to_rgb({'image': grey.astype(np.uint8)}))
  assert rgb.shape == (96, 96, 3)
  for c in range(3):
    np.testing.assert_array_equal(rgb[..., c], grey[..., 0])


def test_smallnorb_labels():
  example = {'label_azimuth': np.int64(17), 'label_elevation': np.int64(8),
             'label_category': np.int64(2)}
  assert int(tasks_lib.smallnorb_azi_label(example)) == 17
  assert int(tasks_lib.smallnorb_ele_label(example)) == 8
