"""Inference throughput of deployed models, timed against each other in the same rounds.

The library side of speed measurements: `main` (the speed-up after training),
`vtab`, the study runner and `pyra_jax.benchmark` (the command-line tool, which
adds the GEMM ceiling, the merge-ops share, the training-step profile and the
console table) all time models through this module.

  res = throughput.run_forward(config, methods=('peft', 'pyra'), batch_size=32)
  res['models']['pyra']['speedup']  # paired median over rounds, over 'peft'

Why the timing looks the way it does: on a shared machine throughput drifts by
10-30 % between runs a minute apart, so a speed-up is only trustworthy between
models timed in the same rounds. `round_robin` calls every model once per round;
a speed-up is the median over rounds of the ratio within each round (a burst of
background load that slows a round cancels out), and its spread is the spread of
those per-round ratios (`speedup_spread`).

The models are deployed (`deployed`): LoRA (or FacT) folded into the frozen
kernels, eval mode, random weights of the run's shapes by default (speed does
not depend on the values).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from pyra_jax import errors
from pyra_jax import registry
from pyra_jax import schedules
from pyra_jax.errors import BenchmarkError
from pyra_jax.models import vit
from pyra_jax.models.lora import fold_lora

PyTree = Any
# Every method the model knows, plus 'evit_own': EViT at its own keep rate
# (model.evit_keep_rate at model.evit_layers) rather than FLOPs-matched.
METHODS = tuple(registry.METHODS) + ('evit_own',)
# What is timed when no methods are given: the original three.
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
    c.rap_widths = vit.rap_uniform_widths(c)
  return c


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


def param_shapes(model_config: ml_collections.ConfigDict, image_size: int) -> PyTree:
  """The shapes `init_params` would give (traced, nothing computed)."""
  model = vit.build_model(model_config)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']


def same_shapes(params: PyTree, shapes: PyTree) -> bool:
  """Whether two parameter trees have the same paths and array shapes."""
  a, b = jax.tree_util.tree_flatten_with_path(params), jax.tree_util.tree_flatten_with_path(shapes)
  return (a[1] == b[1] and all(np.shape(x) == tuple(y.shape) for (_, x), (_, y) in zip(a[0], b[0])))


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
  if model_config.get('peft', 'lora') != 'lora' or has_scope(params, 'fact'):
    params = vit.fold_peft(params, model_config)  # FacT folds, SNF stays
  elif model_config.lora_rank > 0 or has_scope(params, 'lora'):
    params = fold_lora(params)
  return model, jax.device_put(params)


def has_scope(tree: PyTree, name: str) -> bool:
  """Whether any subtree of `tree` is called `name` (e.g. 'lora', 'pyra')."""
  return isinstance(tree, dict) and any(
      k == name or has_scope(v, name) for k, v in tree.items())


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
  widths = [model.reducer.block_widths(layer) for layer in range(model.depth)]
  if any(w is not None for w in widths):  # RaP: fewer heads and MLP units per block
    from pyra_jax.methods import rap  # pylint: disable=g-import-not-at-top
    flops = sum(rap.block_flops(*(w or (model.num_heads, model.mlp_dim)), num_tokens=n0,
                                width=model.width, head_dim=model.width // model.num_heads)
                for w in widths)
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


def block(x: Any) -> Any:
  """Waits for `x`: JAX dispatches asynchronously, so a call is timed to its result."""
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
      block(fn())
  start = time.perf_counter()
  while time.perf_counter() - start < warmup_seconds:
    for fn in calls.values():
      block(fn())
  times: dict[str, list[float]] = {k: [] for k in calls}
  start = time.perf_counter()
  rounds = 0
  while rounds < num_iters or time.perf_counter() - start < min_seconds:
    for name, fn in calls.items():
      t0 = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - t0)
    rounds += 1
  return times


def median_iqr(ts: Sequence[float]) -> tuple[float, float]:
  """Median and interquartile range (75th - 25th percentile) of `ts`."""
  q = np.percentile(np.asarray(ts), [25, 50, 75])
  return float(q[1]), float(q[2] - q[0])


def paired_median(num: Sequence[float], den: Sequence[float]) -> float:
  """Median over rounds of num[i] / den[i]: both timed in the same round, so a
  burst of background load that slows the round cancels out of the ratio."""
  return float(np.median(np.asarray(num) / np.asarray(den)))


def speedup_spread(base: Sequence[float], model: Sequence[float]) -> dict[str, float]:
  """The spread of the per-round speed-ups base[i] / model[i] whose median is
  the paired speed-up: quartiles (q25, q75) and extremes (min, max). With few
  rounds the extremes are the honest statement; the quartiles need about 8."""
  r = np.asarray(base) / np.asarray(model)
  q25, q75 = np.percentile(r, [25, 75])
  return {'q25': float(q25), 'q75': float(q75), 'min': float(r.min()),
          'max': float(r.max()), 'rounds': int(r.size)}


def matmul_call(n: int, dtype: Any) -> tuple[Callable[[], Any], float]:
  """An n x n x n matmul in `dtype` (the models' compute dtype) and its FLOPs."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(7))
  a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
  f = jax.jit(jnp.matmul)
  return (lambda: f(a, b)), 2.0 * n ** 3


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), or platform.processor()."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """What the figures were measured on (platform, device, cores, versions)."""
  dev = jax.devices()[0]
  return {'platform': dev.platform, 'device_kind': dev.device_kind,
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__, 'python': platform.python_version()}


def load_average() -> list[float]:
  """The 1/5/15-minute load average (empty where the OS has none): how busy the
  machine was around a measurement."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


