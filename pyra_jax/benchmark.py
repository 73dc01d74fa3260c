r"""Throughput, FLOPs and memory of the deployed models, side by side.

  python -m pyra_jax.benchmark --config=configs/vitb_high.py --out=bench.json
  python -m pyra_jax.benchmark --config=configs/vitb_low.py --mode=train
  python -m pyra_jax.benchmark --config=configs/vitb_high.py --peft=lora,adapter,convpass,fact,snf

Forward mode (default) builds, from one config, three deployed models (LoRA
folded into q/k/v with `fold_lora` + `deployed_config`, eval mode):

  peft  the uncompressed LoRA model (no merging),
  tome  ToMe with the config's schedule,
  pyra  PYRA with the config's schedule and modulation,

With `--peft=m1,m2,...` (forward mode) it builds each of these models for every
listed PEFT module (config model.peft), named `method[module]`, e.g.
`pyra[adapter]`, all timed in the same rounds; the speed-up is over the first
model (`peft[m1]`). LoRA and FacT fold into the frozen kernels; Adapter,
Convpass and SNF stay in the deployed model, so their cost shows here.

It compiles each once, warms up, then times forward passes *round-robin* (one pass
of each model per round, plus a reference matmul and the merge operations alone)
so background load on a shared machine hits them alike. Per model it reports the
median images/s, GFLOPs per image (our counter, `schedules.vit_flops`: blocks
only, as the paper), the speed-up over `peft` next to the FLOPs ratio, and the
fraction of the machine's matmul rate the model achieves: model FLOPs / time
divided by the FLOP rate of a square `--matmul_size` matmul of the same dtype
timed in the same rounds.

`--mode=train` times the training step a run executes: for each method it
builds the run `training.setup.setup` builds (random weights of the right shapes,
`model_init='random'`, the head sized by --num_classes when the config leaves
it unset) and calls `training.steps.make_train_step`'s memoised jitted step, fed its own
outputs, on a synthetic batch (image, label, mask): the real optimiser with its
lr groups and weight-decay mask, dropout, stochastic depth and the masked loss.
Per model it reports images/s, the paired speed-up over peft, the
step's FLOPs from XLA's cost analysis of the compiled step (the whole program:
dots count 2 per multiply-add, other ops 1 per output element, integer ops
of the RNG included, transcendentals such as exp and erf left out; forward,
backward, optimiser, patch embedding and head are all in) and the rate
achieved, and its peak memory: on GPU/TPU `device.memory_stats()`'s
`peak_bytes_in_use`; on CPU (no allocator statistics) the compiled step's
`memory_analysis()` (arguments + outputs + temporaries - aliased buffers), plus
the process's peak RSS. A breakdown splits the step into forward, RNG
(dropout and stochastic-depth masks), backward and optimiser by timing, in the
same rounds, separately compiled programs on the same inputs and subtracting
(`TrainStepCalls`); it is not a profile.

A jitted function counts its traces with a Python side effect; a trace after the
first call means a recompilation, which is reported (and `recompiled: true` in
the JSON). Train mode counts the real step's compilations from its jit cache
(the step is training's own function, so it cannot be wrapped).

JSON written by `--out` (one object):
  mode, config (the config file's model section), machine (platform, device
  kind, cpu count, jax version), load_average (before, after), settings
  (batch_size, dtype, image_size, warmup, rounds, seconds),
  matmul {size, seconds, gflops_per_s, gflops_per_s_best, round_seconds},
  models {peft|tome|pyra: {method, schedule, tokens, gflops (per image),
          images_per_sec, seconds (median per batch), seconds_iqr, seconds_best,
          speedup, speedup_of_medians, flops_ratio, speedup_over_flops_ratio,
          gflops_per_s, matmul_fraction, matmul_fraction_of_medians, traces,
          recompiled, round_seconds (every timed call, in round order),
          [train: peak_bytes, peak_source, memory_analysis, flops_source,
          forward_gflops_blocks (our counter), breakdown {forward, rng,
          backward, optimizer, sum, step (seconds per batch), method},
          breakdown_gflops {step, fwd_bwd, forward, forward_no_rng}]}},
  merge_ops {model, seconds, share_of_model} (forward mode, when something
  merges), pyra_cost_over_tome (1 - paired tome/pyra time ratio), recompiled.

Speed-ups and matmul fractions are *paired*: the median over rounds of the
ratio within each round, which cancels load that hits a whole round.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from flax import traverse_util

from pyra_jax import errors
from pyra_jax import field_ranges
from pyra_jax import merge as merge_lib
from pyra_jax import profiling
from pyra_jax import registry
from pyra_jax import schedules
from pyra_jax.models import vit
from pyra_jax.models.lora import fold_lora
from pyra_jax.errors import BenchmarkError  # pylint: disable=unused-import
from pyra_jax.training import checks as checks_lib
from pyra_jax.training import setup as setup_lib
from pyra_jax.training import steps as steps_lib

PyTree = Any
# Every method the model knows, plus 'evit_own': EViT at its own keep rate
# (model.evit_keep_rate at model.evit_layers) rather than FLOPs-matched.
METHODS = tuple(registry.METHODS) + ('evit_own',)
# What `--methods` runs when not given: the original three.
DEFAULT_METHODS = ('peft', 'tome', 'pyra')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}



# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

def method_config(model_config: ml_collections.ConfigDict, method: str, *,
                  image_size: int, num_classes: int,
                  peft: Optional[str] = None, schedule: Optional[str] = None
                  ) -> ml_collections.ConfigDict:
  """The config's model section switched to `method` (and `schedule` if given),
  and, if given, to the PEFT module `peft`.

  Every compressing method gets the same schedule: tome/pyra/tofu merge its
  r per layer, ats samples N - r slots, and evit solves the keep rate whose
  FLOPs match it (docs/algorithm.md §16), unless the config itself is an EViT
  config at its own keep rate, or the method is 'evit_own'.
  """
  if method not in METHODS:
    raise BenchmarkError(f'Unknown method {method!r}: use some of {METHODS}.')
  c = ml_collections.ConfigDict(model_config.to_dict())
  if schedule is not None:
    c.schedule = schedule
  if method == 'evit_own':
    c.evit_match_flops = False
  elif method == 'evit' and (model_config.method != 'evit' or schedule is not None):
    c.evit_match_flops = c.schedule != 'none'
  method = 'evit' if method == 'evit_own' else method
  c.method = method
  if peft is not None:
    if peft not in registry.PEFT_MODULES:
      raise BenchmarkError(f'Unknown PEFT module {peft!r}: use some of '
                           f'{tuple(registry.PEFT_MODULES)}.')
    c.peft = peft
  c.image_size = image_size
  if c.num_classes is None:
    c.num_classes = num_classes
  if method == 'pyra' and c.modulation == 'none':
    c.modulation = 'pyra'
  if method == 'diffrate' and not c.get('diffrate_rates'):
    c.diffrate_rates = schedule_as_diffrate_rates(c)
  if method == 'rap' and not c.get('rap_widths'):
    c.rap_widths = rap_uniform_widths(c)
  return c


def rap_uniform_widths(model_config: ml_collections.ConfigDict) -> str:
  """RaP's widths when no search has run: one keep fraction for every block, at
  the schedule's FLOPs (the level a search would meet; `rap.uniform_widths`)."""
  from pyra_jax.methods import base as base_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.methods import rap as rap_lib  # pylint: disable=g-import-not-at-top
  as_peft = ml_collections.ConfigDict(model_config.to_dict())
  as_peft.method = 'peft'
  kw = vit.model_kwargs(as_peft, num_classes=1)
  geo = base_lib.Geometry(
      depth=kw['depth'], num_patches=(model_config.image_size // kw['patch_size']) ** 2,
      num_protected=1 + int(kw['distilled']), width=kw['width'], mlp_dim=kw['mlp_dim'],
      num_heads=kw['num_heads'])
  return rap_lib.uniform_widths(geo, rap_lib.budget(model_config, geo))


def schedule_as_diffrate_rates(model_config: ml_collections.ConfigDict) -> str:
  """DiffRate's rates when no search has run: the schedule's r_l merged, none pruned.

  DiffRate's speed depends on how many tokens each layer keeps, which a search
  sets to meet its FLOPs target; timing it at the schedule's own counts gives
  the same FLOPs as ToMe's, what a search aiming at that budget converges to.
  The inline form of `model.diffrate_rates`: kept counts after pruning (none:
  the layer's input count) ; kept counts after merging.
  """
  as_tome = ml_collections.ConfigDict(model_config.to_dict())
  as_tome.method = 'tome'
  kw = vit.model_kwargs(as_tome, num_classes=1)
  n0 = (model_config.image_size // kw['patch_size']) ** 2 + 1 + int(kw['distilled'])
  counts = schedules.token_counts(kw['reducer'].schedule, n0)  # n0, n1, ..., n_depth
  prune = ','.join(str(n) for n in counts[:-1])
  merge = ','.join(str(n) for n in counts[1:])
  return f'{prune};{merge}'


def _randomize(params: PyTree, pattern: str, key: jax.Array) -> PyTree:
  """Gives zero-initialised leaves (LoRA up, PYRA w_d) random values, so the
  folded kernels and the modulation are not trivially the initial ones."""
  flat = traverse_util.flatten_dict(params, sep='/')
  keys = jax.random.split(key, len(flat))
  out = {k: (v + 0.02 * jax.random.normal(kk, v.shape, v.dtype)
             if re.search(pattern, k) else v)
         for kk, (k, v) in zip(keys, flat.items())}
  return traverse_util.unflatten_dict(out, sep='/')


def init_params(model_config: ml_collections.ConfigDict, image_size: int,
                seed: int = 0) -> PyTree:
  """Random training-time parameters (with LoRA) of `model_config`."""
  model = vit.build_model(model_config)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params = jax.jit(lambda k: model.init(k, x))(jax.random.PRNGKey(seed))['params']
  return _randomize(params, r'lora/up|pyra/w_d|convpass/(attn|mlp)/up|fact/v',
                    jax.random.PRNGKey(seed + 1))


def strip_scope(params: PyTree, name: str) -> PyTree:
  """Drops every subtree called `name` (e.g. 'pyra' to get the ToMe tree)."""
  if not isinstance(params, dict):
    return params
  return {k: strip_scope(v, name) for k, v in params.items() if k != name}


def deployed(model_config: ml_collections.ConfigDict, image_size: int, dtype: Any,
             params: Optional[PyTree] = None, seed: int = 0):
  """(model, params) of the deployed model: LoRA folded, eval mode."""
  dep = vit.deployed_config(model_config)
  model = vit.build_model(dep, dtype=dtype)
  if params is None:
    params = init_params(model_config, image_size, seed)
  if model_config.get('peft', 'lora') != 'lora' or _has_scope(params, 'fact'):
    params = vit.fold_peft(params, model_config)  # FacT folds, SNF stays
  elif model_config.lora_rank > 0 or _has_scope(params, 'lora'):
    params = fold_lora(params)
  return model, jax.device_put(params)


def _has_scope(tree: PyTree, name: str) -> bool:
  return isinstance(tree, dict) and any(
      k == name or _has_scope(v, name) for k, v in tree.items())


def load_params(path: str) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Params and config of a pyra_jax export (imported lazily: needs Orbax)."""
  from pyra_jax.training import export  # pylint: disable=g-import-not-at-top
  return export.load_export(path)


def model_info(model: vit.VisionTransformer, method: str, image_size: int,
               batch_size: int) -> dict[str, Any]:
  """Schedule, token counts and GFLOPs per image from our counter."""
  prefix = 1 + int(model.distilled)
  n0 = (image_size // model.patch_size) ** 2 + prefix
  flops = schedules.vit_flops(model.schedule, num_tokens=n0, width=model.width,
                              mlp_ratio=model.mlp_dim / model.width)
  info = {'method': method, 'schedule': list(model.schedule),
          'tokens': schedules.token_counts(model.schedule, n0),
          'gflops': flops / 1e9, 'batch_flops': flops * batch_size}
  if method == 'ats':
    info['tokens_note'] = ('slots the static shapes compute; repeated picks are masked, '
                           'so fewer distinct tokens are live (live_tokens)')
  if method == 'ltmp':
    # Static shapes: masked tokens stay in the arrays, so every layer runs on
    # all n0 tokens (the FLOPs above); the FLOPs of the tokens LTMP keeps
    # depend on the images (pyra_jax.methods.ltmp.effective_flops).
    info['note'] = ('ltmp: all tokens run (masked ones are ignored by attention); '
                    'effective FLOPs depend on the data')
  return info


def live_tokens(model: vit.VisionTransformer, params: PyTree, images: jax.Array
                ) -> list[float]:
  """ATS: the mean count of live (unmasked) tokens after each block on `images`.

  What a data-dependent implementation would compute; the static shapes
  compute `tokens` (the slots) instead.
  """
  _, state = model.apply({'params': params}, images, mutable=['intermediates'])
  inter = state['intermediates']['Transformer']
  out = []
  for i in range(len(model.schedule)):
    mask = inter.get(f'size_{i}')
    out.append(float(np.asarray(mask[0]).sum(axis=1).mean())
               if mask is not None else float('nan'))
  return out


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #

class Traced:
  """A jitted function that counts its traces (a Python side effect runs only
  while tracing, so count > 1 after the first call means a recompilation)."""

  def __init__(self, fn: Callable[..., Any], **jit_kwargs):
    self.traces = 0

    def counted(*args):
      self.traces += 1
      return fn(*args)
    self.jitted = jax.jit(counted, **jit_kwargs)

  def __call__(self, *args):
    return self.jitted(*args)


def _block(x: Any) -> Any:
  return jax.block_until_ready(x)


def round_robin(calls: dict[str, Callable[[], Any]], *, num_iters: int,
                min_seconds: float, warmup: int,
                warmup_seconds: float = 0.0) -> dict[str, list[float]]:
  """Times each call once per round, rounds until both limits are met.

  Warm-up: `warmup` untimed calls of each (at least one, which compiles),
  then untimed rounds until `warmup_seconds` have passed (the authors warm up
  for 10 s: clocks and caches settle on an accelerator). Returns per-name
  lists of seconds. Interleaving means a burst of background load slows every
  model in the round, not just one, so ratios stay fair.
  """
  for fn in calls.values():
    for _ in range(max(warmup, 1)):  # the first call compiles
      _block(fn())
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    for fn in calls.values():
      _block(fn())
  times: dict[str, list[float]] = {k: [] for k in calls}
  start = time.perf_counter()
  rounds = 0
  while rounds < num_iters or time.perf_counter() - start < min_seconds:
    for name, fn in calls.items():
      t0 = time.perf_counter()
      _block(fn())
      times[name].append(time.perf_counter() - t0)
    rounds += 1
  return times


def _median_iqr(ts: Sequence[float]) -> tuple[float, float]:
  q = np.percentile(np.asarray(ts), [25, 50, 75])
  return float(q[1]), float(q[2] - q[0])


def matmul_call(n: int, dtype: Any) -> tuple[Callable[[], Any], float]:
  """An n x n x n matmul in `dtype` (the models' compute dtype) and its FLOPs."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  return (lambda: f(a, b)), 2.0 * n ** 3


def merge_ops_call(model: vit.VisionTransformer, batch_size: int, image_size: int,
                   params: PyTree, dtype: Any) -> Optional[Callable[[], Any]]:
  """Every merge of `model` (matching, PYRA generator, weighted merge) alone.

  Run on random tokens of the shapes each merging layer sees, with the model's
  own PYRA parameters, so its time over the model's is the merge's share. The
  generator is included for modulation 'pyra' (the paper's form); the ablation
  generators are left out of this figure.
  """
  prefix = 1 + int(model.distilled)
  n = (image_size // model.patch_size) ** 2 + prefix
  d, hd = model.width, model.width // model.num_heads
  layers = []
  for i, r in enumerate(model.schedule):
    if r > 0:
      layers.append((i, n, r))
    n -= r
  if not layers:
    return None
  blocks = params['Transformer']
  key = jax.random.PRNGKey(3)
  inputs = []
  for i, n, r in layers:
    key, k1, k2 = jax.random.split(key, 3)
    inputs.append((jax.random.normal(k1, (batch_size, n, d), dtype),
                   jax.random.normal(k2, (batch_size, n, hd), dtype),
                   jnp.ones((batch_size, n, 1), dtype)))
  pyra = [blocks[f'encoderblock_{i}'].get('pyra') for i, _, _ in layers]

  def run(inputs, pyra):
    outs = []
    for (i, n, r), (x, metric, size), p in zip(layers, inputs, pyra):
      plan = merge_lib.bipartite_soft_matching(metric, r, class_token=True,
                                               distill_token=model.distilled)
      modulate = None
      if p is not None and model.modulation == 'pyra':
        modulate = lambda s, t, p=p: merge_lib.pyra_modulation(
            s, t, p['w_r'].astype(dtype), p['w_d'].astype(dtype),
            p['norm']['scale'].astype(dtype), p['norm']['bias'].astype(dtype),
            model.reducer.ln_eps)
      outs.append(merge_lib.merge_wavg(x, size, plan, distill_token=model.distilled,
                                       modulate=modulate))
    return outs
  f = jax.jit(run)
  return lambda: f(inputs, pyra)


def dense_layers_call(model: vit.VisionTransformer, batch_size: int, image_size: int,
                      params: PyTree, dtype: Any) -> tuple[Callable[[], Any], float]:
  """The model's dense-layer matmuls alone, at the token counts of each block.

  Per block: the q, k, v and attention-output matmuls on the tokens entering
  it, the two MLP matmuls on the tokens left after its merge, with the model's
  own kernels, chained so that they run one after another. Why: a merged model
  does most of its work on few tokens (ViT-B/16 high: 5-37 tokens in the last
  six blocks, 40-300 rows at batch 8), where a CPU matmul runs well below its
  large-matrix rate. The speed-up of these matmuls alone (uncompressed over
  merged, timed in the same rounds) is what the hardware allows at these
  shapes before attention, layer norms, GELU and the merge add anything: the
  ceiling to compare a model's speed-up with, next to its FLOPs ratio.
  Returns the call and its FLOPs per batch.
  """
  prefix = 1 + int(model.distilled)
  n0 = (image_size // model.patch_size) ** 2 + prefix
  tokens = schedules.token_counts(model.schedule, n0)
  d, m = model.width, model.mlp_dim
  blocks = params['Transformer']
  kernels = []
  for i in range(model.depth):
    blk = blocks[f'encoderblock_{i}']
    att = blk['MultiHeadDotProductAttention_0']
    mlp = blk['MlpBlock_0']
    kernels.append(tuple(jnp.asarray(w).reshape(shape).astype(dtype) for w, shape in (
        (att['query']['kernel'], (d, d)), (att['key']['kernel'], (d, d)),
        (att['value']['kernel'], (d, d)), (att['out']['kernel'], (d, d)),
        (mlp['Dense_0']['kernel'], (d, m)), (mlp['Dense_1']['kernel'], (m, d)))))
  x0 = jax.random.normal(jax.random.PRNGKey(5), (batch_size, n0, d), dtype)

  def run(x, kernels):
    for i, (wq, wk, wv, wo, w1, w2) in enumerate(kernels):
      x = x[:, :tokens[i]]
      y = (x @ wq + x @ wk + x @ wv) @ wo
      x = (y[:, :tokens[i + 1]] @ w1) @ w2
    return x
  f = jax.jit(run)
  flops = sum(2 * batch_size * (4 * tokens[i] * d * d + 2 * tokens[i + 1] * d * m)
              for i in range(model.depth))
  return (lambda: f(x0, kernels)), float(flops)


def _machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'device_kind': dev.device_kind,
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__, 'python': platform.python_version()}


def _load() -> list[float]:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------- #
# The two modes
# --------------------------------------------------------------------------- #

def model_name(method: str, peft: Optional[str]) -> str:
  """'pyra' for the config's own module, 'pyra[adapter]' with --peft."""
  return method if peft is None else f'{method}[{peft}]'


def _setup_modules(config: ml_collections.ConfigDict, *, image_size: int,
                   num_classes: int, methods: Sequence[str], peft_modules: Sequence[str]):
  """Per (module, method): its model config and random training params."""
  image_size = image_size or config.model.image_size
  cfgs, params = {}, {}
  for peft in peft_modules:
    base = init_params(method_config(config.model, 'pyra', image_size=image_size,
                                     num_classes=num_classes, peft=peft), image_size)
    for m in methods:
      name = model_name(m, peft)
      cfgs[name] = method_config(config.model, m, image_size=image_size,
                                 num_classes=num_classes, peft=peft)
      params[name] = base if m == 'pyra' else strip_scope(base, 'pyra')
  return image_size, cfgs, params


def model_names(methods: Sequence[str], schedules_: Sequence[str]) -> list[tuple[str, str, Optional[str]]]:
  """(name, method, schedule) of each model timed: with several schedules, every
  compressing method at each ('tome@vitb_low'), peft once."""
  if not schedules_:
    return [(m, m, None) for m in methods]
  out = []
  for m in methods:
    if m in ('peft', 'evit_own'):  # neither depends on the schedule
      out.append((m, m, None))
    else:
      out.extend((f'{m}@{s}', m, s) for s in schedules_)
  return out


def _setup(config: ml_collections.ConfigDict, *, image_size: int, num_classes: int,
           methods: Sequence[str], params_path: str, schedules_: Sequence[str] = ()):
  """Per model name: its model config and (random or exported) training params."""
  exported, export_cfg = (None, None)
  if params_path:
    exported, export_cfg = load_params(params_path)
    if 'pyra' in methods and not _has_scope(exported, 'pyra'):
      raise BenchmarkError(f'{params_path} has no PYRA generators (a ToMe or PEFT '
                           'export): pass --methods=peft,tome.')
  owner = export_cfg if export_cfg is not None else config
  image_size = image_size or owner.model.image_size
  if exported is not None and image_size != owner.model.image_size:
    raise BenchmarkError(f'--image_size={image_size} differs from the export\'s '
                         f'{owner.model.image_size}: drop --image_size.')
  cfgs, params = {}, {}
  bases = {}  # schedule -> init with PYRA's generators, whose shapes follow r_l
  for name, m, sched in model_names(methods, schedules_):
    src = export_cfg.model if export_cfg is not None else config.model
    try:
      cfgs[name] = method_config(src, m, image_size=image_size, num_classes=num_classes,
                                 schedule=sched)
      vit.model_kwargs(cfgs[name])  # a setting that cannot work fails here, named
    except errors.PyraError as e:
      raise BenchmarkError(f'{name}: {e}') from None
    if exported is not None:
      params[name] = exported if m == 'pyra' else strip_scope(exported, 'pyra')
    else:
      # One init (with pyra) per schedule; the backbone is the same in every one
      # (flax draws each parameter from its own path), so all share it.
      key = sched if m == 'pyra' else next(iter(bases), sched)
      if key not in bases:
        bases[key] = init_params(method_config(config.model, 'pyra', image_size=image_size,
                                               num_classes=num_classes, schedule=key),
                                 image_size)
      params[name] = bases[key] if m == 'pyra' else strip_scope(bases[key], 'pyra')
      if m == 'ltmp':  # its thresholds; the backbone is the same (per-path RNG)
        params[name] = init_params(cfgs[name], image_size)
  return image_size, cfgs, params


def run_forward(config: ml_collections.ConfigDict, *, batch_size: int = 8,
                dtype: str = 'float32', image_size: int = 0, num_iters: int = 10,
                min_seconds: float = 0.0, warmup: int = 2, matmul_size: int = 2048,
                methods: Sequence[str] = DEFAULT_METHODS, params_path: str = '',
                num_classes: int = 100, gemm_bound: bool = True,
                reference_model: Optional[ml_collections.ConfigDict] = None,
                warmup_seconds: float = 0.0,
                peft_modules: Sequence[str] = (),
                schedules_: Sequence[str] = ()) -> dict[str, Any]:
  """Times the deployed models round-robin; returns the results dict (module doc).

  gemm_bound: also time each model's dense-layer matmuls alone
  (`dense_layers_call`) in the same rounds and report the speed-up they allow.
  reference_model: another model section (e.g. the full-depth backbone, when
  `config` is a shallower one), deployed without merging and timed in the same
  rounds as 'reference'; every speed-up is then over it. Throughput on a shared
  machine drifts by 10-30 % between runs a minute apart, so a speed-up is only
  trustworthy between models timed in the same rounds.
  peft_modules: time every method with each of these PEFT modules (model names
  `method[module]`, module doc); random weights only.
  """
  load_before = _load()
  jdtype = DTYPES[dtype]
  if peft_modules:
    if params_path:
      raise BenchmarkError('--peft times random weights: drop --params (an export '
                           'holds one module only).')
    if schedules_:
      raise BenchmarkError('--peft times the config\'s schedule only: drop --schedules '
                           '(or run once per schedule).')
    image_size, cfgs, train_params = _setup_modules(
        config, image_size=image_size, num_classes=num_classes, methods=methods,
        peft_modules=peft_modules)
  else:
    image_size, cfgs, train_params = _setup(
        config, image_size=image_size, num_classes=num_classes, methods=methods,
        params_path=params_path, schedules_=schedules_)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)),
                         jnp.float32) for _ in range(2)]
  names = list(cfgs)
  timed = list(names)  # the models (without the reference)
  if reference_model is not None:  # timed like the others, under its own name
    cfgs['reference'] = method_config(reference_model, 'peft', image_size=image_size,
                                      num_classes=num_classes)
    train_params['reference'] = init_params(cfgs['reference'], image_size)
    names.append('reference')
  models, calls, infos, traced = {}, {}, {}, {}
  for m in names:
    model, params = deployed(cfgs[m], image_size, jdtype, train_params[m])
    models[m] = (model, params)
    infos[m] = model_info(model, cfgs[m].method, image_size, batch_size)
    if cfgs[m].method == 'ats':
      infos[m]['live_tokens'] = live_tokens(model, params, batches[0])
    fn = Traced(lambda p, x, model=model: model.apply({'params': p}, x, train=False))
    traced[m] = fn
    counter = iter(range(1 << 62))
    calls[m] = (lambda fn=fn, params=params, counter=counter:
                fn(params, batches[next(counter) % 2]))
  mm, mm_flops = matmul_call(matmul_size, jdtype)
  calls['matmul'] = mm
  dense_flops = {}
  if gemm_bound:
    for m in timed:
      model, params = models[m]
      calls[f'{m}:dense'], dense_flops[m] = dense_layers_call(
          model, batch_size, image_size, params, jdtype)
  merge_owner = next((m for m in timed if cfgs[m].method == 'pyra'),
                     next((m for m in timed if cfgs[m].method == 'tome'), None))
  merge_call = None
  if merge_owner:
    model, params = models[merge_owner]
    merge_call = merge_ops_call(model, batch_size, image_size, params, jdtype)
    if merge_call is not None:
      calls['merge_ops'] = merge_call
  t0 = time.perf_counter()
  times = round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=warmup, warmup_seconds=warmup_seconds)
  elapsed = time.perf_counter() - t0
  out = _results('forward', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before, warmup_seconds)
  out['matmul'] = _matmul_result(matmul_size, mm_flops, times['matmul'])
  base = 'reference' if reference_model is not None else (
      names[0] if peft_modules else None)
  out['models'] = _per_model(names, infos, times, traced, batch_size, mm_flops, base=base)
  if 'pyra' in times and 'tome' in times:
    out['pyra_cost_over_tome'] = 1.0 - _paired_median(times['tome'], times['pyra'])
  if merge_call is not None:
    sec, _ = _median_iqr(times['merge_ops'])
    out['merge_ops'] = {'model': merge_owner, 'seconds': sec,
                        'share_of_model': _paired_median(times['merge_ops'],
                                                         times[merge_owner])}
  if gemm_bound:
    out['gemm_bound'] = _gemm_bound(timed, times, out['models'], dense_flops,
                                    mm_flops)
  out['recompiled'] = any(v['recompiled'] for v in out['models'].values())
  return out


