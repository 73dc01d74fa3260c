"""The frozen teacher of PE-Dist (`config.distill`): restored once, run in eval mode.

A teacher is one of our own trained models, given either as

  * `config.distill.teacher_workdir`: a training workdir. Its latest readable
    checkpoint is restored with the config stored in that checkpoint (its own
    variant, LoRA rank, merging, pretrained weights), exactly as its own
    `--mode=eval` restores it (`setup.restore_run`), LoRA not folded; or
  * `config.distill.teacher_export`: an export of ours (`--mode=export`), LoRA
    folded into q/k/v, as `--mode=eval --export_dir=...` reads it.

Either way its logits in the training step are `model.apply(params, images,
train=False)` with the model and parameters its own evaluation uses (no
dropout, no stochastic depth), so they are the logits behind the accuracy its
run reported. The parameters enter the jitted step as an argument that is
never differentiated (`steps.make_train_step`), so they cannot change.

Before anything is compiled, the teacher is checked against the student: the
same number of classes, the same image size and the same input normalisation
(both see the same batch), each refused in one sentence naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

from absl import logging
import jax
import ml_collections

from pyra_jax import checkpointing
from pyra_jax import errors
from pyra_jax import optim
from pyra_jax.errors import ConfigError
from pyra_jax.training import distill
from pyra_jax.training import export as export_lib
from pyra_jax.training import setup

PyTree = Any


@dataclasses.dataclass
class Teacher:
  """A restored teacher and the loss settings it is distilled with."""
  model: Any                 # its VisionTransformer (its own config)
  params: PyTree             # every parameter, on the student's mesh (replicated)
  model_config: ml_collections.ConfigDict  # resolved (num_classes set)
  source: str                # 'workdir' | 'export'
  path: str                  # absolute path of the workdir or export
  step: Optional[int]        # the checkpoint step (workdir) or the exported step
  fingerprint: str           # sha256 of its parameters (resume refuses a change)
  temperature: float         # config.distill.temperature
  weight: float              # config.distill.weight
  loss: str                  # config.distill.loss (distill.DISTILL_LOSSES)
  recorded_accuracy: Optional[float] = None  # its run's results.json, if any

  def memo_key(self) -> str:
    """What identifies the compiled teacher forward inside a train step."""
    return setup.json_key([self.model_config.to_dict(), self.fingerprint])

  def record(self) -> dict:
    """What checkpoints and results.json store about the teacher."""
    return {'source': self.source, 'path': self.path, 'step': self.step,
            'fingerprint': self.fingerprint,
            'variant': self.model_config.get('variant'),
            'depth': int(self.model.depth), 'width': int(self.model.width),
            'method': self.model_config.get('method'),
            'loss': self.loss,
            'recorded_accuracy': self.recorded_accuracy}


def enabled(config: ml_collections.ConfigDict) -> bool:
  d = config.get('distill')
  return bool(d is not None and d.get('enabled', False))


def check_settings(config: ml_collections.ConfigDict) -> None:
  """Refuses distillation settings that cannot work, before any data or model.

  A teacher path with distillation off would silently train without it, and
  distillation on without exactly one teacher has nothing to distil from.
  """
  d = config.get('distill')
  if d is None:
    return
  workdir, export = d.get('teacher_workdir', ''), d.get('teacher_export', '')
  if not d.enabled:
    if workdir or export:
      field = 'teacher_workdir' if workdir else 'teacher_export'
      raise ConfigError(
          f'config.distill.{field} is set but config.distill.enabled is False, '
          'so it would be ignored: add --config.distill.enabled=True (the config '
          'argument teacher=... / teacher_export=... sets both), or remove the teacher.')
    return
  if workdir and export:
    raise ConfigError(
        'config.distill.teacher_workdir and config.distill.teacher_export are '
        'both set: give one teacher (a training workdir or an export of it).')
  if not (workdir or export):
    raise ConfigError(
        'config.distill.enabled is True but no teacher is given: add teacher=WORKDIR '
        '(a finished training run of the larger model, e.g. trained with '
        'configs/vitb_high.py:method=peft) or teacher_export=DIR to the config '
        'argument, or set --config.distill.teacher_workdir / teacher_export.')
  if not d.temperature > 0:
    raise ConfigError(f'config.distill.temperature = {d.temperature!r}: use a '
                      'temperature > 0 (1 leaves the logits as they are).')
  if not d.weight >= 0:
    raise ConfigError(f'config.distill.weight = {d.weight!r}: use a weight >= 0 '
                      '(0 trains on the cross-entropy alone).')
  loss = d.loss
  if loss not in distill.DISTILL_LOSSES:
    raise ConfigError(f'config.distill.loss = {loss!r}: use one of '
                      f'{", ".join(distill.DISTILL_LOSSES)}.')
  if loss == 'authors_hard':
    for name in ('temperature', 'weight'):
      if d[name] != 1.0:
        raise ConfigError(
            f"config.distill.{name} = {d[name]!r} has no effect with "
            "config.distill.loss='authors_hard' (a fixed ½·CE(labels) + ½·CE(the "
            f"teacher's top class)): leave it at 1, or use loss='kl'.")


def _from_workdir(path: str) -> tuple[Any, PyTree, ml_collections.ConfigDict,
                                      ml_collections.ConfigDict, int]:
  """(model, params, model config, full config, step) of a workdir's latest checkpoint."""
  field = 'config.distill.teacher_workdir'
  if not os.path.isdir(path):
    raise ConfigError(
        f'{field} = {path!r} does not exist: give the --workdir of the teacher\'s '
        'finished training run (e.g. one trained with configs/vitb_high.py:method=peft).')
  directory = setup.checkpoint_dir(path)
  steps = []
  if os.path.isdir(directory):
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
      steps = ckpt.all_steps()
      meta = ckpt.restore_meta(steps[-1]) if steps else None
    except checkpointing.CheckpointDamaged:
      meta = None  # restore_run below falls back to an older step, or says why.
    finally:
      ckpt.close()
  if not steps and export_lib.is_export(path):
    raise ConfigError(
        f'{field} = {path!r} is an export, not a training workdir: give it as '
        'teacher_export=... (config.distill.teacher_export) instead.')
  if not steps:
    raise ConfigError(
        f'{field} = {path!r} holds no checkpoint (nothing in {directory}): train '
        'the teacher there first (python -m pyra_jax.main --config=... '
        f'--workdir={path}), or give its export as config.distill.teacher_export.')
  if meta is None:  # The latest is damaged: the config of an older one serves.
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
      _, meta = ckpt.restore_newest_readable(ckpt.restore_meta)
    finally:
      ckpt.close()
  config = ml_collections.ConfigDict(checkpointing.stored_config(meta['config']))
  try:
    run, trainable, step = setup.restore_run(config, path)
  except errors.PyraError as e:  # Say that it is the teacher's, not the student's.
    raise type(e)(f'Restoring the teacher ({field} = {path!r}) failed: {e}') from e
  params = optim.merge_params(jax.device_get(trainable), jax.device_get(run.frozen))
  return run.model, params, run.model_config, config, step


