"""The deployable checkpoint: full parameters with LoRA folded into q/k/v.

`--mode=export` restores a training checkpoint (trainable params + the frozen
backbone re-created from `model_init`), folds LoRA into the frozen kernels with
`pyra_jax.models.lora.fold_lora` (no extra FLOPs at inference, the paper's
deployment) and writes one self-contained Orbax checkpoint:

  <export_dir>/params   every parameter (no `lora` entries), StandardSave
  <export_dir>/config   JSON: the full config, with `model` resolved
                        (num_classes filled in) and model.lora_rank = 0, so
                        `build_model(config.model)` builds the folded tree;
                        plus `export_info` (source workdir and step).
  <export_dir>/params.safetensors, card.json
                        the same parameters and the model card, for other
                        tools (`pyra_jax.deploy`; docs/deploy.md).

`--format=stablehlo` writes `pyra_jax.deploy`'s compiled program instead of
the Orbax checkpoint (`deploy.write_stablehlo`), into a folder replaced the
same way.

`load_export(path)` reads it back for `pyra_jax.benchmark`, eval
(`--mode=eval --export_dir=...`) and a distillation teacher
(config.distill.teacher_export). An export is not pretrained weights for
`model_init` (it is refused there with these uses; checkpoints/filecheck.py).

Writing is safe against what users do to an export folder:
  * `--export_dir` is resolved through symbolic links: an export onto a link
    to an earlier export replaces that export where it lies, and the link
    keeps pointing at it;
  * several exports into one folder at once each write their own staging
    folder and take turns (an flock on the parent folder) for the swap, so
    the folder ends up holding one complete export, the last one finished;
  * a damaged export (cut short, emptied metadata) is named on reading with
    the command that writes it again, and that command may replace it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from pyra_jax import checkpointing
from pyra_jax import deploy
from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax.errors import ExportError
from pyra_jax.training import checks
from pyra_jax.training import setup
from pyra_jax.training import steps

PyTree = Any



def fold_lora(params: PyTree) -> PyTree:
  from pyra_jax.models import lora  # pylint: disable=g-import-not-at-top
  return lora.fold_lora(params)


def fold_peft(params: PyTree, model_config: ml_collections.ConfigDict) -> PyTree:
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.fold_peft(params, model_config)


def deployed_model_config(model_config: ml_collections.ConfigDict
                          ) -> ml_collections.ConfigDict:
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  return vit.deployed_config(model_config)


def folded_config(config: ml_collections.ConfigDict,
                  model_config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """The exported model's config: resolved, deployed model (LoRA rank 0, no
  dropout), no init file (the export holds every weight)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.model = deployed_model_config(model_config)
  cfg.model_init = ''
  return cfg


def strip_lora(params: PyTree) -> PyTree:
  flat = traverse_util.flatten_dict(params, sep='/')
  flat = {k: v for k, v in flat.items() if '/lora/' not in f'/{k}'}
  return traverse_util.unflatten_dict(flat, sep='/')


# What an export of ours holds at its top level (Orbax's composite layout).
_EXPORT_ENTRIES = frozenset({'params', 'config', '_CHECKPOINT_METADATA',
                             'commit_success.txt'}) | deploy.WEIGHT_FILES


def is_export(path: str) -> bool:
  """Whether `path` holds a pyra_jax export and nothing else."""
  try:
    entries = set(os.listdir(path))
    with open(os.path.join(path, 'config', 'metadata')) as f:
      info = json.load(f).get('export_info')
  except (OSError, ValueError, AttributeError):
    return False
  return {'params', 'config'} <= entries <= _EXPORT_ENTRIES and bool(info)


def has_export_layout(path: str) -> bool:
  """Whether `path` is laid out as an export of ours, even if damaged inside.

  An export whose metadata was emptied or whose arrays were cut short is no
  longer `is_export`, yet it is ours to replace: exporting again is the fix
  `load_export` names.
  """
  if deploy.is_stablehlo_export(path):  # --format=stablehlo
    return True
  try:
    entries = set(os.listdir(path))
  except OSError:
    return False
  return ({'params', 'config'} <= entries <= _EXPORT_ENTRIES
          and os.path.isdir(os.path.join(path, 'params'))
          and os.path.isfile(os.path.join(path, 'config', 'metadata')))


