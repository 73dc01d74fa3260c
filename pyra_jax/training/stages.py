"""The three-stage pipeline of RaP and SPViT, behind `--mode=train` with method=rap|spvit.

As the PYRA paper runs them (Sec. 4.2; docs/algorithm.md §18.3):

  1. `<workdir>/stage1_peft` (or `model.stage1_workdir`): an ordinary
     method='peft' run of the same config: LoRA and the head trained without
     compression. A finished run there is reused as it is.
  2. `<workdir>/stage2_prune`: the pruning. RaP: the channel search (random
     configurations under the budget, each scored on a few training batches,
     the best kept; `methods.rap`), its widths in `rap_widths.json`. SPViT: the
     selectors inserted and initialised, the kept counts from the budget
     (`spvit.json`). Either way the pruned model's parameters, stage 1's LoRA
     and head included, go to `pruned.npz` (our checkpoint format).
  3. `<workdir>`: training of LoRA, the head and the method's own parameters
     (SPViT's selectors) from `pruned.npz`.

Each stage resumes: stages 1 and 3 are ordinary training runs (their latest
checkpoint), stage 2 records each scored RaP candidate in
`rap_candidates.jsonl` and skips them when rerun; a finished stage is skipped.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from pyra_jax import optim
from pyra_jax.errors import ConfigError
from pyra_jax.methods import base
from pyra_jax.methods import rap as rap_lib
from pyra_jax.methods import spvit as spvit_lib

METHODS = ('rap', 'spvit')
STAGE1, STAGE2 = 'stage1_peft', 'stage2_prune'
PRUNED_FILE = 'pruned.npz'
CANDIDATES_FILE = 'rap_candidates.jsonl'
SPVIT_FILE = 'spvit.json'
# Draws per RaP candidate before the budget is declared unreachable.
MAX_DRAWS = 100


def stage1_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.model.stage1_workdir or os.path.join(workdir, STAGE1)


def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run without compression (method='peft').

  The pruning methods' own fields (and `model.stage1_workdir`, which says where
  stage 1 is, not how it trains) are reset to their defaults: stage 1 is the
  same run for RaP and SPViT, so one method's pipeline can reuse the other's
  (`model.stage1_workdir`) without a config mismatch.
  """
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  defaults = common.get_base_config().model
  for field in (*rap_lib.RaP.config_fields, *spvit_lib.SPViT.config_fields):
    c.model[field] = defaults[field]
  c.model.method = 'peft'
  c.benchmark_after_training = False
  return c


def final_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """Stage 3's config: the pruned model, from stage 2's parameters."""
  s2 = os.path.join(workdir, STAGE2)
  c = ml_collections.ConfigDict(config.to_dict())
  c.model_init = os.path.join(s2, PRUNED_FILE)
  c.model_init_format = 'pyra_jax'
  if c.model.method == 'rap':
    c.model.rap_widths = os.path.join(s2, rap_lib.WIDTHS_FILE)
  return c


def geometry(model) -> base.Geometry:
  """The Geometry of a built VisionTransformer at its image size."""
  return base.Geometry(depth=model.depth, num_patches=0, num_protected=1 + int(model.distilled),
                       width=model.width, mlp_dim=model.mlp_dim, num_heads=model.num_heads)


def check_settings(config: ml_collections.ConfigDict) -> None:
  """The method's settings, refused before stage 1 spends any time."""
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  vit.model_kwargs(config.model, num_classes=config.model.num_classes or 2)


def _score_batches(config: ml_collections.ConfigDict, n: int) -> list[dict]:
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  data = setup.get_data(config.data, config.data.train_split, config.batch_size,
                        image_size=config.model.image_size, train=False, seed=config.seed)
  out = []
  for batch in data:
    out.append(batch)
    if len(out) == n:
      break
  return out


def mask_params(flat: dict, head_idx, unit_idx) -> dict:
  """The unpruned parameters with the pruned heads' and units' outputs zeroed.

  The same logits as the pruned model (a zero output row removes a head's or a
  unit's contribution), in the unpruned shapes: every candidate is scored
  through one compiled forward.
  """
  out = dict(flat)
  a = 'MultiHeadDotProductAttention_0/'
  for layer, (hi, ui) in enumerate(zip(head_idx, unit_idx)):
    p = f'Transformer/encoderblock_{layer}/'
    w = np.asarray(out[p + a + 'out/kernel'])
    keep = np.zeros(w.shape[0], bool)
    keep[list(hi)] = True
    out[p + a + 'out/kernel'] = w * keep[:, None, None]
    w = np.asarray(out[p + 'MlpBlock_0/Dense_1/kernel'])
    keep = np.zeros(w.shape[0], bool)
    keep[list(ui)] = True
    out[p + 'MlpBlock_0/Dense_1/kernel'] = w * keep[:, None]
  return out


