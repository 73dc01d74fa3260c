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

`load_export(path)` reads it back for `pyra_jax.benchmark`, eval
(`--mode=eval --export_dir=...`) and the 'pyra_jax' pretrained format.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax import train as train_lib
from pyra_jax.errors import ExportError  # pylint: disable=unused-import

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
                             'commit_success.txt'})


def is_export(path: str) -> bool:
  """Whether `path` holds a pyra_jax export and nothing else."""
  try:
    entries = set(os.listdir(path))
    with open(os.path.join(path, 'config', 'metadata')) as f:
      info = json.load(f).get('export_info')
  except (OSError, ValueError, AttributeError):
    return False
  return {'params', 'config'} <= entries <= _EXPORT_ENTRIES and bool(info)


def check_export_dir(export_dir: str, workdir: str) -> None:
  """Refuses an export target whose contents an export would destroy.

  An export goes into a new or empty folder, or replaces an earlier export
  of ours. Anything else, the workdir itself or a folder that holds it
  included, is the user's data and is left alone.
  """
  export_dir, workdir = os.path.abspath(export_dir), os.path.abspath(workdir)
  inside = os.path.commonpath([export_dir, workdir]) == export_dir
  if inside:
    raise ExportError(
        f'--export_dir={export_dir} is the workdir or a folder that contains it: '
        'an export there would replace the checkpoints it is made from. Give a '
        f'new folder, e.g. --export_dir={os.path.join(workdir, "export")}.')
  checkpoints = os.path.abspath(train_lib.checkpoint_dir(workdir))
  if os.path.commonpath([export_dir, checkpoints]) == checkpoints:
    raise ExportError(
        f'--export_dir={export_dir} is inside the checkpoint folder {checkpoints}, '
        'where it would be taken for a training checkpoint: give a folder outside it.')
  if not os.path.exists(export_dir):
    return
  if not os.path.isdir(export_dir):
    raise ExportError(f'--export_dir={export_dir} is a file: give a new or empty folder.')
  entries = sorted(os.listdir(export_dir))
  if entries and not is_export(export_dir):
    shown = ', '.join(entries[:5]) + (', ...' if len(entries) > 5 else '')
    raise ExportError(
        f'--export_dir={export_dir} is not empty ({shown}) and holds no pyra_jax '
        'export: an export only goes into a new or empty folder, or replaces an '
        'earlier export. Give another --export_dir.')


def export(config: ml_collections.ConfigDict, workdir: str,
           export_dir: str | None = None, step: int | None = None, *,
           two_stage: bool = False) -> str:
  """Writes the folded, deployable checkpoint; returns its directory.

  The export is written next to its target and renamed into place, so the
  target holds the old export or the new one, never a mix or nothing; the
  target is checked first (`check_export_dir`). With `two_stage`, the model
  exported merges as `config` says (see `train.restore_run`), and
  `export_info` names the method it was trained with.
  """
  export_dir = os.path.abspath(export_dir or os.path.join(workdir, 'export'))
  check_export_dir(export_dir, workdir)
  run, trainable, step = train_lib.restore_run(config, workdir, step,
                                               two_stage=two_stage)
  params = optim.merge_params(jax.device_get(trainable),
                              jax.device_get(run.frozen))
  params = fold_peft(params, run.model_config)  # LoRA, FacT; SNF stays
  params = strip_lora(jax.device_get(params))
  cfg = folded_config(config, run.model_config)
  meta = checkpointing.config_to_dict(cfg)
  meta['export_info'] = {'workdir': os.path.abspath(workdir), 'step': int(step)}
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  # Same name on every host (Orbax coordinates a multi-host save on one path);
  # a leftover from a killed export is ours and incomplete.
  staging = os.path.join(parent, f'.{os.path.basename(export_dir)}.staging')
  if os.path.exists(staging) and jax.process_index() == 0:
    shutil.rmtree(staging)
  if two_stage:
    trained = train_lib.checkpoint_model(workdir, step)
    meta['export_info']['trained'] = {'method': trained['method'],
                                      'schedule': trained['schedule']}
  # Every process calls save: Orbax coordinates multi-host writes itself.
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    ckptr.save(staging, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        config=ocp.args.JsonSave(meta)))
  finally:
    ckptr.close()
  if jax.process_index() == 0:
    _replace_dir(staging, export_dir)
  return export_dir


def _replace_dir(new: str, target: str) -> None:
  """Puts directory `new` at `target`, atomically as seen from `target`.

  A rename cannot replace a non-empty directory, so the old export is first
  renamed aside (one rename), the new one renamed in (another), and only then
  the old one deleted: a kill in between leaves a complete export at `target`
  or at the aside name, never nothing.
  """
  if not os.path.exists(target):
    os.replace(new, target)
    return
  old = f'{target}.old-{os.getpid()}'
  os.replace(target, old)
  os.replace(new, target)
  shutil.rmtree(old)


def load_export(path: str) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Reads an export: (params as numpy arrays, config). For benchmark and eval."""
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, 'params')):
    raise ExportError(
        f'{path} is not a pyra_jax export (no params/ inside): write one with '
        '`python -m pyra_jax.main --mode=export --config=... --workdir=...`.')
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = ckptr.restore(path, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  ckptr.close()
  meta = checkpointing.stored_config(dict(restored.config))
  meta.pop('export_info', None)
  params = jax.tree.map(np.asarray, restored.params)
  return params, ml_collections.ConfigDict(meta)


def evaluate_export(export_dir: str,
                    config: ml_collections.ConfigDict | None = None) -> dict:
  """Test accuracy of an exported (folded) model.

  The model comes from the export; the data section from `config` when given
  (e.g. another data_dir or split), else from the export's own config.
  """
  params, cfg = load_export(export_dir)
  data_cfg = config if config is not None else cfg
  model = train_lib.build_model(cfg.model, cfg.get('dtype', 'float32'))
  mesh = train_lib.make_mesh()
  run = train_lib.Run(cfg, cfg.model, model, mesh, params, None, '')
  run.frozen = {}
  train_lib._check_divisible('eval_batch_size', data_cfg.eval_batch_size)  # pylint: disable=protected-access
  eval_data = train_lib.get_data(
      data_cfg.data, data_cfg.data.eval_split, data_cfg.eval_batch_size,
      image_size=cfg.model.image_size, train=False, seed=data_cfg.seed)
  result = train_lib.evaluate(run, train_lib.make_eval_step(run),
                              run.replicate(params), eval_data)
  result.update(split=data_cfg.data.eval_split, export_dir=export_dir)
  return result