def check_export_dir(export_dir: str, workdir: str) -> None:
  """Refuses an export target whose contents an export would destroy.

  An export goes into a new or empty folder, or replaces an earlier export
  of ours. Anything else, the workdir itself or a folder that holds it
  included, is the user's data and is left alone.
  """
  # Through symbolic links: a link to the workdir is the workdir.
  export_dir, workdir = os.path.realpath(export_dir), os.path.realpath(workdir)
  inside = os.path.commonpath([export_dir, workdir]) == export_dir
  if inside:
    raise ExportError(
        f'--export_dir={export_dir} is the workdir or a folder that contains it: '
        'an export there would replace the checkpoints it is made from. Give a '
        f'new folder, e.g. --export_dir={os.path.join(workdir, "export")}.')
  checkpoints = setup.checkpoint_dir(workdir)
  if os.path.commonpath([export_dir, checkpoints]) == checkpoints:
    raise ExportError(
        f'--export_dir={export_dir} is inside the checkpoint folder {checkpoints}, '
        'where it would be taken for a training checkpoint: give a folder outside it.')
  if not os.path.exists(export_dir):
    nearest = os.path.dirname(export_dir)
    while not os.path.exists(nearest):
      nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
      raise ExportError(
          f'--export_dir={export_dir} cannot be created: {nearest} is a file, '
          'not a folder; give an --export_dir elsewhere.')
    return
  if not os.path.isdir(export_dir):
    raise ExportError(f'--export_dir={export_dir} is a file: give a new or empty folder.')
  entries = sorted(os.listdir(export_dir))
  if entries and not has_export_layout(export_dir):
    shown = ', '.join(entries[:5]) + (', ...' if len(entries) > 5 else '')
    raise ExportError(
        f'--export_dir={export_dir} is not empty ({shown}) and holds no pyra_jax '
        'export: an export only goes into a new or empty folder, or replaces an '
        'earlier export. Give another --export_dir.')


def export(config: ml_collections.ConfigDict, workdir: str,
           export_dir: str | None = None, step: int | None = None, *,
           two_stage: bool = False, export_format: str = 'orbax',
           setting: str | None = None) -> str:
  """Writes the folded, deployable checkpoint; returns its directory.

  The export is written next to its target and renamed into place, so the
  target holds the old export or the new one, never a mix or nothing; the
  target is checked first (`check_export_dir`). With `two_stage`, the model
  exported merges as `config` says (see `setup.restore_run`), and
  `export_info` names the method it was trained with. Every export holds
  params.safetensors and card.json too; `export_format='stablehlo'` writes
  the compiled program of `pyra_jax.deploy` instead of the Orbax checkpoint
  (`setting`: the --config value, named in the card).
  """
  if export_format not in deploy.FORMATS:
    raise ExportError(f'Unknown export format {export_format!r}: use one of '
                      f'{", ".join(deploy.FORMATS)}.')
  # Through symbolic links (module docstring): the link stays a link.
  export_dir = os.path.realpath(export_dir or os.path.join(workdir, 'export'))
  check_export_dir(export_dir, workdir)
  run, trainable, step = setup.restore_run(config, workdir, step,
                                           two_stage=two_stage)
  params = optim.merge_params(jax.device_get(trainable),
                              jax.device_get(run.frozen))
  params = fold_peft(params, run.model_config)  # LoRA, FacT; SNF stays
  params = strip_lora(jax.device_get(params))
  cfg = folded_config(config, run.model_config)
  meta = checkpointing.config_to_dict(cfg)
  meta['export_info'] = {'workdir': os.path.abspath(workdir), 'step': int(step)}
  if two_stage:
    trained = setup.checkpoint_model(workdir, step)
    meta['export_info']['trained'] = {'method': trained['method'],
                                      'schedule': trained['schedule']}
  parent, name = os.path.split(export_dir)
  os.makedirs(parent, exist_ok=True)
  # One name per export, the same on every host (Orbax coordinates a
  # multi-host save on one path), so that exports at once never share one.
  token = _export_token()
  staging = os.path.join(parent, f'.{name}.staging-{token}')
  lead = jax.process_index() == 0
  with _folder_lock(parent) if lead else contextlib.nullcontext():
    if lead:  # Holding the lock: what is left of other exports is dead.
      _clear_leftovers(parent, name, keep=staging)
    if lead:  # The card and a StableHLO program are process 0's to write.
      card = deploy.model_card(
          config, run.model_config, workdir=workdir, step=step, two_stage=two_stage,
          trainable=param_counts.trainable_report(trainable, run.frozen),
          setting=deploy.setting_name(setting), export_format=export_format,
          names=deploy.class_names(config.data, cfg.model.image_size,
                                   cfg.model.num_classes))
    if export_format == 'stablehlo':
      if lead:
        deploy.write_stablehlo(staging, params, cfg.model, card,
                               dtype=cfg.get('dtype', 'float32'))
    else:  # Every process saves: Orbax coordinates multi-host writes itself.
      ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
      try:
        ckptr.save(staging, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            config=ocp.args.JsonSave(meta)))
      finally:
        ckptr.close()
      if lead:
        deploy.write_card(staging, params, card)
    if lead:
      _replace_dir(staging, export_dir, f'{export_dir}.old-{token}')
  return export_dir


