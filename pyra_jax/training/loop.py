"""The training loop behind `python -m pyra_jax.main`: restore or start, train, evaluate.

`train_and_evaluate` is the one entry: the commands (main, vtab, the study)
import this module; the rest of the library does not.

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Collection, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from pyra_jax import checkpointing
from pyra_jax import metrics as metrics_lib
from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax import recipe as recipe_lib
from pyra_jax import speedup as speedup_lib
from pyra_jax import speedup_timer
from pyra_jax.errors import ConfigError, DivergedError
from pyra_jax.training import checks
from pyra_jax.training import evaluation
from pyra_jax.training import records as records_lib
from pyra_jax.training import setup
from pyra_jax.training import steps
from pyra_jax.training import teacher as teacher_lib

PyTree = setup.PyTree


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

def _meta(run: setup.Run, step: int, evals: list, train_time: float,
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
                       allow_config_change: Collection[str] = (),
                       train_data: Any = None, eval_data: Any = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the results dict.

  The data come from `config.data`, or, given, from `train_data` / `eval_data`
  (`pyra_jax.data.Data` objects, e.g. `data.from_arrays`), whose batches must
  be config.batch_size / config.eval_batch_size images.

  The workdir is locked for the whole run (`checkpointing.WorkdirLock`), so a
  second run started on it is refused instead of interleaving its checkpoints
  and metrics with this one's. `allow_config_change` names the fields
  (`checkpointing.CHANGEABLE_ON_REQUEST`) that may differ from the
  checkpoint's config on resume; every such change is recorded.

  What is on disk is never lost to a rerun: a finished run is reported
  from its results.json, not rewritten (`records.finished_results`); a continued
  run rewrites results.json keeping the entries other commands added
  (`records.keep_recorded`, under `checkpointing.ResultsLock`); a total shorter than
  the step already trained is refused (`_check_not_past_the_end`); and a
  workdir with a run's records but no readable checkpoint is refused rather
  than started again from step 0 (`_restore_or_start`).
  """
  checks.check_workdir(workdir)
  recipe_lib.apply(config)  # Idempotent: main (or a stored config) may have done it.
  checks.check_config(config)
  teacher_lib.check_settings(config)
  checkpointing.check_allowed_changes(allow_config_change)
  data = (train_data, eval_data)
  if jax.process_index() != 0:  # Process 0 holds the lock for the whole job.
    return _train_and_evaluate(config, workdir, allow_config_change, data)
  with checkpointing.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, allow_config_change, data)


def _restore_opt_state(ckpt: checkpointing.Checkpointer, step: int, meta: dict,
                       run: setup.Run, steps_per_epoch: int, template: PyTree,
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


def lr_to_lower(run: setup.Run) -> tuple[str, float]:
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
                        allow_config_change: Collection[str], data: tuple) -> dict:
  """The run, in its steps: data, model, restore, train, final evaluation."""
  t_start = time.time()
  # 'speedup:<x>' becomes the schedule it measures to (or reads from this
  # workdir's record when resuming), before anything is built from the config.
  speedup_timer.resolve(config, workdir, log=_print0)
  line = recipe_lib.describe(config)
  if line and jax.process_index() == 0:
    print(line, flush=True)
  setup.check_model_init(config)  # Before minutes of data preparation.
  setup.check_model_config(config)  # Likewise.
  train_data, eval_data, steps_per_epoch = _load_data(config, *data)
  run = setup.setup(config, train_data.num_classes)
  if teacher_lib.enabled(config):
    run.teacher = teacher_lib.load_teacher(config, run.model_config, run.replicate)
    if jax.process_index() == 0:
      print(teacher_lib.describe(run.teacher), flush=True)
  # What the run trains, as Table 1 reports it (LoRA, generators, head).
  trainable_params = param_counts.trainable_report(run.trainable, run.frozen)
  if jax.process_index() == 0:
    print(param_counts.format_trainable(trainable_params), flush=True)
  ckpt = checkpointing.Checkpointer(setup.checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints)
  writer = None
  try:
    progress = _restore_or_start(run, ckpt, steps_per_epoch, allow_config_change,
                                 workdir)
    total_steps = int(config.num_epochs * steps_per_epoch)
    _check_not_past_the_end(progress, total_steps, steps_per_epoch, ckpt.directory)
    recorded = records_lib.finished_results(workdir, progress, total_steps)
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
  chosen = speedup_lib.read_record(workdir)
  if chosen is not None and chosen.get('schedule') == config.model.schedule:
    # The measurement that chose the schedule.
    results['speedup_schedule'] = chosen
  if jax.process_index() == 0:
    writer.write(results['steps'], final_accuracy=results['final_accuracy'],
                 max_accuracy_paper_protocol=results['max_accuracy_paper_protocol'])
    records_lib.update_results(workdir, lambda old: records_lib.keep_recorded(old, results))
  writer.close()
  return results


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


