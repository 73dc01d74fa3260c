r"""Throughput, FLOPs and memory of the deployed models, side by side.

  python -m pyra_jax.benchmark --config=configs/vitb_high.py --out=bench.json
  python -m pyra_jax.benchmark --config=configs/vitb_low.py --mode=train

Forward mode (default) builds, from one config, three deployed models (LoRA
folded into q/k/v with `fold_lora` + `deployed_config`, eval mode):

  peft  the uncompressed LoRA model (no merging),
  tome  ToMe with the config's schedule,
  pyra  PYRA with the config's schedule and modulation,

compiles each once, warms up, then times forward passes *round-robin* (one pass
of each model per round, plus a reference matmul and the merge operations alone)
so background load on a shared machine hits them alike. Per model it reports the
median images/s, GFLOPs per image (our counter, `schedules.vit_flops`: blocks
only, as the paper), the speed-up over `peft` next to the FLOPs ratio, and the
fraction of the machine's matmul rate the model achieves: model FLOPs / time
divided by the FLOP rate of a square `--matmul_size` matmul of the same dtype
timed in the same rounds.

`--mode=train` times one LoRA + PYRA training step (value_and_grad w.r.t. the
trainable parameters only, `config.trainable`, + an AdamW update; the frozen
backbone is a separate, non-differentiated argument) for the same three methods,
and reports its peak memory: on GPU/TPU `device.memory_stats()`'s
`peak_bytes_in_use`; on CPU (no allocator statistics) the compiled step's
`memory_analysis()` (arguments + outputs + temporaries - aliased buffers), plus
the process's peak RSS.

A jitted function counts its traces with a Python side effect; a trace after the
first call means a recompilation, which is reported (and `recompiled: true` in
the JSON).

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
          [train: peak_bytes, peak_source, memory_analysis]}},
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
import statistics
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
import optax
from flax import traverse_util

from pyra_jax import merge as merge_lib
from pyra_jax import optim
from pyra_jax import schedules
from pyra_jax.models import vit
from pyra_jax.models.lora import fold_lora
from pyra_jax.errors import BenchmarkError  # pylint: disable=unused-import

PyTree = Any
METHODS = ('peft', 'tome', 'pyra')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}



# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

def method_config(model_config: ml_collections.ConfigDict, method: str, *,
                  image_size: int, num_classes: int) -> ml_collections.ConfigDict:
  """The config's model section switched to `method` (same schedule for tome/pyra)."""
  if method not in METHODS:
    raise BenchmarkError(f'Unknown method {method!r}: use some of {METHODS}.')
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.method = method
  c.image_size = image_size
  if c.num_classes is None:
    c.num_classes = num_classes
  if method == 'pyra' and c.modulation == 'none':
    c.modulation = 'pyra'
  return c


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
  return _randomize(params, r'lora/up|pyra/w_d', jax.random.PRNGKey(seed + 1))


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
  if model_config.lora_rank > 0 or _has_scope(params, 'lora'):
    params = fold_lora(params)
  return model, jax.device_put(params)


def _has_scope(tree: PyTree, name: str) -> bool:
  return isinstance(tree, dict) and any(
      k == name or _has_scope(v, name) for k, v in tree.items())


def load_params(path: str) -> tuple[PyTree, ml_collections.ConfigDict]:
  """Params and config of a pyra_jax export (imported lazily: needs Orbax)."""
  from pyra_jax import export  # pylint: disable=g-import-not-at-top
  return export.load_export(path)


def model_info(model: vit.VisionTransformer, method: str, image_size: int,
               batch_size: int) -> dict[str, Any]:
  """Schedule, token counts and GFLOPs per image from our counter."""
  prefix = 1 + int(model.distilled)
  n0 = (image_size // model.patch_size) ** 2 + prefix
  flops = schedules.vit_flops(model.schedule, num_tokens=n0, width=model.width,
                              mlp_ratio=model.mlp_dim / model.width)
  return {'method': method, 'schedule': list(model.schedule),
          'tokens': schedules.token_counts(model.schedule, n0),
          'gflops': flops / 1e9, 'batch_flops': flops * batch_size}


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
                min_seconds: float, warmup: int) -> dict[str, list[float]]:
  """Times each call once per round, rounds until both limits are met.

  Returns per-name lists of seconds. Interleaving means a burst of background
  load slows every model in the round, not just one, so ratios stay fair.
  """
  for fn in calls.values():
    for _ in range(max(warmup, 1)):  # the first call compiles
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
            model.pyra_ln_eps)
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