def _export_token() -> str:
  """A random name part for this export, process 0's on every host."""
  token = np.int32(int.from_bytes(os.urandom(4), 'little') >> 1)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    token = multihost_utils.broadcast_one_to_all(token)
  return f'{int(token):08x}'


@contextlib.contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
  """An exclusive flock on `folder` (the export's parent) while held.

  Exports into one folder take turns for clearing leftovers and swapping the
  new export in; the kernel drops the lock of a killed export. On a file
  system without flock the staging names alone keep exports apart.
  """
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:  # Writable but not readable: the staging names still hold.
    yield
    return
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'Another export into {folder} is being written: waiting for it '
            'to finish ...', file=sys.stderr, flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
  finally:
    os.close(fd)  # Releases the lock.


def _clear_leftovers(parent: str, name: str, keep: str) -> None:
  """Removes what killed exports of `name` left in `parent` (all ours).

  Staging folders (`.<name>.staging...`) are incomplete exports; an aside
  folder (`<name>.old-...`) is an earlier export that a kill between the two
  renames of `_replace_dir` left behind, removed only once `name` holds one.
  """
  target = os.path.join(parent, name)
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if path == keep or os.path.islink(path):
      continue
    if entry.startswith(f'.{name}.staging'):
      shutil.rmtree(path, ignore_errors=True)
    elif (entry.startswith(f'{name}.old-') and has_export_layout(path)
          and has_export_layout(target)):
      shutil.rmtree(path, ignore_errors=True)


def _replace_dir(new: str, target: str, aside: str) -> None:
  """Puts directory `new` at `target`, atomically as seen from `target`.

  A rename cannot replace a non-empty directory, so the old export is first
  renamed aside (one rename), the new one renamed in (another), and only then
  the old one deleted: a kill in between leaves a complete export at `target`
  or at `aside`, never nothing (the next export clears `aside`). `target` is
  a real folder (`export` resolved links), so the renames move folders, never
  a link.
  """
  if not os.path.exists(target):
    os.replace(new, target)
    return
  os.replace(target, aside)
  os.replace(new, target)
  shutil.rmtree(aside)