def _gemm_bound(methods, times, models, dense_flops, mm_flops) -> dict[str, Any]:
  """Per model: its dense matmuls' time and rate, the speed-up they allow
  (paired, over the baseline's dense matmuls) and the share of it achieved."""
  base = models[methods[0]]['baseline']
  out = {}
  for m in methods:
    key = f'{m}:dense'
    sec, _ = _median_iqr(times[key])
    bound = _paired_median(times[f'{base}:dense'], times[key])
    out[m] = {'seconds': sec, 'gflops': dense_flops[m] / 1e9,
              'gflops_per_s': dense_flops[m] / sec / 1e9,
              'matmul_fraction': dense_flops[m] / mm_flops
                                 * _paired_median(times['matmul'], times[key]),
              'speedup_bound': bound,
              'speedup_over_bound': models[m]['speedup'] / bound,
              'round_seconds': list(times[key])}
  return out


def _results(mode, config, image_size, batch_size, dtype, warmup, times, elapsed,
             load_before, warmup_seconds: float = 0.0) -> dict[str, Any]:
  return {'mode': mode, 'config': config.model.to_dict(), 'machine': _machine(),
          'load_average': {'before': load_before, 'after': _load()},
          'settings': {'batch_size': batch_size, 'dtype': dtype,
                       'image_size': image_size, 'warmup': warmup,
                       'warmup_seconds': warmup_seconds,
                       'rounds': len(next(iter(times.values()))),
                       'seconds': elapsed}}


