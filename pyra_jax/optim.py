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
LoRA matrices, W_r, W_D), never to biases, norms or other 1-D parameters, nor
to the class/distillation tokens and the position embeddings (timm's and MAE's
`no_weight_decay()` list: they are embeddings, not weights; they only train in
full fine-tuning), and not to a DeiT distillation head the training loss does not read
(`model.distilled_train`): PyTorch's AdamW skips a parameter without a
gradient, so the authors' untrained head stays exactly at its initial values,
and so does ours (zero gradient, zero Adam step, no decay).

Full fine-tuning (`configs.paper.full_finetune`, the config argument
`finetune=full`): one more group, 'backbone', matching every path, after the
default groups (PYRA's generators keep `pyra_lr`), so nothing is frozen.

Layer-wise lr decay (`config.layer_decay` < 1, MAE's util/lr_decay.py, from
BEiT/ELECTRA): every parameter gets a layer id (the patch embedding, class
token and position embeddings 0, block i: i + 1, everything after the blocks
-- final norm, head -- depth + 1) and its update is multiplied by
layer_decay ** (depth + 1 - id). Scaling AdamW's whole update equals scaling
its learning rate (decay included), which is what MAE's per-group `lr_scale`
does; the multiplier is a stateless transform after the groups, so the
optimiser state is the same as without it.

Learning-rate schedules (`config.lr_schedule`, docs/algorithm.md §4 and §8):
  * 'per_step' -> linear warm-up, then a half cosine, evaluated at every step
                (`make_schedule`); a group's curve is the base curve scaled to
                its peak;
  * 'authors'  -> timm 0.5.4's `CosineLRScheduler(t_initial=num_epochs,
                warmup_t=warmup_epochs)` as the PYRA authors' train.py steps it
                (`authors_schedule`): once per epoch, after the epoch.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
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


# Paths that never get weight decay whatever their rank: the class and
# distillation tokens and the position embeddings (timm's VisionTransformer
# `no_weight_decay()` = {pos_embed, cls_token, dist_token}, which MAE's
# fine-tuning passes to its optimiser).
NO_DECAY = re.compile(r'(cls|dist|Transformer/posembed_input/pos_embedding)')


def decay_mask(params: PyTree) -> PyTree:
  """True for leaves that get weight decay: matrices and kernels (ndim >= 2),
  not the tokens and position embeddings of `NO_DECAY`."""
  # With paths from the pytree itself: inside optax.partition the tree holds
  # empty `MaskedNode`s in place of the other groups' leaves.
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not NO_DECAY.fullmatch(path_name(path)), params)


def path_name(path) -> str:
  """A jax key path as our '/'-joined parameter path ('Transformer/encoder_norm/scale')."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def model_depth(config: ml_collections.ConfigDict) -> int:
  """The number of transformer blocks of config.model (set, or the variant's)."""
  model = config.get('model')
  if model is None:
    raise ConfigError('config.layer_decay needs config.model to know the depth.')
  if model.get('depth'):
    return int(model.depth)
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  name = str(model.get('variant', '')).partition('/')[0]
  if name not in vit.VARIANTS:
    raise ConfigError(f'model.variant {model.get("variant")!r} is not one of '
                      f'{sorted(vit.VARIANTS)} (any patch size): the layer-wise lr '
                      'decay needs its depth.')
  return vit.VARIANTS[name][1]


_BLOCK = re.compile(r'Transformer/encoderblock_(\d+)/.*')
_EMBEDDING = re.compile(r'(embedding/.*|cls|dist|Transformer/posembed_input/.*)')


def layer_id(path: str, depth: int) -> int:
  """MAE's `get_layer_id_for_vit` on our paths: embeddings 0, block i -> i + 1,
  anything else (final norm, fc_norm, head, FacT's shared factors) depth + 1."""
  if _EMBEDDING.fullmatch(path):
    return 0
  m = _BLOCK.fullmatch(path)
  if m:
    return int(m.group(1)) + 1
  return depth + 1


def layer_scales(params: PyTree, layer_decay: float, depth: int) -> PyTree:
  """A tree like `params` of each leaf's lr multiplier, decay ** (depth + 1 - id)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: float(layer_decay) ** (depth + 1 - layer_id(path_name(path), depth)),
      params)


def scale_by_layer(layer_decay: float, depth: int) -> optax.GradientTransformation:
  """Multiplies each update by its layer's scale (`layer_scales`); no state."""
  def scale(updates, params=None):
    del params
    scales = layer_scales(updates, layer_decay, depth)
    return jax.tree.map(lambda u, k: u * jnp.asarray(k, u.dtype), updates, scales)
  return optax.stateless(scale)


def unused_heads(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Top-level scopes the training loss does not read: ('head_dist',) for a
  distilled (DeiT) model trained on its class-token head, else ()."""
  model = config.get('model')
  if model is None or not model.get('distilled', False):
    return ()
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  return ('head_dist',) if vit.distilled_train_head(model) == 'cls' else ()


def make_decay_mask(config: ml_collections.ConfigDict) -> Callable[[PyTree], PyTree]:
  """`decay_mask`, minus the leaves of `unused_heads(config)`.

  Their gradient is zero, so Adam's step is exactly zero; without decay
  they keep their initial values, as PyTorch's AdamW leaves a parameter
  that got no gradient.
  """
  unused = unused_heads(config)
  if not unused:
    return decay_mask

  def mask(params: PyTree) -> PyTree:
    out = decay_mask(params)
    if isinstance(out, Mapping):
      out = {k: (jax.tree.map(lambda _: False, v) if k in unused else v)
             for k, v in out.items()}
    return out
  return mask


LR_SCHEDULES = ('per_step', 'authors')


def make_schedule(peak_lr: float, config: ml_collections.ConfigDict,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning rate of a group peaking at `peak_lr`, per `config.lr_schedule`.

  'per_step': warm-up goes linearly from `warmup_init_lr` to `lr` over
  `warmup_epochs`, then a half cosine from `lr` to `min_lr` at the last step,
  both evaluated at every step. A group whose peak differs from `config.lr`
  (the PYRA group) follows the same curve scaled by peak / lr, so
  `pyra_lr = 0` really freezes it.

  'authors': `authors_schedule` (the PYRA authors' code).
  """
  kind = config.get('lr_schedule', 'per_step')
  if kind not in LR_SCHEDULES:
    raise ConfigError(f'config.lr_schedule = {kind!r}: use one of '
                      f'{", ".join(repr(k) for k in LR_SCHEDULES)}.')
  total = int(config.num_epochs * steps_per_epoch)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ConfigError(f'Training has {total} steps (num_epochs={config.num_epochs}, '
                      f'{steps_per_epoch} steps per epoch): raise num_epochs.')
  if warmup > total:
    raise ConfigError(f'warmup_epochs={config.warmup_epochs} exceeds '
                      f'num_epochs={config.num_epochs}.')
  if kind == 'authors':
    return authors_schedule(peak_lr, config, steps_per_epoch)
  scale = peak_lr / config.lr if config.lr else 1.0
  init, end = config.warmup_init_lr * scale, config.min_lr * scale
  if warmup == total:  # Warm-up only: optax needs a non-empty decay phase.
    return optax.linear_schedule(init, peak_lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=init, peak_value=peak_lr, warmup_steps=warmup,
      decay_steps=total, end_value=end)


def authors_schedule(peak_lr: float, config: ml_collections.ConfigDict,
                     steps_per_epoch: int) -> optax.Schedule:
  """timm 0.5.4's cosine schedule as the PYRA authors' train.py steps it.

  Their train.py builds `CosineLRScheduler(t_initial=epochs, lr_min=min_lr,
  warmup_t=warmup_epochs, warmup_lr_init=warmup_lr)` (timm's
  `create_scheduler`: cycle_mul 1, cycle_limit 1, k_decay 1, no noise,
  warmup_prefix False, t_in_epochs True) and calls `step(epoch)` *after*
  training epoch `epoch`. So, with the epoch e = step // steps_per_epoch:

    lr(e) = f(max(e - 1, 0))             constant within an epoch, one epoch late
    f(t)  = warmup_init_lr + t (peak - warmup_init_lr) / warmup_epochs
                                         if t < warmup_epochs (the warm-up ...)
          = min_lr + (peak - min_lr) (1 + cos(pi t / num_epochs)) / 2
                                         if t < num_epochs (... lies inside the
                                         cosine's span, whose t counts from 0)
          = min_lr                       after the cycle

  Epoch 0 runs at what the constructor set: warmup_init_lr (or the peak
  without warm-up), which is f(0); epoch 1 at f(0) as well. The peak is never
  reached when there is a warm-up: the cosine is already past its top at
  t = warmup_epochs. `warmup_init_lr` and `min_lr` are absolute, the same for
  every group; only the peak is the group's own (timm keeps each param
  group's initial lr as its base value).
  """
  epochs = float(config.num_epochs)
  warmup_t = float(config.warmup_epochs)
  init, lr_min, peak = (float(config.warmup_init_lr), float(config.min_lr),
                        float(peak_lr))
  slope = (peak - init) / warmup_t if warmup_t > 0 else 0.0

  def schedule(count):
    epoch = jnp.asarray(count) // steps_per_epoch
    t = jnp.maximum(epoch - 1, 0).astype(jnp.float32)
    cosine = lr_min + 0.5 * (peak - lr_min) * (1.0 + jnp.cos(jnp.pi * t / epochs))
    lr = jnp.where(t < epochs, cosine, lr_min)
    return jnp.where(t < warmup_t, init + t * slope, lr)
  return schedule


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
                     mask=make_decay_mask(config))
      for g in peaks}
  transforms[FROZEN] = optax.set_to_zero()
  tx = optax.partition(transforms,
                       lambda p: param_labels(p, config.trainable))
  layer_decay = float(config.get('layer_decay', 1.0))
  if layer_decay != 1.0:  # Only then: the optimiser state stays as before.
    tx = optax.chain(tx, scale_by_layer(layer_decay, model_depth(config)))
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  base = make_schedule(config.lr, config, steps_per_epoch)
  logged = {'lr': base,
            'pyra_lr': schedules.get(PYRA_GROUP, base)}
  if config.get('model') is not None and config.model.get('diffrate_search', False):
    logged['diffrate_lr'] = schedules.get(DIFFRATE_GROUP, base)  # the search's logits
  return tx, logged
