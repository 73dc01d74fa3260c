"""The training augmentation (pyra_jax/data/augment.py) against numpy transcriptions
of PIL's formulas (ImageOps, ImageEnhance, as timm's RandAugment calls them),
timm's RandAugment string parsing, determinism, and the pipeline with it on."""

import numpy as np
import pytest
import tensorflow as tf

from pyra_jax.data import augment
from pyra_jax.data.errors import DataError
from pyra_jax.data.input_pipeline import build_data


def _image(seed=0, h=12, w=10):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def _grey(x):  # PIL's L24 fixed-point RGB -> L
  x = x.astype(np.int64)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16


def _blend(d, x, f):  # PIL ImagingBlend (C floats): truncated, clipped
  d = d.astype(np.float32)
  out = d + np.float32(f) * (x.astype(np.float32) - d)
  return np.floor(np.clip(out, 0, 255)).astype(np.uint8)


def _equalize_band(band):  # PIL ImageOps.equalize, one band
  h = np.bincount(band.ravel(), minlength=256)
  histo = [v for v in h if v]
  if len(histo) <= 1:
    return band
  step = (sum(histo) - histo[-1]) // 255
  if not step:
    return band
  lut, n = [], step // 2
  for i in range(256):
    lut.append(min(n // step, 255))
    n = n + h[i]
  return np.asarray(lut, np.uint8)[band]


def _autocontrast_band(band):  # PIL ImageOps.autocontrast, cutoff 0
  lo, hi = int(band.min()), int(band.max())
  if hi <= lo:
    return band
  scale = 255.0 / (hi - lo)
  offset = -lo * scale
  lut = [min(255, max(0, int(ix * scale + offset))) for ix in range(256)]
  return np.asarray(lut, np.uint8)[band]


@pytest.mark.parametrize('seed', [0, 1])
def test_pixel_ops_match_pil_formulas(seed):
  x = _image(seed)
  if seed:  # A low-contrast image, where autocontrast and equalize matter.
    x = (x // 4 + 60).astype(np.uint8)
  t = tf.constant(x)
  xi = x.astype(np.int64)
  np.testing.assert_array_equal(augment.invert(t), 255 - x)
  for bits in (0, 1, 4, 7):
    mask = ~(2 ** (8 - bits) - 1) & 255
    np.testing.assert_array_equal(augment.posterize(t, bits), (xi & mask).astype(np.uint8))
  for thresh in (0, 100, 256):
    np.testing.assert_array_equal(augment.solarize(t, thresh),
                                  np.where(xi < thresh, xi, 255 - xi).astype(np.uint8))
  np.testing.assert_array_equal(augment.solarize_add(t, 99),
                                np.where(xi < 128, np.minimum(255, xi + 99), xi))
  np.testing.assert_array_equal(
      augment.auto_contrast(t), np.stack([_autocontrast_band(x[..., c]) for c in range(3)], -1))
  np.testing.assert_array_equal(
      augment.equalize(t), np.stack([_equalize_band(x[..., c]) for c in range(3)], -1))
  grey = _grey(x)
  for f in (0.1, 0.55, 1.9):
    np.testing.assert_array_equal(augment.color(t, f),
                                  _blend(np.repeat(grey[..., None], 3, -1), x, f))
    mean = int(grey.mean() + 0.5)
    np.testing.assert_array_equal(augment.contrast(t, f), _blend(np.full_like(x, mean), x, f))
    np.testing.assert_array_equal(augment.brightness(t, f), _blend(np.zeros_like(x), x, f))
  # SMOOTH: [1 1 1; 1 5 1; 1 1 1] / 13 inside, rounded; the border as it was.
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
  want = x.copy()
  for i in range(1, x.shape[0] - 1):
    for j in range(1, x.shape[1] - 1):
      for c in range(3):
        want[i, j, c] = np.clip(np.floor((xi[i - 1:i + 2, j - 1:j + 2, c] * k).sum() + 0.5),
                                0, 255)
  np.testing.assert_array_equal(augment.smooth(t), want)


def test_geometric_ops_move_pixels_as_pil_affine():
  x = _image(2)
  t = tf.constant(x)
  fill = np.array(augment.FILL, np.uint8)
  # TranslateXRel by +3 pixels: output (i, j) reads input (i, j + 3).
  got = augment.affine(t, (1.0, 0.0, 3.0, 0.0, 1.0, 0.0)).numpy()
  np.testing.assert_array_equal(got[:, :-3], x[:, 3:])
  assert (got[:, -3:] == fill).all()
  got = augment.affine(t, (1.0, 0.0, 0.0, 0.0, 1.0, -2.0)).numpy()
  np.testing.assert_array_equal(got[2:], x[:-2])
  assert (got[:2] == fill).all()
  # 180 degrees about the centre of an even-sized image: a point reflection.
  sq = _image(3, 8, 8)
  np.testing.assert_array_equal(augment.rotate(tf.constant(sq), 180.0).numpy(), sq[::-1, ::-1])
  np.testing.assert_array_equal(augment.rotate(tf.constant(sq), 0.0).numpy(), sq)


def test_randaugment_strings_parse_as_timm():
  s = augment.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert (s.magnitude, s.num_layers, s.magnitude_std, s.increasing) == (9, 2, 0.5, True)
  assert s.ops == augment.RAND_INCREASING_OPS and len(s.ops) == 15
  s = augment.parse_randaugment('rand-m7-n3-mstd101')
  assert (s.magnitude, s.num_layers, s.magnitude_std, s.increasing) == (7, 3, float('inf'), False)
  for bad in ('rand-x9', 'augmix-m3', 'rand-m', 'rand-n0'):
    with pytest.raises(DataError, match='rand-m9-mstd0.5-inc1'):
      augment.parse_randaugment(bad)


def test_every_op_keeps_shape_and_dtype_and_the_draws_are_deterministic():
  x = tf.constant(_image(4, 16, 16))
  for name in augment.RAND_OPS + augment.RAND_INCREASING_OPS:
    out = augment.apply_op(name, x, tf.constant(9.0), tf.constant(0.7))
    assert out.shape == (16, 16, 3) and out.dtype == tf.uint8, name
  spec = augment.parse_randaugment('rand-m9-mstd0.5-inc1')
  outs = [augment.rand_augment(x, spec, tf.constant([0, i], tf.int64)).numpy()
          for i in range(12)]
  again = [augment.rand_augment(x, spec, tf.constant([0, i], tf.int64)).numpy()
           for i in range(12)]
  for a, b in zip(outs, again):
    np.testing.assert_array_equal(a, b)
  assert len({o.tobytes() for o in outs}) > 4  # Different seeds, different images.
  crop = augment.random_resized_crop(tf.constant(_image(5, 40, 30)), 16,
                                     tf.constant([1, 2], tf.int64))
  assert crop.shape == (16, 16, 3) and crop.dtype == tf.uint8


def test_random_erasing_erases_one_box_with_the_given_probability():
  img = tf.zeros([20, 20, 3])
  erased = []
  for i in range(200):
    out = augment.random_erasing(img, 0.25, tf.constant([3, i], tf.int64)).numpy()
    changed = (out != 0).any(-1)
    if changed.any():
      rows, cols = np.nonzero(changed)
      box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
      assert box.mean() > 0.95  # One rectangle of noise.
      area = box.size / 400
      assert 0.015 <= area <= 1 / 3 + 0.05
    erased.append(changed.any())
  assert 0.15 < np.mean(erased) < 0.35


def test_pipeline_with_augmentation_repeats_exactly():
  images = np.random.default_rng(0).integers(0, 256, size=(12, 20, 20, 3)).astype(np.uint8)
  ds = tf.data.Dataset.from_tensor_slices({'image': images, 'label': np.arange(12) % 3})
  aug = augment.Augment(random_resized_crop=True, flip=True,
                        randaugment=augment.parse_randaugment('rand-m9-mstd0.5-inc1'),
                        random_erasing=0.25)
  data = build_data(ds, 12, num_classes=3, batch_size=4, image_size=16, train=True,
                    seed=1, task='t', split='s', augment=aug)
  first = [b for _, b in zip(range(5), data)]
  second = [b for _, b in zip(range(5), data)]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['image'].shape == (4, 16, 16, 3) and a['image'].dtype == np.float32
  plain = build_data(ds, 12, num_classes=3, batch_size=4, image_size=16, train=True,
                     seed=1, task='t', split='s')
  p = next(iter(plain))
  assert not np.allclose(p['image'], first[0]['image'])
