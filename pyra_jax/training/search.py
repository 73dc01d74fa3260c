"""DiffRate's search stage, behind `python -m pyra_jax.main --mode=search`.

The search is a training run of its own (docs/algorithm.md §17.2): the same
loop, data, Orbax checkpoints and resume as `--mode=train`, on the config
with `model.diffrate_search = True` and `model.diffrate_search_epochs`
epochs. Besides LoRA and the head (a new task's head starts random, so class
attention means nothing until they train), it learns each layer's prune and
merge rate logits under the FLOPs target `model.diffrate_flops_ratio`. At
the end the rates (kept token counts per layer) are written to
`<workdir>/diffrate_rates.json`, which a training config reads with
`--config.model.diffrate_rates=<workdir>/diffrate_rates.json`. A killed
search rerun with the same command resumes from its latest checkpoint; a
finished one only rewrites the file.
"""

from __future__ import annotations

import os
from typing import Collection

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from pyra_jax import optim
from pyra_jax import schedules
from pyra_jax.errors import UsageError
from pyra_jax.methods import diffrate as diffrate_lib


def search_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config turned into its search run's config."""
  if config.model.method != 'diffrate':
    raise UsageError(
        f'--mode=search finds DiffRate\'s rates, but model.method is '
        f'{config.model.method!r}: add method=diffrate to the config argument '
        '(e.g. --config=configs/demo.py:method=diffrate).')
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.diffrate_search = True
  c.model.diffrate_rates = ''
  c.num_epochs = c.model.diffrate_search_epochs
  c.warmup_epochs = min(c.warmup_epochs, c.num_epochs)
  c.benchmark_after_training = False
  return c


def rates_from_params(trainable, *, depth: int, num_patches: int, num_protected: int,
                      granularity: int) -> list[tuple[int, int]]:
  """The kept counts the searched logits stand for (layer 0: uncompressed)."""
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep='/')
  logits = []
  for layer in range(1, depth):
    prefix = f'Transformer/encoderblock_{layer}/diffrate/'
    logits.append((np.asarray(flat[prefix + 'prune_logits']),
                   np.asarray(flat[prefix + 'merge_logits'])))
  return diffrate_lib.final_rates(logits, num_patches=num_patches,
                                  num_protected=num_protected, granularity=granularity)


# A search that ends further than this below its target says so (the ceil of
# the expected counts and the granularity leave a few per cent either way).
TARGET_TOLERANCE = 0.03


def shortfall_message(flops_ratio: float, target: float, config: ml_collections.ConfigDict
                      ) -> str:
  """'' if the searched FLOPs ratio reached the target, else what to do."""
  if flops_ratio >= target * (1.0 - TARGET_TOLERANCE):
    return ''
  # config.diffrate_lr acts only on a trainable group named 'diffrate' (a
  # renamed group trains the logits at the base lr): name what applies.
  lr = optim.group_lrs(config).get('diffrate')
  larger = (f'a larger --config.diffrate_lr (now {lr:g})' if lr is not None else
            "a larger lr for the rate logits (config.trainable has no 'diffrate' group, "
            'so --config.diffrate_lr does not apply to them)')
  return (f'WARNING: the search ended at a FLOPs ratio of {flops_ratio:.2f}, short of '
          f'its target {target:.2f}: the rate logits did not move far enough in '
          f'{config.model.diffrate_search_epochs} epochs. Search again in a new workdir '
          f'with {larger} or more --config.model.diffrate_search_epochs.')


def run_search(config: ml_collections.ConfigDict, workdir: str, *,
               allow_config_change: Collection[str] = ()) -> dict:
  """Runs (or resumes) the search in `workdir`; writes and returns the rates."""
  from pyra_jax.training import loop, setup  # pylint: disable=g-import-not-at-top
  c = search_config(config)
  results = loop.train_and_evaluate(c, workdir, allow_config_change=allow_config_change)
  run, trainable, step = setup.restore_run(c, workdir)
  model = run.model
  num_protected = 1 + int(model.distilled)
  num_patches = (c.model.image_size // model.patch_size) ** 2
  rates = rates_from_params(trainable, depth=model.depth, num_patches=num_patches,
                            num_protected=num_protected,
                            granularity=c.model.diffrate_granularity)
  n0 = num_patches + num_protected
  sched = diffrate_lib.rates_to_schedule(rates, n0)
  mlp_ratio = model.mlp_dim / model.width
  full = schedules.vit_flops([0] * model.depth, num_tokens=n0, width=model.width,
                             mlp_ratio=mlp_ratio)
  flops = schedules.vit_flops(sched, num_tokens=n0, width=model.width, mlp_ratio=mlp_ratio)
  path = os.path.join(workdir, diffrate_lib.RATES_FILE)
  extra = {'flops_ratio': full / flops, 'target_flops_ratio': c.model.diffrate_flops_ratio,
           'shortfall': shortfall_message(full / flops, c.model.diffrate_flops_ratio, c),
           'search_step': int(step),
           'search_final_accuracy': results['final_accuracy']}
  if jax.process_index() == 0:
    diffrate_lib.write_rates(path, rates, num_tokens=n0, extra=extra)
  return {'path': path, 'rates': rates, **extra}
