"""FacT: the weight increments of all layers as one factorised tensor, and its folding.

FacT (Jie & Deng, AAAI 2023) views the increments of every linear map of the
ViT as slices of one tensor ΔW (12L, D, D): per layer q, k, v, the attention
output, and the MLP's fc1 (D, 4D) and fc2 (4D, D) cut into four (D, D) slices
each. The tensor is factorised with two factor matrices shared by every slice,
U (D, r) on the input side and V (r, D) on the output side, and one (r, r) core
per slice:

  tt (Tensor-Train)  every slice has its own learned core Σ_i (r, r);
  tk (Tucker)        the cores are one learned (r, r, r) tensor C mixed by a
                     learned row P_i (r) of the third factor P (12L, r):
                     Σ_i = Σ_c C[:, :, c] P_i[c].

For tk, which core feeds which MLP slice is `model.fact_tk_layout`
(`FACT_TK_LAYOUTS`, `tk_mlp_cores`): 'paper' gives slice i the core Σ_i
above; 'authors' is the FacT code's (`FacT/fact_tk.py`), where the m fc1
cores, stacked as an (r, r, m) tensor, are read back as one (r, m·r) matrix
whose m column blocks feed the m slices, so each slice's core interleaves
entries of all m cores (likewise fc2, read through the transpose). The
published FacT-TK numbers come from that layout.

So ΔW_i = s · U Σ_i V with a fixed scale s; the module computes it as
s · ((x U) Σ_i) V, with dropout on (x U) Σ_i in training. V starts at zero, so
FacT starts as the identity (docs/algorithm.md §14). Every increment is linear
in x, which is why `fold_fact` can add s · U Σ_i V to the frozen kernels for
deployment: same logits, no FacT parameter left, no extra FLOPs.

Where the parameters live (stable names): U and V (and for tk, C and P) are
shared by all layers, under `Transformer/fact/{u, v, core, factors}`; a tt
model's per-layer cores are under `Transformer/encoderblock_<i>/fact/{query,
key, value, out, fc1, fc2}`, fc1/fc2 stacked as (m, r, r) over their m = 4
slices. Slice j of fc1 feeds output columns [jD, (j+1)D) of the fc1 kernel;
slice j of fc2 reads input rows [jD, (j+1)D) of the fc2 kernel.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
FACT_VARIANTS = ('tt', 'tk')
FACT_TK_LAYOUTS = ('authors', 'paper')
# Per layer, in the order of the rows of the tk factor P: 4 attention slices,
# then `mlp_slices` slices of fc1 and as many of fc2.
ATTENTION_SLICES = ('query', 'key', 'value', 'out')


def slices_per_layer(mlp_slices: int) -> int:
  return len(ATTENTION_SLICES) + 2 * mlp_slices


def _uniform(bound: float) -> Callable[..., Array]:
  """U(-bound, bound): the FacT code's inits have explicit fan-in bounds."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class FactShared(nn.Module):
  """`Transformer/fact`: the factors shared by all layers.

  Returns {'u': (D, r), 'v': (r, D)} and, for tk, the (m_total, r, r) cores
  of every slice of every layer computed from C and P. Inits (the authors'
  code): U as a PyTorch Linear(D, r), U(±1/√D); V zero; C and P Xavier-uniform
  with PyTorch's fans (C: r² in and out; P: 12L and r).
  """
  variant: str
  rank: int
  num_slices: int  # 12L: every slice of every layer

  @nn.compact
  def __call__(self, width: int) -> dict[str, Array]:
    r = self.rank
    out = {'u': self.param('u', _uniform(1 / math.sqrt(width)), (width, r)),
           'v': self.param('v', nn.initializers.zeros, (r, width))}
    if self.variant == 'tk':
      core = self.param('core', _uniform(math.sqrt(6 / (2 * r * r))), (r, r, r))
      factors = self.param('factors', _uniform(math.sqrt(6 / (self.num_slices + r))),
                           (self.num_slices, r))
      out['cores'] = jnp.einsum('abc,ic->iab', core, factors)
    return out


