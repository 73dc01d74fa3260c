"""The training loop, evaluation and export behind `python -m pyra_jax.main`.

One run = one workdir:
  <workdir>/checkpoints/<step>/   Orbax: trainable params, optimiser state, meta
  <workdir>/metrics.jsonl         loss, both lrs, train accuracy, images/s, evals
  <workdir>/tensorboard/          the same scalars for TensorBoard
  <workdir>/results.json          final and max eval accuracy, config, timings;
                                  `--two_stage` evaluations under 'two_stage'
  <workdir>/export/               (`--mode=export`) full params with LoRA folded

Exactness: the batch of step s is the s-th batch of the seeded pipeline and
the dropout key of step s is `fold_in(key, s)`, so a run killed at any point
and restarted on the same workdir ends with bit-identical parameters (on one
platform).

Data parallelism: a 1-D mesh 'data' over every device; batches are sharded on
their first axis, parameters and optimiser state replicated. The global batch
is `config.batch_size`, whatever the number of devices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Collection, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pyra_jax import checkpointing
from pyra_jax.field_ranges import Choices, Range, check_fields
from pyra_jax import metrics as metrics_lib
from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax import recipe as recipe_lib
from pyra_jax.errors import DivergedError, TrainingError  # pylint: disable=unused-import

PyTree = Any



# A config that cannot run; the message names the field to change.
ConfigError = optim.ConfigError


# ----------------------------------------------------------------------------
# Compiled functions are memoised per (model, optimiser, mesh), so several runs
# in one process (tests, sweeps, eval after train) compile once. Keys are JSON
# of the config sections that define the function; a field missing from a key
# could only cause a recompilation, never a wrong reuse, because keys exclude
# fields by name (`_NOT_IN_STEP`) rather than include them.
# ----------------------------------------------------------------------------

_CACHE: 'collections.OrderedDict[Any, Any]' = collections.OrderedDict()
_CACHE_SIZE = 16
# Fields that never change a compiled train step.
_NOT_IN_STEP = ('seed', 'model_init', 'model_init_format',
                'model_init_first_blocks', 'data',
                'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                'keep_checkpoints', 'eval_batch_size', 'benchmark_after_training',
                'vtab', 'recipe', 'eval_epochs', 'headline')
# config.headline: which accuracy a run reports first; config.eval_epochs: which
# epochs the periodic evaluations follow (configs/common.py).
HEADLINES = ('final', 'max')
EVAL_EPOCHS = ('ours', 'authors')


def _json(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, default=str)


def _memo(key: Any, make: Callable[[], Any]) -> Any:
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = _CACHE[key] = make()
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return value


# ----------------------------------------------------------------------------
# The modules this loop drives. Indirections so tests can swap in tiny fakes.
# ----------------------------------------------------------------------------

def build_model(model_config: ml_collections.ConfigDict, dtype: str = 'float32'):
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    return _memo(('model', _json(model_config.to_dict()), dtype),
                 lambda: vit.build_model(model_config, dtype=dtype))
  except ValueError as e:
    # Its checks are all about the user's config (model_kwargs validates the
    # variant, method and schedule before tracing): a plain ValueError there
    # is a config problem, reported as one.
    if type(e) is ValueError:
      raise ConfigError(str(e)) from e
    raise


def get_data(data_config, split: str, batch_size: int, *, image_size: int,
             train: bool, seed: int):
  from pyra_jax import data  # pylint: disable=g-import-not-at-top
  return data.get_data(data_config, split, batch_size, image_size=image_size,
                       train=train, seed=seed)


def load_pretrained(path: str, fmt: str, init_params: PyTree,
                    model_config: ml_collections.ConfigDict, *,
                    first_blocks: bool = False) -> PyTree:
  from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_pretrained(path, fmt, init_params, model_config,
                                     first_blocks=first_blocks)


# ----------------------------------------------------------------------------
# Setup shared by train, eval and export.
# ----------------------------------------------------------------------------

def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device (of every host)."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def resolve_model_config(config: ml_collections.ConfigDict,
                         num_classes: int) -> ml_collections.ConfigDict:
  """config.model with an unset num_classes set to the task's class count."""
  mc = ml_collections.ConfigDict(config.model.to_dict())
  if 'num_classes' in mc and mc.num_classes is None:  # A missing field: build_model names it.
    mc.num_classes = int(num_classes)
  return mc


def check_model_init(config: ml_collections.ConfigDict) -> None:
  """Refuses an empty `model_init` (naming the weights to fetch) or a malformed Hub name.

  A random frozen backbone trains without error, so a forgotten `init=` would
  silently give a meaningless run: it must be asked for by name
  (model_init='random', as the tiny test config does).
  """
  if not config.model_init:
    from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
    raise ConfigError(checkpoints.missing_weights_message(config.model))
  from pyra_jax.checkpoints import hub  # pylint: disable=g-import-not-at-top
  if hub.is_hub_spec(config.model_init):
    hub.parse(config.model_init)  # A malformed Hub name, before the data.


def check_model_config(config: ml_collections.ConfigDict) -> None:
  """Resolves config.model once without data (pure Python, no tracing), so a bad
  model setting is reported before the data is prepared. The task's class
  count is not known yet: a stand-in is used when the config leaves it unset.
  """
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    vit.model_kwargs(resolve_model_config(config, 1))
  except ValueError as e:
    if type(e) is ValueError:
      raise ConfigError(str(e)) from e
    raise


def init_params(config: ml_collections.ConfigDict,
                model_config: ml_collections.ConfigDict, model) -> PyTree:
  """Random init (head, LoRA, PYRA), then the pretrained backbone."""
  from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
  check_model_init(config)
  # An 'rbg' key: XLA compiles its RNG 3-4x faster than threefry on CPU (init
  # draws a key per parameter), and init runs on one device, so its values do
  # not depend on the mesh. Dropout keeps threefry (sharding-invariant).
  key = jax.random.key(config.seed, impl='rbg')
  size = model_config.image_size

  def make_init():
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.jit(lambda k: model.init({'params': k}, dummy, train=False))
  # id(model) is a safe key: the cached closure keeps the model alive, so its
  # id cannot be reused by another object while the entry exists.
  init = _memo(('init', id(model), size), make_init)
  params = jax.device_get(init(key)['params'])
  if config.model_init != checkpoints.RANDOM_INIT:
    params = load_pretrained(
        config.model_init, config.model_init_format, params, model_config,
        first_blocks=config.get('model_init_first_blocks', False))
  return params


def dropout_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The root dropout key; step s uses fold_in(root, s), so resume is exact."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)


def _check_divisible(name: str, value: int) -> None:
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
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file, not a folder: give a '
                      'folder (new or an earlier run of this config).')