def _matmul_result(size: int, flops: float, ts: Sequence[float]) -> dict[str, Any]:
  sec, _ = _median_iqr(ts)
  return {'size': size, 'seconds': sec, 'gflops_per_s': flops / sec / 1e9,
          'gflops_per_s_best': flops / min(ts) / 1e9, 'round_seconds': list(ts)}


def _paired_median(num: Sequence[float], den: Sequence[float]) -> float:
  """Median over rounds of num[i] / den[i]: both timed in the same round, so a
  burst of background load that slows the round cancels out of the ratio."""
  return float(np.median(np.asarray(num) / np.asarray(den)))


def _per_model(methods, infos, times, traced, batch_size, mm_flops,
               base: Optional[str] = None) -> dict[str, Any]:
  """Per-model figures from the round-robin times.

  images/s is from the median time. Speed-ups and matmul fractions are paired:
  the median over rounds of the ratio within each round (the ratio of the
  medians is kept as `speedup_of_medians`), over `base` (default: peft, else
  the first model).
  """
  out = {}
  base = base or ('peft' if 'peft' in methods else methods[0])
  base_sec = _median_iqr(times[base])[0]
  mm_sec = _median_iqr(times['matmul'])[0]
  for m in methods:
    sec, iqr = _median_iqr(times[m])
    info = dict(infos[m])
    flops = info.pop('batch_flops')
    ratio = infos[base]['gflops'] / info['gflops']
    speedup = _paired_median(times[base], times[m])
    out[m] = dict(info, images_per_sec=batch_size / sec, seconds=sec, seconds_iqr=iqr,
                  seconds_best=min(times[m]), speedup=speedup,
                  speedup_of_medians=base_sec / sec, flops_ratio=ratio,
                  speedup_over_flops_ratio=speedup / ratio,
                  gflops_per_s=flops / sec / 1e9,
                  matmul_fraction=flops / mm_flops * _paired_median(times['matmul'], times[m]),
                  matmul_fraction_of_medians=flops / sec / (mm_flops / mm_sec),
                  traces=traced[m].traces, recompiled=traced[m].traces > 1,
                  baseline=base, round_seconds=list(times[m]))
  return out


