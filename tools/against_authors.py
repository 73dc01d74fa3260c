r"""Ours against the authors' PyTorch PYRA, in one process, rounds alternating.

  /work/torchenv/bin/python tools/against_authors.py --authors_repo=/path/to/PYRA \
      [--rounds=5] [--batch_size=8] [--methods=peft,tome,pyra] [--profile_calls=3] \
      [--gemms] [--out=res.json]

This repository's `pyra_jax` (the one beside this script) is imported. `--authors_repo` is a checkout of github.com/THU-MIG/PYRA;
its `model/` package is imported from there at run time (nothing of it is
copied here).

The environment: one Python with both frameworks. We install our JAX stack
into a PyTorch venv (the smaller of the two ways: our requirements minus
TensorFlow, which the benchmark does not import):

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 timm==0.5.4 jax==0.10.2 \
      jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 \
      ml-collections==1.1.0 absl-py==2.5.1 numpy==2.4.6 tqdm==4.70.1 \
      tensorboardX==2.6.5

timm 0.5.4 imports torchvision at import time (its data transforms and FX
feature extraction), which the authors' model code never calls. PyPI's
torchvision wheels are CUDA builds that cannot load against a CPU-only torch,
so when `import torchvision` fails this script puts an inert stand-in module in
its place (any attribute is a placeholder class); nothing timed touches it.

What is timed, ViT-B/16 at 224 px, 100 classes, fp32, random weights (speed
does not depend on their values), the paper's `high` schedule:

  forward   ours: the deployed model (LoRA folded into q/k/v, eval mode, jit),
            what our inference runs; theirs: their model in eval mode under
            torch.no_grad(), what their `test_model_latency` times (LoRA as a
            separate branch, which is how their code deploys).
  train     ours: `training.steps.make_train_step`, the step a training run executes
            (AdamW with lr groups and weight-decay mask, LoRA dropout 0.1,
            stochastic depth 0.1, masked cross-entropy), fed its own outputs;
            theirs: their `train_one_epoch` body without data loading and
            logging: model.train(), forward, CrossEntropyLoss, loss.item(),
            zero_grad, backward, AdamW (their `create_optimizer`, weight decay
            1e-4 off for biases and 1-D params, separate PYRA lr group).

Methods: peft (no merging), tome, pyra (both with the high schedule; theirs via
`apply_tome` and `pyra_r`, as their train.py builds them). Each round calls,
for every method, our forward, their forward, our step, their step, so load on
a shared machine hits both sides alike; a ratio is the median over rounds of
ours/theirs throughput within the round (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import platform
import sys
import time
import types

import numpy as np

METHODS = ('peft', 'tome', 'pyra')
NUM_CLASSES = 100
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- #
# The authors' side.
# --------------------------------------------------------------------------- #

class _InertType(type):
  """Class attributes of the stand-in (e.g. InterpolationMode.NEAREST) are stand-ins,
  one distinct class per name (timm builds lookup tables keyed by them)."""
  _made: dict = {}

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    key = (cls.__name__, name)
    if key not in _InertType._made:
      _InertType._made[key] = _InertType(name, (_Inert,), {})
    return _InertType._made[key]


class _Inert(metaclass=_InertType):
  """Stands for any torchvision name timm touches at import time."""

  def __init__(self, *a, **k):
    pass

  def __getattr__(self, name):
    return _Inert


class InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves the packages `roots` and all their submodules as inert modules."""

  def __init__(self, roots: tuple[str, ...] = ('torchvision',)):
    self.roots = tuple(roots)

  def find_spec(self, name, path, target=None):
    if any(name == r or name.startswith(r + '.') for r in self.roots):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def attribute(attr):
      if attr.startswith('__'):  # __file__ and the like: absent, as for a builtin
        raise AttributeError(attr)
      return getattr(_Inert, attr)
    module.__getattr__ = attribute
    return module

  def exec_module(self, module):
    pass


