"""PYRA's modulation-weight generators (and the ablation variants).

A generator sees the r size-weighted source tokens about to be merged and their
destinations, and returns re-activated sources (docs/algorithm.md §1, Eqs. 5-7).
It lives in the `pyra` scope of a merging block, with parameters sized by that
block's static r. Every variant starts exactly as ToMe when its zero-initialised
parameter is zero, except the two that have no such parameter (wr_only,
sigmoid_wr_only), which are a modulation from the first step by construction.

Variants (config `model.modulation`), all of the form src' = src * multiplier:
  pyra             1 + 2σ(W_rᵀM) · (2σ(M W_Dᵀ) − 1)            the paper
  low_rank         the mean of s such rank-one terms (W_r: r×s, W_D: s×D), Fig. 6
  no_sigmoid       1 + (1 + W_rᵀM) · (M W_Dᵀ)                   Table 6, "W_r & W_D w/o σ"
  wr_only          1 + W_rᵀM                                      Table 6, "W_r only"
  sigmoid_wr_only  2σ(W_rᵀM)                                      Table 6, "σ & W_r"
  wd_only          1 + M W_Dᵀ                                     Table 6, "W_D only"
  sigmoid_wd_only  1 + (2σ(M W_Dᵀ) − 1)                           Table 6, "σ & W_D"
  full_matrix      1 + (2σ(M ⊙ W) − 1), W: r×D (zeros)            Table 7, W_{D×r}
  mlp              pyra's form with each linear generator replaced by a gated
                   two-layer MLP of hidden width 4 (last layer zeros)   Table 8
"Without σ" replaces 2σ(z) by 1 + z and 2σ(z) − 1 by z: the same centre, no
squashing. These readings of the ablations are ours (the paper gives no formulas
for them); README "Decisions" records them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyra_jax import merge as merge_lib

MODULATIONS = ('pyra', 'low_rank', 'no_sigmoid', 'wr_only', 'sigmoid_wr_only',
               'wd_only', 'sigmoid_wd_only', 'full_matrix', 'mlp')
WR_INITS = ('uniform', 'normal')


def _wr_init(kind: str) -> Callable[..., jax.Array]:
  """U(-1, 1) is what PyTorch's kaiming_uniform(a=√5) gives on fan-in 1 (authors' code)."""
  if kind == 'uniform':
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, minval=-1.0, maxval=1.0)
  if kind == 'normal':
    return nn.initializers.normal(stddev=1.0)
  raise ValueError(f'model.wr_init must be one of {WR_INITS}, got {kind!r}.')


class NormParams(nn.Module):
  """The generator's LayerNorm parameters, `norm/{scale, bias}`.

  The normalisation itself is `merge.layer_norm`, shared with the pure equations,
  so the module and its numpy transcription compute the same thing.
  """

  @nn.compact
  def __call__(self, dim: int) -> tuple[jax.Array, jax.Array]:
    return (self.param('scale', nn.initializers.ones, (dim,)),
            self.param('bias', nn.initializers.zeros, (dim,)))


class PyraGenerator(nn.Module):
  """Modulates (B, r, D) size-weighted sources given their (B, r, D) destinations.

  Attributes:
    r: tokens merged in this layer (static; sizes W_r).
    modulation: one of MODULATIONS.
    rank: s, for modulation='low_rank'.
    wr_init: 'uniform' (authors' code) or 'normal' (the paper's text).
    ln_eps: epsilon of the generator's LayerNorm (1e-5, PyTorch's default).
    hidden: hidden width of the 'mlp' generator.
  """
  r: int
  modulation: str = 'pyra'
  rank: int = 1
  wr_init: str = 'uniform'
  ln_eps: float = 1e-5
  hidden: int = 4

  @nn.compact
  def __call__(self, src: jax.Array, dst: jax.Array) -> jax.Array:
    if self.modulation not in MODULATIONS:
      raise ValueError(
          f'model.modulation must be one of {MODULATIONS}, got {self.modulation!r}.')
    dim = src.shape[-1]
    scale, bias = NormParams(name='norm')(dim)
    dtype = src.dtype
    kind = self.modulation
    zeros = nn.initializers.zeros

    if kind in ('pyra', 'low_rank'):
      s = self.rank if kind == 'low_rank' else 1
      w_r = self.param('w_r', _wr_init(self.wr_init), (self.r, s))
      w_d = self.param('w_d', zeros, (s, dim))
      return merge_lib.pyra_modulation(src, dst, w_r.astype(dtype), w_d.astype(dtype),
                                       scale.astype(dtype), bias.astype(dtype),
                                       self.ln_eps)

    m = merge_lib.layer_norm(src + dst, scale.astype(dtype), bias.astype(dtype), self.ln_eps)
    if kind == 'mlp':
      h = self.hidden
      # Channel generator: contracts the r tokens (like W_r), gated, hidden h.
      c_fc1 = self.param('channel_fc1', _wr_init(self.wr_init), (self.r, h))
      c_gate = self.param('channel_gate', _wr_init(self.wr_init), (self.r, h))
      c_fc2 = self.param('channel_fc2', nn.initializers.normal(0.5), (h, 1))
      zc = jnp.einsum('bhd,hs->bsd', nn.gelu(jnp.einsum('brd,rh->bhd', m, c_fc1), approximate=False)
                      * jax.nn.sigmoid(jnp.einsum('brd,rh->bhd', m, c_gate)), c_fc2)
      # Token generator: contracts the D channels (like W_D), gated, hidden h.
      t_fc1 = self.param('token_fc1', nn.initializers.lecun_normal(), (dim, h))
      t_gate = self.param('token_gate', nn.initializers.lecun_normal(), (dim, h))
      t_fc2 = self.param('token_fc2', zeros, (h, 1))
      zt = (nn.gelu(m @ t_fc1, approximate=False) * jax.nn.sigmoid(m @ t_gate)) @ t_fc2
      return src + (src * (2.0 * jax.nn.sigmoid(zc))) * (2.0 * jax.nn.sigmoid(zt) - 1.0)

    if kind == 'full_matrix':
      w = self.param('w_full', zeros, (self.r, dim))
      return src + src * (2.0 * jax.nn.sigmoid(m * w) - 1.0)

    if kind in ('no_sigmoid', 'wr_only', 'sigmoid_wr_only'):
      w_r = self.param('w_r', _wr_init(self.wr_init), (self.r, 1))
      zc = jnp.einsum('brd,rs->bsd', m, w_r)  # (B, 1, D)
    if kind in ('no_sigmoid', 'wd_only', 'sigmoid_wd_only'):
      w_d = self.param('w_d', zeros, (1, dim))
      zt = m @ w_d.T  # (B, r, 1)
    if kind == 'no_sigmoid':
      return src + (src * (1.0 + zc)) * zt
    if kind == 'wr_only':
      return src + src * zc
    if kind == 'sigmoid_wr_only':
      return src * (2.0 * jax.nn.sigmoid(zc))
    if kind == 'wd_only':
      return src + src * zt
    return src + src * (2.0 * jax.nn.sigmoid(zt) - 1.0)  # sigmoid_wd_only
