"""Training augmentation in tf.data: MAE's fine-tuning transform, deterministic.

MAE fine-tunes with timm's `create_transform(is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, interpolation='bicubic')`:
a random resized crop, a horizontal flip, RandAugment, normalisation, then
random erasing. Each step is a config field (configs/common.py, data), all off
by default (the paper's VTAB-1k recipe has no augmentation):

  * random_resized_crop: TF's own `stateless_sample_distorted_bounding_box`
    with area (0.08, 1), aspect ratio (3/4, 4/3), 10 attempts, the whole image
    otherwise (the Inception crop, as big_vision's `inception_crop` and timm's
    `RandomResizedCrop` draw it), then a bicubic resize;
  * flip: `tf.image.stateless_random_flip_left_right`;
  * randaugment: timm's RandAugment (timm/data/auto_augment.py), written here
    in TF ops: `num_layers` ops drawn with replacement from timm's 15, each
    applied with probability 0.5 at a magnitude ~ N(M, mstd) clipped to
    [0, 10]; 'inc1' picks the ops whose severity increases with M. Fill colour
    of the geometric ops: the ImageNet mean pixel (timm's `img_mean`);
  * random_erasing: timm's `RandomErasing(mode='pixel')` on the normalised
    image: with probability p, a box of area (0.02, 1/3) of the image and
    aspect ratio in (0.3, 1/0.3) (log-uniform), 10 attempts, filled with N(0, 1)
    noise.

Why our own RandAugment: the libraries with one for tf.data are
tf-models-official (its `official.vision.ops.augment` needs TensorFlow 2.20
exactly, tensorflow-text and ~30 other packages) and Keras 3 (installed with
TensorFlow; its `keras.layers.RandAugment` has another op set and magnitude
scale than timm's, no magnitude noise, and draws from a stateful seed
generator, so a tf.data pipeline with parallel maps does not give the same
images twice and a resumed run would not see the images the interrupted one
would have). Here every random draw is stateless, from (config.seed, the
example's position in the training stream), so the same seed gives the same
images and a resumed run sees exactly what the uninterrupted one did.

Differences from timm's PIL ops: the geometric ops (rotate, shear, translate)
interpolate bilinearly (TF's projective transform has no bicubic) where timm
picks bilinear or bicubic; pixel ops follow PIL's integer formulas.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Optional, Sequence

from pyra_jax.data.tf_import import tf

from pyra_jax.data.errors import DataError

# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (the 'inc1' set).
RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
            'ShearY', 'TranslateXRel', 'TranslateYRel')
RAND_INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate',
                       'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
                       'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                       'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
                       'TranslateYRel')
LEVEL_DENOM = 10.0
# timm's fill colour in create_transform: the ImageNet mean as a pixel.
FILL = (124, 116, 104)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed 'rand-m9-mstd0.5-inc1' (timm's `rand_augment_transform` keys)."""
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return RAND_INCREASING_OPS if self.increasing else RAND_OPS


def parse_randaugment(spec: str) -> RandAugmentSpec:
  """timm's RandAugment string -> RandAugmentSpec; DataError if malformed."""
  parts = spec.split('-')
  bad = DataError(f"data.randaugment = {spec!r}: use timm's form 'rand-m<M>[-n<N>]"
                  "[-mstd<S>][-mmax<X>][-inc1]', e.g. 'rand-m9-mstd0.5-inc1' "
                  "(MAE's), or '' for none.")
  if parts[0] != 'rand':
    raise bad
  out = {}
  for part in parts[1:]:
    m = re.fullmatch(r'([a-z]+)(\d.*)', part)
    if not m:
      raise bad
    key, val = m.groups()
    try:
      if key == 'm':
        out['magnitude'] = float(int(val))
      elif key == 'n':
        out['num_layers'] = int(val)
      elif key == 'mstd':
        std = float(val)
        out['magnitude_std'] = math.inf if std > 100 else std
      elif key == 'mmax':
        out['magnitude_max'] = float(int(val))
      elif key == 'inc':
        out['increasing'] = bool(int(val))
      else:
        raise bad
    except ValueError:
      raise bad from None
  if out.get('num_layers', 2) < 1 or out.get('magnitude', 10) < 0:
    raise bad
  return RandAugmentSpec(**out)