def real_or_stand_in(root: str, why: str = 'it does not import here') -> str:
  """Imports package `root`; if that fails, serves it (and its submodules) as
  inert stand-ins from then on. Returns which one the process now has."""
  try:
    importlib.import_module(root)
    return 'real'
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n == root or n.startswith(root + '.')]:
      del sys.modules[name]
    sys.meta_path.insert(0, InertFinder((root,)))
    return f'inert stand-in ({why})'


def _torchvision_or_stand_in() -> str:
  return real_or_stand_in('torchvision', 'the PyPI wheel cannot load against this torch')


# Public for the other comparison tools (tools/originals_methods.py).
torchvision_or_stand_in = _torchvision_or_stand_in


def their_model(method: str, authors_repo: str):
  """Their ViT-B/16 (LoRA 8) for `method`, built as their train.py builds it."""
  if authors_repo not in sys.path:
    sys.path.insert(0, authors_repo)
  import model as their_models  # pylint: disable=g-import-not-at-top
  from model import tome as their_tome  # pylint: disable=g-import-not-at-top
  name = 'vit_base_patch16_224_in21k'
  r = their_tome.get_merging_schedule(name, 'high') if method != 'peft' else None
  m = getattr(their_models, name)(
      img_size=224, drop_rate=0.0, drop_path_rate=0.1, prompt_tuning_dim=0,
      LoRA_dim=8, adapter_dim=0, prefix_dim=0, drop_rate_LoRA=0.1,
      drop_rate_prompt=0.0, drop_rate_adapter=0.0, IS_not_position_VPT=False,
      pyra_r=list(r) if method == 'pyra' else None)
  m.reset_classifier(NUM_CLASSES)
  if method != 'peft':
    their_tome.apply_tome(m)
    m.r = list(r)
  return m


class Theirs:
  """Their forward (eval, no_grad) and training step for one method."""

  def __init__(self, method: str, authors_repo: str, batch_size: int, seed: int = 0):
    import torch  # pylint: disable=g-import-not-at-top
    if authors_repo not in sys.path:
      sys.path.insert(0, authors_repo)
    from model import optim_factory  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(seed)
    self.model = their_model(method, authors_repo)
    rng = np.random.default_rng(seed)
    self.x = torch.from_numpy(rng.normal(size=(batch_size, 3, 224, 224)).astype(np.float32))
    self.y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch_size).astype(np.int64))
    args = argparse.Namespace(opt='adamw', lr=1e-3, weight_decay=1e-4, momentum=0.9,
                              opt_eps=1e-8, opt_betas=None, opt_args=None,
                              separate_lr_for_pyra=True, pyra_lr=1e-3)
    self.opt = optim_factory.create_optimizer(args, self.model)
    self.criterion = torch.nn.CrossEntropyLoss()
    self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

  def forward(self):
    self.model.eval()
    with self.torch.no_grad():
      return self.model(self.x)

  def step(self):
    # The named ranges cost nothing unless a profiler is on (`profile_theirs`).
    rf = self.torch.profiler.record_function
    self.model.train()
    with rf('forward'):
      loss = self.criterion(self.model(self.x), self.y)
      value = loss.item()
    with rf('backward'):
      self.opt.zero_grad()
      loss.backward()
    with rf('optimizer'):
      self.opt.step()
    return value


# --------------------------------------------------------------------------- #
# Our side.
# --------------------------------------------------------------------------- #

class Ours:
  """Our deployed forward and our real training step for one method."""

  def __init__(self, method: str, batch_size: int):
    import jax  # pylint: disable=g-import-not-at-top
    from pyra_jax import benchmark  # pylint: disable=g-import-not-at-top
    from pyra_jax import throughput  # pylint: disable=g-import-not-at-top
    from pyra_jax.configs import vitb_high  # pylint: disable=g-import-not-at-top
    from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
    self.jax = jax
    config = vitb_high.get_config()
    mc = throughput.method_config(config.model, method, image_size=224,
                                  num_classes=NUM_CLASSES)
    model, params = throughput.deployed(mc, 224, throughput.DTYPES['float32'])
    x = jax.device_put(np.random.default_rng(0).normal(
        size=(batch_size, 224, 224, 3)).astype(np.float32))
    apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
    self.forward = lambda: apply(params, x)
    run = benchmark.train_run(config, method, image_size=224,
                              num_classes=NUM_CLASSES, dtype='float32')
    self.calls = benchmark.TrainStepCalls(run, benchmark.synthetic_batch(run, batch_size))
    self.step = self.calls.call_step
    self.trainable = sum(int(np.size(v)) for v in jax.tree.leaves(run.trainable))
    self.schedule = list(run.model.schedule)
    self.tokens = vit.num_tokens(run.model, 224)  # entering each block, then after the last