# Length of the lr schedule the benchmarked step is built with. The step reads
# the lr at its step index, so the schedule's length changes a number, not the
# program's cost.
BENCH_STEPS_PER_EPOCH = 100


def train_run(config: ml_collections.ConfigDict, method: str, *, image_size: int,
              num_classes: int, dtype: str) -> setup_lib.Run:
  """The `training.setup.Run` a training run of `method` builds, with random weights.

  A copy of `config` with model_init='random' (the step's cost depends on the
  shapes only, so no weights are needed) and a fixed head size.
  """
  cfg = config.copy_and_resolve_references()
  cfg.model = method_config(config.model, method, image_size=image_size,
                            num_classes=num_classes)
  cfg.model_init = 'random'
  cfg.dtype = dtype
  checks_lib.check_config(cfg)
  return setup_lib.setup(cfg, num_classes)


def synthetic_batch(run: setup_lib.Run, batch_size: int, seed: int = 0) -> dict:
  """A training batch (image, label, mask) of random values, on the run's mesh."""
  rng = np.random.default_rng(seed)
  size = run.model_config.image_size
  batch = {'image': rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
           'label': rng.integers(0, run.model_config.num_classes,
                                 size=(batch_size,)).astype(np.int32),
           'mask': np.ones((batch_size,), bool)}
  return setup_lib.shard(batch, run.batch_sharding)