def rap_search(config: ml_collections.ConfigDict, model, flat: dict, s2: str) -> dict:
  """RaP's channel search on stage 1's parameters; returns the best candidate."""
  c = config.model
  geo = base.Geometry(depth=model.depth,
                      num_patches=(c.image_size // model.patch_size) ** 2,
                      num_protected=1 + int(model.distilled), width=model.width,
                      mlp_dim=model.mlp_dim, num_heads=model.num_heads)
  target = rap_lib.budget(c, geo)
  rap_lib.check_budget(target, geo)
  path = os.path.join(s2, CANDIDATES_FILE)
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
          done[rec['candidate']] = rec
        except ValueError:
          continue  # a line cut short by a kill
  batches = _score_batches(config, c.rap_score_batches)

  @jax.jit
  def loss_of(params, image, label, mask):
    logits = model.apply({'params': params}, image, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    return (ce * mask).sum(), mask.sum()

  for i in range(c.rap_candidates):
    if i in done:
      continue
    rng = np.random.default_rng([config.seed, i])
    cand = None
    for _ in range(MAX_DRAWS):
      cand = rap_lib.sample_candidate(rng, geo, target)
      if cand is not None:
        break
    if cand is None:
      raise ConfigError(
          f'RaP found no channel configuration within {rap_lib.BUDGET_TOLERANCE} below '
          f'its FLOPs budget {target:.3f} in {MAX_DRAWS} draws; choose another '
          'model.schedule.')
    heads, mlps = cand
    head_idx, unit_idx = rap_lib.select_channels(flat, heads, mlps)
    params = traverse_util.unflatten_dict(mask_params(flat, head_idx, unit_idx), sep='/')
    total = count = 0.0
    for b in batches:
      s, n = loss_of(params, b['image'], b['label'], b['mask'].astype(jnp.float32))
      total, count = total + float(s), count + float(n)
    rec = dict(candidate=i, heads=heads, mlp=mlps, loss=total / max(count, 1.0),
               flops_fraction=rap_lib.flops_fraction(heads, mlps, geo))
    if jax.process_index() == 0:
      with open(path, 'a') as f:
        f.write(json.dumps(rec) + '\n')
    done[i] = rec
  best = min((done[i] for i in range(c.rap_candidates)), key=lambda r: (r['loss'], r['candidate']))
  head_idx, unit_idx = rap_lib.select_channels(flat, best['heads'], best['mlp'])
  return dict(best, head_index=head_idx, mlp_index=unit_idx, target=target,
              num_candidates=c.rap_candidates)


def spvit_insert(config: ml_collections.ConfigDict, flat: dict, num_classes: int) -> tuple[dict, dict]:
  """SPViT's model with fresh selectors and stage 1's parameters everywhere else."""
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(config.model, num_classes=num_classes)
  size = config.model.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  # Jitted: run op by op, init compiles every operation of the model separately
  # (most of stage 2's time on a small model).
  init = jax.jit(lambda k: model.init({'params': k}, images))(
      jax.random.key(config.seed))['params']
  out = traverse_util.flatten_dict(jax.device_get(init), sep='/')
  for k, v in flat.items():
    if k in out:
      out[k] = np.asarray(v)
  red = model.reducer
  info = dict(layers=list(red.layers), keep_ratios=list(red.ratios), keeps=list(red.keeps),
              schedule=list(red.schedule))
  return out, info


def run_prune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 2 (skipped when its pruned.npz exists): returns what it chose."""
  from pyra_jax.checkpoints import npz  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  s2 = os.path.join(workdir, STAGE2)
  out = os.path.join(s2, PRUNED_FILE)
  info_path = os.path.join(s2, rap_lib.WIDTHS_FILE if config.model.method == 'rap'
                           else SPVIT_FILE)
  if os.path.exists(out) and os.path.exists(info_path):
    with open(info_path) as f:
      return json.load(f)
  os.makedirs(s2, exist_ok=True)
  c1 = stage1_config(config)
  run, trainable, step = setup.restore_run(c1, stage1_dir(config, workdir))
  params = optim.merge_params(jax.device_get(trainable), jax.device_get(run.frozen))
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  if config.model.method == 'rap':
    best = rap_search(config, run.model, flat, s2)
    pruned = rap_lib.prune_params(flat, best['head_index'], best['mlp_index'])
    info = {k: v for k, v in best.items() if k not in ('heads', 'mlp', 'head_index', 'mlp_index')}
    info['stage1_step'] = int(step)
    write = lambda p: rap_lib.write_widths(p, best['heads'], best['mlp'], best['head_index'],
                                           best['mlp_index'], info)
  else:
    pruned, info = spvit_insert(config, flat, run.model.num_classes)
    info['stage1_step'] = int(step)

    def write(p):
      with open(p, 'w') as f:
        json.dump(info, f, indent=1)
  if jax.process_index() == 0:
    partial = out + '.partial'
    npz.save_pyra_jax(partial, pruned, {'source_format': 'pyra_jax',
                                        'stage': 'pruned', 'method': config.model.method})
    os.replace(partial, out)
    write(info_path + '.partial')
    os.replace(info_path + '.partial', info_path)
  with open(info_path) as f:
    return json.load(f)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *,
                 allow_config_change: Collection[str] = ()) -> dict[str, Any]:
  """Stages 1-3 (each resumed or skipped when done); returns stage 3's results."""
  from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
  if config.model.method not in METHODS:
    raise ConfigError(f'The three-stage pipeline is for model.method in {METHODS}, '
                      f'not {config.model.method!r}.')
  check_settings(config)
  loop.train_and_evaluate(stage1_config(config), stage1_dir(config, workdir),
                          allow_config_change=allow_config_change)
  pruned = run_prune(config, workdir)
  results = loop.train_and_evaluate(final_config(config, workdir), workdir,
                                    allow_config_change=allow_config_change)
  return dict(results, pruning=pruned)