# --------------------------------------------------------------------------- #
# Timing.
# --------------------------------------------------------------------------- #

def _timed(fn, sync) -> float:
  t0 = time.perf_counter()
  sync(fn())
  return time.perf_counter() - t0


def compare(authors_repo: str, *, methods=METHODS, batch_size: int = 8,
            rounds: int = 5, warmup: int = 1, threads: int = 0,
            profile_calls: int = 0, gemms: bool = False) -> dict:
  """Times both sides, alternating; returns per-method seconds and paired ratios."""
  tv = _torchvision_or_stand_in()
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from pyra_jax import throughput  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  sync_jax = jax.block_until_ready
  sync_torch = lambda out: out
  sides = {}
  for m in methods:
    ours, theirs = Ours(m, batch_size), Theirs(m, authors_repo, batch_size)
    sides[m] = {'ours': ours, 'theirs': theirs}
  calls = {}
  for m in methods:
    o, t = sides[m]['ours'], sides[m]['theirs']
    calls[f'{m}/forward/ours'] = (o.forward, sync_jax)
    calls[f'{m}/forward/theirs'] = (t.forward, sync_torch)
    calls[f'{m}/train/ours'] = (o.step, sync_jax)
    calls[f'{m}/train/theirs'] = (t.step, sync_torch)
  gemm_sets = {}
  if gemms:
    for m in methods:
      gemm_sets[m] = gemm_calls(batch_size, sides[m]['ours'].tokens)
      for side in ('ours', 'theirs'):
        for what in ('forward', 'step', 'attention'):
          calls[f'gemms/{m}/{what}/{side}'] = (gemm_sets[m][side][what], lambda out: out)
  t_compile = time.perf_counter()
  for name, (fn, sync) in calls.items():  # compile (ours) and warm up (both)
    for _ in range(1 + warmup):
      sync(fn())
    print(f'warmed up {name} ({time.perf_counter() - t_compile:.0f} s)', file=sys.stderr,
          flush=True)
  t_compile = time.perf_counter() - t_compile
  times = {k: [] for k in calls}
  load_before = os.getloadavg()
  t0 = time.perf_counter()
  for i in range(rounds):
    for k, (fn, sync) in calls.items():
      times[k].append(_timed(fn, sync))
    print(f'round {i + 1}/{rounds}: ' + ', '.join(
        f'{k} {v[-1]:.2f} s' for k, v in times.items()), file=sys.stderr, flush=True)
  elapsed = time.perf_counter() - t0
  out = {'settings': {'batch_size': batch_size, 'rounds': rounds, 'warmup': warmup,
                      'image_size': 224, 'dtype': 'float32', 'num_classes': NUM_CLASSES,
                      'schedule': 'high', 'seconds': elapsed,
                      'compile_and_warmup_seconds': t_compile},
         'machine': {'cpu': throughput.cpu_name(), 'cpu_count': os.cpu_count(),
                     'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
                     'jax': jax.__version__, 'python': platform.python_version(),
                     'torchvision': tv},
         'load_average': {'before': load_before, 'after': os.getloadavg()},
         'times': times, 'methods': {}}
  for m in methods:
    rec = {'schedule': sides[m]['ours'].schedule,
           'trainable_params': {'ours': sides[m]['ours'].trainable,
                                'theirs': sides[m]['theirs'].trainable}}
    for what in ('forward', 'train'):
      o = np.asarray(times[f'{m}/{what}/ours'])
      t = np.asarray(times[f'{m}/{what}/theirs'])
      rec[what] = {'ours_seconds': float(np.median(o)), 'theirs_seconds': float(np.median(t)),
                   'ours_images_per_sec': batch_size / float(np.median(o)),
                   'theirs_images_per_sec': batch_size / float(np.median(t)),
                   'ratio': float(np.median(t / o)),  # ours/theirs throughput, paired
                   'ratio_min_max': [float((t / o).min()), float((t / o).max())]}
    out['methods'][m] = rec
  if gemm_sets:
    out['gemm_ceiling'] = {}
    for m, sets in gemm_sets.items():
      g = out['gemm_ceiling'][m] = {'gflops': sets['gflops']}
      for what, key in (('forward', 'forward'), ('step', 'train')):
        o = np.asarray(times[f'gemms/{m}/{what}/ours'])
        t = np.asarray(times[f'gemms/{m}/{what}/theirs'])
        model_t = np.asarray(times[f'{m}/{key}/theirs'])
        model_o = np.asarray(times[f'{m}/{key}/ours'])
        g[what] = {'ours_seconds': float(np.median(o)), 'theirs_seconds': float(np.median(t)),
                   'ours_gflops_per_s': sets['gflops'][what] / float(np.median(o)),
                   'theirs_gflops_per_s': sets['gflops'][what] / float(np.median(t)),
                   'ours_over_theirs_rate': float(np.median(t / o)),
                   # Within each round: their forward/step over our GEMMs.
                   'ceiling_ratio': float(np.median(model_t / o)),
                   'ours_share_in_gemms': float(np.median(o / model_o)),
                   'theirs_share_in_gemms': float(np.median(t / model_t))}
      # The attention cores, each side's own; with the dense GEMMs, at the
      # faster side's attention, a tighter bound on our step: their step over
      # (our GEMMs + the faster attention), per round.
      o = np.asarray(times[f'gemms/{m}/attention/ours'])
      t = np.asarray(times[f'gemms/{m}/attention/theirs'])
      bound = np.asarray(times[f'gemms/{m}/step/ours']) + np.minimum(o, t)
      g['attention'] = {'ours_seconds': float(np.median(o)),
                        'theirs_seconds': float(np.median(t)),
                        'ours_over_theirs_rate': float(np.median(t / o)),
                        'step_bound_seconds': float(np.median(bound)),
                        'step_ceiling_ratio': float(np.median(
                            np.asarray(times[f'{m}/train/theirs']) / bound))}
  if profile_calls > 0:  # after the timed rounds, so profiling cannot disturb them
    out['profiles'] = {}
    for m in methods:
      out['profiles'][m] = {
          'num_calls': profile_calls,
          'ours': profile_ours(sides[m]['ours'], profile_calls),
          'theirs': profile_theirs(sides[m]['theirs'].step, torch, profile_calls)}
  return out


