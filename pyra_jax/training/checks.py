"""Config checks of the loop: what cannot run is refused before anything is compiled.

The loop's numeric fields and their ranges (`EVAL_FIELDS`, `TRAIN_FIELDS`,
checked by `check_config`), the workdir, the device count a batch must divide,
the task's class count against the head, and a lower bound on the memory one
batch needs (`check_batch_memory`). Each refusal is a `ConfigError` whose
message names the field to change.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from pyra_jax import optim
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import SPEEDUP_FIELDS, Choices, Range, check_fields


# config.headline: which accuracy a run reports first; config.eval_epochs: which
# epochs the periodic evaluations follow (configs/common.py).
HEADLINES = ('final', 'max')
EVAL_EPOCHS = ('ours', 'authors')


def check_divisible(name: str, value: int) -> None:
  """Refuses a batch size the devices cannot share equally (config.`name` = `value`)."""
  n = jax.device_count()
  if value % n:
    raise ConfigError(f'config.{name} = {value} is not divisible by the {n} '
                      f'devices: use a multiple of {n}.')


# The loop's numeric fields and the values that work (configs/common.py
# documents each), one table per use: what evaluation reads too, then what only
# training reads. Checked by `check_config` before anything is compiled.
EVAL_FIELDS: dict[str, Range | Choices] = {
    # jax.random keys and the tf.data shuffle take a signed 64-bit seed.
    'seed': Range(-2 ** 63, 2 ** 63 - 1, integer=True,
                  why='what jax.random and tf.data accept as a seed'),
    'eval_batch_size': Range(1, integer=True, why='images per evaluation batch'),
    'data.num_parallel_calls': Range(1, integer=True, also=(-1,),
                                     why='-1: tf.data.AUTOTUNE'),
    'headline': Choices(HEADLINES, why="the last evaluation's accuracy, or the best one's"),
}


TRAIN_FIELDS: dict[str, Range | Choices] = {
    'batch_size': Range(1, integer=True, why='images per update'),
    'grad_accum_steps': Range(1, integer=True, why=(
        'micro-batches per update; 1: no accumulation')),
    'num_epochs': Range(0, low_open=True, why='train for at least one epoch'),
    'warmup_epochs': Range(0, why='0 for no warm-up'),
    'log_every_steps': Range(1, integer=True, why='log every N >= 1 steps'),
    'checkpoint_every_steps': Range(1, integer=True, why=(
        'save every N >= 1 steps; a very large N saves only at the end')),
    'keep_checkpoints': Range(1, integer=True, why=(
        'at least the latest checkpoint is kept, or the run would delete its own result')),
    # Optimiser settings: a non-finite one makes the first update NaN, which
    # would then be reported as a divergence of the learning rate.
    'lr': Range(0, low_open=True, why='the peak learning rate'),
    'pyra_lr': Range(0, also=(-1,), why='-1: the same as config.lr'),
    'diffrate_lr': Range(0, also=(-1,), why='-1: the same as config.lr'),
    'min_lr': Range(0, why='the learning rate at the end of the cosine'),
    'warmup_init_lr': Range(0, why='the learning rate at step 0'),
    'weight_decay': Range(0, why='0: no weight decay'),
    'b1': Range(0, 1, high_open=True, why="Adam's first-moment decay"),
    'b2': Range(0, 1, high_open=True, why="Adam's second-moment decay"),
    'eps': Range(0, low_open=True, why=(
        "Adam's epsilon; at 0 a parameter with zero gradients gets 0/0 = NaN")),
    'grad_clip_norm': Range(0, why='0: no clipping'),
    'lr_schedule': Choices(optim.LR_SCHEDULES, why=(
        "per-step warm-up and cosine, or timm's per-epoch cosine as the authors step it")),
    'eval_epochs': Choices(EVAL_EPOCHS, why=(
        "'ours': after epochs 1, N, 2N, ...; 'authors': after 1, N+1, 2N+1, ...")),
    'distill.temperature': Range(0, low_open=True, why=(
        'the distillation temperature T; 1 leaves the logits as they are')),
    'distill.weight': Range(0, why='0 trains on the cross-entropy alone'),
    'data.shuffle_buffer': Range(1, integer=True, why=(
        'the tf.data shuffle buffer; 1 does not shuffle')),
    'layer_decay': Range(0, 1, low_open=True, why=(
        "layer-wise lr decay, each layer's lr scaled by decay ** (depth + 1 - id); 1: off")),
    'label_smoothing': Range(0, 1, high_open=True, why='0: one-hot targets'),
    'mixup.mixup_alpha': Range(0, why='Beta(alpha, alpha) of Mixup; 0: off'),
    'mixup.cutmix_alpha': Range(0, why='Beta(alpha, alpha) of CutMix; 0: off'),
    'mixup.prob': Range(0, 1, why='the probability that a batch is mixed'),
    'mixup.switch_prob': Range(0, 1, why=(
        'the probability of CutMix rather than Mixup when both are on')),
    'data.random_erasing': Range(0, 1, why='the probability of erasing a box'),
}


def check_config(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
  """Refuses loop settings that cannot work, before anything is compiled.

  Each would otherwise fail deep inside a step (a modulo by zero after
  compilation, an OverflowError from a seed), be reported under another
  field's name (an infinite weight decay as a divergence of the lr), or run
  silently with a meaning nobody asked for (a negative warm-up, float16 on a
  model that is only tested in float32 and bfloat16).
  """
  check_fields(config, EVAL_FIELDS, 'config.')
  if 'speedup' in config:
    check_fields(config.speedup, SPEEDUP_FIELDS, 'config.speedup.')
  dtype = config.get('dtype', 'float32')
  if dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"config.dtype = {dtype!r}: use 'float32' or 'bfloat16' "
                      '(float16 overflows in the attention logits without loss '
                      'scaling, which pyra_jax does not implement).')
  if not training:
    return
  check_fields(config, TRAIN_FIELDS, 'config.')
  accum = config.grad_accum_steps
  if config.batch_size % accum:
    raise ConfigError(
        f'config.batch_size = {config.batch_size} is not divisible by '
        f'config.grad_accum_steps = {accum}: batch_size is the global batch of one '
        'update, split into grad_accum_steps equal micro-batches; use a batch size '
        'that is a multiple of it.')


def check_workdir(workdir: str) -> None:
  """Refuses a --workdir that is a file: a run's records need a folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file, not a folder: give a '
                      'folder (new or an earlier run of this config).')


