"""SNF: the blocks' shortcuts replaced by small normalizing flows.

SNF (Wang et al., CVPR 2023) keeps both branches of a block frozen and adapts
the two identity shortcuts instead: `x + Attn(LN(x))` becomes
`f_attn(x) + Attn(LN(x))` and `x + MLP(LN(x))` becomes `f_mlp(x) + MLP(LN(x))`,
where each f is an invertible map (a normalizing flow) applied to every token
independently (docs/algorithm.md §15):

  z_0 = μ + exp(log σ) ⊙ x                       (element-wise affine)
  z_k = z_{k-1} + u_k · tanh(w_k · z_{k-1} + b_k)  (K planar steps, k = 1..K)
  f(x) = z_K

μ, log σ ∈ R^D start at zero (f starts as the identity, so the model starts as
the pretrained ViT); w_k, u_k ∈ R^D and b_k ∈ R start at U(-0.01, 0.01), as in
the authors' code. The flow's log-determinant is not used by the classifier
(the authors' block discards it too), so it is not computed.

The number of planar steps K is `model.snf_flow_length`. The paper reports
0.036M trainable parameters for ViT-B/16, which is 2 flows × 12 blocks × 2D =
36,864 at K = 0 (affine only); the authors' code defaults to K = 16
(0.63M at ViT-B). Our default is the paper's size (K = 0); set K for the planar steps.

SNF does not fold: the shortcut carries no linear map of the backbone to absorb
the affine step, and the planar steps are non-linear, so the deployed model
keeps the flows (`encoderblock_<i>/snf/{attn, mlp}/...`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class ShortcutFlow(nn.Module):
  """f: (..., D) -> (..., D), token-wise: affine, then `flow_length` planar steps.

  Parameters: `mu`, `log_sigma` (D,); with K > 0 planar steps also
  `planar_w`, `planar_u` (K, D) and `planar_b` (K,).
  """
  flow_length: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    mu = self.param('mu', nn.initializers.zeros, (d,)).astype(self.dtype)
    log_sigma = self.param('log_sigma', nn.initializers.zeros, (d,)).astype(self.dtype)
    z = mu + jnp.exp(log_sigma) * x
    if self.flow_length > 0:
      k = self.flow_length
      w = self.param('planar_w', _uniform(0.01), (k, d)).astype(self.dtype)
      u = self.param('planar_u', _uniform(0.01), (k, d)).astype(self.dtype)
      b = self.param('planar_b', _uniform(0.01), (k,)).astype(self.dtype)
      for i in range(k):
        z = z + u[i] * jnp.tanh(z @ w[i] + b[i])[..., None]
    return z


class SNF(nn.Module):
  """`encoderblock_<i>/snf`: the flows of the block's two shortcuts.

  `SNF(...)(x, 'attn')` is the shortcut around attention, `(x, 'mlp')` the
  one around the MLP.
  """
  flow_length: int
  dtype: Any

  def setup(self):
    self.attn = ShortcutFlow(self.flow_length, self.dtype)
    self.mlp = ShortcutFlow(self.flow_length, self.dtype)

  def __call__(self, x: Array, which: str) -> Array:
    return self.attn(x) if which == 'attn' else self.mlp(x)
