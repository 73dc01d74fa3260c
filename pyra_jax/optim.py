"""Parameter groups, learning-rate schedules and the optimiser.

PYRA trains a handful of small tensors (LoRA, the PYRA generators, the head) on
top of a frozen backbone. Which parameter is in which group is decided by
`config.trainable`: a mapping group name -> regex over '/'-joined parameter
paths (e.g. 'Transformer/encoderblock_3/pyra/w_r'). A path joins the first group
(in the order the config writes them) whose regex matches the *whole* path;
paths that match no group are frozen.

Groups:
  * 'pyra'   -> AdamW at `config.pyra_lr` (-1: the base lr, which is what the
                authors' code effectively did), weight decay on its 2-D W_r/W_D
                as in the authors' code;
  * 'diffrate' -> AdamW at `config.diffrate_lr` (-1: the base lr): DiffRate's
                rate logits move on a scale of their own (the method gives them
                their own lr), and a search of a few dozen steps at LoRA's lr
                leaves them where they started;
  * any other name -> AdamW at `config.lr`;
  * frozen   -> `optax.set_to_zero()`: no update and no optimiser state.

Weight decay (decoupled, AdamW) applies only to leaves with ndim >= 2 (kernels,
LoRA matrices, W_r, W_D), never to biases, norms or other 1-D parameters.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

import jax
import ml_collections
import optax
from flax import traverse_util
from pyra_jax.errors import ConfigError  # pylint: disable=unused-import

PyTree = Any
FROZEN = 'frozen'
PYRA_GROUP = 'pyra'
DIFFRATE_GROUP = 'diffrate'
# Groups whose peak lr is a config field of its own (-1 in the field: config.lr).
GROUP_LR_FIELDS = {PYRA_GROUP: 'pyra_lr', DIFFRATE_GROUP: 'diffrate_lr'}



def group_regexes(trainable: ml_collections.ConfigDict | Mapping[str, str]
                  ) -> list[tuple[str, re.Pattern]]:
  """Returns [(group, compiled regex)] in the order the config wrote them.

  ConfigDict.items() sorts its keys; `to_json` keeps insertion order, which is
  what "first match wins" must follow.
  """
  if isinstance(trainable, ml_collections.ConfigDict):
    items = json.loads(trainable.to_json()).items()
  else:
    items = trainable.items()
  out = []
  for name, rx in items:
    if name == FROZEN:
      raise ConfigError(f"'{FROZEN}' is reserved for parameters that match no "
                        'group; rename config.trainable.frozen.')
    try:
      out.append((name, re.compile(rx)))
    except re.error as e:
      raise ConfigError(f'config.trainable.{name} = {rx!r} is not a valid '
                        f'regex: {e}.') from None
  return out


def param_labels(params: PyTree, trainable) -> PyTree:
  """Returns a tree like `params` whose leaves are group names (or FROZEN)."""
  groups = group_regexes(trainable)
  flat = traverse_util.flatten_dict(params, sep='/')
  labels = {}
  for path in flat:
    labels[path] = next((g for g, rx in groups if rx.fullmatch(path)), FROZEN)
  return traverse_util.unflatten_dict(labels, sep='/')


def split_params(params: PyTree, trainable) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) nested dicts.

  Only the trainable part goes to the optimiser and into training checkpoints;
  the frozen backbone is re-created from the pretrained weights.
  """
  flat = traverse_util.flatten_dict(params, sep='/')
  labels = traverse_util.flatten_dict(param_labels(params, trainable), sep='/')
  train = {k: v for k, v in flat.items() if labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] == FROZEN}
  return (traverse_util.unflatten_dict(train, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `split_params` (works inside jit: only dict surgery)."""
  flat = traverse_util.flatten_dict(frozen, sep='/')
  flat.update(traverse_util.flatten_dict(trainable, sep='/'))
  return traverse_util.unflatten_dict(flat, sep='/')


def decay_mask(params: PyTree) -> PyTree:
  """True for leaves that get weight decay: matrices and kernels (ndim >= 2)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(peak_lr: float, config: ml_collections.ConfigDict,
                  steps_per_epoch: int) -> optax.Schedule:
  """Per-step linear warm-up then cosine decay, peaking at `peak_lr`.

  Warm-up goes linearly from `warmup_init_lr` to `lr` over `warmup_epochs`, then
  a half cosine from `lr` to `min_lr` at the last step. A group whose peak
  differs from `config.lr` (the PYRA group) follows the same curve scaled by
  peak / lr, so `pyra_lr = 0` really freezes it.
  """
  total = int(config.num_epochs * steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ConfigError(f'Training has {total} steps (num_epochs={config.num_epochs}, '
                      f'{steps_per_epoch} steps per epoch): raise num_epochs.')
  if warmup > total:
    raise ConfigError(f'warmup_epochs={config.warmup_epochs} exceeds '
                      f'num_epochs={config.num_epochs}.')
  scale = peak_lr / config.lr if config.lr else 1.0
  init, end = config.warmup_init_lr * scale, config.min_lr * scale
  if warmup == total:  # Warm-up only: optax needs a non-empty decay phase.
    return optax.linear_schedule(init, peak_lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=init, peak_value=peak_lr, warmup_steps=warmup,
      decay_steps=total, end_value=end)


def group_lrs(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Peak learning rate of every group named in config.trainable."""
  def peak(group: str) -> float:
    field = GROUP_LR_FIELDS.get(group)
    value = config.get(field, -1.0) if field else -1.0
    return config.lr if value < 0 else value
  return {g: peak(g) for g, _ in group_regexes(config.trainable)}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation,
                              dict[str, Callable[[int], Any]]]:
  """Returns (optimiser, {'lr': schedule, 'pyra_lr': schedule[, 'diffrate_lr' in a search]}).

  The optimiser works on any params tree (labels are computed from the paths
  at init/update time): the training loop passes only the trainable part, but
  a full tree also works (its frozen leaves get `set_to_zero`, no state).
  """
  peaks = group_lrs(config)
  schedules = {g: make_schedule(peak, config, steps_per_epoch)
               for g, peak in peaks.items()}
  transforms = {
      g: optax.adamw(learning_rate=schedules[g], b1=config.b1, b2=config.b2,
                     eps=config.eps, weight_decay=config.weight_decay,
                     mask=decay_mask)
      for g in peaks}
  transforms[FROZEN] = optax.set_to_zero()
  tx = optax.partition(transforms,
                       lambda p: param_labels(p, config.trainable))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  base = make_schedule(config.lr, config, steps_per_epoch)
  logged = {'lr': base,
            'pyra_lr': schedules.get(PYRA_GROUP, base)}
  if config.get('model') is not None and config.model.get('diffrate_search', False):
    logged['diffrate_lr'] = schedules.get(DIFFRATE_GROUP, base)  # the search's logits
  return tx, logged
