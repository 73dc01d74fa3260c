"""Convpass (Jie & Deng 2022): 3x3 convolutional bypasses beside attention and the MLP.

Each block gets two bypasses, `convpass/attn` and `convpass/mlp`, each fed the
same LayerNorm output as the branch it runs beside and added with a scale s:

    h = LN_1(x);  x ← x + Attn(h) + s·C_attn(h)
    h = LN_2(x);  x ← x + MLP(h)  + s·C_mlp(h)
    C(h) = up(dropout(QuickGELU(conv3x3(QuickGELU(down(h))))))

down: D -> k and up: k -> D are per-token dense layers (1x1 convolutions);
conv3x3 is a k -> k convolution with zero padding on the patch grid. A
prefix token (class, distillation) is convolved as a 1x1 image of its own:
with zero padding only the kernel's centre tap touches it. Initialisation
(their code): `down` Xavier-uniform, `up` kernel and bias zero (so the bypass
starts at zero and the model starts as the frozen backbone), conv bias zero,
conv kernel either the identity on the centre tap ('identity', their default)
or Xavier-uniform ('xavier', which their per-task configs pick for some tasks).
Stochastic depth drops each bypass independently of its branch.

Under token merging the tokens no longer form a grid. We run the convolution
on the grid of the *input patches*: each patch position takes the value of the
token that currently covers it (the source matrix of docs/algorithm.md §3),
the 3x3 convolution runs on that piecewise-constant grid, and each token
receives the mean of the results over the positions it covers. That mean is the
size-weighted average merging itself uses, so the bypass of a merged model is
"un-merge, convolve, merge again", and with no merge yet (the source matrix is
the identity) it is exactly the original Convpass. Convolving is linear, so
the down/activation stay per token; only the conv itself needs the grid.
Nothing here folds (the activations are nonlinear): the deployed model keeps
the bypasses (docs/algorithm.md §13).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyra_jax.models.adapter import quick_gelu

CONVPASS_INITS = ('identity', 'xavier')


def _conv_init(kind: str) -> Callable[..., jax.Array]:
  """The conv kernel's init, (3, 3, k_in, k_out) HWIO."""
  if kind == 'xavier':  # fan_in = 9 k_in, fan_out = 9 k_out, as PyTorch's for a conv
    return nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1)
  if kind == 'identity':
    def init(key, shape, dtype=jnp.float32):
      del key
      return jnp.zeros(shape, dtype).at[1, 1].set(jnp.eye(shape[2], shape[3], dtype=dtype))
    return init
  raise ValueError(f'model.convpass_init must be one of {CONVPASS_INITS}, got {kind!r}.')


def conv_tokens(z: jax.Array, kernel: jax.Array, bias: jax.Array, num_prefix: int,
                source: Optional[jax.Array]) -> jax.Array:
  """The 3x3 convolution of (B, N, k) token features, merged or not.

  Args:
    z: (B, N, k) features, the first `num_prefix` tokens being prefix tokens.
    kernel: (3, 3, k, k) HWIO; bias: (k,).
    num_prefix: class (+ distillation) tokens, each convolved as a 1x1 image.
    source: None when no token has been merged (then the N - num_prefix
      tokens are the row-major patch grid), else the (B, N, N0) 0/1 matrix whose
      row n marks the N0 input positions token n covers (prefix first).
  Returns:
    (B, N, k): per token, the convolution (averaged over its positions).
  """
  if source is not None:
    # Un-merge: every input position takes its token's value (one 1 per column).
    z_pos = jnp.einsum('bnm,bnk->bmk', source.astype(z.dtype), z)
  else:
    z_pos = z
  b, n0, k = z_pos.shape
  g = int(round((n0 - num_prefix) ** 0.5))
  if g * g != n0 - num_prefix:
    raise ValueError(f'Convpass needs a square patch grid, got {n0 - num_prefix} patches.')
  prefix = z_pos[:, :num_prefix] @ kernel[1, 1] + bias  # a 1x1 image: the centre tap
  grid = z_pos[:, num_prefix:].reshape(b, g, g, k)
  grid = jax.lax.conv_general_dilated(
      grid, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  out = jnp.concatenate([prefix, grid.reshape(b, g * g, k)], axis=1)
  if source is None:
    return out
  # Merge again: each token gets the mean over the positions it covers.
  src = source.astype(out.dtype)
  return jnp.einsum('bnm,bmk->bnk', src, out) / src.sum(axis=-1, keepdims=True)


class ConvBypass(nn.Module):
  """One bypass C(h) (module docstring), without the scale s.

  Parameters `down/{kernel (D, k), bias}`, `conv/{kernel (3, 3, k, k), bias}`,
  `up/{kernel (k, D), bias}`.
  """
  dim: int
  dropout: float
  init_scheme: str
  dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array, source: Optional[jax.Array], num_prefix: int, *,
               train: bool) -> jax.Array:
    z = nn.Dense(self.dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.zeros, name='down')(h)
    z = quick_gelu(z)
    kernel, bias = ConvParams((3, 3, self.dim, self.dim), _conv_init(self.init_scheme),
                              name='conv')()
    z = conv_tokens(z, kernel.astype(z.dtype), bias.astype(z.dtype), num_prefix, source)
    z = quick_gelu(z)
    z = nn.Dropout(rate=self.dropout, deterministic=not train)(z)
    return nn.Dense(h.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name='up')(z)


class ConvParams(nn.Module):
  """Declares the conv's `kernel` (HWIO) and `bias` and returns them."""
  kernel_shape: tuple[int, ...]
  kernel_init: Callable[..., jax.Array]

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return (self.param('kernel', self.kernel_init, self.kernel_shape),
            self.param('bias', nn.initializers.zeros, self.kernel_shape[-1:]))


class Convpass(nn.Module):
  """A block's two bypasses, under one `convpass` scope: `attn` and `mlp`.

  Call `attn_branch(LN_1(x), ...)` and `mlp_branch(LN_2(x), ...)`; each returns
  s·C(h). The source matrix passed is the one of the tokens at that point of
  the block (the attention bypass runs before this block's merge, the MLP
  bypass after it).
  """
  dim: int
  dropout: float
  init_scheme: str
  scale: float
  dtype: Any

  def setup(self):
    kw = dict(dim=self.dim, dropout=self.dropout, init_scheme=self.init_scheme,
              dtype=self.dtype)
    self.attn = ConvBypass(**kw)
    self.mlp = ConvBypass(**kw)

  def attn_branch(self, h: jax.Array, source: Optional[jax.Array], num_prefix: int, *,
                  train: bool) -> jax.Array:
    return self.scale * self.attn(h, source, num_prefix, train=train)

  def mlp_branch(self, h: jax.Array, source: Optional[jax.Array], num_prefix: int, *,
                 train: bool) -> jax.Array:
    return self.scale * self.mlp(h, source, num_prefix, train=train)