def _shard(batch: dict, sharding: NamedSharding) -> dict:
  """Places a global numpy batch on the mesh, split along axis 0.

  Every host reads the same global batch (VTAB-1k is small) and contributes
  its own slice, so multi-host data needs no per-host sharding of the files.
  """
  pc, pi = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    if pc > 1:
      n = x.shape[0] // pc
      x = x[pi * n:(pi + 1) * n]
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: put(batch[k]) for k in ('image', 'label', 'mask')}


@dataclasses.dataclass
class Run:
  """Everything train/eval/export need, built once from a config."""
  config: ml_collections.ConfigDict
  model_config: ml_collections.ConfigDict
  model: Any
  mesh: Mesh
  trainable: PyTree          # host arrays, fresh init (before any restore)
  frozen: PyTree             # on the mesh, replicated
  frozen_fingerprint: str
  # PE-Dist's frozen teacher (`pyra_jax.teacher.Teacher`), loaded for training
  # only when config.distill.enabled; eval and export never need it.
  teacher: Any = None

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P('data'))

  def replicate(self, tree: PyTree) -> PyTree:
    return jax.device_put(tree, self.replicated)

  def abstract(self, tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the replicated sharding, for Orbax restores."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                       sharding=self.replicated), tree)


def setup(config: ml_collections.ConfigDict, num_classes: int) -> Run:
  model_config = resolve_model_config(config, num_classes)
  model = build_model(model_config, config.get('dtype', 'float32'))
  params = init_params(config, model_config, model)
  trainable, frozen = optim.split_params(params, config.trainable)
  if not jax.tree.leaves(trainable):
    raise ConfigError('No parameter matches config.trainable '
                      f'{json.loads(config.trainable.to_json())}: nothing would '
                      'train. Check the regexes against the parameter paths.')
  fp = checkpointing.fingerprint(frozen)
  mesh = make_mesh()
  run = Run(config, model_config, model, mesh, trainable, None, fp)
  run.frozen = run.replicate(frozen)
  return run


# ----------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------

def _masked_xent(logits, labels, mask, total=None):
  """(sum of the unmasked rows' cross-entropy / total, correct, count).

  `total` defaults to the batch's own mask count (its mean loss); a
  micro-batch of an accumulated step divides by the whole batch's count.
  """
  w = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if total is None:
    total = jnp.maximum(w.sum(), 1.0)
  loss = (ce * w).sum() / total
  correct = ((jnp.argmax(logits, -1) == labels) * w).sum()
  return loss, correct, w.sum()


def training_loss(model, trainable: PyTree, frozen: PyTree, batch: dict,
                  rng: jax.Array, total=None, *, teacher=None,
                  teacher_params: PyTree = None) -> tuple[jax.Array, tuple]:
  """The loss a training step differentiates: (loss, (correct, count)).

  The model in training mode (LoRA dropout, stochastic depth drawn from
  `rng`) on `batch`, masked cross-entropy (`_masked_xent`), plus the FLOPs
  regulariser of the methods that learn their compression (LTMP, the DiffRate
  search: the model sows it under `losses`; docs/algorithm.md §17). Shared by
  the step and by the benchmark's breakdown of it.

  With a `teacher` (PE-Dist, `pyra_jax.teacher.Teacher`) each unmasked row
  adds `w·T²·KL(softmax(t/T) || softmax(s/T))` (`methods.pedist`), averaged
  like the cross-entropy; with `teacher.loss == 'authors_hard'` the loss is
  instead ½·CE(labels) + ½·CE(the teacher's argmax), both averaged over the
  unmasked rows (the PYRA authors' code). The teacher runs in eval mode on
  `teacher_params`, which get no gradient (they are not an argument of the
  differentiation, and its logits are behind a stop_gradient).
  """
  variables = {'params': optim.merge_params(trainable, frozen)}
  if _has_flops_regulariser(model):
    logits, state = model.apply(variables, batch['image'], train=True,
                                 rngs={'dropout': rng}, mutable=['losses'])
  else:
    logits, state = model.apply(variables, batch['image'], train=True,
                                rngs={'dropout': rng}), {}
  loss, correct, count = _masked_xent(logits, batch['label'], batch['mask'], total)
  if teacher is not None:
    from pyra_jax.methods import pedist  # pylint: disable=g-import-not-at-top
    teacher_logits = jax.lax.stop_gradient(teacher.model.apply(
        {'params': teacher_params}, batch['image'], train=False))
    w = batch['mask'].astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0) if total is None else total
    if teacher.loss == 'authors_hard':
      hard = pedist.hard_label_term(logits, teacher_logits)
      loss = 0.5 * loss + 0.5 * (hard * w).sum() / denom
    else:
      kd = pedist.distillation_term(logits, teacher_logits, teacher.temperature,
                                    teacher.weight)
      loss = loss + (kd * w).sum() / denom
  for penalty in jax.tree.leaves(state.get('losses', {})):
    # A micro-batch of an accumulated step adds its share (count / total).
    loss = loss + (penalty if total is None else penalty * count / total)
  return loss, (correct, count)


def _has_flops_regulariser(model) -> bool:
  method = getattr(model, 'method', None)
  return method == 'ltmp' or (
      method == 'diffrate' and dict(getattr(model, 'settings', ())).get('diffrate_search', False))


def project_params(trainable: PyTree) -> PyTree:
  """Constraints the methods keep after every update (LTMP: thresholds in [0, 1])."""
  from pyra_jax.methods import ltmp  # pylint: disable=g-import-not-at-top
  return ltmp.project_thresholds(trainable)


def step_key(run: 'Run') -> str:
  """JSON of every config field that can change the compiled train step."""
  cfg = checkpointing.config_to_dict(run.config)
  for k in _NOT_IN_STEP:
    cfg.pop(k, None)
  return _json([cfg, run.model_config.to_dict()])


def make_optimizer(run: 'Run', steps_per_epoch: int):
  """(tx, schedules, jit(tx.init)), memoised with the train step."""
  def make():
    tx, schedules = optim.make_optimizer(run.config, steps_per_epoch)
    return tx, schedules, jax.jit(tx.init)
  return _memo(('opt', step_key(run), steps_per_epoch), make)