def load_export(path: str) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Reads an export: (params as numpy arrays, config). For benchmark and eval.

  What is not an export (a training checkpoint or workdir, a foreign folder)
  or a damaged one is an ExportError saying what it is and what to run.
  """
  path = os.path.abspath(path)
  _check_readable_export(path)
  _check_export_data(path)
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    restored = ckptr.restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
    meta = checkpointing.stored_config(dict(restored.config))
    params = jax.tree.map(np.asarray, restored.params)
  except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
    raise ExportError(_damaged_export(path, e)) from e
  finally:
    ckptr.close()
  meta.pop('export_info', None)
  return params, ml_collections.ConfigDict(meta)


def _check_readable_export(path: str) -> None:
  """Refuses, in one sentence, a path that holds no export of ours."""
  write_one = ('write one with `python -m pyra_jax.main --mode=export '
               '--config=... --workdir=...`')
  if not os.path.exists(path):
    raise ExportError(f'Export {path} does not exist: {write_one}.')
  if not os.path.isdir(path):
    raise ExportError(f'{path} is a file, not an export folder: {write_one}.')
  entries = set(os.listdir(path))
  if deploy.is_stablehlo_export(path):
    raise ExportError(
        f'{path} is a StableHLO export (--format=stablehlo), which runs without '
        f'pyra_jax (python {os.path.join(path, deploy.LOADER_FILE)}): for eval, the '
        'benchmark or a teacher, export with --format=orbax (the default).')
  if os.path.basename(setup.checkpoint_dir(path)) in entries:
    raise ExportError(
        f'{path} is a training workdir, not an export: evaluate its latest '
        f'checkpoint with --mode=eval --workdir={path}, or export it with '
        f'--mode=export --workdir={path}.')
  if 'params' in entries and 'config' not in entries and (
      {'meta', 'opt_state'} & entries):
    step, folder = os.path.basename(path), os.path.dirname(path)
    wd = os.path.dirname(folder)
    if step.isdigit() and setup.checkpoint_dir(wd) == folder:
      raise ExportError(
          f'{path} is a training checkpoint (step {step} of the workdir {wd}), '
          f'not an export: evaluate it with --mode=eval --workdir={wd} '
          f'--checkpoint_step={step}, or export it first with --mode=export '
          f'--workdir={wd} --checkpoint_step={step}.')
    raise ExportError(
        f'{path} is a training checkpoint, not an export: evaluate it with '
        '--mode=eval --workdir=<its workdir> --checkpoint_step=<step>, or '
        'export it first with --mode=export.')
  if 'params' not in entries:
    raise ExportError(
        f'{path} is not a pyra_jax export (no params/ inside): {write_one}.')


def _check_export_data(path: str) -> None:
  """Finds a damaged export before Orbax reads it.

  Orbax reads the arrays concurrently; when one read fails (a file cut
  short), the reads still in flight report into an event loop that is gone,
  and each prints a RuntimeError traceback ("Event loop is closed") however
  the failure is handled. So the metadata is parsed here, and the last byte of
  every stored value read one at a time (a tiny read per array chunk), which
  finds a truncated file with no concurrency.
  """
  try:
    with open(os.path.join(path, 'config', 'metadata')) as f:
      json.load(f)
    params = os.path.join(path, 'params')
    if not os.path.exists(os.path.join(params, 'manifest.ocdbt')):
      return  # Not Orbax's OCDBT layout: left to Orbax's restore.
    import tensorstore as ts  # pylint: disable=g-import-not-at-top
    store = ts.KvStore.open({'driver': 'ocdbt',
                             'base': f'file://{params}/'}).result()
    for key in store.list().result():
      store.read(key, byte_range=slice(-1, None)).result()
  except (OSError, ValueError) as e:  # tensorstore's errors are ValueErrors.
    raise ExportError(_damaged_export(path, e)) from e


def _damaged_export(path: str, e: BaseException) -> str:
  """The sentence for an export Orbax cannot read: name it, say how to redo it."""
  reason = ' '.join(str(e).split())[:160] or type(e).__name__
  try:
    with open(os.path.join(path, 'config', 'metadata')) as f:
      info = json.load(f)['export_info']
    again = (f'--workdir={info["workdir"]} --checkpoint_step={info["step"]}')
  except (OSError, ValueError, KeyError, TypeError):
    again = '--workdir=<the workdir it came from>'
  return (f'The export {path} is damaged and cannot be read ({reason}): export '
          f'again with python -m pyra_jax.main --config=... {again} '
          f'--mode=export --export_dir={path}, which replaces it.')


def evaluate_export(export_dir: str,
                    config: ml_collections.ConfigDict | None = None) -> dict:
  """Test accuracy of an exported (folded) model.

  The model comes from the export; the data section from `config` when given
  (e.g. another data_dir or split), else from the export's own config.
  """
  params, cfg = load_export(export_dir)
  data_cfg = config if config is not None else cfg
  model = setup.build_model(cfg.model, cfg.get('dtype', 'float32'))
  mesh = setup.make_mesh()
  run = setup.Run(cfg, cfg.model, model, mesh, params, None, '')
  run.frozen = {}
  checks.check_divisible('eval_batch_size', data_cfg.eval_batch_size)
  eval_data = setup.get_eval_data(data_cfg, image_size=cfg.model.image_size)
  checks.check_num_classes(model.num_classes, eval_data)
  checks.check_batch_memory(model, data_cfg, 'eval_batch_size', eval_data.batch_size,
                            training=False, image_size=cfg.model.image_size)
  result = steps.evaluate(run, steps.make_eval_step(run),
                          run.replicate(params), eval_data)
  result.update(split=data_cfg.data.eval_split, export_dir=export_dir)
  return result