def check_num_classes(num_classes: int | None, data) -> None:
  """Refuses a head with fewer outputs than the task has classes.

  A label >= num_classes has no logit: the cross-entropy is NaN from the first
  step, which would otherwise be reported as a divergence of the lr. A larger
  head is fine (unused outputs), and an unset one is the task's count.
  """
  if num_classes is not None and num_classes < data.num_classes:
    raise ConfigError(
        f'config.model.num_classes = {num_classes}, but task {data.task!r} has '
        f'{data.num_classes} classes (labels 0 to {data.num_classes - 1}): the '
        'labels beyond the head have no logit; leave model.num_classes unset '
        f"(the task's count) or set it to at least {data.num_classes}.")


def batch_memory_bytes(model, image_size: int, batch: int, *, training: bool) -> int:
  """A lower bound on the bytes one batch of `batch` images needs in `model`.

  Counts only tensors that must exist: the float32 images; for evaluation the
  largest of one block's attention weights (B, H, N, N) float32 (unless JAX's
  attention kernel is asked for, which may never form them) and its MLP
  hidden layer (B, N', mlp) in the compute dtype; for training, those of every
  block at once, which the backward pass reads (nothing is rematerialised).
  Parameters, gradients and XLA's temporaries come on top, so a batch over
  this bound cannot run, and one under it may still not.
  """
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  counts = vit.num_tokens(model, image_size)
  act = np.dtype(model.dtype).itemsize
  # Masked attention (LTMP, the DiffRate search) forms the weights whatever the
  # implementation.
  masked = any(r.masked or r.mean_attn for r in (
      model.reducer.attention(l, train=training) for l in range(model.depth)))
  weights = model.arch.attention != 'dot_product_attention' or masked
  per_block = []
  for l in range(model.depth):
    attn = model.num_heads * counts[l] ** 2 * 4 if weights else 0
    mlp = counts[l + 1] * model.mlp_dim * act
    per_block.append((attn, mlp))
  if training:
    per_image = sum(a + m for a, m in per_block)
  else:
    per_image = max(max(a, m) for a, m in per_block)
  return int(batch) * (image_size * image_size * 3 * 4 + per_image)