class TrainStepCalls:
  """The real training step of a run, and the programs that split its time.

    step         `training.steps.make_train_step(run, ...)`, the memoised jitted step a
                 training run calls (optimiser with its lr groups, dropout,
                 stochastic depth, masked loss), fed its own outputs, so every
                 call is a real step on the updated parameters;
    fwd_bwd      value_and_grad of the same loss w.r.t. the trainable
                 parameters, no update;
    forward      the loss alone;
    forward_no_rng  the loss of the same model with dropout and stochastic
                 depth off (no masks drawn or applied).

  Each is compiled separately, on the same inputs. Their differences, paired
  within a round, split the step: RNG = forward - forward_no_rng, backward =
  fwd_bwd - forward, optimiser = step - fwd_bwd. This is a subtraction of
  separately compiled programs, not a profile: XLA fuses differently in each,
  so the parts are estimates that add up to the step only approximately.
  """

  PARTS = ('forward_no_rng', 'forward', 'fwd_bwd', 'step')

  def __init__(self, run: setup_lib.Run, batch: dict,
               steps_per_epoch: int = BENCH_STEPS_PER_EPOCH):
    self.run, self.batch = run, batch
    self.step_fn = steps_lib.make_train_step(run, steps_per_epoch)
    tx_init = steps_lib.make_optimizer(run, steps_per_epoch)[2]
    self.trainable = run.replicate(run.trainable)
    self.opt_state = run.replicate(tx_init(self.trainable))
    self.key = run.replicate(setup_lib.dropout_key(run.config))
    self.step = 0
    self.compiles_before = self.step_fn._cache_size()  # pylint: disable=protected-access
    no_rng = ml_collections.ConfigDict(run.model_config.to_dict())
    no_rng.drop_path, no_rng.lora_dropout = 0.0, 0.0
    no_rng_model = setup_lib.build_model(no_rng, run.config.get('dtype', 'float32'))

    def loss(model, trainable, frozen, batch, step, key):
      return steps_lib.training_loss(model, trainable, frozen, batch,
                                     jax.random.fold_in(key, step))[0]

    self.programs = {
        'forward_no_rng': Traced(lambda *a: loss(no_rng_model, *a)),
        'forward': Traced(lambda *a: loss(run.model, *a)),
        'fwd_bwd': Traced(jax.value_and_grad(lambda *a: loss(run.model, *a))),
    }

  def _args(self) -> tuple:
    return (self.trainable, self.opt_state, self.run.frozen, self.batch,
            np.int32(self.step), self.key)

  def call_step(self) -> jax.Array:
    """One training step, exactly as `train`'s loop calls it."""
    self.trainable, self.opt_state, metrics = self.step_fn(*self._args())
    self.step += 1
    return metrics['loss']

  def calls(self) -> dict[str, Callable[[], Any]]:
    def program(name):
      fn = self.programs[name]
      return lambda: fn(self.trainable, self.run.frozen, self.batch,
                        np.int32(self.step), self.key)
    out = {name: program(name) for name in self.programs}
    out['step'] = self.call_step
    return out

  def step_compiles(self) -> int:
    """Compilations of the step since this object was made (1: the first call)."""
    return self.step_fn._cache_size() - self.compiles_before  # pylint: disable=protected-access

  def compiled_step(self) -> Any:
    """The step compiled for the current inputs (jax's cache after the first
    call): its HLO names the ops a profile of the step reports."""
    return self.step_fn.lower(*self._args()).compile()

  def compiled(self) -> dict[str, Any]:
    """Each program compiled for the current inputs (served from jax's caches
    after the first calls; used for the cost and memory analyses)."""
    args = self._args()
    out = {'step': self.step_fn.lower(*args).compile()}
    for name, fn in self.programs.items():
      out[name] = fn.jitted.lower(args[0], *args[2:]).compile()
    return out


