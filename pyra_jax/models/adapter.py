"""The bottleneck Adapter of the authors' PYRA code (Tables 18-19), after the MLP.

    y = MLP(LN_2(x))                       the frozen branch (LayerScale'd if any)
    x ← x + (y + up(QuickGELU(down(y))))   QuickGELU(z) = z·σ(1.702 z)

down: D -> k and up: k -> D are dense layers with biases, both kernels
Xavier-uniform and both biases N(0, 1e-6), as the authors initialise them; so
the Adapter is *not* the identity at initialisation. Dropout sits between the
activation and `up` (training only). Stochastic depth drops y before the
Adapter sees it, so a dropped branch drops the Adapter's output too (the
authors' `x + adapter(drop_path(mlp(norm2(x))))`). The update is nonlinear in
y, so it cannot be folded into the frozen MLP: the deployed model keeps it
(docs/algorithm.md §13).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(z: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU, z·σ(1.702 z), which both the
  authors' Adapter and Convpass use."""
  return z * jax.nn.sigmoid(1.702 * z)


class Adapter(nn.Module):
  """Returns up(QuickGELU(down(y))) for the (B, N, D) MLP output y.

  Parameters `down/{kernel (D, k), bias (k,)}`, `up/{kernel (k, D), bias (D,)}`
  (the authors' `adapter.ln1` and `adapter.ln2`, transposed).

  Attributes:
    dim: k, the bottleneck width.
    dropout: rate of the dropout before `up`, training only.
  """
  dim: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, y: jax.Array, *, train: bool) -> jax.Array:
    kernel_init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    z = nn.Dense(self.dim, dtype=self.dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name='down')(y)
    z = quick_gelu(z)
    z = nn.Dropout(rate=self.dropout, deterministic=not train)(z)
    return nn.Dense(y.shape[-1], dtype=self.dtype, kernel_init=kernel_init,
                    bias_init=bias_init, name='up')(z).astype(jnp.dtype(self.dtype))