# --- Pixel ops on uint8 (H, W, 3), as PIL computes them. ---------------------

def _lut(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """Applies per-channel lookup tables `table` (3, 256) to a uint8 image."""
  idx = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  return tf.cast(tf.gather(tf.reshape(table, [-1]), idx), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.posterize`: keep the `bits` most significant bits (>= 8: as is)."""
  bits = tf.cast(bits, tf.int32)
  shift = tf.clip_by_value(8 - bits, 0, 8)
  mask = tf.bitwise.bitwise_and(tf.bitwise.invert(tf.bitwise.left_shift(1, shift) - 1), 255)
  return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.solarize`: i < threshold ? i : 255 - i."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image: tf.Tensor, add: tf.Tensor, threshold: int = 128) -> tf.Tensor:
  """timm's `solarize_add`: i < threshold ? min(255, i + add) : i."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < threshold, tf.minimum(255, x + tf.cast(add, tf.int32)), x),
                 tf.uint8)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.autocontrast` (cutoff 0): each channel stretched to [0, 255]."""
  x = tf.cast(image, tf.float64)  # Python floats, as PIL's table is computed.
  lo = tf.reduce_min(x, axis=[0, 1])
  hi = tf.reduce_max(x, axis=[0, 1])
  i = tf.range(256, dtype=tf.float64)[None, :]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  table = tf.clip_by_value(tf.floor(i * scale[:, None] - lo[:, None] * scale[:, None]),
                           0.0, 255.0)
  table = tf.where((hi > lo)[:, None], table, tf.broadcast_to(i, [3, 256]))
  return _lut(image, tf.cast(table, tf.int32))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """PIL `ImageOps.equalize`: per channel, lut[i] = (step // 2 + sum(h[:i])) // step
  with step = (pixels - count of the last used level) // 255 (identity if 0)."""
  x = tf.cast(image, tf.int32)
  tables = []
  for c in range(3):
    h = tf.math.bincount(tf.reshape(x[..., c], [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(h, h > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    before = tf.concat([[0], tf.cumsum(h)[:-1]], 0)
    lut = tf.minimum((step // 2 + before) // tf.maximum(step, 1), 255)
    tables.append(tf.where(step > 0, lut, tf.range(256)))
  return _lut(image, tf.stack(tables))


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L: (299 R + 587 G + 114 B) / 1000 in its fixed-point form, (H, W) int32."""
  x = tf.cast(image, tf.int32)
  return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `Image.blend(degenerate, image, factor)` (ImageEnhance): in single
  precision as PIL's C code, truncated to uint8."""
  d = tf.cast(degenerate, tf.float32)
  out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.floor(tf.clip_by_value(out, 0.0, 255.0)), tf.uint8)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Color`: blend with the greyscale image."""
  grey = tf.cast(tf.repeat(grayscale(image)[..., None], 3, axis=-1), tf.uint8)
  return blend(grey, image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Contrast`: blend with the mean grey level, int(mean + 0.5)."""
  mean = tf.floor(tf.reduce_mean(tf.cast(grayscale(image), tf.float64)) + 0.5)
  return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Brightness`: blend with black."""
  return blend(tf.zeros_like(image), image, factor)


def smooth(image: tf.Tensor) -> tf.Tensor:
  """PIL's `ImageFilter.SMOOTH` (3x3 [1 1 1; 1 5 1; 1 1 1] / 13, rounded), the
  one-pixel border left as it is."""
  x = tf.cast(image, tf.float32)[None]
  k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  inner = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], 'VALID')[0]
  inner = tf.clip_by_value(tf.floor(inner + 0.5), 0.0, 255.0)
  out = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  border = tf.pad(tf.ones([h - 2, w - 2, 3], tf.bool), [[1, 1], [1, 1], [0, 0]])
  return tf.cast(tf.where(border, out, tf.cast(image, tf.float32)), tf.uint8)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL `ImageEnhance.Sharpness`: blend with the smoothed image."""
  return blend(smooth(image), image, factor)


def affine(image: tf.Tensor, matrix: Sequence[tf.Tensor],
           fill: Sequence[int] = FILL) -> tf.Tensor:
  """PIL's `Image.transform(AFFINE, (a, b, c, d, e, f))`: output (x, y) reads input
  (a x + b y + c, d x + e y + f); outside the image: `fill`. Bilinear."""
  fill_t = tf.constant(fill, tf.float32)
  x = tf.cast(image, tf.float32) - fill_t  # Fill 0 below = `fill` after adding back.
  a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in matrix)
  # PIL maps pixel centres (x + 0.5, y + 0.5) and samples at the result - 0.5;
  # TF maps pixel indices: shift the offsets so both sample the same points.
  c = c + 0.5 * (a + b) - 0.5
  f = f + 0.5 * (d + e) - 0.5
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return tf.cast(tf.clip_by_value(tf.round(out + fill_t), 0.0, 255.0), tf.uint8)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """PIL `Image.rotate(degrees)` about the centre, counter-clockwise."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  angle = -tf.cast(degrees, tf.float32) * math.pi / 180.0
  a, b, d, e = tf.cos(angle), tf.sin(angle), -tf.sin(angle), tf.cos(angle)
  cx, cy = w / 2.0, h / 2.0
  c = a * -cx + b * -cy + cx
  f = d * -cx + e * -cy + cy
  return affine(image, (a, b, c, d, e, f))


# --- timm's level -> argument functions and the ops by name. ------------------

def _negate(level: tf.Tensor, coin: tf.Tensor) -> tf.Tensor:
  return tf.where(coin > 0.5, -level, level)


def apply_op(name: str, image: tf.Tensor, magnitude: tf.Tensor,
             coin: tf.Tensor) -> tf.Tensor:
  """The timm op `name` at `magnitude` (in [0, 10]); `coin` in [0, 1) is the draw
  of timm's `_randomly_negate` (> 0.5: negative)."""
  level = tf.cast(magnitude, tf.float32) / LEVEL_DENOM
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  one = tf.constant(1.0)
  zero = tf.constant(0.0)
  if name == 'AutoContrast':
    return auto_contrast(image)
  if name == 'Equalize':
    return equalize(image)
  if name == 'Invert':
    return invert(image)
  if name == 'Rotate':
    return rotate(image, _negate(level * 30.0, coin))
  if name == 'Posterize':
    return posterize(image, tf.cast(level * 4, tf.int32))
  if name == 'PosterizeIncreasing':
    return posterize(image, 4 - tf.cast(level * 4, tf.int32))
  if name == 'Solarize':
    return solarize(image, tf.cast(level * 256, tf.int32))
  if name == 'SolarizeIncreasing':
    return solarize(image, 256 - tf.cast(level * 256, tf.int32))
  if name == 'SolarizeAdd':
    return solarize_add(image, tf.cast(level * 110, tf.int32))
  enhance = {'Color': color, 'Contrast': contrast, 'Brightness': brightness,
             'Sharpness': sharpness}
  base = name.replace('Increasing', '')
  if base in enhance:
    if name.endswith('Increasing'):
      factor = tf.maximum(0.1, 1.0 + _negate(level * 0.9, coin))
    else:
      factor = level * 1.8 + 0.1
    return enhance[base](image, factor)
  if name == 'ShearX':
    return affine(image, (one, _negate(level * 0.3, coin), zero, zero, one, zero))
  if name == 'ShearY':
    return affine(image, (one, zero, zero, _negate(level * 0.3, coin), one, zero))
  if name == 'TranslateXRel':
    return affine(image, (one, zero, _negate(level * 0.45, coin) * size[1], zero, one, zero))
  if name == 'TranslateYRel':
    return affine(image, (one, zero, zero, zero, one, _negate(level * 0.45, coin) * size[0]))
  raise ValueError(f'Unknown RandAugment op {name!r}.')


def rand_augment(image: tf.Tensor, spec: RandAugmentSpec, seed: tf.Tensor) -> tf.Tensor:
  """timm's `RandAugment.__call__` on a uint8 (H, W, 3) image, from a stateless seed."""
  ops = spec.ops
  seeds = tf.random.experimental.stateless_split(seed, spec.num_layers * 4 + 1)
  chosen = tf.random.stateless_uniform([spec.num_layers], seeds[0], 0, len(ops),
                                       dtype=tf.int32)
  for layer in range(spec.num_layers):
    s_apply, s_mag, s_coin = seeds[1 + 4 * layer], seeds[2 + 4 * layer], seeds[3 + 4 * layer]
    magnitude = tf.constant(spec.magnitude, tf.float32)
    if math.isinf(spec.magnitude_std):
      magnitude = tf.random.stateless_uniform([], s_mag, 0.0, spec.magnitude)
    elif spec.magnitude_std > 0:
      magnitude = magnitude + spec.magnitude_std * tf.random.stateless_normal([], s_mag)
    magnitude = tf.clip_by_value(magnitude, 0.0, spec.magnitude_max)
    coin = tf.random.stateless_uniform([], s_coin)
    # timm: `if prob < 1 and random() > prob: skip`, prob 0.5.
    apply = tf.random.stateless_uniform([], s_apply) <= 0.5
    branches = [functools.partial(apply_op, name, image, magnitude, coin) for name in ops]
    out = tf.switch_case(chosen[layer], branches)
    image = tf.where(apply, out, image)
    image.set_shape([None, None, 3])
  return image


# --- Crop, flip, erasing, and the whole transform. ----------------------------

def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """The Inception crop (TF's sampler, 10 attempts, else the whole image), then a
  bicubic resize to (size, size); uint8."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  out = tf.image.resize(crop, [size, size], method='bicubic', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def random_erasing(image: tf.Tensor, prob: float, seed: tf.Tensor,
                   attempts: int = 10) -> tf.Tensor:
  """timm's `RandomErasing(probability=prob, mode='pixel', max_count=1)` on a
  normalised float (H, W, C) image."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  area = tf.cast(h * w, tf.float32)
  s = tf.random.experimental.stateless_split(seed, 5)
  target = tf.random.stateless_uniform([attempts], s[0], 0.02, 1 / 3) * area
  log_ratio = tf.random.stateless_uniform([attempts], s[1], math.log(0.3), math.log(1 / 0.3))
  ratio = tf.exp(log_ratio)
  eh = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (ew < w) & (eh < h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # The first attempt that fits.
  any_fits = tf.reduce_any(fits)
  bh, bw = eh[first], ew[first]
  u = tf.random.stateless_uniform([2], s[2])
  top = tf.cast(u[0] * tf.cast(h - bh + 1, tf.float32), tf.int32)
  left = tf.cast(u[1] * tf.cast(w - bw + 1, tf.float32), tf.int32)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  noise = tf.random.stateless_normal(tf.shape(image), s[3], dtype=image.dtype)
  erase = any_fits & (tf.random.stateless_uniform([], s[4]) < prob)
  return tf.where(erase & box[..., None], noise, image)


@dataclasses.dataclass(frozen=True)
class Augment:
  """The training augmentation of `config.data` (module doc); `None` fields are off."""
  random_resized_crop: bool = False
  flip: bool = False
  randaugment: Optional[RandAugmentSpec] = None
  random_erasing: float = 0.0

  @property
  def crops(self) -> bool:
    return self.random_resized_crop

  def uint8_ops(self, image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
    """Crop, flip and RandAugment on an example's uint8 image: the original
    one with a random resized crop, else one already resized to `size`."""
    s = tf.random.experimental.stateless_split(seed, 3)
    if self.random_resized_crop:
      image = random_resized_crop(image, size, s[0])
    if self.flip:
      image = tf.image.stateless_random_flip_left_right(image, s[1])
    if self.randaugment is not None:
      image = rand_augment(image, self.randaugment, s[2])
    return image

  def float_ops(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random erasing on the normalised image."""
    if self.random_erasing > 0:
      image = random_erasing(image, self.random_erasing,
                             tf.random.experimental.stateless_fold_in(seed, 7))
    return image


def from_config(data_config) -> Optional[Augment]:
  """The `Augment` of config.data, or None when every augmentation is off."""
  def get(name, default):
    try:
      return data_config[name]
    except (KeyError, AttributeError, TypeError):
      return default
  spec = get('randaugment', '') or ''
  erasing = float(get('random_erasing', 0.0) or 0.0)
  if not 0.0 <= erasing <= 1.0:
    raise DataError(f'data.random_erasing = {erasing}: use a probability from 0 to 1.')
  out = Augment(random_resized_crop=bool(get('random_resized_crop', False)),
                flip=bool(get('flip', False)),
                randaugment=parse_randaugment(spec) if spec else None,
                random_erasing=erasing)
  return None if out == Augment() else out