# --------------------------------------------------------------------------- #
# Forward timing of deployed models
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
    if 'pyra' in methods and not has_scope(exported, 'pyra'):
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
      if not same_shapes(params[name], param_shapes(cfgs[name], image_size)):
        # A method with parameters of its own (LTMP's thresholds, SPViT's
        # selectors) or a smaller backbone (RaP's pruned widths): its own init.
        params[name] = init_params(cfgs[name], image_size)
  return image_size, cfgs, params


def results_header(mode: str, config: ml_collections.ConfigDict, image_size: int,
                   batch_size: int, dtype: str, warmup: int,
                   times: dict[str, list[float]], elapsed: float,
                   load_before: list[float], warmup_seconds: float = 0.0) -> dict[str, Any]:
  """The first keys of a results dict: mode, config, machine, load, settings."""
  return {'mode': mode, 'config': config.model.to_dict(), 'machine': machine_info(),
          'load_average': {'before': load_before, 'after': load_average()},
          'settings': {'batch_size': batch_size, 'dtype': dtype,
                       'image_size': image_size, 'warmup': warmup,
                       'warmup_seconds': warmup_seconds,
                       'rounds': len(next(iter(times.values()))),
                       'seconds': elapsed}}


def matmul_result(size: int, flops: float, ts: Sequence[float]) -> dict[str, Any]:
  """The reference matmul's time and FLOP rate (median and fastest round)."""
  sec, _ = median_iqr(ts)
  return {'size': size, 'seconds': sec, 'gflops_per_s': flops / sec / 1e9,
          'gflops_per_s_best': flops / min(ts) / 1e9, 'round_seconds': list(ts)}


def per_model(methods: Sequence[str], infos: dict[str, dict[str, Any]],
              times: dict[str, list[float]], traced: dict[str, Any], batch_size: int,
              mm_flops: float, base: Optional[str] = None) -> dict[str, Any]:
  """Per-model figures from the round-robin times.

  images/s is from the median time. Speed-ups and matmul fractions are paired:
  the median over rounds of the ratio within each round (the ratio of the
  medians is kept as `speedup_of_medians`), over `base` (default: peft, else
  the first model).
  """
  out = {}
  base = base or ('peft' if 'peft' in methods else methods[0])
  base_sec = median_iqr(times[base])[0]
  mm_sec = median_iqr(times['matmul'])[0]
  for m in methods:
    sec, iqr = median_iqr(times[m])
    info = dict(infos[m])
    flops = info.pop('batch_flops')
    ratio = infos[base]['gflops'] / info['gflops']
    speedup = paired_median(times[base], times[m])
    out[m] = dict(info, images_per_sec=batch_size / sec, seconds=sec, seconds_iqr=iqr,
                  seconds_best=min(times[m]), speedup=speedup,
                  speedup_spread=speedup_spread(times[base], times[m]),
                  speedup_of_medians=base_sec / sec, flops_ratio=ratio,
                  speedup_over_flops_ratio=speedup / ratio,
                  gflops_per_s=flops / sec / 1e9,
                  matmul_fraction=flops / mm_flops * paired_median(times['matmul'], times[m]),
                  matmul_fraction_of_medians=flops / sec / (mm_flops / mm_sec),
                  traces=traced[m].traces, recompiled=traced[m].traces > 1,
                  baseline=base, round_seconds=list(times[m]))
  return out




