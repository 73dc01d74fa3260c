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

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax import train as train_lib

PyTree = Any


class ExportError(ValueError):
  """An export that cannot be written or read; the message says what to do."""


def fold_lora(params: PyTree) -> PyTree:
  from pyra_jax.models import lora  # pylint: disable=g-import-not-at-top
  return lora.fold_lora(params)


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


def export(config: ml_collections.ConfigDict, workdir: str,
           export_dir: str | None = None, step: int | None = None, *,
           two_stage: bool = False) -> str:
  """Writes the folded, deployable checkpoint; returns its directory.

  With `two_stage`, the model exported merges as `config` says (see
  `train.restore_run`), and `export_info` names the method it was trained with.
  """
  export_dir = os.path.abspath(export_dir or os.path.join(workdir, 'export'))
  run, trainable, step = train_lib.restore_run(config, workdir, step,
                                               two_stage=two_stage)
  params = optim.merge_params(jax.device_get(trainable),
                              jax.device_get(run.frozen))
  if run.model_config.lora_rank > 0:
    params = fold_lora(params)
  params = strip_lora(jax.device_get(params))
  cfg = folded_config(config, run.model_config)
  meta = checkpointing.config_to_dict(cfg)
  meta['export_info'] = {'workdir': os.path.abspath(workdir), 'step': int(step)}
  if two_stage:
    trained = train_lib.checkpoint_model(workdir, step)
    meta['export_info']['trained'] = {'method': trained['method'],
                                      'schedule': trained['schedule']}
  # Every process calls save: Orbax coordinates multi-host writes itself.
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(export_dir, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      config=ocp.args.JsonSave(meta)), force=True)
  ckptr.close()
  return export_dir


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
  meta = dict(restored.config)
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