def _micro_batches(batch: dict, k: int) -> dict:
  """(B, ...) -> (k, B/k, ...): micro-batch j holds rows j, j + k, j + 2k, ...

  Strided rather than contiguous so that each device's contiguous shard of the
  global batch holds its own slice of every micro-batch: no data moves between
  devices when B/devices is a multiple of k.
  """
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(run: 'Run', steps_per_epoch: int) -> Callable:
  """jit(train_step)(trainable, opt_state, frozen, batch, step, key[, teacher_params]).

  With a teacher (`run.teacher`, PE-Dist) its parameters are the last
  argument: an input of the compiled step like the frozen backbone, never
  differentiated, donated or returned.

  Returns (trainable, opt_state, metrics). The dropout key of the step is
  fold_in(key, step): a pure function of the step, so a resumed run draws the
  same masks.

  With `config.grad_accum_steps` = k > 1 the step splits its global batch into
  k micro-batches and sums their gradients in a `lax.scan` before the one
  optimiser update, so only a micro-batch's activations are alive at a time.
  Each micro-batch's loss is divided by the *global* batch's mask count, so
  the summed gradient is the gradient of the global batch's mean loss: the
  same update as k = 1, up to round-off. Accumulating inside the step (rather
  than `optax.MultiSteps` over k calls) keeps one call = one update = one
  batch of the pipeline, so the optimiser state, the learning-rate schedule
  (counted in updates), the checkpoints and exact resume are all unchanged.
  Micro-batch j's dropout key is fold_in(step key, j).
  """
  tx = make_optimizer(run, steps_per_epoch)[0]
  accum = int(run.config.grad_accum_steps)
  teacher = run.teacher
  loss_and_grad = jax.value_and_grad(
      functools.partial(training_loss, run.model, teacher=teacher), has_aux=True)

  def train_step(trainable, opt_state, frozen, batch, step, key, teacher_params=None):
    if (teacher is None) != (teacher_params is None):
      raise ValueError('Pass teacher_params exactly when the run has a teacher.')
    rng = jax.random.fold_in(key, step)
    if accum == 1:
      (loss, (correct, count)), grads = loss_and_grad(
          trainable, frozen, batch, rng, teacher_params=teacher_params)
    else:
      total = jnp.maximum(batch['mask'].astype(jnp.float32).sum(), 1.0)

      def add_micro_batch(carry, xs):
        j, micro = xs
        (loss, (correct, count)), grads = loss_and_grad(
            trainable, frozen, micro, jax.random.fold_in(rng, j), total,
            teacher_params=teacher_params)
        return jax.tree.map(jnp.add, carry, (loss, correct, count, grads)), None

      zeros = (jnp.zeros((), jnp.float32),) * 3 + (jax.tree.map(jnp.zeros_like, trainable),)
      (loss, correct, count, grads), _ = jax.lax.scan(
          add_micro_batch, zeros, (jnp.arange(accum), _micro_batches(batch, accum)))
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = project_params(optax.apply_updates(trainable, updates))
    return trainable, opt_state, {'loss': loss, 'correct': correct,
                                  'count': count,
                                  'grad_norm': optax.tree.norm(grads)}

  teacher_key = teacher.memo_key() if teacher is not None else None
  return _memo(('train', step_key(run), teacher_key, steps_per_epoch, run.mesh),
               lambda: jax.jit(train_step, donate_argnums=(0, 1),
                               out_shardings=run.replicated))


def make_eval_step(run: 'Run') -> Callable:
  """jit(eval_step)(trainable, frozen, batch) -> (correct, count) as int32."""
  model = run.model

  def eval_step(trainable, frozen, batch):
    logits = model.apply({'params': optim.merge_params(trainable, frozen)},
                         batch['image'], train=False)
    hit = (jnp.argmax(logits, -1) == batch['label']) & batch['mask']
    return hit.sum(dtype=jnp.int32), batch['mask'].sum(dtype=jnp.int32)

  return _memo(('eval', id(model), run.mesh),
               lambda: jax.jit(eval_step, out_shardings=run.replicated))


def evaluate(run: Run, eval_step: Callable, trainable: PyTree,
             eval_data) -> dict:
  """Top-1 accuracy over one pass of `eval_data`; padded rows do not count.

  Counts are summed as integers, so the accuracy is exact and reproducible.
  """
  correct = count = 0
  for batch in iter(eval_data):
    c, n = eval_step(trainable, run.frozen, _shard(batch, run.batch_sharding))
    correct += int(c)
    count += int(n)
  if count != eval_data.num_examples:
    raise TrainingError(
        f'The eval pass saw {count} images but the split has '
        f'{eval_data.num_examples}: the data pipeline must pad and mask the '
        'last batch so every image counts exactly once.')
  return {'accuracy': correct / max(count, 1), 'correct': correct,
          'count': count}


# ----------------------------------------------------------------------------
# Data order.
# ----------------------------------------------------------------------------

def train_batches(train_data, start_step: int) -> Iterator[dict]:
  """Yields the training batches from `start_step` on, deterministically.

  The pipeline is a pure function of the seed (seeded shuffle, deterministic
  tf.data), so the batch of step s is the s-th batch of a fresh iteration:
  resuming replays and drops the first `start_step` batches. The decoded and
  resized images are cached in memory by the pipeline, so the replay costs
  only the shuffle and normalisation (seconds for a 100-epoch VTAB-1k run).
  """
  it = iter(train_data)
  for _ in range(start_step):
    next(it)
  yield from it


# ----------------------------------------------------------------------------
# Train.
# ----------------------------------------------------------------------------