@dataclasses.dataclass
class ForwardModels:
  """The deployed models of one forward timing, ready to go into `round_robin`.

  names: every model timed (the `reference` last when there is one); timed: the
  same without the reference; calls: one zero-argument call per name (a jitted
  forward pass on one of two fixed batches, alternated so that no call reuses
  its previous input); models: (flax module, deployed params) per name; infos:
  `model_info` per name; traced: the `Traced` function per name (its trace count
  tells a recompilation); base: the model the speed-ups are over (None: peft,
  else the first).
  """
  image_size: int
  batch_size: int
  cfgs: dict[str, ml_collections.ConfigDict]
  names: list[str]
  timed: list[str]
  models: dict[str, tuple[vit.VisionTransformer, PyTree]]
  infos: dict[str, dict[str, Any]]
  traced: dict[str, Traced]
  calls: dict[str, Callable[[], Any]]
  base: Optional[str]


def build_forward(config: ml_collections.ConfigDict, *, batch_size: int, dtype: str,
                  image_size: int = 0, methods: Sequence[str] = DEFAULT_METHODS,
                  params_path: str = '', num_classes: int = 100,
                  reference_model: Optional[ml_collections.ConfigDict] = None,
                  peft_modules: Sequence[str] = (),
                  schedules_: Sequence[str] = ()) -> ForwardModels:
  """Builds the deployed model of every method (module doc); nothing is timed
  or compiled yet (each forward compiles at its first call).

  Arguments as `run_forward`'s.
  """
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
  base = 'reference' if reference_model is not None else (
      names[0] if peft_modules else None)
  return ForwardModels(image_size=image_size, batch_size=batch_size, cfgs=cfgs,
                       names=names, timed=timed, models=models, infos=infos,
                       traced=traced, calls=calls, base=base)


def forward_results(config: ml_collections.ConfigDict, fm: ForwardModels,
                    times: dict[str, list[float]], *, dtype: str, warmup: int,
                    warmup_seconds: float, elapsed: float, load_before: list[float],
                    matmul_size: int, matmul_flops: float) -> dict[str, Any]:
  """The results dict of a forward timing (`run_forward`'s), from the
  round-robin times of `fm.calls` plus 'matmul'."""
  out = results_header('forward', config, fm.image_size, fm.batch_size, dtype, warmup,
                       times, elapsed, load_before, warmup_seconds)
  out['matmul'] = matmul_result(matmul_size, matmul_flops, times['matmul'])
  out['models'] = per_model(fm.names, fm.infos, times, fm.traced, fm.batch_size,
                            matmul_flops, base=fm.base)
  if 'pyra' in times and 'tome' in times:
    out['pyra_cost_over_tome'] = 1.0 - paired_median(times['tome'], times['pyra'])
  out['recompiled'] = any(v['recompiled'] for v in out['models'].values())
  return out


