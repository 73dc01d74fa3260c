"""The bottleneck Adapter of the authors' PYRA code (Tables 18-19), after the MLP.

    y = MLP(LN_2(x))                       the frozen branch (LayerScale'd if any)
    x ← x + (y + up(QuickGELU(down(y))))   QuickGELU(z) = z·σ(1.702 z)

down: D -> k and up: k -> D are dense layers with biases. Their init is
`model.adapter_init` (`ADAPTER_INITS`):

  'trunc_normal'  kernels N(0, 0.02²) cut at ±2 (absolute, as timm's
                  `trunc_normal_`: ±100 std, so in effect untruncated), biases
                  zero. What the authors' model holds once built: their Adapter
                  class sets Xavier kernels and N(0, 1e-6) biases, then their
                  ViT's `init_weights` re-initialises every nn.Linear this way,
                  the Adapter's included. The paper's Tables 18-19 start here.
  'xavier'        Xavier-uniform kernels, N(0, 1e-6) biases: the Adapter class's
                  own init, which their model overwrites.

Either way `up` is not zero, so the Adapter is *not* the identity at
initialisation. Dropout sits between the activation and `up` (training only).
Stochastic depth drops y before the Adapter sees it, so a dropped branch drops
the Adapter's output too (the authors' `x + adapter(drop_path(mlp(norm2(x))))`). The update is nonlinear in
y, so it cannot be folded into the frozen MLP: the deployed model keeps it
(docs/algorithm.md §13).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


ADAPTER_INITS = ('trunc_normal', 'xavier')


def timm_trunc_normal(std: float, bound: float = 2.0) -> Callable[..., jax.Array]:
  """timm's `trunc_normal_(t, std=std)`: N(0, std²) cut at ±`bound` *absolute*.

  timm's cut-off is in the tensor's units (a = -2, b = 2), not in standard
  deviations; at std 0.02 it lies 100 std out, so the draw is a plain normal
  with std 0.02. (flax's `truncated_normal(0.02)` cuts at ±2 std, giving a
  std of 0.0176: a different distribution.)
  """
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)
  return init


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
    init_scheme: an ADAPTER_INITS entry (module docstring).
  """
  dim: int
  dropout: float
  init_scheme: str  # not `init`, which would hide nn.Module.init
  dtype: Any

  @nn.compact
  def __call__(self, y: jax.Array, *, train: bool) -> jax.Array:
    if self.init_scheme == 'trunc_normal':
      kernel_init, bias_init = timm_trunc_normal(0.02), nn.initializers.zeros
    elif self.init_scheme == 'xavier':
      kernel_init = nn.initializers.xavier_uniform()
      bias_init = nn.initializers.normal(stddev=1e-6)
    else:
      raise ValueError(f'model.adapter_init must be one of {ADAPTER_INITS}, '
                       f'got {self.init_scheme!r}.')
    z = nn.Dense(self.dim, dtype=self.dtype, kernel_init=kernel_init,
                 bias_init=bias_init, name='down')(y)
    z = quick_gelu(z)
    z = nn.Dropout(rate=self.dropout, deterministic=not train)(z)
    return nn.Dense(y.shape[-1], dtype=self.dtype, kernel_init=kernel_init,
                    bias_init=bias_init, name='up')(z).astype(jnp.dtype(self.dtype))
