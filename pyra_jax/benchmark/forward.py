"""Forward mode: the deployed models timed round-robin with the tool's extras.

`throughput.run_forward` times the models and the reference matmul; this adds,
in the same rounds, the merge operations alone (their share of the model's
time) and each model's dense-layer matmuls (`gemm.dense_layers_call`, the
speed-up ceiling).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import merge as merge_lib
from pyra_jax import throughput
from pyra_jax.benchmark import gemm
from pyra_jax.models import vit

PyTree = Any


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


def run_forward(config: ml_collections.ConfigDict, *, batch_size: int = 8,
                dtype: str = 'float32', image_size: int = 0, num_iters: int = 10,
                min_seconds: float = 0.0, warmup: int = 2, matmul_size: int = 2048,
                methods: Sequence[str] = throughput.DEFAULT_METHODS, params_path: str = '',
                num_classes: int = 100, gemm_bound: bool = True,
                reference_model: Optional[ml_collections.ConfigDict] = None,
                warmup_seconds: float = 0.0,
                peft_modules: Sequence[str] = (),
                schedules_: Sequence[str] = ()) -> dict[str, Any]:
  """`throughput.run_forward` plus the tool's extras, timed in the same rounds.

  gemm_bound: also time each model's dense-layer matmuls alone
  (`gemm.dense_layers_call`) and report the speed-up they allow. When something
  merges, the merge operations alone (`merge_ops_call`) are timed too, for
  their share of the model's time. Other arguments: `throughput.run_forward`.
  """
  load_before = throughput.load_average()
  jdtype = throughput.DTYPES[dtype]
  fm = throughput.build_forward(config, batch_size=batch_size, dtype=dtype, image_size=image_size,
                     methods=methods, params_path=params_path, num_classes=num_classes,
                     reference_model=reference_model, peft_modules=peft_modules,
                     schedules_=schedules_)
  image_size, timed, cfgs, models = fm.image_size, fm.timed, fm.cfgs, fm.models
  calls = dict(fm.calls)
  mm, mm_flops = throughput.matmul_call(matmul_size, jdtype)
  calls['matmul'] = mm
  dense_flops = {}
  if gemm_bound:
    for m in timed:
      model, params = models[m]
      calls[f'{m}:dense'], dense_flops[m] = gemm.dense_layers_call(
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
  times = throughput.round_robin(calls, num_iters=num_iters, min_seconds=min_seconds,
                      warmup=warmup, warmup_seconds=warmup_seconds)
  out = throughput.forward_results(config, fm, times, dtype=dtype, warmup=warmup,
                        warmup_seconds=warmup_seconds,
                        elapsed=time.perf_counter() - t0, load_before=load_before,
                        matmul_size=matmul_size, matmul_flops=mm_flops)
  recompiled = out.pop('recompiled')  # stays the last key
  if merge_call is not None:
    sec, _ = throughput.median_iqr(times['merge_ops'])
    out['merge_ops'] = {'model': merge_owner, 'seconds': sec,
                        'share_of_model': throughput.paired_median(times['merge_ops'],
                                                        times[merge_owner])}
  if gemm_bound:
    out['gemm_bound'] = gemm.gemm_bound(timed, times, out['models'], dense_flops,
                                    mm_flops)
  out['recompiled'] = recompiled
  return out
