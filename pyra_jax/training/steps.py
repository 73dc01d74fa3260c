"""The compiled steps of a run: the training loss and step, the eval step, one eval pass.

`make_train_step` and `make_eval_step` return jitted functions memoised per
(model, optimiser, mesh) (`setup.memo`); `evaluate` runs one exact pass over
the eval split. The loop (`training.loop`), evaluation, export and the
benchmark all use these same steps.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax.errors import TrainingError
from pyra_jax.training import distill
from pyra_jax.training import mixup
from pyra_jax.training import setup

PyTree = setup.PyTree


# Mixup's key is fold_in(step key, MIX_KEY): the micro-batches' dropout keys
# are fold_in(step key, j) with j < grad_accum_steps, far below it.
MIX_KEY = 0x6D6978

# Fields that never change a compiled train step.
_NOT_IN_STEP = ('seed', 'model_init', 'model_init_format',
                'model_init_first_blocks', 'data',
                'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
                'keep_checkpoints', 'eval_batch_size', 'benchmark_after_training',
                'vtab', 'recipe', 'eval_epochs', 'headline')


def _masked_xent(logits, labels, mask, total=None, targets=None):
  """(sum of the unmasked rows' cross-entropy / total, correct, count).

  `total` defaults to the batch's own mask count (its mean loss); a
  micro-batch of an accumulated step divides by the whole batch's count.
  With `targets` (B, C) (label smoothing, mixup/cutmix: `training.mixup`) the
  cross-entropy is against those soft targets; `correct` still counts the
  argmax against the integer labels.
  """
  w = mask.astype(jnp.float32)
  if targets is None:
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
  else:
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
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

  With a `teacher` (PE-Dist, `training.teacher.Teacher`) each unmasked row
  adds `w·T²·KL(softmax(t/T) || softmax(s/T))` (`training.distill`), averaged
  like the cross-entropy; with `teacher.loss == 'authors_hard'` the loss is
  instead ½·CE(labels) + ½·CE(the teacher's argmax), both averaged over the
  unmasked rows (the PYRA authors' code). The teacher runs in eval mode on
  `teacher_params`, which get no gradient (they are not an argument of the
  differentiation, and its logits are behind a stop_gradient).
  """
  variables = {'params': optim.merge_params(trainable, frozen)}
  if model.reducer.has_regulariser:  # Sown under 'losses' (models/vit.py: Encoder).
    logits, state = model.apply(variables, batch['image'], train=True,
                                 rngs={'dropout': rng}, mutable=['losses'])
  else:
    logits, state = model.apply(variables, batch['image'], train=True,
                                rngs={'dropout': rng}), {}
  loss, correct, count = _masked_xent(logits, batch['label'], batch['mask'], total,
                                      batch.get('target'))
  if teacher is not None:
    teacher_logits = jax.lax.stop_gradient(teacher.model.apply(
        {'params': teacher_params}, batch['image'], train=False))
    w = batch['mask'].astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1.0) if total is None else total
    if teacher.loss == 'authors_hard':
      hard = distill.hard_label_term(logits, teacher_logits)
      loss = 0.5 * loss + 0.5 * (hard * w).sum() / denom
    else:
      kd = distill.distillation_term(logits, teacher_logits, teacher.temperature,
                                     teacher.weight)
      loss = loss + (kd * w).sum() / denom
  for penalty in jax.tree.leaves(state.get('losses', {})):
    # A micro-batch of an accumulated step adds its share (count / total).
    loss = loss + (penalty if total is None else penalty * count / total)
  return loss, (correct, count)


def step_key(run: setup.Run) -> str:
  """JSON of every config field that can change the compiled train step."""
  cfg = checkpointing.config_to_dict(run.config)
  for k in _NOT_IN_STEP:
    cfg.pop(k, None)
  return setup.json_key([cfg, run.model_config.to_dict()])


def make_optimizer(run: setup.Run, steps_per_epoch: int):
  """(tx, schedules, jit(tx.init)), memoised with the train step."""
  def make():
    tx, schedules = optim.make_optimizer(run.config, steps_per_epoch)
    return tx, schedules, jax.jit(tx.init)
  return setup.memo(('opt', step_key(run), steps_per_epoch), make)


def _micro_batches(batch: dict, k: int) -> dict:
  """(B, ...) -> (k, B/k, ...): micro-batch j holds rows j, j + k, j + 2k, ...

  Strided rather than contiguous so that each device's contiguous shard of the
  global batch holds its own slice of every micro-batch: no data moves between
  devices when B/devices is a multiple of k.
  """
  return jax.tree.map(
      lambda x: x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(run: setup.Run, steps_per_epoch: int) -> Callable:
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
  mixing = mixup.enabled(run.config)
  num_classes = int(run.model.num_classes) if mixing else 0
  teacher = run.teacher
  loss_and_grad = jax.value_and_grad(
      functools.partial(training_loss, run.model, teacher=teacher), has_aux=True)

  def train_step(trainable, opt_state, frozen, batch, step, key, teacher_params=None):
    if (teacher is None) != (teacher_params is None):
      raise ValueError('Pass teacher_params exactly when the run has a teacher.')
    rng = jax.random.fold_in(key, step)
    if mixing:  # On the whole batch (timm's 'batch' mode), before micro-batches.
      batch = mixup.mix_batch(batch, jax.random.fold_in(rng, MIX_KEY), num_classes,
                              run.config)
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
    # The constraints the method keeps after every update (LTMP: thresholds in [0, 1]).
    trainable = run.model.reducer.project(optax.apply_updates(trainable, updates))
    return trainable, opt_state, {'loss': loss, 'correct': correct,
                                  'count': count,
                                  'grad_norm': optax.tree.norm(grads)}

  teacher_key = teacher.memo_key() if teacher is not None else None
  return setup.memo(('train', step_key(run), teacher_key, steps_per_epoch, run.mesh),
                    lambda: jax.jit(train_step, donate_argnums=(0, 1),
                                    out_shardings=run.replicated))


def make_eval_step(run: setup.Run) -> Callable:
  """jit(eval_step)(trainable, frozen, batch) -> (correct, count) as int32."""
  model = run.model

  def eval_step(trainable, frozen, batch):
    logits = model.apply({'params': optim.merge_params(trainable, frozen)},
                         batch['image'], train=False)
    hit = (jnp.argmax(logits, -1) == batch['label']) & batch['mask']
    return hit.sum(dtype=jnp.int32), batch['mask'].sum(dtype=jnp.int32)

  return setup.memo(('eval', id(model), run.mesh),
                    lambda: jax.jit(eval_step, out_shardings=run.replicated))


def evaluate(run: setup.Run, eval_step: Callable, trainable: PyTree,
             eval_data) -> dict:
  """Top-1 accuracy over one pass of `eval_data`; padded rows do not count.

  Counts are summed as integers, so the accuracy is exact and reproducible.
  """
  correct = count = 0
  for batch in iter(eval_data):
    c, n = eval_step(trainable, run.frozen, setup.shard(batch, run.batch_sharding))
    correct += int(c)
    count += int(n)
  if count != eval_data.num_examples:
    raise TrainingError(
        f'The eval pass saw {count} images but the split has '
        f'{eval_data.num_examples}: the data pipeline must pad and mask the '
        'last batch so every image counts exactly once.')
  return {'accuracy': correct / max(count, 1), 'correct': correct,
          'count': count}