def _setup(config: ml_collections.ConfigDict, *, image_size: int, num_classes: int,
           methods: Sequence[str], params_path: str):
  """Per method: its model config and (random or exported) training params."""
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
  base = None
  for m in methods:
    src = export_cfg.model if export_cfg is not None else config.model
    cfgs[m] = method_config(src, m, image_size=image_size, num_classes=num_classes)
    if exported is not None:
      params[m] = exported if m == 'pyra' else strip_scope(exported, 'pyra')
    else:
      if base is None:  # one init (with pyra), shared: same backbone for all
        base = init_params(method_config(config.model, 'pyra', image_size=image_size,
                                         num_classes=num_classes), image_size)
      params[m] = base if m == 'pyra' else strip_scope(base, 'pyra')
  return image_size, cfgs, params


def run_forward(config: ml_collections.ConfigDict, *, batch_size: int = 8,
                dtype: str = 'float32', image_size: int = 0, num_iters: int = 10,
                min_seconds: float = 0.0, warmup: int = 2, matmul_size: int = 2048,
                methods: Sequence[str] = METHODS, params_path: str = '',
                num_classes: int = 100, gemm_bound: bool = True,
                reference_model: Optional[ml_collections.ConfigDict] = None
                ) -> dict[str, Any]:
  """Times the deployed models round-robin; returns the results dict (module doc).

  gemm_bound: also time each model's dense-layer matmuls alone
  (`dense_layers_call`) in the same rounds and report the speed-up they allow.
  reference_model: another model section (e.g. the full-depth backbone, when
  `config` is a shallower one), deployed without merging and timed in the same
  rounds as 'reference'; every speed-up is then over it. Throughput on a shared
  machine drifts by 10-30 % between runs a minute apart, so a speed-up is only
  trustworthy between models timed in the same rounds.
  """
  load_before = _load()
  jdtype = DTYPES[dtype]
  image_size, cfgs, train_params = _setup(
      config, image_size=image_size, num_classes=num_classes, methods=methods,
      params_path=params_path)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)),
                         jnp.float32) for _ in range(2)]
  names = list(methods)
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
    fn = Traced(lambda p, x, model=model: model.apply({'params': p}, x, train=False))
    traced[m] = fn
    counter = iter(range(1 << 62))
    calls[m] = (lambda fn=fn, params=params, counter=counter:
                fn(params, batches[next(counter) % 2]))
  mm, mm_flops = matmul_call(matmul_size, jdtype)
  calls['matmul'] = mm
  dense_flops = {}
  if gemm_bound:
    for m in methods:
      model, params = models[m]
      calls[f'{m}:dense'], dense_flops[m] = dense_layers_call(
          model, batch_size, image_size, params, jdtype)
  merge_owner = 'pyra' if 'pyra' in models else ('tome' if 'tome' in models else None)
  merge_call = None
  if merge_owner:
    model, params = models[merge_owner]
    merge_call = merge_ops_call(model, batch_size, image_size, params, jdtype)
    if merge_call is not None:
      calls['merge_ops'] = merge_call
  t0 = time.perf_counter()
  times = round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=warmup)
  elapsed = time.perf_counter() - t0
  out = _results('forward', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before)
  out['matmul'] = _matmul_result(matmul_size, mm_flops, times['matmul'])
  out['models'] = _per_model(names, infos, times, traced, batch_size, mm_flops,
                             base='reference' if reference_model is not None else None)
  if 'pyra' in methods and 'tome' in methods:
    out['pyra_cost_over_tome'] = 1.0 - _paired_median(times['tome'], times['pyra'])
  if merge_call is not None:
    sec, _ = _median_iqr(times['merge_ops'])
    out['merge_ops'] = {'model': merge_owner, 'seconds': sec,
                        'share_of_model': _paired_median(times['merge_ops'],
                                                         times[merge_owner])}
  if gemm_bound:
    out['gemm_bound'] = _gemm_bound(methods, times, out['models'], dense_flops,
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
             load_before) -> dict[str, Any]:
  return {'mode': mode, 'config': config.model.to_dict(), 'machine': _machine(),
          'load_average': {'before': load_before, 'after': _load()},
          'settings': {'batch_size': batch_size, 'dtype': dtype,
                       'image_size': image_size, 'warmup': warmup,
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


def run_train(config: ml_collections.ConfigDict, *, batch_size: int = 8,
              dtype: str = 'float32', image_size: int = 0, num_iters: int = 5,
              min_seconds: float = 0.0, warmup: int = 1, matmul_size: int = 2048,
              methods: Sequence[str] = METHODS, params_path: str = '',
              num_classes: int = 100) -> dict[str, Any]:
  """Times one training step per method round-robin; reports peak memory."""
  load_before = _load()
  jdtype = DTYPES[dtype]
  image_size, cfgs, train_params = _setup(
      config, image_size=image_size, num_classes=num_classes, methods=methods,
      params_path=params_path)
  if params_path and not _has_scope(train_params[methods[0]], 'lora'):
    raise BenchmarkError('--mode=train needs LoRA parameters; an export has them '
                         'folded. Drop --params (random weights time the same).')
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch_size, image_size, image_size, 3)),
                       jnp.float32)
  labels = jnp.asarray(rng.integers(0, 2, size=(batch_size,)), jnp.int32)
  tx = optax.adamw(config.get('lr', 1e-3), weight_decay=config.get('weight_decay', 1e-4))
  calls, infos, traced, compiled, state = {}, {}, {}, {}, {}
  key = jax.random.PRNGKey(0)
  for m in methods:
    model = vit.build_model(cfgs[m], dtype=jdtype)
    trainable, frozen = optim.split_params(train_params[m], config.trainable)
    if not trainable:
      raise BenchmarkError('config.trainable matches no parameter: nothing to train.')
    infos[m] = model_info(model, m, image_size, batch_size)
    # Forward + backward to the inputs only: frozen kernels get no gradient, so
    # each forward matmul has one backward matmul (LoRA's extras are tiny).
    infos[m]['batch_flops'] *= 2
    infos[m]['gflops'] *= 2

    def step(tr, opt, frozen, x, y, key, model=model):
      def loss_fn(tr):
        logits = model.apply({'params': optim.merge_params(tr, frozen)}, x, train=True,
                             rngs={'dropout': key})
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), y).mean()
      loss, grads = jax.value_and_grad(loss_fn)(tr)
      updates, opt = tx.update(grads, opt, tr)
      return optax.apply_updates(tr, updates), opt, loss

    fn = Traced(step, donate_argnums=(0, 1))
    traced[m] = fn
    # Own copies: the step donates them, and methods share the initial arrays.
    trainable = jax.tree.map(jnp.array, trainable)
    state[m] = [trainable, jax.jit(tx.init)(trainable), jax.device_put(frozen)]

    def call(m=m, fn=fn):
      tr, opt, frozen = state[m]
      tr, opt, loss = fn(tr, opt, frozen, images, labels, key)
      state[m][:2] = [tr, opt]
      return loss
    calls[m] = call
  mm, mm_flops = matmul_call(matmul_size, jdtype)
  calls['matmul'] = mm
  rss0 = _peak_rss_bytes()
  t0 = time.perf_counter()
  times = round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=warmup)
  elapsed = time.perf_counter() - t0
  for m in methods:  # after the timed calls: hits the jit caches, no new trace
    compiled[m] = traced[m].jitted.lower(*state[m], images, labels,
                                         jax.random.PRNGKey(0)).compile()
  out = _results('train', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before)
  out['matmul'] = _matmul_result(matmul_size, mm_flops, times['matmul'])
  out['models'] = _per_model(methods, infos, times, traced, batch_size, mm_flops)
  if 'pyra' in methods and 'tome' in methods:
    out['pyra_cost_over_tome'] = 1.0 - _paired_median(times['tome'], times['pyra'])
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, 'memory_stats') else None
  for m in methods:
    ma = compiled[m].memory_analysis()
    info = {}
    if ma is not None:
      for f in ('argument_size_in_bytes', 'output_size_in_bytes',
                'temp_size_in_bytes', 'alias_size_in_bytes',
                'generated_code_size_in_bytes'):
        info[f] = int(getattr(ma, f, 0) or 0)
    rec = out['models'][m]
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
  return out


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #

def format_table(res: dict[str, Any]) -> str:
  """The console table (one row per model) and the notes under it."""
  s, mm = res['settings'], res['matmul']
  lines = [f"mode={res['mode']} batch={s['batch_size']} image={s['image_size']} "
           f"dtype={s['dtype']} rounds={s['rounds']} ({s['seconds']:.1f} s) "
           f"load avg before/after={res['load_average']['before']}/"
           f"{res['load_average']['after']}",
           f"matmul {mm['size']}^3: {mm['gflops_per_s']:.1f} GFLOP/s "
           f"(fastest round {mm['gflops_per_s_best']:.1f})"]
  hdr = (f"{'model':6} {'img/s':>7} {'GFLOPs':>7} {'speed-up':>8} {'FLOPs ratio':>11} "
         f"{'su/ratio':>8} {'GFLOP/s':>8} {'% matmul':>8}")
  if res['mode'] == 'train':
    hdr += f" {'peak MiB':>9}"
  lines.append(hdr)
  for m, r in res['models'].items():
    row = (f"{m:6} {r['images_per_sec']:7.2f} {r['gflops']:7.4g} {r['speedup']:7.2f}x "
           f"{r['flops_ratio']:10.2f}x {r['speedup_over_flops_ratio']:8.1%} "
           f"{r['gflops_per_s']:8.1f} {r['matmul_fraction']:8.1%}")
    if res['mode'] == 'train':
      row += f" {r.get('peak_bytes', 0) / 2**20:9.0f}"
    lines.append(row)
  lines.append('img/s: median round; speed-up and % matmul: median over rounds of '
               'the ratio within a round.')
  if res['mode'] == 'train':
    lines.append('train GFLOPs = 2 x forward (frozen kernels: input gradients only); '
                 'peak memory: '
                 + next(iter(res['models'].values())).get('peak_source', 'n/a'))
  if 'gemm_bound' in res:
    lines.append('dense-layer matmuls alone, at each model\'s token counts '
                 '(the ceiling for its speed-up on this machine):')
    for m, g in res['gemm_bound'].items():
      lines.append(f"  {m:6} {g['gflops_per_s']:7.1f} GFLOP/s ({g['matmul_fraction']:.1%} "
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
      methods=flags.DEFINE_list('methods', list(METHODS),
                                'Which of peft,tome,pyra to run.'),
      num_classes=flags.DEFINE_integer('num_classes', 100,
                                       'Head size when the config leaves it unset (-1).'),
  )


def main(argv: Sequence[str], fl: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = fl['config'].value
  if config is None:
    raise app.UsageError('Give --config=configs/<setting>.py (a file with get_config()).')
  methods = tuple(fl['methods'].value)
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise app.UsageError(f'--methods: use some of {METHODS}, got {methods}.')
  train = fl['mode'].value == 'train'
  batch = fl['batch_size'].value or (8 if jax.devices()[0].platform == 'cpu' else 64)
  kwargs = dict(batch_size=batch, dtype=fl['dtype'].value,
                image_size=fl['image_size'].value,
                num_iters=fl['num_iters'].value or (5 if train else 10),
                min_seconds=fl['min_seconds'].value, warmup=fl['warmup'].value,
                matmul_size=fl['matmul_size'].value, methods=methods,
                params_path=fl['params'].value, num_classes=fl['num_classes'].value)
  if not train:
    kwargs['gemm_bound'] = fl['gemm_bound'].value
  res = (run_train if train else run_forward)(config, **kwargs)
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