def _from_export(path: str) -> tuple[Any, PyTree, ml_collections.ConfigDict,
                                     ml_collections.ConfigDict, Optional[int]]:
  field = 'config.distill.teacher_export'
  if not os.path.isdir(path):
    raise ConfigError(f'{field} = {path!r} does not exist: give the folder written '
                      'by the teacher\'s --mode=export.')
  if not export_lib.is_export(path):
    raise ConfigError(
        f'{field} = {path!r} is not a pyra_jax export: write one with python -m '
        'pyra_jax.main --mode=export --config=<teacher config> --workdir=<teacher '
        'workdir>, or give the workdir itself as config.distill.teacher_workdir.')
  params, config = export_lib.load_export(path)
  model = setup.build_model(config.model, config.get('dtype', 'float32'))
  return model, params, config.model, config, None


def _recorded_accuracy(path: str, step: Optional[int]) -> Optional[float]:
  """The final test accuracy the teacher's run recorded, if it finished at `step`."""
  import json  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(path, 'results.json')) as f:
      results = json.load(f)
  except (OSError, ValueError):
    return None
  if step is not None and results.get('steps') != step:
    return None
  return results.get('final_accuracy')


def load_teacher(config: ml_collections.ConfigDict,
                 student_model_config: ml_collections.ConfigDict,
                 replicate: Callable[[PyTree], PyTree]) -> Teacher:
  """Restores the teacher named by `config.distill` and checks it fits the student.

  `student_model_config` is the student's resolved model config (num_classes
  set from its task); `replicate` puts the parameters on the student's mesh.
  """
  check_settings(config)
  d = config.distill
  if d.teacher_workdir:
    path = os.path.abspath(d.teacher_workdir)
    model, params, mc, tconfig, step = _from_workdir(path)
    source = 'workdir'
  else:
    path = os.path.abspath(d.teacher_export)
    model, params, mc, tconfig, step = _from_export(path)
    source = 'export'
    with open(os.path.join(path, 'config', 'metadata')) as f:
      import json  # pylint: disable=g-import-not-at-top
      step = (json.load(f).get('export_info') or {}).get('step')
  what = f'The teacher ({source} {path})'
  tc, sc = mc.num_classes, student_model_config.num_classes
  if tc != sc:
    raise ConfigError(
        f'{what} has {tc} classes but the student\'s task ({config.data.task}) has '
        f'{sc}: distil from a teacher trained on the student\'s task.')
  ti, si = mc.image_size, student_model_config.image_size
  if ti != si:
    raise ConfigError(
        f'{what} was trained at {ti} px but the student runs at '
        f'config.model.image_size = {si}: both read the same batch, so use '
        f'--config.model.image_size={ti} or a teacher trained at {si} px.')
  tn = tconfig.get('data', {}).get('normalization', config.data.normalization)
  if tn != config.data.normalization:
    raise ConfigError(
        f'{what} was trained on {tn!r}-normalised images but the student reads '
        f'config.data.normalization = {config.data.normalization!r}: both read the '
        f'same batch, so use --config.data.normalization={tn}.')
  tt = tconfig.get('data', {}).get('task')
  if tt is not None and tt != config.data.task:
    logging.warning('The teacher was trained on task %r, the student trains on %r '
                    '(same number of classes): make sure the labels mean the same.',
                    tt, config.data.task)
  teacher = Teacher(
      model=model, params=replicate(params), model_config=mc, source=source,
      path=path, step=None if step is None else int(step),
      fingerprint=checkpointing.fingerprint(params),
      temperature=float(d.temperature), weight=float(d.weight),
      loss=d.loss,
      recorded_accuracy=(_recorded_accuracy(path, step) if source == 'workdir'
                         else None))
  logging.info('Teacher: %s', teacher.record())
  return teacher


def describe(teacher: Teacher) -> str:
  """One line for the console: which teacher, and how it is distilled."""
  mc = teacher.model_config
  acc = (f', its recorded test accuracy {100 * teacher.recorded_accuracy:.2f}%'
         if teacher.recorded_accuracy is not None else '')
  step = f' step {teacher.step}' if teacher.step is not None else ''
  how = (f'with T = {teacher.temperature:g}, weight {teacher.weight:g}'
         if teacher.loss == 'kl' else
         "with the authors' loss ½·CE(labels) + ½·CE(the teacher's top class)")
  return (f'Distilling from the teacher {teacher.path} ({teacher.source}{step}: '
          f'{mc.variant}, depth {teacher.model.depth}, '
          f'method {mc.method}{acc}) {how}.')