def _meta(run: Run, step: int, evals: list, train_time: float,
          config_changes: list) -> dict:
  return {'step': int(step),
          'config_changes': config_changes,
          'config': checkpointing.config_to_dict(run.config),
          'model_config': run.model_config.to_dict(),
          'frozen_fingerprint': run.frozen_fingerprint,
          'evals': evals,
          'train_time_s': float(train_time),
          'num_devices': jax.device_count(),
          'teacher': run.teacher.record() if run.teacher is not None else None}


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def _is_eval_epoch(epoch: int, config) -> bool:
  """After the first epoch, every eval_every_epochs, and after the last.

  With 100 epochs and every 10 that is the paper's 11 evaluations; with
  eval_every_epochs <= 0, only after the last epoch. `epoch` counts from 1.
  `config.eval_epochs = 'authors'` shifts the periodic ones by one, as the
  authors' train.py tests `epoch % val_interval == 0` on epochs counted
  from 0: after epochs 1, N + 1, 2N + 1, ... (11 of them as well).
  """
  every = config.eval_every_epochs
  if epoch == config.num_epochs:
    return True
  if every <= 0:
    return False
  if config.get('eval_epochs', 'ours') == 'authors':
    return (epoch - 1) % every == 0
  return epoch == 1 or epoch % every == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: Collection[str] = ()) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the results dict.

  The workdir is locked for the whole run (`checkpointing.WorkdirLock`), so a
  second run started on it is refused instead of interleaving its checkpoints
  and metrics with this one's. `allow_config_change` names the fields
  (`checkpointing.CHANGEABLE_ON_REQUEST`) that may differ from the
  checkpoint's config on resume; every such change is recorded.

  What is on disk is never lost to a rerun: a finished run is reported
  from its results.json, not rewritten (`_finished_results`); a continued
  run rewrites results.json keeping the entries other commands added
  (`_keep_recorded`, under `checkpointing.ResultsLock`); a total shorter than
  the step already trained is refused (`_check_not_past_the_end`); and a
  workdir with a run's records but no readable checkpoint is refused rather
  than started again from step 0 (`_restore_or_start`).
  """
  check_workdir(workdir)
  recipe_lib.apply(config)  # Idempotent: main (or a stored config) may have done it.
  check_config(config)
  from pyra_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  teacher_lib.check_settings(config)
  checkpointing.check_allowed_changes(allow_config_change)
  if jax.process_index() != 0:  # Process 0 holds the lock for the whole job.
    return _train_and_evaluate(config, workdir, allow_config_change)
  with checkpointing.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, allow_config_change)


def _restore_opt_state(ckpt: checkpointing.Checkpointer, step: int, meta: dict,
                       run: Run, steps_per_epoch: int, template: PyTree,
                       changed: dict) -> PyTree:
  """The saved optimiser state, in the structure of the current optimiser.

  When allowed fields changed (e.g. gradient clipping switched on), the saved
  state has the structure of the *saved* config's optimiser: restore it as
  that, then carry its leaves (Adam moments, step counts) over. Stateless
  transforms such as clipping add no leaves, so the leaves line up.
  """
  if not changed:
    return ckpt.restore_opt_state(step, run.abstract(template))
  saved_config = ml_collections.ConfigDict(checkpointing.stored_config(meta['config']))
  saved_tx, _ = optim.make_optimizer(saved_config, steps_per_epoch)
  restored = ckpt.restore_opt_state(
      step, run.abstract(jax.eval_shape(saved_tx.init, run.trainable)))
  leaves, target = jax.tree.leaves(restored), jax.tree.leaves(template)
  if [np.shape(a) for a in leaves] != [np.shape(b) for b in target]:
    raise checkpointing.CheckpointMismatchError(
        f'The optimiser state of step {step} in {ckpt.directory} does not fit the '
        f'optimiser of the changed config ({", ".join(changed)}): use a new --workdir.')
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def lr_to_lower(run: Run) -> tuple[str, float]:
  """(config field, its value) of the highest peak learning rate that trains
  something in `run`: the field a divergence's advice should lower.

  A group with its own lr field (pyra_lr, diffrate_lr) counts only when it
  holds parameters and the field is not -1 (which means config.lr).
  """
  config = run.config
  labels = set(jax.tree.leaves(optim.param_labels(run.trainable, config.trainable)))
  best = ('lr', float(config.lr))
  for group, field in optim.GROUP_LR_FIELDS.items():
    value = config.get(field, -1.0)
    if group in labels and value >= 0 and value > best[1]:
      best = (field, float(value))
  return best


def _diverged(ckpt: checkpointing.Checkpointer, step: int, what: str,
              lr: float, lower: tuple[str, float], suspect: int | None) -> DivergedError:
  """The error for a non-finite loss or parameters at `step`.

  The checkpoint of step `suspect` (the one whose parameters produced a
  non-finite loss), if it is the latest and nothing has vouched for it, is set
  aside, so the latest checkpoint left is one whose parameters gave a finite
  loss, and a rerun resumes from there.
  """
  moved = ''
  if (suspect is not None and ckpt.latest_step() == suspect
      and not ckpt.is_verified(suspect)):
    dest = ckpt.set_aside(suspect, 'diverged')
    moved = (f' (step {suspect}, whose parameters gave this loss, was moved '
             f'to {dest})')
  last = ckpt.latest_step()
  where = (f'The last checkpoint whose parameters gave a finite loss is step '
           f'{last} in {ckpt.directory}{moved}; rerunning the same command resumes '
           'from it.' if last is not None else
           'No checkpoint was saved before it, so a rerun starts from the beginning.')
  field, value = lower
  return DivergedError(
      f'{what} at step {step} (lr {lr:.3g}): training stopped without saving '
      f'this state. {where} To continue with a lower learning rate or gradient '
      f'clipping, add e.g. --config.{field}={value / 10:.2g} --config.grad_clip_norm=1.0 '
      f'--allow_config_change={field},grad_clip_norm.')


def _all_finite(tree: PyTree) -> bool:
  return all(bool(np.isfinite(np.asarray(x)).all())
             for x in jax.tree.leaves(jax.device_get(tree)))


@dataclasses.dataclass
class Progress:
  """Where a run stands: what a checkpoint restores and each step advances."""
  step: int
  trainable: PyTree
  opt_state: PyTree
  evals: list = dataclasses.field(default_factory=list)
  train_time_s: float = 0.0  # Wall time of the earlier sessions of this run.
  config_changes: list = dataclasses.field(default_factory=list)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        allow_config_change: Collection[str]) -> dict:
  """The run, in its steps: data, model, restore, train, final evaluation."""
  t_start = time.time()
  line = recipe_lib.describe(config)
  if line and jax.process_index() == 0:
    print(line, flush=True)
  check_model_init(config)  # Before minutes of data preparation.
  check_model_config(config)  # Likewise.
  train_data, eval_data, steps_per_epoch = _load_data(config)
  run = setup(config, train_data.num_classes)
  from pyra_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  if teacher_lib.enabled(config):
    run.teacher = teacher_lib.load_teacher(config, run.model_config, run.replicate)
    if jax.process_index() == 0:
      print(teacher_lib.describe(run.teacher), flush=True)
  # What the run trains, as Table 1 reports it (LoRA, generators, head).
  trainable_params = param_counts.trainable_report(run.trainable, run.frozen)
  if jax.process_index() == 0:
    print(param_counts.format_trainable(trainable_params), flush=True)
  ckpt = checkpointing.Checkpointer(checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints)
  writer = None
  try:
    progress = _restore_or_start(run, ckpt, steps_per_epoch, allow_config_change,
                                 workdir)
    total_steps = int(config.num_epochs * steps_per_epoch)
    _check_not_past_the_end(progress, total_steps, steps_per_epoch, ckpt.directory)
    recorded = _finished_results(workdir, progress, total_steps)
    if recorded is not None:
      return recorded
    writer = _open_metrics(workdir, progress)
    speed = _train_loop(run, ckpt, writer, progress, train_data, eval_data,
                        steps_per_epoch, t_start)
  finally:
    ckpt.close()
    if writer is not None:
      writer.flush()
  results = _final_results(run, progress, eval_data, steps_per_epoch, speed,
                           trainable_params, t_start)
  if jax.process_index() == 0:
    writer.write(results['steps'], final_accuracy=results['final_accuracy'],
                 max_accuracy_paper_protocol=results['max_accuracy_paper_protocol'])
    update_results(workdir, lambda old: _keep_recorded(old, results))
  writer.close()
  return results


def _finished_results(workdir: str, progress: 'Progress',
                      total_steps: int) -> dict | None:
  """The recorded results of a run that already finished, else None.

  Rerunning the training command on a finished workdir reports the run, it
  does not redo its end: nothing is trained, evaluated or written
  (results.json keeps its timings and the 'two_stage' entries added since,
  metrics.jsonl gets no second final line). Finished means the restored
  checkpoint is the last step and results.json records that many steps; a
  run killed between its last checkpoint and results.json is finished now,
  as before.
  """
  if progress.step != total_steps:
    return None
  recorded = read_results(workdir)
  if recorded is None or recorded.get('steps') != total_steps:
    return None
  if jax.process_index() == 0:
    print(f'{workdir} holds a finished run ({total_steps} steps): reporting its '
          f'results.json as recorded; nothing was trained or rewritten.', flush=True)
  return recorded


def _keep_recorded(old: dict | None, results: dict) -> dict:
  """The new results.json: `results`, plus what earlier commands recorded
  there that the training run does not compute (the 'two_stage' entries of
  `--mode=eval --two_stage`, kept when a run is continued or its end redone)."""
  out = dict(results)
  if old and old.get('two_stage'):
    out['two_stage'] = old['two_stage']
  return out


def _check_not_past_the_end(progress: 'Progress', total_steps: int,
                            steps_per_epoch: int, directory: str) -> None:
  """Refuses a config whose run ends before the step already trained.

  With `--allow_config_change=num_epochs` the total may change, but a run
  cannot be shortened below what it has trained: its last checkpoint's
  parameters would be labelled with the smaller step count.
  """
  if progress.step <= total_steps:
    return
  need = math.ceil(progress.step / steps_per_epoch)
  raise checkpointing.CheckpointMismatchError(
      f'{directory} holds a checkpoint at step {progress.step}, past the '
      f'{total_steps} steps of config.num_epochs = '
      f'{total_steps / steps_per_epoch:g} ({steps_per_epoch} steps per epoch): '
      f'a run cannot be shortened below what it has trained; give '
      f'--config.num_epochs={need} or more, or a new --workdir.')


def _load_data(config: ml_collections.ConfigDict) -> tuple[Any, Any, int]:
  """(train data, eval data, steps per epoch), with the batch sizes checked
  against the splits, the task's labels and the memory there is."""
  _check_divisible('batch_size', config.batch_size)
  _check_divisible('eval_batch_size', config.eval_batch_size)
  train_data = get_data(config.data, config.data.train_split,
                        config.batch_size, image_size=config.model.image_size,
                        train=True, seed=config.seed)
  steps_per_epoch = int(train_data.steps_per_epoch)
  if steps_per_epoch <= 0:
    raise ConfigError(
        f'The train split has {train_data.num_examples} images, fewer than '
        f'config.batch_size = {config.batch_size}: lower the batch size.')
  check_num_classes(config.model.get('num_classes'), train_data)
  eval_data = get_eval_data(config)
  model = build_model(resolve_model_config(config, train_data.num_classes),
                      config.get('dtype', 'float32'))
  check_batch_memory(model, config, 'batch_size',
                     config.batch_size // config.grad_accum_steps, training=True)
  check_batch_memory(model, config, 'eval_batch_size', eval_data.batch_size,
                     training=False)
  return train_data, eval_data, steps_per_epoch


# ----------------------------------------------------------------------------
# Batches that fit: the split, the task's labels, the memory.
# ----------------------------------------------------------------------------

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


def get_eval_data(config: ml_collections.ConfigDict, image_size: int | None = None):
  """The eval split in batches of config.eval_batch_size, clamped to the split.

  A batch larger than the split would only add padding (zero images, masked
  out), so a larger eval_batch_size evaluates the whole split in one batch,
  rounded up to a multiple of the device count: the accuracy is the same, and
  eval_batch_size=1000000 no longer allocates a million images. `image_size`:
  the model's, when it is not config.model's (an export's).
  """
  size = config.model.image_size if image_size is None else image_size
  data = get_data(config.data, config.data.eval_split, config.eval_batch_size,
                  image_size=size, train=False, seed=config.seed)
  n = jax.device_count()
  whole = -(-int(data.num_examples) // n) * n
  if data.batch_size > whole:
    logging.info('config.eval_batch_size = %d exceeds the %d images of split %r: '
                 'evaluating in batches of %d.', data.batch_size, data.num_examples,
                 config.data.eval_split, whole)
    data = get_data(config.data, config.data.eval_split, whole,
                    image_size=size, train=False, seed=config.seed)
  return data


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
  weights = (model.attention != 'dot_product_attention'
             or model.method in ('ltmp', 'diffrate'))  # Masked attention forms them.
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


def _check_same_teacher(meta: dict, run: Run, directory: str) -> None:
  """Refuses to resume a distillation run on a teacher with other weights.

  The teacher's path may change (a moved folder, its export instead of its
  workdir if the weights are the same), its parameters may not: the steps
  after the resume would distil from another model.
  """
  saved = (meta.get('teacher') or {}).get('fingerprint')
  now = run.teacher.fingerprint if run.teacher is not None else None
  if saved is not None and now is not None and saved != now:
    where = meta['teacher'].get('path')
    raise checkpointing.CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {meta.get("step")}) distilled from '
        f'a teacher with other weights ({where}, step {meta["teacher"].get("step")}) '
        f'than the one loaded now ({run.teacher.path}, step {run.teacher.step}): '
        'give the same teacher to resume, or use a new --workdir.')


