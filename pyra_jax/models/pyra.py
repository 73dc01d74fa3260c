"""PYRA's modulation-weight generators and the paper's ablation variants.

A generator sees the r size-weighted source tokens about to be merged (M_s,
(B, r, D)) and their destinations (M_t), and returns re-activated sources. It
lives in the `pyra` scope of a merging block, with parameters sized by that
block's static r. Shared notation:

  M      = LN(M_s + M_t)            the generator's view of the pairs (eps 1e-5)
  δ_D    = W_rᵀ M   (B, 1, D)       W_r (r, 1) weighs the r pairs: one weight per channel
  δ_r    = M W_Dᵀ   (B, r, 1)       W_D (1, D) weighs the channels: one weight per pair
  g(z)   = 2σ(z) − 1                a gate in (−1, 1), zero at z = 0

Variants (config `model.modulation`). Every one keeps the residual form
M_s ← M_s + (·) ⊙ M_s and has a part initialised to zero that makes (·) zero,
so every variant starts exactly as ToMe and leaves it only by learning:

  pyra             M_s + g(δ_r) ⊙ (2σ(δ_D) ⊙ M_s)        the paper; W_D = 0, W_r ~ U(−1, 1)
  sigmoid_wr_only  M_s + g(δ_D) ⊙ M_s                     one channel generator; W_r = 0
  sigmoid_wd_only  M_s + g(δ_r) ⊙ M_s                     one token generator; W_D = 0
  wr_only          M_s + δ_D ⊙ M_s                        no σ; W_r = 0
  wd_only          M_s + δ_r ⊙ M_s                        no σ; W_D = 0
  no_sigmoid       M_s + δ_r ⊙ ((1 + δ_D) ⊙ M_s)          no σ; W_r = W_D = 0
  full_matrix      M_s + g(W) ⊙ M_s, W (r, D) = 0         learned directly: never sees the
                                                          tokens, so it has no LayerNorm
  mlp              M_s + g(δ) ⊙ M_s, δ = fc2(GELU(fc1(M)))  per token, D → 4 → D, no
                                                          biases; fc2 = 0; size independent of r
  low_rank         M_s + g(W) ⊙ M_s, W = δ_r δ_Dᵀ (B, r, D)  W_r (r, s), W_D (s, D) = 0:
                                                          a rank-s full-matrix weight made
                                                          from the tokens; no channel factor

A single generator takes the place of the token gate of PYRA's second step and
drops the first (the channel scaling 2σ(δ_D)), whichever generator it is.

"Without σ" (the plain forms) is degenerate if taken literally: 2σ(z) − 1
would become 2z − 1, which is −1 at z = 0 and deletes every source at
initialisation. We read σ's removal as removing only its squashing and keeping
its centre: 2σ(z) → 1 + z and 2σ(z) − 1 → z (σ's first-order expansion at 0,
its slope 1/2 folded into the learned weights), so a zero generator is still
the identity. Their W_r is zero-initialised too: with σ the U(−1, 1) init of W_r
is bounded to channel factors in (0, 2), but without σ it would multiply the
sources by 1 + W_rᵀM, factors of either sign and several units in size, from
the first step (an earlier reading did that and lost ~35 points on MNIST).
The single-generator σ forms zero-initialise their generator for the same
reason: to start as ToMe. `model.wr_init` applies only where the channel
factor is multiplied by a zero-initialised token factor (pyra, low_rank).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyra_jax import merge as merge_lib
from pyra_jax.models import activations

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


def _gate(z: jax.Array) -> jax.Array:
  """2σ(z) − 1: a signed weight in (−1, 1), exactly zero at z = 0."""
  return 2.0 * jax.nn.sigmoid(z) - 1.0


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

  In your own Flax ViT: one generator per merging block, created inside that
  block's compact `__call__` and passed to the merge, which calls it between
  gathering the sources and adding them into their destinations:

    plan = merge.bipartite_soft_matching(keys.mean(axis=2), r)
    if plan is not None:
      gen = PyraGenerator(r=plan.src_idx.shape[1], modulation='pyra', rank=1,
                          wr_init='uniform', ln_eps=1e-5, name='pyra')
      x, size = merge.merge_wavg(x, size, plan, modulate=gen)

  `r` must be the r the plan merges (plan.src_idx.shape[1], which is the r
  asked for unless merge.merge_cap lowered it): it sizes W_r. The values above
  are the paper's (the configs' defaults). At initialisation every variant
  returns `src` exactly, so a model with generators gives ToMe's output bit for
  bit until they are trained; adding generators to trained weights adds only
  the `pyra` parameters. A generator in the last block gets no gradient
  through the class token (nothing after that merge reaches it).

  Attributes:
    r: tokens merged in this layer (static; sizes W_r and full_matrix's W).
    modulation: one of MODULATIONS.
    rank: s, for modulation='low_rank'.
    wr_init: 'uniform' (authors' code) or 'normal' (the paper's text); used by
      pyra and low_rank only (see the module docstring).
    ln_eps: epsilon of the generator's LayerNorm.
    hidden: hidden width of the 'mlp' generator.
  """
  r: int
  modulation: str
  rank: int
  wr_init: str
  ln_eps: float
  hidden: int = 4

  @nn.compact
  def __call__(self, src: jax.Array, dst: jax.Array) -> jax.Array:
    if self.modulation not in MODULATIONS:
      raise ValueError(
          f'model.modulation must be one of {MODULATIONS}, got {self.modulation!r}.')
    dim = src.shape[-1]
    dtype = src.dtype
    kind = self.modulation
    zeros = nn.initializers.zeros

    if kind == 'full_matrix':
      # Deliberately token-independent: the same (r, D) weights for every image.
      w = self.param('w_full', zeros, (self.r, dim)).astype(dtype)
      return src + src * _gate(w)[None]

    scale, bias = NormParams(name='norm')(dim)
    if kind == 'pyra':
      w_r = self.param('w_r', _wr_init(self.wr_init), (self.r, 1))
      w_d = self.param('w_d', zeros, (1, dim))
      return merge_lib.pyra_modulation(src, dst, w_r.astype(dtype), w_d.astype(dtype),
                                       scale.astype(dtype), bias.astype(dtype),
                                       self.ln_eps)

    m = merge_lib.layer_norm(src + dst, scale.astype(dtype), bias.astype(dtype), self.ln_eps)
    if kind == 'mlp':
      fc1 = self.param('fc1', nn.initializers.lecun_normal(), (dim, self.hidden))
      fc2 = self.param('fc2', zeros, (self.hidden, dim))
      delta = activations.gelu(m @ fc1.astype(dtype)) @ fc2.astype(dtype)
      return src + src * _gate(delta)

    if kind == 'low_rank':
      w_r = self.param('w_r', _wr_init(self.wr_init), (self.r, self.rank))
      w_d = self.param('w_d', zeros, (self.rank, dim))
      channel = jnp.einsum('brd,rs->bsd', m, w_r.astype(dtype))  # δ_Dᵀ (B, s, D)
      token = jnp.einsum('brd,sd->brs', m, w_d.astype(dtype))    # δ_r  (B, r, s)
      w = jnp.einsum('brs,bsd->brd', token, channel)             # Wᵀ   (B, r, D)
      return src + src * _gate(w)

    if kind in ('no_sigmoid', 'wr_only', 'sigmoid_wr_only'):
      w_r = self.param('w_r', zeros, (self.r, 1))
      delta_d = (m * w_r.astype(dtype)[None]).sum(axis=1, keepdims=True)  # (B, 1, D)
    if kind in ('no_sigmoid', 'wd_only', 'sigmoid_wd_only'):
      w_d = self.param('w_d', zeros, (1, dim))
      delta_r = (m * w_d.astype(dtype)[None]).sum(axis=2, keepdims=True)  # (B, r, 1)
    if kind == 'no_sigmoid':
      return src + (src * (1.0 + delta_d)) * delta_r
    if kind == 'wr_only':
      return src + src * delta_d
    if kind == 'sigmoid_wr_only':
      return src + src * _gate(delta_d)
    if kind == 'wd_only':
      return src + src * delta_r
    return src + src * _gate(delta_r)  # sigmoid_wd_only
