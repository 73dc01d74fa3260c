"""Train mode: the real training step timed per method, and its breakdown.

The step is `training.steps.make_train_step`'s memoised jitted step on random
weights of the run's shapes; `TrainStepCalls` adds the separately compiled
programs whose differences split it (forward, RNG, backward, optimiser), and
`run_train` times them round-robin with the reference matmul, reads XLA's cost
and memory analyses and, if asked, profiles each step (`profiling`).
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from pyra_jax import profiling
from pyra_jax import throughput
from pyra_jax.errors import BenchmarkError
from pyra_jax.training import checks as checks_lib
from pyra_jax.training import setup as setup_lib
from pyra_jax.training import steps as steps_lib


def _peak_rss_bytes() -> int:
  """The process's peak resident memory so far (the only peak a CPU run has)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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
  cfg.model = throughput.method_config(config.model, method, image_size=image_size,
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
        'forward_no_rng': throughput.Traced(lambda *a: loss(no_rng_model, *a)),
        'forward': throughput.Traced(lambda *a: loss(run.model, *a)),
        'fwd_bwd': throughput.Traced(jax.value_and_grad(lambda *a: loss(run.model, *a))),
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
              methods: Sequence[str] = throughput.DEFAULT_METHODS, params_path: str = '',
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
  load_before = throughput.load_average()
  image_size = image_size or config.model.image_size
  calls, infos, traced, steps = {}, {}, {}, {}
  for m in methods:
    run = train_run(config, m, image_size=image_size, num_classes=num_classes,
                    dtype=dtype)
    steps[m] = TrainStepCalls(run, synthetic_batch(run, batch_size))
    infos[m] = throughput.model_info(run.model, m, image_size, batch_size)
    step_calls = steps[m].calls()
    calls[m] = step_calls.pop('step')
    for name, fn in step_calls.items():
      calls[f'{m}:{name}'] = fn
  mm, mm_flops = throughput.matmul_call(matmul_size, throughput.DTYPES[dtype])
  calls['matmul'] = mm
  for fn in calls.values():  # compile everything before timing anything
    throughput.block(fn())
  compiles_first = {m: steps[m].step_compiles() for m in methods}
  rss0 = _peak_rss_bytes()
  t0 = time.perf_counter()
  times = throughput.round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
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
  out = throughput.results_header('train', config, image_size, batch_size, dtype, warmup, times,
                 elapsed, load_before, warmup_seconds)
  out['matmul'] = throughput.matmul_result(matmul_size, mm_flops, times['matmul'])
  out['models'] = throughput.per_model(methods, infos, times, traced, batch_size, mm_flops)
  if 'pyra' in times and 'tome' in times:
    out['pyra_cost_over_tome'] = 1.0 - throughput.paired_median(times['tome'], times['pyra'])
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
  """`traces` in the shape `throughput.per_model` reads from a `Traced`."""

  def __init__(self, traces: int):
    self.traces = traces
