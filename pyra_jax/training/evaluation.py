"""Evaluation of a saved checkpoint, its two-stage record, and the methods' cost reports.

`evaluate_checkpoint` (`--mode=eval`) restores a checkpoint and measures its
test accuracy; with `two_stage` it evaluates it with another merging and
records the result in the run's results.json. `token_mask_report` measures
LTMP's data-dependent cost, reported with a run's results.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax.training import checks
from pyra_jax.training import records
from pyra_jax.training import setup
from pyra_jax.training import steps

PyTree = setup.PyTree


def record_two_stage(workdir: str, entry: dict) -> str:
  """Adds `entry` to the 'two_stage' list of <workdir>/results.json.

  The training run's own fields stay as they are; an entry for the same
  checkpoint step, evaluated model and split replaces the earlier one. Runs
  under the results lock (`records.update_results`), so several evaluations at once
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
  return records.update_results(workdir, add)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None, *,
                        two_stage: bool = False, eval_data: Any = None) -> dict:
  """Test accuracy of a saved checkpoint, without training.

  With `two_stage` the checkpoint is evaluated with `config`'s merging (see
  `setup.restore_run`) and the result is added to the run's results.json under
  'two_stage', next to (not over) what the training run recorded.
  """
  checks.check_config(config, training=False)
  checks.check_divisible('eval_batch_size', config.eval_batch_size)
  results_path = os.path.join(workdir, 'results.json')
  if two_stage and not os.path.isfile(results_path):
    raise checkpointing.CheckpointMismatchError(
        f'{results_path} does not exist: a two-stage evaluation is recorded '
        'next to the finished training run, so finish training first '
        '(rerun --mode=train with the training config).')
  run, trainable, step = setup.restore_run(config, workdir, step, two_stage=two_stage)
  if eval_data is None:
    eval_data = setup.get_eval_data(config)
  else:
    checks.check_given_data(eval_data, config, train=False)
  checks.check_num_classes(run.model_config.num_classes, eval_data)
  checks.check_batch_memory(run.model, config, 'eval_batch_size', eval_data.batch_size,
                            training=False)
  result = steps.evaluate(run, steps.make_eval_step(run), trainable, eval_data)
  result.update(step=step, split=config.data.eval_split)
  if two_stage:
    trained = setup.checkpoint_model(workdir, step)
    evaluated = config.model
    result['trained'] = {'method': trained['method'],
                         'schedule': trained['schedule']}
    result['evaluated'] = {'method': evaluated.method,
                           'schedule': evaluated.schedule,
                           'r_per_layer': [int(r) for r in run.model.schedule]}
    if jax.process_index() == 0:
      result['recorded_in'] = record_two_stage(workdir, dict(result))
  return result


def token_mask_report(run: setup.Run, trainable: PyTree, eval_data) -> dict:
  """The data-dependent cost of a method that masks tokens (LTMP) on `eval_data`.

  Hard masks, eval mode. Static shapes make every layer compute all tokens
  (`flops_fraction_run` = 1); `effective_flops_fraction` is the mean over the
  images of the blocks' FLOPs with the inactive tokens removed (the method's
  `masked_flops`, docs/algorithm.md §17.1), and `mean_active_tokens` the
  tokens left active after each block.
  """
  model = run.model

  def report(trainable, frozen, batch):
    _, state = model.apply({'params': optim.merge_params(trainable, frozen)},
                           batch['image'], train=False, mutable=['intermediates'])
    inter = state['intermediates']['Transformer']
    masks = [inter[f'mask_{i}'][0] for i in range(model.depth)]
    w = batch['mask'].astype(jnp.float32)
    frac = model.reducer.masked_flops([m.mean(axis=-1) for m in masks],
                                      num_tokens=masks[0].shape[1], width=model.width,
                                      mlp_ratio=model.mlp_dim / model.width)
    return ((frac * w).sum(), jnp.stack([(m.sum(-1) * w).sum() for m in masks]), w.sum())

  step = setup.memo(('mask_report', id(model), run.mesh),
                    lambda: jax.jit(report, out_shardings=run.replicated))
  frac = count = 0.0
  tokens = np.zeros(model.depth)
  for batch in iter(eval_data):
    f, t, n = step(trainable, run.frozen, setup.shard(batch, run.batch_sharding))
    frac, tokens, count = frac + float(f), tokens + np.asarray(t), count + float(n)
  count = max(count, 1.0)
  return {'effective_flops_fraction': frac / count, 'flops_fraction_run': 1.0,
          'mean_active_tokens': [round(float(v) / count, 2) for v in tokens]}
