"""The GEMM ceiling: each model's dense-layer matmuls alone, at its token counts.

A merged model does most of its work on few tokens, where a CPU matmul runs
well below its large-matrix rate; the speed-up these matmuls alone allow is the
ceiling a model's speed-up is compared with (`gemm_bound` in the results).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from pyra_jax import schedules
from pyra_jax import throughput
from pyra_jax.models import vit

PyTree = Any


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


def gemm_bound(methods: Sequence[str], times: dict[str, list[float]],
               models: dict[str, dict[str, Any]], dense_flops: dict[str, float],
               mm_flops: float) -> dict[str, Any]:
  """Per model: its dense matmuls' time and rate, the speed-up they allow
  (paired, over the baseline's dense matmuls) and the share of it achieved."""
  base = models[methods[0]]['baseline']
  out = {}
  for m in methods:
    key = f'{m}:dense'
    sec, _ = throughput.median_iqr(times[key])
    bound = throughput.paired_median(times[f'{base}:dense'], times[key])
    out[m] = {'seconds': sec, 'gflops': dense_flops[m] / 1e9,
              'gflops_per_s': dense_flops[m] / sec / 1e9,
              'matmul_fraction': dense_flops[m] / mm_flops
                                 * throughput.paired_median(times['matmul'], times[key]),
              'speedup_bound': bound,
              'speedup_over_bound': models[m]['speedup'] / bound,
              'round_seconds': list(times[key])}
  return out