def _records_without_checkpoint(workdir: str, config: ml_collections.ConfigDict,
                                steps_per_epoch: int) -> list[str]:
  """What in `workdir` shows a run that got past its first checkpoint.

  results.json, checkpoints set aside as unreadable, or metrics logged after
  the step of the first checkpoint: records of a run whose checkpoints are
  gone. A run killed before its first checkpoint has none of these (its
  metrics end at or before that step) and simply starts again.
  """
  found = []
  if os.path.exists(os.path.join(workdir, 'results.json')):
    found.append('results.json')
  unreadable = f'{checkpoint_dir(workdir)}_unreadable'
  if os.path.isdir(unreadable) and os.listdir(unreadable):
    found.append(f'{os.path.basename(unreadable)}/')
  first = min(config.checkpoint_every_steps,
              int(config.num_epochs * steps_per_epoch))
  logged = [r.get('step', 0) for r in metrics_lib.read_metrics(workdir)]
  if logged and max(logged) > first:
    found.append(f'metrics.jsonl (up to step {max(logged)})')
  return found


def _restore_or_start(run: Run, ckpt: checkpointing.Checkpointer,
                      steps_per_epoch: int,
                      allow_config_change: Collection[str],
                      workdir: str) -> Progress:
  """The newest readable checkpoint's progress, or step 0 with a fresh optimiser.

  Parameters and optimiser state come back replicated on the mesh. Step 0
  only for a workdir without the records of a run: one whose checkpoints
  are gone (deleted, set aside as unreadable) is refused, since starting
  again would overwrite its metrics.jsonl and results.json.
  """
  tx_init = make_optimizer(run, steps_per_epoch)[2]
  fresh = Progress(0, run.trainable, jax.device_get(tx_init(run.trainable)))
  if ckpt.latest_step() is None:
    records = _records_without_checkpoint(workdir, run.config, steps_per_epoch)
    if records:
      raise checkpointing.CheckpointUnreadableError(
          f'{workdir} holds the records of a run ({", ".join(records)}) but no '
          f'checkpoint in {ckpt.directory} to resume from, and starting again '
          'from step 0 would overwrite them: put the checkpoints back (from a '
          'backup), or train in a new --workdir.')
    progress = fresh
  else:
    def read(step):
      meta = ckpt.restore_meta(step)
      changed = checkpointing.check_compatible(
          meta, run.config, run.frozen_fingerprint, ckpt.directory,
          allow=allow_config_change)
      _check_same_teacher(meta, run, ckpt.directory)
      params = ckpt.restore_params(step, run.abstract(fresh.trainable))
      opt = _restore_opt_state(ckpt, step, meta, run, steps_per_epoch,
                               fresh.opt_state, changed)
      return meta, changed, params, opt
    _, (meta, changed, trainable, opt_state) = ckpt.restore_newest_readable(read)
    progress = Progress(int(meta['step']), trainable, opt_state,
                        list(meta['evals']), float(meta['train_time_s']),
                        list(meta.get('config_changes', [])))
    if changed:
      progress.config_changes.append({'step': progress.step, 'changes': {
          k: [va, vb] for k, (va, vb) in changed.items()}})
      logging.info('Resuming with changed config: %s', progress.config_changes[-1])
    logging.info('Resuming from %s at step %d.', ckpt.directory, progress.step)
  progress.trainable = run.replicate(progress.trainable)
  progress.opt_state = run.replicate(progress.opt_state)
  return progress