def _load_data(config: ml_collections.ConfigDict, train_data: Any = None,
               eval_data: Any = None) -> tuple[Any, Any, int]:
  """(train data, eval data, steps per epoch), with the batch sizes checked
  against the splits, the task's labels and the memory there is. Data given
  (the Python API) are used as they are, once their batches are checked."""
  checks.check_divisible('batch_size', config.batch_size)
  checks.check_divisible('eval_batch_size', config.eval_batch_size)
  if train_data is None:
    train_data = setup.get_data(config.data, config.data.train_split,
                                config.batch_size, image_size=config.model.image_size,
                                train=True, seed=config.seed)
  else:
    checks.check_given_data(train_data, config, train=True)
  steps_per_epoch = int(train_data.steps_per_epoch)
  if steps_per_epoch <= 0:
    raise ConfigError(
        f'The train split has {train_data.num_examples} images, fewer than '
        f'config.batch_size = {config.batch_size}: lower the batch size.')
  checks.check_num_classes(config.model.get('num_classes'), train_data)
  if eval_data is None:
    eval_data = setup.get_eval_data(config)
  else:
    checks.check_given_data(eval_data, config, train=False)
  model = setup.build_model(setup.resolve_model_config(config, train_data.num_classes),
                            config.get('dtype', 'float32'))
  checks.check_batch_memory(model, config, 'batch_size',
                            config.batch_size // config.grad_accum_steps, training=True)
  checks.check_batch_memory(model, config, 'eval_batch_size', eval_data.batch_size,
                            training=False)
  return train_data, eval_data, steps_per_epoch


def _check_same_teacher(meta: dict, run: setup.Run, directory: str) -> None:
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


def _print0(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


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
  unreadable = f'{setup.checkpoint_dir(workdir)}_unreadable'
  if os.path.isdir(unreadable) and os.listdir(unreadable):
    found.append(f'{os.path.basename(unreadable)}/')
  first = min(config.checkpoint_every_steps,
              int(config.num_epochs * steps_per_epoch))
  logged = [r.get('step', 0) for r in metrics_lib.read_metrics(workdir)]
  if logged and max(logged) > first:
    found.append(f'metrics.jsonl (up to step {max(logged)})')
  return found


def _restore_or_start(run: setup.Run, ckpt: checkpointing.Checkpointer,
                      steps_per_epoch: int,
                      allow_config_change: Collection[str],
                      workdir: str) -> Progress:
  """The newest readable checkpoint's progress, or step 0 with a fresh optimiser.

  Parameters and optimiser state come back replicated on the mesh. Step 0
  only for a workdir without the records of a run: one whose checkpoints
  are gone (deleted, set aside as unreadable) is refused, since starting
  again would overwrite its metrics.jsonl and results.json.
  """
  tx_init = steps.make_optimizer(run, steps_per_epoch)[2]
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


def _train_loop(run: setup.Run, ckpt: checkpointing.Checkpointer,
                writer: metrics_lib.MetricWriter, progress: Progress,
                train_data, eval_data, steps_per_epoch: int,
                t_start: float) -> dict:
  """Steps from `progress.step` to the end, with logging, evals and checkpoints.

  Advances `progress` in place; returns the measured training speed.
  """
  config = run.config
  is_main = jax.process_index() == 0
  schedules = steps.make_optimizer(run, steps_per_epoch)[1]
  total_steps = int(config.num_epochs * steps_per_epoch)
  train_step = steps.make_train_step(run, steps_per_epoch)
  eval_step = steps.make_eval_step(run)
  key = run.replicate(setup.dropout_key(config))
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
      batch = setup.shard(next(batches), run.batch_sharding)
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
        result = steps.evaluate(run, eval_step, progress.trainable, eval_data)
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


def _final_results(run: setup.Run, progress: Progress, eval_data,
                   steps_per_epoch: int, speed: dict, trainable_params: dict,
                   t_start: float) -> dict:
  """results.json's contents: the final (and the paper-protocol max) accuracy."""
  config = run.config
  total_steps = int(config.num_epochs * steps_per_epoch)
  evals = progress.evals
  if not evals or evals[-1]['step'] != total_steps:
    # Resumed after the end, or a config with no eval at the last step.
    result = steps.evaluate(run, steps.make_eval_step(run), progress.trainable, eval_data)
    evals.append({'epoch': config.num_epochs, 'step': total_steps,
                  'accuracy': result['accuracy']})
  extra = {}
  if run.model.reducer.masks_tokens:  # Recorded under the method's name (LTMP: 'ltmp').
    extra[run.model.method] = evaluation.token_mask_report(run, progress.trainable, eval_data)
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