def _cost_flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0]
  return float((cost or {}).get('flops', 0.0))


def _breakdown(times: dict[str, list[float]], m: str) -> dict[str, float]:
  """Step parts in seconds: paired (per-round) differences of the programs."""
  t = {p: np.asarray(times[f'{m}:{p}']) for p in TrainStepCalls.PARTS[:-1]}
  t['step'] = np.asarray(times[m])
  parts = {'forward': float(np.median(t['forward_no_rng'])),
           'rng': float(np.median(t['forward'] - t['forward_no_rng'])),
           'backward': float(np.median(t['fwd_bwd'] - t['forward'])),
           'optimizer': float(np.median(t['step'] - t['fwd_bwd']))}
  return dict(parts, sum=sum(parts.values()), step=float(np.median(t['step'])),
              method='subtraction of separately compiled programs, paired within rounds')


def run_train(config: ml_collections.ConfigDict, *, batch_size: int = 8,
              dtype: str = 'float32', image_size: int = 0, num_iters: int = 5,
              min_seconds: float = 0.0, warmup: int = 1, matmul_size: int = 2048,
              methods: Sequence[str] = DEFAULT_METHODS, params_path: str = '',
              num_classes: int = 100, warmup_seconds: float = 0.0,
              profile_calls: int = 0) -> dict[str, Any]:
  """Times the real training step (`training.steps.make_train_step`) per method.

  Round-robin like the forward mode: each round calls every method's step and
  the programs that split it (`TrainStepCalls`), plus the reference matmul.
  Reports images/s, the paired speed-up over peft (else the first method),
  the step's FLOPs from XLA's cost analysis and the rate achieved, peak
  memory, and the forward / RNG / backward / optimiser breakdown. With
  `profile_calls` > 0, each step is then also profiled over that many calls
  (`profiling.profile_compiled`): milliseconds by phase and part of the one
  compiled program, the breakdown that does not rely on subtraction.
  """
  if params_path:
    raise BenchmarkError('--mode=train times the training step on random weights of '
                         'the right shapes (an export has LoRA folded in): drop --params.')
  load_before = _load()
  image_size = image_size or config.model.image_size
  calls, infos, traced, steps = {}, {}, {}, {}
  for m in methods:
    run = train_run(config, m, image_size=image_size, num_classes=num_classes,
                    dtype=dtype)
    steps[m] = TrainStepCalls(run, synthetic_batch(run, batch_size))
    infos[m] = model_info(run.model, m, image_size, batch_size)
    step_calls = steps[m].calls()
    calls[m] = step_calls.pop('step')
    for name, fn in step_calls.items():
      calls[f'{m}:{name}'] = fn
  mm, mm_flops = matmul_call(matmul_size, DTYPES[dtype])
  calls['matmul'] = mm
  for fn in calls.values():  # compile everything before timing anything
    _block(fn())
  compiles_first = {m: steps[m].step_compiles() for m in methods}
  rss0 = _peak_rss_bytes()
  t0 = time.perf_counter()
  times = round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=max(warmup - 1, 0), warmup_seconds=warmup_seconds)
  elapsed = time.perf_counter() - t0
  compiled = {m: steps[m].compiled() for m in methods}
  for m in methods:
    # What the step runs per image, XLA's count: the whole program (forward,
    # backward, optimiser, patch embedding and head included).
    flops = _cost_flops(compiled[m]['step'])
    infos[m]['forward_gflops_blocks'] = infos[m]['gflops']  # our counter, forward
    infos[m]['batch_flops'] = flops
    infos[m]['gflops'] = flops / batch_size / 1e9
    compiles = steps[m].step_compiles()
    # Traces of the step after its first call, plus those of the helpers.
    traced[m] = _Count(1 + compiles - compiles_first[m] + sum(
        steps[m].programs[p].traces - 1 for p in steps[m].programs))
  out = _results('train', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before, warmup_seconds)
  out['matmul'] = _matmul_result(matmul_size, mm_flops, times['matmul'])
  out['models'] = _per_model(methods, infos, times, traced, batch_size, mm_flops)
  if 'pyra' in times and 'tome' in times:
    out['pyra_cost_over_tome'] = 1.0 - _paired_median(times['tome'], times['pyra'])
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  for m in methods:
    rec = out['models'][m]
    rec['flops_source'] = ('XLA cost analysis of the compiled step '
                           '(compiled.cost_analysis()["flops"])')
    rec['breakdown'] = _breakdown(times, m)
    rec['breakdown_gflops'] = {p: _cost_flops(c) / batch_size / 1e9
                               for p, c in compiled[m].items()}
    ma = compiled[m]['step'].memory_analysis()
    info = {}
    if ma is not None:
      for f in ('argument_size_in_bytes', 'output_size_in_bytes',
                'temp_size_in_bytes', 'alias_size_in_bytes',
                'generated_code_size_in_bytes'):
        info[f] = int(getattr(ma, f, 0) or 0)
    rec['memory_analysis'] = info
    if stats and 'peak_bytes_in_use' in stats:
      rec['peak_bytes'] = int(stats['peak_bytes_in_use'])
      rec['peak_source'] = 'device.memory_stats peak_bytes_in_use (process-wide)'
    elif info:
      rec['peak_bytes'] = (info['argument_size_in_bytes'] + info['output_size_in_bytes']
                           + info['temp_size_in_bytes'] - info['alias_size_in_bytes'])
      rec['peak_source'] = 'compiled memory_analysis: arguments + outputs + temp - alias'
  out['process_peak_rss_bytes'] = {'before_timing': rss0, 'after': _peak_rss_bytes()}
  out['recompiled'] = any(v['recompiled'] for v in out['models'].values())
  if profile_calls > 0:
    for m in methods:  # after the timing, so the profiler cannot disturb it
      out['models'][m]['profile'] = profiling.profile_compiled(
          steps[m].call_step, compiled[m]['step'].as_text(), profile_calls)
  return out