# --------------------------------------------------------------------------- #
# Profiles: where each side's training step spends its time.
# --------------------------------------------------------------------------- #

# Their aten ops by part, named as pyra_jax.profiling names ours.
_TORCH_PARTS = {
    'dense matmul': ('aten::mm', 'aten::addmm', 'aten::convolution',
                     'aten::mkldnn_convolution', 'aten::_convolution',
                     'aten::convolution_backward'),
    'attention matmul': ('aten::bmm', 'aten::baddbmm'),
    'softmax': ('aten::_softmax', 'aten::_softmax_backward_data'),
    'gelu': ('aten::gelu', 'aten::gelu_backward'),
    'layernorm': ('aten::native_layer_norm', 'aten::native_layer_norm_backward'),
    'rng': ('aten::bernoulli_', 'aten::uniform_', 'aten::rand', 'aten::native_dropout',
            'aten::bernoulli'),
    'merge': ('aten::sort', 'aten::argsort', 'aten::topk', 'aten::gather',
              'aten::scatter_reduce', 'aten::scatter_reduce_', 'aten::scatter_add',
              'aten::scatter_add_', 'aten::max'),
}


def profile_theirs(step, torch, num_calls: int) -> dict:
  """ms per step of their step by phase (its named ranges) and part (aten ops'
  self time), in the rows `pyra_jax.profiling` uses for ours.

  The rows line up for the uncompressed step. In the merged ones aten names
  cannot tell code apart the way our name scopes do: ToMe's similarity matmul
  (`aten::bmm`) counts as attention matmul and PYRA's generator matmuls as
  dense here, both as merge on our side; `native_dropout`'s time includes its
  mask multiply, which ours counts as other.
  """
  from pyra_jax import profiling  # pylint: disable=g-import-not-at-top
  part_of = {op: part for part, ops in _TORCH_PARTS.items() for op in ops}
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(num_calls):
      step()
    wall = (time.perf_counter() - t0) / num_calls
  table = {ph: {} for ph in profiling.PHASES}
  ops_ms = 0.0
  for ev in prof.events():
    if ev.name in profiling.PHASES or ev.name.startswith('autograd::') \
        or ev.name.startswith('ProfilerStep'):
      continue
    phase, parent = None, ev.cpu_parent
    while parent is not None:
      if parent.name in profiling.PHASES:
        phase = parent.name
      parent = parent.cpu_parent
    if phase is None:
      phase = 'backward' if 'Backward' in ev.name else 'optimizer'
    ms = ev.self_cpu_time_total / 1e3 / num_calls
    part = part_of.get(ev.name, 'other')
    table[phase][part] = table[phase].get(part, 0.0) + ms
    ops_ms += ms
  return {'ms': table, 'ops_ms': ops_ms, 'wall_ms': wall * 1e3, 'num_calls': num_calls}