def _open_metrics(workdir: str, progress: Progress) -> metrics_lib.MetricWriter:
  """metrics.jsonl without the records after the restored step (recomputed
  now), plus a record of a config change made at this resumption."""
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.truncate_after(progress.step)
  changes = progress.config_changes
  if changes and changes[-1]['step'] == progress.step and progress.step > 0:
    writer.write(progress.step, config_change=json.dumps(changes[-1]['changes']))
  return writer


def _train_loop(run: Run, ckpt: checkpointing.Checkpointer,
                writer: metrics_lib.MetricWriter, progress: Progress,
                train_data, eval_data, steps_per_epoch: int,
                t_start: float) -> dict:
  """Steps from `progress.step` to the end, with logging, evals and checkpoints.

  Advances `progress` in place; returns the measured training speed.
  """
  config = run.config
  is_main = jax.process_index() == 0
  schedules = make_optimizer(run, steps_per_epoch)[1]
  total_steps = int(config.num_epochs * steps_per_epoch)
  train_step = make_train_step(run, steps_per_epoch)
  eval_step = make_eval_step(run)
  key = run.replicate(dropout_key(config))
  bar = metrics_lib.progress_bar(total_steps, progress.step, enabled=is_main)
  batches = train_batches(train_data, progress.step)
  teacher_args = (run.teacher.params,) if run.teacher is not None else ()
  window = {'loss': 0.0, 'correct': 0.0, 'count': 0.0, 'steps': 0,
            't0': time.time()}
  train_images, train_seconds = 0, 0.0
  first = progress.step + 1
  try:
    for step in range(first, total_steps + 1):
      t0 = time.time()
      batch = _shard(next(batches), run.batch_sharding)
      progress.trainable, progress.opt_state, m = train_step(
          progress.trainable, progress.opt_state, run.frozen, batch,
          np.int32(step - 1), key, *teacher_args)
      progress.step = step
      loss = float(m['loss'])  # Also the sync point that makes timings real.
      if not math.isfinite(loss):
        raise _diverged(ckpt, step, f'The loss became {loss}',
                        float(schedules['lr'](step - 1)), lr_to_lower(run),
                        suspect=step - 1)
      ckpt.mark_verified(step - 1)  # Its parameters just gave a finite loss.
      if step > first:  # The first step includes compilation.
        train_seconds += time.time() - t0
        train_images += config.batch_size
      window['loss'] += loss
      window['correct'] += float(m['correct'])
      window['count'] += float(m['count'])
      window['steps'] += 1
      bar.update(1)

      if step % config.log_every_steps == 0 or step == total_steps:
        dt = time.time() - window['t0']
        record = {
            'loss': window['loss'] / window['steps'],
            'train_accuracy': window['correct'] / max(window['count'], 1),
            'lr': float(schedules['lr'](step - 1)),
            'pyra_lr': float(schedules['pyra_lr'](step - 1)),
            **({'diffrate_lr': float(schedules['diffrate_lr'](step - 1))}
               if 'diffrate_lr' in schedules else {}),
            'grad_norm': float(m['grad_norm']),
            'images_per_sec': window['steps'] * config.batch_size / max(dt, 1e-9),
            'epoch': step / steps_per_epoch}
        writer.write(step, **record)
        bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.2e}')
        window = {'loss': 0.0, 'correct': 0.0, 'count': 0.0, 'steps': 0,
                  't0': time.time()}

      if step % steps_per_epoch == 0 and _is_eval_epoch(
          step // steps_per_epoch, config):
        result = evaluate(run, eval_step, progress.trainable, eval_data)
        progress.evals.append({'epoch': step // steps_per_epoch, 'step': step,
                               'accuracy': result['accuracy']})
        writer.write(step, eval_accuracy=result['accuracy'])
        if is_main:
          bar.write(f'epoch {step // steps_per_epoch}: '
                    f'{config.data.eval_split} accuracy '
                    f'{100 * result["accuracy"]:.2f}% '
                    f'({result["correct"]}/{result["count"]})')
        window['t0'] = time.time()  # Do not count eval time as training time.

      if step % config.checkpoint_every_steps == 0 or step == total_steps:
        if not _all_finite(progress.trainable):
          raise _diverged(ckpt, step, 'The parameters became non-finite',
                          float(schedules['lr'](step - 1)), lr_to_lower(run),
                          suspect=None)
        ckpt.save(step, progress.trainable, progress.opt_state,
                  _meta(run, step, progress.evals,
                        progress.train_time_s + time.time() - t_start,
                        progress.config_changes))
        window['t0'] = time.time()
    ckpt.finish()
  finally:
    batches.close()
    bar.close()
  return {'train_images_per_sec': (train_images / train_seconds
                                   if train_seconds else None)}


def ltmp_token_report(run: Run, trainable: PyTree, eval_data) -> dict:
  """LTMP's data-dependent cost on `eval_data` (hard masks, eval mode).

  Static shapes make every layer compute all tokens (`flops_fraction_run` =
  1); `effective_flops_fraction` is the mean over the images of the blocks'
  FLOPs with the inactive tokens removed (docs/algorithm.md §17.1), and
  `mean_active_tokens` the tokens left active after each block.
  """
  from pyra_jax.methods import ltmp  # pylint: disable=g-import-not-at-top
  model = run.model

  def report(trainable, frozen, batch):
    _, state = model.apply({'params': optim.merge_params(trainable, frozen)},
                           batch['image'], train=False, mutable=['intermediates'])
    inter = state['intermediates']['Transformer']
    masks = [inter[f'mask_{i}'][0] for i in range(model.depth)]
    w = batch['mask'].astype(jnp.float32)
    frac = ltmp.flops_ratio([m.mean(axis=-1) for m in masks],
                            num_tokens=masks[0].shape[1], width=model.width,
                            mlp_ratio=model.mlp_dim / model.width)
    return ((frac * w).sum(), jnp.stack([(m.sum(-1) * w).sum() for m in masks]), w.sum())

  step = _memo(('ltmp_report', id(model), run.mesh),
               lambda: jax.jit(report, out_shardings=run.replicated))
  frac = count = 0.0
  tokens = np.zeros(model.depth)
  for batch in iter(eval_data):
    f, t, n = step(trainable, run.frozen, _shard(batch, run.batch_sharding))
    frac, tokens, count = frac + float(f), tokens + np.asarray(t), count + float(n)
  count = max(count, 1.0)
  return {'effective_flops_fraction': frac / count, 'flops_fraction_run': 1.0,
          'mean_active_tokens': [round(float(v) / count, 2) for v in tokens]}


def _final_results(run: Run, progress: Progress, eval_data,
                   steps_per_epoch: int, speed: dict, trainable_params: dict,
                   t_start: float) -> dict:
  """results.json's contents: the final (and the paper-protocol max) accuracy."""
  config = run.config
  total_steps = int(config.num_epochs * steps_per_epoch)
  evals = progress.evals
  if not evals or evals[-1]['step'] != total_steps:
    # Resumed after the end, or a config with no eval at the last step.
    result = evaluate(run, make_eval_step(run), progress.trainable, eval_data)
    evals.append({'epoch': config.num_epochs, 'step': total_steps,
                  'accuracy': result['accuracy']})
  extra = {}
  if getattr(run.model, 'method', None) == 'ltmp':
    extra['ltmp'] = ltmp_token_report(run, progress.trainable, eval_data)
  headline = config.get('headline', 'final')
  best = max(e['accuracy'] for e in evals)
  return {
      **extra,
      'headline': headline,
      'headline_accuracy': best if headline == 'max' else evals[-1]['accuracy'],
      'final_accuracy': evals[-1]['accuracy'],
      'max_accuracy_paper_protocol': best,
      'evals': evals,
      'num_test_images': int(eval_data.num_examples),
      'eval_split': config.data.eval_split,
      'steps': total_steps,
      'wall_time_s': progress.train_time_s + time.time() - t_start,
      'train_images_per_sec': speed['train_images_per_sec'],
      'num_devices': jax.device_count(),
      'trainable_params': trainable_params,
      'config': checkpointing.config_to_dict(config),
      'config_changes': progress.config_changes,
      'teacher': run.teacher.record() if run.teacher is not None else None,
  }


def write_json(path: str, obj: dict) -> None:
  """Writes JSON atomically: a kill leaves the old file or the new, never half."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, default=str)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ----------------------------------------------------------------------------
# Restore for eval / export.
# ----------------------------------------------------------------------------

# What a two-stage evaluation (train without merging, deploy with merging, the
# paper's Table 16) may change: the merging only. The parameter tree is checked
# on top of that (`_two_stage_tree`), so e.g. trained PYRA generators cannot be
# dropped or reshaped by it.
TWO_STAGE_FIELDS = ('model.method', 'model.schedule')


def _stored_trainable_shapes(meta: dict, config: ml_collections.ConfigDict
                             ) -> PyTree:
  """Shapes of the trainable params a checkpoint holds, from its model config."""
  mc = ml_collections.ConfigDict(checkpointing.stored_model_config(meta['model_config']))
  model = build_model(mc, config.get('dtype', 'float32'))
  dummy = jax.ShapeDtypeStruct((1, mc.image_size, mc.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({'params': jax.random.PRNGKey(0)}, x, train=False),
      dummy)['params']
  return optim.split_params(shapes, config.trainable)[0]


def _two_stage_tree(stored: PyTree, fresh: PyTree, meta: dict,
                    config: ml_collections.ConfigDict, directory: str
                    ) -> tuple[PyTree, list[str]]:
  """(the part of `fresh` the checkpoint fills, paths left at their init).

  Every trained parameter must exist with its shape in the evaluated model.
  Parameters only the evaluated model has (PYRA's generators on a PEFT or ToMe
  checkpoint) keep their fresh initialisation, where W_D = 0 makes PYRA equal
  ToMe.
  """
  flat_stored = traverse_util.flatten_dict(stored, sep='/')
  flat_fresh = traverse_util.flatten_dict(fresh, sep='/')
  lost = [k for k, v in flat_stored.items()
          if k not in flat_fresh or np.shape(flat_fresh[k]) != tuple(v.shape)]
  if lost:
    trained = meta['config']['model']
    raise checkpointing.CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {meta.get("step")}) trained with '
        f'method {trained["method"]!r}, schedule {trained["schedule"]!r}, whose '
        f'trained parameters ({", ".join(lost[:3])}{", ..." if len(lost) > 3 else ""}) '
        f'do not fit method {config.model.method!r}, schedule '
        f'{config.model.schedule!r}: --two_stage may change only the merging, '
        'and only of a model trained without PYRA generators (e.g. peft -> tome '
        'or pyra); evaluate with the config it was trained with.')
  added = sorted(k for k in flat_fresh if k not in flat_stored)
  kept = {k: v for k, v in flat_fresh.items() if k in flat_stored}
  return traverse_util.unflatten_dict(kept, sep='/'), added


def restore_run(config: ml_collections.ConfigDict, workdir: str,
                step: int | None = None, *, two_stage: bool = False
                ) -> tuple[Run, PyTree, int]:
  """Rebuilds the model and restores the trainable params of `step` (or latest).

  The restored run must match `config` in the fields that define the
  parameters (model, trainable groups) and in the frozen weights. With
  `two_stage`, `config` may merge differently (TWO_STAGE_FIELDS) as long as
  every trained parameter fits; parameters the checkpoint lacks keep their
  initialisation. Without a `step`, a latest checkpoint that cannot be read
  falls back to the newest one that can, with a warning (nothing is moved:
  eval and export only read).
  """
  check_workdir(workdir)
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    live = checkpointing.WorkdirLock(workdir).running_holder()
    if live:
      raise checkpointing.CheckpointUnreadableError(
          f'Training is in progress in {workdir} '
          f'({checkpointing.WorkdirLock.describe(live)}) and has not saved a '
          'checkpoint yet: rerun when it has.')
    raise checkpointing.CheckpointMismatchError(
        f'No checkpoints in {directory}: train first with --mode=train '
        f'--workdir={workdir}.')
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  runs = {}

  def read(s: int):
    meta = ckpt.restore_meta(s)
    _RESTORED_MODELS.clear()
    _RESTORED_MODELS[(os.path.abspath(directory), s)] = meta['config']['model']
    num_classes = meta['model_config']['num_classes']
    if num_classes not in runs:
      runs[num_classes] = setup(config, num_classes)
    run = runs[num_classes]
    try:
      checkpointing.check_compatible(
          meta, config, run.frozen_fingerprint, directory, for_eval=True,
          allow=TWO_STAGE_FIELDS if two_stage else ())
    except checkpointing.CheckpointMismatchError as e:
      if two_stage:
        raise
      # Only the merging differs: say how to evaluate these weights with it.
      checkpointing.check_compatible(meta, config, run.frozen_fingerprint,
                                     directory, for_eval=True,
                                     allow=TWO_STAGE_FIELDS)
      raise checkpointing.CheckpointMismatchError(
          f'{e} To evaluate these weights with this merging (two-stage), add '
          '--two_stage.') from None
    if not two_stage:
      return run, ckpt.restore_params(s, run.abstract(run.trainable))
    stored, added = _two_stage_tree(_stored_trainable_shapes(meta, config),
                                    run.trainable, meta, config, directory)
    trainable = ckpt.restore_params(s, run.abstract(stored))
    fresh = traverse_util.flatten_dict(run.trainable, sep='/')
    return run, optim.merge_params(
        run.replicate(traverse_util.unflatten_dict(
            {k: fresh[k] for k in added}, sep='/')), trainable)
  try:
    step, (run, trainable) = ckpt.restore_newest_readable(read, step)
  finally:
    ckpt.close()
  return run, trainable, step


# The `model` section of the checkpoint `restore_run` restored last, by
# (checkpoint folder, step): `checkpoint_model` right after a restore must not
# read the step again, since a training run live in the same workdir may have
# deleted it in between (keep_checkpoints).
_RESTORED_MODELS: dict[tuple[str, int], dict] = {}


def checkpoint_model(workdir: str, step: int) -> dict:
  """The `model` config section a checkpoint was trained with."""
  known = _RESTORED_MODELS.get((os.path.abspath(checkpoint_dir(workdir)), step))
  if known is not None:
    return known
  ckpt = checkpointing.Checkpointer(checkpoint_dir(workdir), read_only=True)
  try:
    return ckpt.restore_meta(step)['config']['model']
  finally:
    ckpt.close()


def read_results(workdir: str) -> dict | None:
  """<workdir>/results.json, or None when there is none (or it is not a JSON object)."""
  try:
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:
    return None
  return results if isinstance(results, dict) else None


def update_results(workdir: str, update: Callable[[dict | None], dict]) -> str:
  """Writes `update(current results.json or None)` as results.json; returns its path.

  The read, the change and the write happen under `checkpointing.ResultsLock`,
  so concurrent writers (two-stage evaluations, the training run's final
  write) each see the others' parts and none is lost; the write itself is
  atomic (`write_json`). A results.json that exists but cannot be parsed is
  kept beside the new one as results.json.unreadable, never dropped.
  """
  path = os.path.join(workdir, 'results.json')
  with checkpointing.ResultsLock(workdir):
    current = read_results(workdir)
    if current is None and os.path.exists(path):
      os.replace(path, f'{path}.unreadable')
      logging.warning('%s could not be parsed: kept as %s.unreadable.', path, path)
    write_json(path, update(current))
  return path


def record_two_stage(workdir: str, entry: dict) -> str:
  """Adds `entry` to the 'two_stage' list of <workdir>/results.json.

  The training run's own fields stay as they are; an entry for the same
  checkpoint step, evaluated model and split replaces the earlier one. Runs
  under the results lock (`update_results`), so several evaluations at once
  each keep their entry.
  """
  same = lambda e: all(e[k] == entry[k] for k in ('step', 'evaluated', 'split'))

  def add(results: dict | None) -> dict:
    if results is None:
      raise checkpointing.CheckpointMismatchError(
          f'{os.path.join(workdir, "results.json")} is missing or unreadable: a '
          'two-stage evaluation is recorded next to the finished training run, so '
          'finish training first (rerun --mode=train with the training config).')
    results['two_stage'] = [e for e in results.get('two_stage', []) if not same(e)]
    results['two_stage'].append(entry)
    return results
  return update_results(workdir, add)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None, *,
                        two_stage: bool = False) -> dict:
  """Test accuracy of a saved checkpoint, without training.

  With `two_stage` the checkpoint is evaluated with `config`'s merging (see
  `restore_run`) and the result is added to the run's results.json under
  'two_stage', next to (not over) what the training run recorded.
  """
  check_config(config, training=False)
  _check_divisible('eval_batch_size', config.eval_batch_size)
  results_path = os.path.join(workdir, 'results.json')
  if two_stage and not os.path.isfile(results_path):
    raise checkpointing.CheckpointMismatchError(
        f'{results_path} does not exist: a two-stage evaluation is recorded '
        'next to the finished training run, so finish training first '
        '(rerun --mode=train with the training config).')
  run, trainable, step = restore_run(config, workdir, step, two_stage=two_stage)
  eval_data = get_eval_data(config)
  check_num_classes(run.model_config.num_classes, eval_data)
  check_batch_memory(run.model, config, 'eval_batch_size', eval_data.batch_size,
                     training=False)
  result = evaluate(run, make_eval_step(run), trainable, eval_data)
  result.update(step=step, split=config.data.eval_split)
  if two_stage:
    trained = checkpoint_model(workdir, step)
    evaluated = config.model
    result['trained'] = {'method': trained['method'],
                         'schedule': trained['schedule']}
    result['evaluated'] = {'method': evaluated.method,
                           'schedule': evaluated.schedule,
                           'r_per_layer': [int(r) for r in run.model.schedule]}
    if jax.process_index() == 0:
      result['recorded_in'] = record_two_stage(workdir, dict(result))
  return result