def run_forward(config: ml_collections.ConfigDict, *, batch_size: int = 8,
                dtype: str = 'float32', image_size: int = 0, num_iters: int = 10,
                min_seconds: float = 0.0, warmup: int = 2, matmul_size: int = 2048,
                methods: Sequence[str] = DEFAULT_METHODS, params_path: str = '',
                num_classes: int = 100,
                reference_model: Optional[ml_collections.ConfigDict] = None,
                warmup_seconds: float = 0.0,
                peft_modules: Sequence[str] = (),
                schedules_: Sequence[str] = ()) -> dict[str, Any]:
  """Times the deployed models round-robin; returns the results dict.

  Keys: mode, config (the model section), machine, load_average {before,
  after}, settings {batch_size, dtype, image_size, warmup, warmup_seconds,
  rounds, seconds}, matmul (the `matmul_size`^3 reference timed in the same
  rounds), models {name: `per_model`'s figures}, pyra_cost_over_tome (when both
  are timed), recompiled.

  methods: names from METHODS; with `schedules_`, every compressing method at
  each schedule ('tome@vitb_low'). params_path: a pyra_jax export to take the
  weights from (default: random). reference_model: another model section (e.g.
  the full-depth backbone, when `config` is a shallower one), deployed without
  merging and timed in the same rounds as 'reference'; every speed-up is then
  over it. peft_modules: time every method with each of these PEFT modules
  (model names `method[module]`, speed-ups over the first); random weights only.
  """
  load_before = load_average()
  fm = build_forward(config, batch_size=batch_size, dtype=dtype, image_size=image_size,
                     methods=methods, params_path=params_path, num_classes=num_classes,
                     reference_model=reference_model, peft_modules=peft_modules,
                     schedules_=schedules_)
  calls = dict(fm.calls)
  calls['matmul'], mm_flops = matmul_call(matmul_size, DTYPES[dtype])
  t0 = time.perf_counter()
  times = round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=warmup, warmup_seconds=warmup_seconds)
  return forward_results(config, fm, times, dtype=dtype, warmup=warmup,
                         warmup_seconds=warmup_seconds,
                         elapsed=time.perf_counter() - t0, load_before=load_before,
                         matmul_size=matmul_size, matmul_flops=mm_flops)


# The measurement after training (`speedup_after_training`). Why these values:
# the demo's whole run must stay within minutes on a 2-core CPU, and at the
# evaluation batch (200) two compilations and six passes per model cost about
# two minutes, as much as training. At batch 32 a ViT-S forward takes a fraction
# of a second; each model compiles once (its untimed first call) and runs once
# per round, and the speed-up is the median of the per-round ratios over
# AFTER_TRAINING_ROUNDS rounds, stated with their spread (`speedup_spread`).
AFTER_TRAINING_BATCH = 32
AFTER_TRAINING_ROUNDS = 10
# The reference matmul (for `matmul_fraction`): small, it costs milliseconds.
AFTER_TRAINING_MATMUL = 512


def after_training_batch(config: ml_collections.ConfigDict) -> int:
  """The batch `speedup_after_training` times: AFTER_TRAINING_BATCH, or the
  evaluation batch if that is smaller."""
  return min(AFTER_TRAINING_BATCH, int(config.eval_batch_size))


def speedup_after_training(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The deployed trained method against the uncompressed model (speedup.json).

  What `main` prints after training and `vtab` stores per final run, when the
  config sets `benchmark_after_training`: `run_forward` on 'peft' and the
  config's method, random weights of the run's shapes (speed does not depend
  on their values), at AFTER_TRAINING_BATCH images (or the evaluation batch
  if smaller), one compilation per model, AFTER_TRAINING_ROUNDS paired rounds.
  """
  return run_forward(config, batch_size=after_training_batch(config),
                     methods=('peft', config.model.method),
                     num_iters=AFTER_TRAINING_ROUNDS, warmup=1,
                     matmul_size=AFTER_TRAINING_MATMUL)


def speedup_line(res: dict[str, Any], method: str) -> str:
  """The line `main` prints for `speedup_after_training`'s result: throughputs,
  the paired speed-up with the range of its per-round ratios, the FLOPs ratio."""
  fast, slow = res['models'][method], res['models']['peft']
  sp = fast['speedup_spread']
  return (f'throughput: {method} {fast["images_per_sec"]:.1f} images/s vs uncompressed '
          f'{slow["images_per_sec"]:.1f} images/s: {fast["speedup"]:.2f}x faster '
          f'(median of {sp["rounds"]} paired rounds at batch {res["settings"]["batch_size"]}, '
          f'per-round {sp["min"]:.2f}-{sp["max"]:.2f}x; FLOPs ratio {fast["flops_ratio"]:.2f}x)')
