"""Mixup, CutMix and label smoothing of a training batch, in JAX, inside the step.

The behaviour is timm's `Mixup` in 'batch' mode (timm/data/mixup.py), the one
MAE's fine-tuning uses (mixup 0.8, cutmix 1.0, prob 1, switch_prob 0.5,
smoothing 0.1): one draw per batch decides whether to mix at all (`prob`),
then CutMix (with probability `switch_prob` when both alphas are > 0) or
Mixup, with lam ~ Beta(alpha, alpha). The batch is mixed with its own reverse
(row i with row B - 1 - i):

  Mixup:  x <- lam x + (1 - lam) x[::-1]
  CutMix: a box of side H sqrt(1 - lam) x W sqrt(1 - lam) (floored), centred
          on a uniform pixel and clipped to the image, is pasted from x[::-1];
          lam becomes 1 - (pasted area) / (H W) (timm's `correct_lam`).

Targets: smoothed one-hots (on = 1 - s + s / C, off = s / C) mixed with the same
lam: lam y + (1 - lam) y[::-1]; each row sums to one.

Here the draws come from a JAX key (a pure function of the run's seed and the
step), so a resumed run mixes exactly as the uninterrupted one; everything is
traced, one compilation whatever is drawn. Images are (B, H, W, C).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array


class MixParams(NamedTuple):
  """One batch's draw: whether to mix, CutMix or Mixup, lam, the box centre."""
  mix: Array          # bool: mix this batch at all (probability `prob`)
  use_cutmix: Array   # bool
  lam: Array          # float32, the drawn Beta sample (before CutMix's correction)
  cy: Array           # int32 in [0, H): the box centre row (CutMix)
  cx: Array           # int32 in [0, W)


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the step needs soft targets: mixup, cutmix or label smoothing on."""
  m = config.get('mixup')
  mixing = m is not None and (m.mixup_alpha > 0 or m.cutmix_alpha > 0) and m.prob > 0
  return bool(mixing or config.get('label_smoothing', 0.0) > 0)


def draw(key: Array, height: int, width: int, *, mixup_alpha: float,
         cutmix_alpha: float, prob: float, switch_prob: float) -> MixParams:
  """timm's `_params_per_batch` (plus the box centre of `rand_bbox`), from `key`."""
  k_mix, k_switch, k_lam_mix, k_lam_cut, k_y, k_x = jax.random.split(key, 6)
  mixing = mixup_alpha > 0 or cutmix_alpha > 0
  mix = jax.random.uniform(k_mix) < prob if mixing else jnp.asarray(False)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = (jax.random.beta(k_lam_mix, mixup_alpha, mixup_alpha)
             if mixup_alpha > 0 else jnp.float32(1.0))
  lam_cut = (jax.random.beta(k_lam_cut, cutmix_alpha, cutmix_alpha)
             if cutmix_alpha > 0 else jnp.float32(1.0))
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  return MixParams(mix=mix, use_cutmix=use_cutmix, lam=lam,
                   cy=jax.random.randint(k_y, (), 0, height),
                   cx=jax.random.randint(k_x, (), 0, width))


def cutmix_box(lam: Array, height: int, width: int, cy: Array, cx: Array
               ) -> tuple[Array, Array, Array, Array]:
  """timm's `rand_bbox` for a given centre: (yl, yh, xl, xh), clipped to the image."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + cut_h // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + cut_w // 2, 0, width)
  return yl, yh, xl, xh


def apply(images: Array, labels: Array, num_classes: int, params: MixParams,
          smoothing: float) -> tuple[Array, Array]:
  """(mixed images, soft targets (B, num_classes) float32) for a drawn `params`."""
  b, h, w = images.shape[:3]
  del b
  flipped = images[::-1]
  yl, yh, xl, xh = cutmix_box(params.lam, h, w, params.cy, params.cx)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # (H, W)
  area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
  lam_cut = 1.0 - area / float(h * w)
  lam = jnp.where(params.use_cutmix, lam_cut, params.lam)
  lam = jnp.where(params.mix, lam, 1.0)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  blend = lam.astype(images.dtype) * images + (1.0 - lam).astype(images.dtype) * flipped
  mixed = jnp.where(params.mix, jnp.where(params.use_cutmix, cut, blend), images)
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off
  targets = lam * y + (1.0 - lam) * y[::-1]
  return mixed, targets


def mix_batch(batch: dict[str, Any], key: Array, num_classes: int,
              config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`batch` with mixed 'image' and soft 'target' per config.mixup / label_smoothing."""
  m = config.mixup
  images = batch['image']
  params = draw(key, images.shape[1], images.shape[2],
                mixup_alpha=float(m.mixup_alpha), cutmix_alpha=float(m.cutmix_alpha),
                prob=float(m.prob), switch_prob=float(m.switch_prob))
  mixed, targets = apply(images, batch['label'], num_classes, params,
                         float(config.get('label_smoothing', 0.0)))
  return dict(batch, image=mixed, target=targets)