class FactLayerCores(nn.Module):
  """`encoderblock_<i>/fact` of a tt model: this layer's own (r, r) cores.

  Inits as the authors' code's PyTorch Linear layers, U(±1/√fan_in): fan-in r
  for q/k/v/out and fc1 (a Linear r -> m·r), m·r for fc2 (a Linear m·r -> r).
  """
  rank: int
  mlp_slices: int

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    r, m = self.rank, self.mlp_slices
    cores = {name: self.param(name, _uniform(1 / math.sqrt(r)), (r, r))
             for name in ATTENTION_SLICES}
    cores['fc1'] = self.param('fc1', _uniform(1 / math.sqrt(r)), (m, r, r))
    cores['fc2'] = self.param('fc2', _uniform(1 / math.sqrt(m * r)), (m, r, r))
    return cores


def tk_mlp_cores(fc1: Array, fc2: Array) -> tuple[Array, Array]:
  """The FacT code's use of a layer's tk MLP cores, as per-slice cores.

  `fc1`, `fc2`: (m, r, r), the cores Σ_c C[:, :, c] P[i, c] of the layer's m
  fc1 rows of P, then its m fc2 rows (the paper's per-slice cores). The FacT
  code (`fact_forward_mlp` in FacT/fact_tk.py) keeps them as one (r, r, m)
  tensor G, G[a, b, j] = core j's [a, b], and reshapes it row-major:

    fc1: M = G.reshape(r, m·r); the (B, N, m·r) product (x U) M is read as
         (B, N, m, r), so slice p uses M's columns [p·r, (p+1)·r):
         K_p[a, q] = M[a, p·r + q].
    fc2: M = G.reshape(r, m·r); the fc2 input's m slices, each times U, are
         concatenated to (B, N, m·r) and multiplied by Mᵀ:
         K_p[q, a] = M[a, p·r + q].

  Returns (fc1, fc2) as (m, r, r) cores in our layout: slice p computes
  (x_p U) K_p. Each K_p mixes entries of all m cores, unlike the paper's
  K_p = core p.
  """
  m, r, _ = fc1.shape
  g1 = fc1.transpose(1, 2, 0).reshape(r, m * r)  # M[a, b·m + j] = core_j[a, b]
  g2 = fc2.transpose(1, 2, 0).reshape(r, m * r)
  k1 = g1.reshape(r, m, r).transpose(1, 0, 2)    # [p, a, q] = M[a, p·r + q]
  k2 = g2.reshape(r, m, r).transpose(1, 2, 0)    # [p, q, a] = M[a, p·r + q]
  return k1, k2


def layer_cores(stacked: Array, layer: int, mlp_slices: int,
                tk_layout: str) -> dict[str, Array]:
  """Layer `layer`'s cores, from the tk (12L, r, r) stack, in the tt layout.

  `tk_layout` (FACT_TK_LAYOUTS): 'paper' gives MLP slice i its own core;
  'authors' the FacT code's interleaving (`tk_mlp_cores`).
  """
  if tk_layout not in FACT_TK_LAYOUTS:
    raise ValueError(f'model.fact_tk_layout must be one of {FACT_TK_LAYOUTS}, '
                     f'got {tk_layout!r}.')
  n = slices_per_layer(mlp_slices)
  c = stacked[layer * n:(layer + 1) * n]
  cores = {name: c[i] for i, name in enumerate(ATTENTION_SLICES)}
  a = len(ATTENTION_SLICES)
  cores['fc1'] = c[a:a + mlp_slices]
  cores['fc2'] = c[a + mlp_slices:]
  if tk_layout == 'authors':
    cores['fc1'], cores['fc2'] = tk_mlp_cores(cores['fc1'], cores['fc2'])
  return cores