def _meminfo_available() -> int | None:
  """MemAvailable of /proc/meminfo, lowered to what a cgroup limit leaves."""
  out = None
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          out = int(line.split()[1]) * 1024
  except (OSError, ValueError):
    return None
  for limit_file, usage_file in (
      ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
      ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
       '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
    try:
      with open(limit_file) as f:
        limit = f.read().strip()
      with open(usage_file) as f:
        usage = int(f.read().strip())
    except (OSError, ValueError):
      continue
    if limit.isdigit() and int(limit) < 2 ** 60:
      left = max(int(limit) - usage, 0)
      out = left if out is None else min(out, left)
  return out


def available_memory_bytes() -> int | None:
  """Bytes the activations of one process's share of a batch can still take.

  CPU: the host's available memory (all local devices share it). An
  accelerator: the free memory of its fullest local device, times the local
  device count (the batch is split evenly over them). None when unknown.
  """
  devices = jax.local_devices()
  if devices[0].platform == 'cpu':
    return _meminfo_available()
  try:
    stats = [d.memory_stats() or {} for d in devices]
  except Exception:  # pylint: disable=broad-except
    return None
  if not all('bytes_limit' in st for st in stats):
    return None
  return min(st['bytes_limit'] - st.get('bytes_in_use', 0) for st in stats) * len(devices)


def check_batch_memory(model, config: ml_collections.ConfigDict, field: str,
                       batch: int, *, training: bool, image_size: int | None = None) -> None:
  """Refuses a batch whose activations alone exceed the memory there is.

  Such a batch would allocate until the kernel kills the process (or the
  accelerator runs out), after minutes of data preparation and compilation;
  the message names the field and the largest batch the bound allows.
  `image_size`: the model's, when it is not config.model's (an export's).
  """
  available = available_memory_bytes()
  if available is None:
    return
  share = jax.local_device_count() / jax.device_count()
  size = config.model.image_size if image_size is None else image_size
  need = batch_memory_bytes(model, size, batch * share, training=training)
  if need <= available:
    return
  n = jax.device_count()
  per_image = batch_memory_bytes(model, size, 1, training=training) * share
  fit = int(available // per_image) // n * n
  what = 'training step' if training else 'evaluation batch'
  if field == 'batch_size' and config.grad_accum_steps > 1:
    shown = (f'config.batch_size = {config.batch_size} (micro-batches of {batch} '
             f'with grad_accum_steps = {config.grad_accum_steps})')
  else:
    shown = f'config.{field} = {config[field]}'
  if fit < n:
    advice = ('not even one image per device fits, so use a smaller '
              'model.image_size or model')
  elif field == 'batch_size':
    advice = ('raise config.grad_accum_steps (the same update in more micro-batches) '
              f'or lower config.batch_size, so that a micro-batch holds at most {fit} '
              'images')
  else:
    advice = f'use config.eval_batch_size = {fit} or less'
  raise ConfigError(
      f'{shown}: one {what} needs at least {_size(need)} for its activations '
      f'(images, attention weights, MLP layers), more than the {_size(available)} '
      f'of memory available: {advice}.')


def _size(num_bytes: float) -> str:
  """'15.4 GB', '883.8 KB': a memory size a reader compares at a glance."""
  for unit, scale in (('GB', 2 ** 30), ('MB', 2 ** 20)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.1f} {unit}'
  return f'{num_bytes / 2 ** 10:.1f} KB'


def check_given_data(data: Any, config: ml_collections.ConfigDict, *, train: bool) -> None:
  """Refuses data passed in Python that the config's run cannot use as they are.

  A training `Data` must give config.batch_size images per batch (the
  learning-rate schedule and the logs count in them) and an evaluation one
  config.eval_batch_size; both must be at the model's image size and of the
  right kind (training iterators repeat, evaluation ones make one pass).
  """
  what = 'train_data' if train else 'eval_data'
  field = 'batch_size' if train else 'eval_batch_size'
  for attr in ('batch_size', 'image_size', 'train', 'num_examples', 'num_classes'):
    if not hasattr(data, attr):
      raise ConfigError(f'{what} is a {type(data).__name__}, not a pyra_jax.data.Data: '
                        'build it with pyra_jax.data.from_arrays, from_tf_dataset or '
                        'get_data.')
  if bool(data.train) != train:
    raise ConfigError(f'{what} was built with train={data.train}: build it with '
                      f'train={train}.')
  if data.batch_size != config[field]:
    raise ConfigError(f'{what} gives batches of {data.batch_size} images but '
                      f'config.{field} = {config[field]}: build it with '
                      f'batch_size={config[field]} (or set config.{field}).')
  if data.image_size != config.model.image_size:
    raise ConfigError(f'{what} gives {data.image_size}-pixel images but the model takes '
                      f'{config.model.image_size} (config.model.image_size): build it '
                      f'with image_size={config.model.image_size}.')