class _Count:
  """`traces` in the shape `_per_model` reads from a `Traced`."""

  def __init__(self, traces: int):
    self.traces = traces


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

def format_table(res: dict[str, Any]) -> str:
  """The console table (one row per model) and the notes under it."""
  s, mm = res['settings'], res['matmul']
  lines = [(f"preset={s['preset']} " if s.get('preset') else '') +
           f"mode={res['mode']} batch={s['batch_size']} image={s['image_size']} "
           f"dtype={s['dtype']} rounds={s['rounds']} ({s['seconds']:.1f} s) "
           f"load avg before/after={res['load_average']['before']}/"
           f"{res['load_average']['after']}",
           f"matmul {mm['size']}^3: {mm['gflops_per_s']:.1f} GFLOP/s "
           f"(fastest round {mm['gflops_per_s_best']:.1f})"]
  w = max([6] + [len(m) for m in res['models']])
  hdr = (f"{'model':{w}} {'img/s':>7} {'GFLOPs':>7} {'speed-up':>8} {'FLOPs ratio':>11} "
         f"{'su/ratio':>8} {'GFLOP/s':>8} {'% matmul':>8}")
  if res['mode'] == 'train':
    hdr += f" {'peak MiB':>9}"
  lines.append(hdr)
  for m, r in res['models'].items():
    row = (f"{m:{w}} {r['images_per_sec']:7.2f} {r['gflops']:7.4g} {r['speedup']:7.2f}x "
           f"{r['flops_ratio']:10.2f}x {r['speedup_over_flops_ratio']:8.1%} "
           f"{r['gflops_per_s']:8.1f} {r['matmul_fraction']:8.1%}")
    if res['mode'] == 'train':
      row += f" {r.get('peak_bytes', 0) / 2**20:9.0f}"
    lines.append(row)
  lines.append('img/s: median round; speed-up and % matmul: median over rounds of '
               'the ratio within a round.')
  if res['mode'] == 'train':
    lines.append('train: the real step (training.steps.make_train_step); GFLOPs per image of the '
                 'whole compiled step (XLA cost analysis); peak memory: '
                 + next(iter(res['models'].values())).get('peak_source', 'n/a'))
    lines.append('step breakdown, ms per batch (by subtraction of separately compiled '
                 'programs, paired within rounds; not a profile):')
    for m, r in res['models'].items():
      b = r['breakdown']
      lines.append(f"  {m:{w}} forward {b['forward'] * 1e3:8.1f}  RNG {b['rng'] * 1e3:7.1f}  "
                   f"backward {b['backward'] * 1e3:8.1f}  optimizer {b['optimizer'] * 1e3:7.1f}"
                   f"  sum {b['sum'] * 1e3:8.1f}  step {b['step'] * 1e3:8.1f}")
  if any('profile' in r for r in res['models'].values()):
    lines.append(format_profiles({m: r['profile'] for m, r in res['models'].items()
                                  if 'profile' in r}))
  if 'gemm_bound' in res:
    lines.append('dense-layer matmuls alone, at each model\'s token counts '
                 '(the ceiling for its speed-up on this machine):')
    for m, g in res['gemm_bound'].items():
      lines.append(f"  {m:{w}} {g['gflops_per_s']:7.1f} GFLOP/s ({g['matmul_fraction']:.1%} "
                   f"of the matmul rate): speed-up bound {g['speedup_bound']:.2f}x, "
                   f"model achieves {g['speedup_over_bound']:.1%} of it")
  if 'merge_ops' in res:
    mo = res['merge_ops']
    lines.append(f"merge ops alone ({mo['model']}): {mo['seconds'] * 1e3:.1f} ms per batch, "
                 f"{mo['share_of_model']:.1%} of the model's time")
  if 'pyra_cost_over_tome' in res:
    lines.append(f"PYRA throughput cost over ToMe (same schedule): "
                 f"{res['pyra_cost_over_tome']:.1%}")
  if res['recompiled']:
    bad = [m for m, r in res['models'].items() if r['recompiled']]
    lines.append(f'WARNING: recompilation between calls in {bad} (traces > 1).')
  else:
    lines.append('No recompilation between calls (one trace per model).')
  return '\n'.join(lines)


def format_profiles(profiles: dict[str, dict[str, Any]]) -> str:
  """One table, models side by side, so a part that grows or vanishes between
  the uncompressed and the merged steps (matmuls, merge) reads across a row."""
  names = list(profiles)
  lines = ['step profile, ms per step (jax.profiler; each HLO op attributed by the '
           'code it came from, pyra_jax/profiling.py):',
           f"  {'phase / part':28}" + ''.join(f'{m:>12}' for m in names)]
  for ph in profiling.PHASES:
    for part in profiling.PARTS:
      vals = [p['ms'][ph].get(part, 0.0) for p in profiles.values()]
      if any(vals):
        lines.append(f'  {ph + " / " + part:28}' + ''.join(f'{v:12.1f}' for v in vals))
  lines.append(f"  {'all ops':28}" + ''.join(f"{p['ops_ms']:12.1f}" for p in profiles.values()))
  lines.append(f"  {'wall time (profiled)':28}" + ''.join(
      f"{p['wall_ms']:12.1f}" for p in profiles.values()))
  return '\n'.join(lines)