# The dense matmuls of one ViT-B/16 LoRA training step, per block with n tokens
# entering and n' after its merge (rows = batch x tokens): forward q, k, v, out
# on n, fc1 and fc2 on n', and the backward's input gradients dy @ W^T of each
# (the frozen kernels get no weight gradient; LoRA's rank-8 matmuls are left
# out). `tokens` is the model's token counts (`vit.num_tokens`).
def step_gemms(batch_size: int, tokens: list[int]) -> list[tuple[int, int, int]]:
  """The forward's dense GEMMs (m, k, n), all blocks; the step runs them twice."""
  out = []
  for n_in, n_out in zip(tokens[:-1], tokens[1:]):
    out += [(batch_size * n_in, 768, 768)] * 4
    out += [(batch_size * n_out, 768, 3072), (batch_size * n_out, 3072, 768)]
  return out


def gemm_calls(batch_size: int, tokens: list[int]) -> dict:
  """One method's dense GEMMs and attention cores, one call per framework per set.

  Returns {'ours'|'theirs': {'step'|'forward'|'attention': fn}, 'gflops': ...},
  each fn running the set once (all blocks) with that framework's own kernels
  and returning when done. They are timed in the same rounds as the models
  (`compare(..., gemms=True)`), so a ceiling is a within-round ratio like every
  other figure: no step can be faster than its own dense matmuls, so their
  step time over our GEMM time bounds how far ahead ours can get on this
  machine. 'forward' is the set's forward half (q, k, v, out, fc1, fc2 once),
  the same matmuls as our deployed forward (LoRA folded), and bounds the
  forward the same way. 'attention' is the step's attention cores
  (`attention_calls`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  forward = step_gemms(batch_size, tokens)
  gemms = forward * 2
  dot = jax.jit(lambda a, b: a @ b)
  ours, theirs = {}, {}
  for m, k, n in sorted(set(gemms)):
    a = rng.normal(size=(m, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    ours[(m, k, n)] = (jax.device_put(a), jax.device_put(b))
    theirs[(m, k, n)] = (torch.from_numpy(a), torch.from_numpy(b))

  def run_ours(shapes):
    for s in shapes:
      jax.block_until_ready(dot(*ours[s]))

  def run_theirs(shapes):
    for s in shapes:
      torch.mm(*theirs[s])

  attention_ours, attention_theirs = attention_calls(batch_size, tokens[:-1])
  return {'ours': {'step': lambda: run_ours(gemms), 'forward': lambda: run_ours(forward),
                   'attention': attention_ours},
          'theirs': {'step': lambda: run_theirs(gemms),
                     'forward': lambda: run_theirs(forward), 'attention': attention_theirs},
          'gflops': {'step': sum(2 * m * k * n for m, k, n in gemms) / 1e9,
                     'forward': sum(2 * m * k * n for m, k, n in forward) / 1e9}}


def attention_calls(batch_size: int, tokens: list[int]):
  """(ours, theirs): the step's attention cores, forward and backward.

  softmax(q k^T / sqrt(64)) v for 12 heads of n tokens, and its gradient with
  respect to q, k and v, once per block (n = `tokens[i]`, the tokens entering
  block i), as each side's model computes it: ours
  `pyra_jax.models.vit._attention_einsum` under `jax.vjp`, theirs timm 0.5.4's
  `Attention` core under autograd (both without the size bias of proportional
  attention: a lower bound). Its two forward and four backward batched
  matmuls are most of what a step does besides the dense GEMMs; the faster of
  the two sides bounds that part of a step from below on this machine (the
  tighter ceiling of `compare`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  fn = jax.jit(lambda q, k, v, g: jax.vjp(
      lambda *a: vit._attention_einsum(*a, None), q, k, v)[1](g))  # pylint: disable=protected-access
  ours_args, theirs_args = [], []
  for n in tokens:
    q, k, v, g = (rng.normal(size=(batch_size, n, 12, 64)).astype(np.float32)
                  for _ in range(4))
    ours_args.append([jax.device_put(a) for a in (q, k, v, g)])
    theirs_args.append([torch.from_numpy(a).permute(0, 2, 1, 3).contiguous()
                        for a in (q, k, v, g)])
    for t in theirs_args[-1][:3]:
      t.requires_grad_()

  def run_ours():
    for args in ours_args:
      jax.block_until_ready(fn(*args))

  def run_theirs():
    for tq, tk, tv, tg in theirs_args:
      attn = ((tq @ tk.transpose(-2, -1)) * 64 ** -0.5).softmax(dim=-1)
      torch.autograd.grad(attn @ tv, (tq, tk, tv), tg)

  return run_ours, run_theirs


def profile_ours(ours: 'Ours', num_calls: int) -> dict:
  """Our step's profile; only the step is compiled again (jax's cache), not
  the benchmark's helper programs, whose HLO the profile does not need."""
  from pyra_jax import profiling  # pylint: disable=g-import-not-at-top
  hlo = ours.calls.compiled_step().as_text()
  return profiling.profile_compiled(ours.step, hlo, num_calls)


def format_profiles(res: dict) -> str:
  """The ceiling line and, per method, ours and theirs side by side by part,
  with the difference: the column that says where our step loses."""
  from pyra_jax import profiling  # pylint: disable=g-import-not-at-top
  lines = []
  for m, g in res.get('gemm_ceiling', {}).items():
    lines.append('')
    for what in ('step', 'forward'):
      r = g[what]
      lines.append(
          f"{m}: dense GEMMs of the {what} alone ({g['gflops'][what]:.0f} GFLOP, same "
          f"rounds): ours {r['ours_seconds']:.2f} s ({r['ours_gflops_per_s']:.0f} GFLOP/s), "
          f"theirs {r['theirs_seconds']:.2f} s ({r['theirs_gflops_per_s']:.0f} GFLOP/s), our "
          f"rate / theirs {r['ours_over_theirs_rate']:.2f}; share of the {what} in them: ours "
          f"{r['ours_share_in_gemms']:.0%}, theirs {r['theirs_share_in_gemms']:.0%}; ceiling "
          f"on ours/theirs: {r['ceiling_ratio']:.2f}x")
    a = g['attention']
    lines.append(
        f"{m}: attention cores of the step (forward + backward, all blocks, same rounds): "
        f"ours {a['ours_seconds']:.2f} s, theirs {a['theirs_seconds']:.2f} s (our speed / "
        f"theirs {a['ours_over_theirs_rate']:.2f}); our dense GEMMs + the faster attention: "
        f"{a['step_bound_seconds']:.2f} s, ceiling on the step ours/theirs: "
        f"{a['step_ceiling_ratio']:.2f}x")
  for m, prof in res.get('profiles', {}).items():
    o, t = prof['ours'], prof['theirs']
    lines += ['', f'{m}: training step profile, ms per step ({prof["num_calls"]} calls '
              'each; ours: jax.profiler, theirs: torch.profiler self time)',
              '| phase / part | ours | theirs | ours - theirs |', '|---|---|---|---|']
    for ph in profiling.PHASES:
      for part in profiling.PARTS:
        a, b = o['ms'][ph].get(part, 0.0), t['ms'][ph].get(part, 0.0)
        if a or b:
          lines.append(f'| {ph} / {part} | {a:.1f} | {b:.1f} | {a - b:+.1f} |')
    lines.append(f"| all ops | {o['ops_ms']:.1f} | {t['ops_ms']:.1f} | "
                 f"{o['ops_ms'] - t['ops_ms']:+.1f} |")
    lines.append(f"| wall time while profiled | {o['wall_ms']:.1f} | {t['wall_ms']:.1f} | "
                 f"{o['wall_ms'] - t['wall_ms']:+.1f} |")
  return '\n'.join(lines)


def format_table(res: dict) -> str:
  s, mach = res['settings'], res['machine']
  lines = [f"ViT-B/16 224, batch {s['batch_size']}, fp32, schedule {s['schedule']}; "
           f"{s['rounds']} rounds ({s['seconds']:.0f} s); CPU {mach['cpu']} x{mach['cpu_count']}; "
           f"torch {mach['torch']} ({mach['torch_threads']} threads), jax {mach['jax']}; "
           f"load avg before/after {[round(x, 1) for x in res['load_average']['before']]}/"
           f"{[round(x, 1) for x in res['load_average']['after']]}",
           '',
           '| | forward, ours / theirs | one training step, ours / theirs |',
           '|---|---|---|']
  names = {'peft': 'uncompressed (PEFT)', 'tome': 'ToMe', 'pyra': 'PYRA'}
  for m, r in res['methods'].items():
    cell = lambda w: (f"{r[w]['ratio']:.2f}x ({r[w]['ours_images_per_sec']:.1f} vs "
                      f"{r[w]['theirs_images_per_sec']:.1f} img/s)")
    lines.append(f"| {names[m]} | {cell('forward')} | {cell('train')} |")
  lines.append('')
  lines.append('ratio: median over rounds of (their time / our time) within a round; '
               'img/s: median round.')
  return '\n'.join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--authors_repo', required=True,
                 help='A checkout of github.com/THU-MIG/PYRA (its model/ is imported).')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--threads', type=int, default=0,
                 help='torch intra-op threads (0: torch default, one per core).')
  p.add_argument('--profile_calls', type=int, default=0,
                 help='After timing, profile this many training steps of each side '
                      'and print ms per step by phase and part, side by side.')
  p.add_argument('--gemms', action='store_true',
                 help='Also time each method\'s step and forward dense GEMMs alone, '
                      'and its step\'s attention cores, in each framework, in the same '
                      'rounds (the ceilings).')
  p.add_argument('--out', default='')
  a = p.parse_args(argv)
  if not os.path.isfile(os.path.join(a.authors_repo, 'model', 'tome.py')):
    raise SystemExit(f'error: {a.authors_repo} has no model/tome.py: give a checkout '
                     'of github.com/THU-MIG/PYRA with --authors_repo.')
  methods = tuple(x for x in a.methods.split(',') if x)
  if not methods or any(m not in METHODS for m in methods):
    raise SystemExit(f'error: --methods: use some of {",".join(METHODS)}.')
  res = compare(os.path.abspath(a.authors_repo), methods=methods,
                batch_size=a.batch_size, rounds=a.rounds, warmup=a.warmup,
                threads=a.threads, profile_calls=a.profile_calls,
                gemms=a.gemms)
  print(format_table(res))
  extra = format_profiles(res)
  if extra:
    print(extra)
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(res, f, indent=2)
    print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
