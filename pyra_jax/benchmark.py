r"""Throughput, FLOPs and memory of the deployed models, side by side.

  python -m pyra_jax.benchmark --config=configs/vitb_high.py --out=bench.json
  python -m pyra_jax.benchmark --config=configs/vitb_low.py --mode=train
  python -m pyra_jax.benchmark --config=configs/vitb_high.py --peft=lora,adapter,convpass,fact,snf
  python -m pyra_jax.benchmark --config=configs/demo.py --curve --curve_png=curve.png

`--curve` (pyra_jax/speedup_curve.py) times schedules spread over each merging
method's family (PYRA: Eq. 8; ToMe: constant r) against the uncompressed model
and prints measured speed-up against FLOPs ratio: what each choice of
model.schedule='speedup:<x>' or 'flops:<ratio>' buys on this device.

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

from pyra_jax import errors
from pyra_jax import field_ranges
from pyra_jax import merge as merge_lib
from pyra_jax import profiling
from pyra_jax import registry
from pyra_jax import schedules
from pyra_jax.models import vit
from pyra_jax.errors import BenchmarkError  # pylint: disable=unused-import
from pyra_jax.throughput import (DEFAULT_METHODS, DTYPES, METHODS, PyTree, Traced, block,
                                 build_forward, forward_results, load_average,
                                 matmul_call, matmul_result, median_iqr, method_config,
                                 model_info, paired_median, per_model, results_header,
                                 round_robin)
from pyra_jax.training import checks as checks_lib
from pyra_jax.training import setup as setup_lib
from pyra_jax.training import steps as steps_lib


# --------------------------------------------------------------------------- #
# Forward extras: the merge operations alone, the dense-layer ceiling
# --------------------------------------------------------------------------- #

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


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --------------------------------------------------------------------------- #
# The two modes
# --------------------------------------------------------------------------- #

def run_forward(config: ml_collections.ConfigDict, *, batch_size: int = 8,
                dtype: str = 'float32', image_size: int = 0, num_iters: int = 10,
                min_seconds: float = 0.0, warmup: int = 2, matmul_size: int = 2048,
                methods: Sequence[str] = DEFAULT_METHODS, params_path: str = '',
                num_classes: int = 100, gemm_bound: bool = True,
                reference_model: Optional[ml_collections.ConfigDict] = None,
                warmup_seconds: float = 0.0,
                peft_modules: Sequence[str] = (),
                schedules_: Sequence[str] = ()) -> dict[str, Any]:
  """`throughput.run_forward` plus the tool's extras, timed in the same rounds.

  gemm_bound: also time each model's dense-layer matmuls alone
  (`dense_layers_call`) and report the speed-up they allow. When something
  merges, the merge operations alone (`merge_ops_call`) are timed too, for
  their share of the model's time. Other arguments: `throughput.run_forward`.
  """
  load_before = load_average()
  jdtype = DTYPES[dtype]
  fm = build_forward(config, batch_size=batch_size, dtype=dtype, image_size=image_size,
                     methods=methods, params_path=params_path, num_classes=num_classes,
                     reference_model=reference_model, peft_modules=peft_modules,
                     schedules_=schedules_)
  image_size, timed, cfgs, models = fm.image_size, fm.timed, fm.cfgs, fm.models
  calls = dict(fm.calls)
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
  out = forward_results(config, fm, times, dtype=dtype, warmup=warmup,
                        warmup_seconds=warmup_seconds,
                        elapsed=time.perf_counter() - t0, load_before=load_before,
                        matmul_size=matmul_size, matmul_flops=mm_flops)
  recompiled = out.pop('recompiled')  # stays the last key
  if merge_call is not None:
    sec, _ = median_iqr(times['merge_ops'])
    out['merge_ops'] = {'model': merge_owner, 'seconds': sec,
                        'share_of_model': paired_median(times['merge_ops'],
                                                        times[merge_owner])}
  if gemm_bound:
    out['gemm_bound'] = _gemm_bound(timed, times, out['models'], dense_flops,
                                    mm_flops)
  out['recompiled'] = recompiled
  return out


def _gemm_bound(methods, times, models, dense_flops, mm_flops) -> dict[str, Any]:
  """Per model: its dense matmuls' time and rate, the speed-up they allow
  (paired, over the baseline's dense matmuls) and the share of it achieved."""
  base = models[methods[0]]['baseline']
  out = {}
  for m in methods:
    key = f'{m}:dense'
    sec, _ = median_iqr(times[key])
    bound = paired_median(times[f'{base}:dense'], times[key])
    out[m] = {'seconds': sec, 'gflops': dense_flops[m] / 1e9,
              'gflops_per_s': dense_flops[m] / sec / 1e9,
              'matmul_fraction': dense_flops[m] / mm_flops
                                 * paired_median(times['matmul'], times[key]),
              'speedup_bound': bound,
              'speedup_over_bound': models[m]['speedup'] / bound,
              'round_seconds': list(times[key])}
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
  load_before = load_average()
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
    block(fn())
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
  out = results_header('train', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before, warmup_seconds)
  out['matmul'] = matmul_result(matmul_size, mm_flops, times['matmul'])
  out['models'] = per_model(methods, infos, times, traced, batch_size, mm_flops)
  if 'pyra' in times and 'tome' in times:
    out['pyra_cost_over_tome'] = 1.0 - paired_median(times['tome'], times['pyra'])
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
      curve=flags.DEFINE_bool(
          'curve', False, 'Print the measured speed-up vs FLOPs ratio over the '
          'schedule families of --methods (PYRA: Eq. 8; ToMe: constant r), the '
          "choices model.schedule='speedup:<x>' picks from; --batch_size, "
          '--num_iters apply (pyra_jax/speedup_curve.py).'),
      curve_points=flags.DEFINE_integer('curve_points', 10,
                                        '--curve: schedules timed per family.'),
      curve_png=flags.DEFINE_string('curve_png', '', '--curve: also plot it to this PNG.'),
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
    'curve_points': field_ranges.Range(2, integer=True, why='schedules timed per family'),
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
  if fl['curve'].value:
    run_curve(config, fl, methods)
    return
  if fl['curve_png'].value:
    raise app.UsageError('--curve_png plots the --curve measurement: add --curve.')
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


def run_curve(config: ml_collections.ConfigDict, fl: dict[str, Any],
              methods: Sequence[str]) -> None:
  """--curve: speedup_curve's table (and JSON with --out, PNG with --curve_png)."""
  from pyra_jax import speedup_curve, speedup_timer  # pylint: disable=g-import-not-at-top
  if fl['mode'].value == 'train':
    raise app.UsageError('--curve times deployed models: drop --mode=train.')
  config = ml_collections.ConfigDict(config.to_dict())
  if fl['image_size'].value:
    config.model.image_size = fl['image_size'].value
  if fl['dtype'].value != 'float32':
    config.dtype = fl['dtype'].value
  try:
    res = speedup_curve.curve(
        config, methods=methods, points=fl['curve_points'].value,
        batch=fl['batch_size'].value or speedup_timer.default_batch(),
        rounds=fl['num_iters'].value or 10)
  except errors.PyraError as e:
    raise SystemExit(f'error: {e}') from None
  print(speedup_curve.format_curve(res))
  for path, write in ((fl['out'].value, lambda p: json.dump(res, open(p, 'w'), indent=2)),
                      (fl['curve_png'].value, lambda p: speedup_curve.plot_curve(res, p))):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      write(path)
      print(f'wrote {path}')
  sys.stdout.flush()


def run() -> None:
  """The `pyra-jax-benchmark` command (also `python -m pyra_jax.benchmark`)."""
  from pyra_jax import configs  # pylint: disable=g-import-not-at-top
  configs.resolve_argv(sys.argv)  # A packaged setting by name: --config=vitb_high.
  fl = define_flags()
  app.run(lambda argv: main(argv, fl))


if __name__ == '__main__':
  run()