def define_flags() -> dict[str, Any]:
  """Defines the command-line flags (only when run as a program, so importing
  this module next to `pyra_jax.main`, which also has --config, is safe)."""
  return dict(
      config=config_flags.DEFINE_config_file(
          'config', None, 'A config file with get_config(), e.g. configs/vitb_high.py.',
          lock_config=False),
      mode=flags.DEFINE_enum('mode', 'forward', ['forward', 'train'],
                             'forward: deployed inference; train: one training step.'),
      out=flags.DEFINE_string('out', '', 'Write the results as JSON here.'),
      gemm_bound=flags.DEFINE_bool(
          'gemm_bound', True, "forward mode: also time each model's dense-layer "
          'matmuls alone, at its token counts, and report the speed-up they '
          'allow (the ceiling on this machine).'),
      batch_size=flags.DEFINE_integer('batch_size', 0,
                                      'Images per call; 0: 8 on CPU, 64 otherwise.'),
      dtype=flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype.'),
      image_size=flags.DEFINE_integer('image_size', 0,
                                      "0: the config's model.image_size."),
      num_iters=flags.DEFINE_integer('num_iters', 0,
                                     'At least this many timed rounds; 0: 10 '
                                     '(forward) or 5 (train).'),
      min_seconds=flags.DEFINE_float('min_seconds', 0.0,
                                     'Keep timing rounds until this much time has passed.'),
      warmup=flags.DEFINE_integer('warmup', 2, 'Untimed calls per model after compiling.'),
      matmul_size=flags.DEFINE_integer('matmul_size', 2048,
                                       'n of the n x n x n reference matmul.'),
      params=flags.DEFINE_string(
          'params', '', 'A pyra_jax export directory (`main --mode=export`) to take '
          'the weights from; default: random weights (speed does not depend on them).'),
      methods=flags.DEFINE_list('methods', list(DEFAULT_METHODS),
                                f'Which of {",".join(METHODS)} to run, or "all" '
                                '(every one; evit_own: EViT at its own keep rate).'),
      peft=flags.DEFINE_list('peft', [],
                             'forward mode: time every method with each of these PEFT '
                             'modules (model.peft: lora,adapter,convpass,fact,snf), in '
                             "the same rounds; empty: the config's own module."),
      schedules=flags.DEFINE_list(
          'schedules', [], 'forward mode: time every compressing method at each of '
          'these schedules (e.g. vitb_low,vitb_high) in the same rounds, as '
          "'<method>@<schedule>'; default: the config's schedule only."),
      num_classes=flags.DEFINE_integer('num_classes', 100,
                                       'Head size when the config leaves it unset (-1).'),
      warmup_seconds=flags.DEFINE_float(
          'warmup_seconds', 0.0, 'After --warmup calls, untimed rounds until this '
          'much time has passed.'),
      profile_calls=flags.DEFINE_integer(
          'profile_calls', 0, 'train mode: after timing, profile this many calls of '
          'each step and print ms by phase (forward, backward, optimizer) and part '
          '(dense/attention matmuls, softmax, GELU, LayerNorm, RNG, merge, other).'),
      preset=flags.DEFINE_enum(
          'preset', '', ['', 'paper'],
          "paper: the authors' timing (batch 512, 10 s warm-up, then rounds "
          'until 10 s are timed; PRESETS), for an accelerator; --batch_size, '
          '--warmup_seconds, --min_seconds and --num_iters given on the command '
          'line override it. In train mode a batch that does not fit is split '
          'with --config.grad_accum_steps=k (the same 512-image update).'),
  )


# Timing settings a `--preset` stands for. 'paper': the authors'
# test_model_latency (engine.py of their code): batch 512, 10 s of untimed
# calls, then calls until 10 s are timed; throughput = 512 / mean time.
PRESETS = {
    'paper': {'batch_size': 512, 'warmup_seconds': 10.0, 'min_seconds': 10.0,
              'num_iters': 1},
}
PRESET_FLAGS = ('batch_size', 'warmup_seconds', 'min_seconds', 'num_iters')


# The numeric flags and the values that work; a negative batch or round count
# would otherwise fail inside JAX with a traceback.
FLAG_RANGES: dict[str, field_ranges.Range] = {
    'batch_size': field_ranges.Range(0, integer=True, why='images per call; 0: 8 on CPU, 64 otherwise'),
    'image_size': field_ranges.Range(0, integer=True, why="0: the config's model.image_size"),
    'num_iters': field_ranges.Range(0, integer=True, why='timed rounds; 0: the default'),
    'min_seconds': field_ranges.Range(0, why='seconds of timed rounds at least'),
    'warmup': field_ranges.Range(0, integer=True, why='untimed calls per model'),
    'warmup_seconds': field_ranges.Range(0, why='seconds of untimed rounds'),
    'matmul_size': field_ranges.Range(1, integer=True, why='n of the reference matmul'),
    'num_classes': field_ranges.Range(1, integer=True, why='the head size'),
    'profile_calls': field_ranges.Range(0, integer=True, why='profiled calls per step'),
}


def check_flags(values: dict[str, Any]) -> None:
  """Refuses a numeric flag outside FLAG_RANGES, in one sentence naming it."""
  for name, spec in FLAG_RANGES.items():
    if name in values and not spec.admits(values[name]):
      raise BenchmarkError(field_ranges.message(f'--{name}', values[name], spec))


def settings_from_flags(preset: str, given: dict[str, Any],
                        defaults: dict[str, Any]) -> dict[str, Any]:
  """The timing settings: `given` (flags on the command line) over the preset
  over `defaults`."""
  out = dict(defaults)
  if preset:
    if preset not in PRESETS:
      raise BenchmarkError(f'--preset={preset!r}: use one of {sorted(PRESETS)}.')
    out.update(PRESETS[preset])
  out.update(given)
  return out


def main(argv: Sequence[str], fl: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = fl['config'].value
  if config is None:
    raise app.UsageError('Give --config=configs/<setting>.py (a file with get_config()).')
  methods = tuple(fl['methods'].value)
  if methods == ('all',):
    methods = METHODS
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise app.UsageError(f'--methods: use some of {tuple(registry.METHODS)}, got {methods}.')
  try:
    check_flags({k: fl[k].value for k in FLAG_RANGES})
  except BenchmarkError as e:
    raise SystemExit(f'error: {e}') from None
  train = fl['mode'].value == 'train'
  defaults = {'batch_size': 8 if jax.devices()[0].platform == 'cpu' else 64,
              'num_iters': 5 if train else 10, 'min_seconds': 0.0,
              'warmup_seconds': 0.0}
  given = {k: fl[k].value for k in PRESET_FLAGS
           if flags.FLAGS[k].present and (fl[k].value or k.endswith('seconds'))}
  timing = settings_from_flags(fl['preset'].value, given, defaults)
  kwargs = dict(batch_size=timing['batch_size'], dtype=fl['dtype'].value,
                image_size=fl['image_size'].value,
                num_iters=timing['num_iters'],
                min_seconds=timing['min_seconds'], warmup=fl['warmup'].value,
                warmup_seconds=timing['warmup_seconds'],
                matmul_size=fl['matmul_size'].value, methods=methods,
                params_path=fl['params'].value, num_classes=fl['num_classes'].value)
  if not train:
    kwargs['gemm_bound'] = fl['gemm_bound'].value
    kwargs['peft_modules'] = tuple(fl['peft'].value)
    kwargs['schedules_'] = tuple(fl['schedules'].value)
  if train:
    kwargs['profile_calls'] = fl['profile_calls'].value
  elif fl['profile_calls'].value:
    raise app.UsageError('--profile_calls profiles the training step: add --mode=train.')
  if train and fl['peft'].value:
    raise app.UsageError('--peft is for the forward mode: drop it or --mode=train.')
  elif train and fl['schedules'].value:
    raise app.UsageError('--schedules is for the forward mode: use one config per '
                         'schedule with --mode=train.')
  try:
    res = (run_train if train else run_forward)(config, **kwargs)
  except errors.PyraError as e:  # a setting that cannot run: one sentence, no traceback
    raise SystemExit(f'error: {e}') from None
  res['settings']['preset'] = fl['preset'].value or None
  print(format_table(res))
  out = fl['out'].value
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(res, f, indent=2)
    print(f'wrote {out}')
  sys.stdout.flush()


def run() -> None:
  """The `pyra-jax-benchmark` command (also `python -m pyra_jax.benchmark`)."""
  from pyra_jax import configs  # pylint: disable=g-import-not-at-top
  configs.resolve_argv(sys.argv)  # A packaged setting by name: --config=vitb_high.
  fl = define_flags()
  app.run(lambda argv: main(argv, fl))


if __name__ == '__main__':
  run()