class FactDelta(nn.Module):
  """Computes FacT increments for one layer (no parameters: it gets them).

  `fact` holds 'u', 'v' and this layer's 'cores'. Methods return the
  increment of a linear map's *output* for its input x.
  """
  scale: float
  dropout: float
  dtype: Any

  def _drop(self, h: Array, train: bool) -> Array:
    return nn.Dropout(self.dropout, deterministic=not train)(h)

  @nn.compact
  def __call__(self, x: Array, fact: Mapping[str, Any], name: str, *,
               train: bool) -> Array:
    u = fact['u'].astype(self.dtype)
    v = fact['v'].astype(self.dtype)
    core = fact['cores'][name].astype(self.dtype)
    if name == 'fc1':   # (B, N, D) -> (B, N, m·D), slice j -> columns [jD, (j+1)D)
      h = self._drop(jnp.einsum('bnr,jrk->bnjk', x @ u, core), train)
      y = h @ v
      return self.scale * y.reshape(y.shape[:2] + (-1,))
    if name == 'fc2':   # (B, N, m·D) -> (B, N, D), slice j reads rows [jD, (j+1)D)
      m = core.shape[0]
      xu = x.reshape(x.shape[:2] + (m, -1)) @ u
      h = self._drop(jnp.einsum('bnjr,jrk->bnk', xu, core), train)
      return self.scale * (h @ v)
    return self.scale * (self._drop((x @ u) @ core, train) @ v)


def _increments(u: Array, v: Array, cores: Mapping[str, Array], scale: float
                ) -> dict[str, Array]:
  """The (in, out) weight increments s · U Σ V of one layer."""
  def one(c):
    return scale * (u @ c @ v)
  out = {name: one(cores[name]) for name in ATTENTION_SLICES}
  out['fc1'] = jnp.concatenate([one(c) for c in cores['fc1']], axis=1)  # (D, m·D)
  out['fc2'] = jnp.concatenate([one(c) for c in cores['fc2']], axis=0)  # (m·D, D)
  return out


def fold_fact(params: Mapping[str, Any], scale: float, *,
              tk_layout: str) -> dict[str, Any]:
  """Adds s · U Σ_i V to every frozen kernel FacT adapts and removes FacT.

  `tk_layout` is the model's `fact_tk_layout` (a tk tree only; see
  `layer_cores`).

  The result is the parameter tree of the same model with `peft='lora'` and
  `lora_rank=0` (see `pyra_jax.models.vit.deployed_config`): a plain ViT with
  the same logits.
  """
  params = dict(params)  # copied level by level below: the input is not changed
  enc = dict(params['Transformer'])
  shared = enc.pop('fact')
  u, v = jnp.asarray(shared['u']), jnp.asarray(shared['v'])
  blocks = sorted((k for k in enc if k.startswith('encoderblock_')),
                  key=lambda k: int(k.rsplit('_', 1)[1]))
  stacked = None
  if 'core' in shared:
    stacked = jnp.einsum('abc,ic->iab', jnp.asarray(shared['core']),
                         jnp.asarray(shared['factors']))
  for layer, name in enumerate(blocks):
    block = dict(enc[name])
    if stacked is None:
      cores = {k: jnp.asarray(c) for k, c in block.pop('fact').items()}
    else:
      mlp_slices = (stacked.shape[0] // len(blocks) - len(ATTENTION_SLICES)) // 2
      cores = layer_cores(stacked, layer, mlp_slices, tk_layout)
    inc = _increments(u, v, cores, scale)
    attn = dict(block['MultiHeadDotProductAttention_0'])
    for proj in ('query', 'key', 'value', 'out'):
      k = jnp.asarray(attn[proj]['kernel'])
      attn[proj] = dict(attn[proj], kernel=k + inc[proj].reshape(k.shape).astype(k.dtype))
    block['MultiHeadDotProductAttention_0'] = attn
    mlp = dict(block['MlpBlock_0'])
    for dense, key in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      k = jnp.asarray(mlp[dense]['kernel'])
      mlp[dense] = dict(mlp[dense], kernel=k + inc[key].astype(k.dtype))
    block['MlpBlock_0'] = mlp
    enc[name] = block
  params['Transformer'] = enc
  return params


def has_fact(params: Optional[Mapping[str, Any]]) -> bool:
  return isinstance(params, Mapping) and 'fact' in params.get('Transformer', {})
