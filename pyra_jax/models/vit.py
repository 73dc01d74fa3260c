"""The Vision Transformer of pyra_jax: frozen backbone + LoRA + token merging + PYRA.

Parameter names and shapes follow the linen layout of
google-research/vision_transformer (docs/architecture.md has the full tree), so
converted checkpoints load by name. The block's order of operations is
docs/algorithm.md §1: LN -> attention (q/k/v + LoRA, proportional attention) ->
residual -> merge (matching on the head-mean keys, PYRA on the size-weighted
sources) -> LN -> MLP -> residual.

Speed notes (see README "Performance"; measured with `pyra_jax.benchmark`):
q/k/v are three (D, D) matmuls on the stored kernels (concatenating them into
one (D, 3D) kernel copies 7 MB per layer per call on ViT-B: XLA does not hoist
it, and it cost ~9% of a merged model); attention runs on a (B, H, N, hd)
layout, heads as a leading batch dimension (the (B, N, H, hd) einsums were ~4x
slower on XLA:CPU), with the softmax normalisation applied to the (B, H, N, hd)
output rather than the (B, H, N, N) weights; the patch embedding is a reshape
+ matmul rather than a strided convolution. The exact (erf) GELU stays: it
costs ~3-4% of the forward.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import merge as merge_lib
from pyra_jax import schedules
from pyra_jax.models import activations
from pyra_jax.models.adapter import ADAPTER_INITS, Adapter
from pyra_jax.models.convpass import CONVPASS_INITS, Convpass
from pyra_jax.models import fact as fact_lib
from pyra_jax.errors import ConfigError
from pyra_jax.methods import ats as ats_lib
from pyra_jax.methods import diffrate as diffrate_lib
from pyra_jax.methods import evit as evit_lib
from pyra_jax.methods import ltmp as ltmp_lib
from pyra_jax.methods import tofu as tofu_lib
from pyra_jax.field_ranges import Choices, Range, check_fields
from pyra_jax.models.lora import LORA_INITS, LoRA
from pyra_jax.models.snf import SNF
from pyra_jax.models.pyra import MODULATIONS, WR_INITS, PyraGenerator

Array = jax.Array

# name -> (width, depth, num_heads, mlp_dim); the patch size comes from '/NN'.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}
METHODS = ('peft', 'tome', 'pyra',
           'evit', 'tofu', 'ats',
           'ltmp', 'diffrate')
# Methods whose token reduction keeps a source matrix (what Convpass needs).
MERGING_METHODS = ('peft', 'tome', 'pyra')
# Methods that need the class token's attention (Attention.return_cls_attn).
CLS_ATTN_METHODS = ('evit', 'ats')
# The trainable module (config.model.peft; docs/algorithm.md §13-15). Each keeps its
# parameters under its own scope name, the module's name, so one regex selects
# them; anything but 'lora' turns LoRA off.
PEFT_MODULES = ('lora', 'adapter', 'convpass', 'fact', 'snf')
# How Attention computes softmax(q k^T / sqrt(hd) + log size) v (config.model.attention).
ATTENTION_IMPLEMENTATIONS = ('einsum', 'dot_product_attention')
# A distilled (DeiT) model's logits: 'cls' (the class token's head) or 'avg'
# (the mean of it and the distillation token's head_dist), in evaluation
# (model.distilled_eval) and in training (model.distilled_train; 'as_eval':
# the evaluation's, the behaviour before the two could differ).
DISTILLED_HEADS = ('cls', 'avg')
DISTILLED_TRAIN = ('as_eval',) + DISTILLED_HEADS


def distilled_train_head(model_config: ml_collections.ConfigDict) -> str:
  """The heads a distilled model's training logits read: 'cls' or 'avg'.

  'as_eval' (the default) is `distilled_eval`'s; the authors' code trains the
  class-token head and averages both heads at evaluation (`distilled_train =
  'cls'`, `distilled_eval = 'avg'`, docs/algorithm.md §8).
  """
  train = _field(model_config, 'distilled_train')
  if train not in DISTILLED_TRAIN:
    raise ConfigError(f'model.distilled_train must be one of {DISTILLED_TRAIN}, '
                      f'got {train!r}.')
  evaluation = _field(model_config, 'distilled_eval')
  if evaluation not in DISTILLED_HEADS:
    raise ConfigError(f'model.distilled_eval must be one of {DISTILLED_HEADS}, '
                      f'got {evaluation!r}.')
  return evaluation if train == 'as_eval' else train


class ParamsOnly(nn.Module):
  """Declares `kernel` (and `bias`) under its own name and returns them.

  Lets a fused computation keep the per-projection parameter names that
  checkpoints use (`query/kernel`, `key/kernel`, ...).
  """
  kernel_shape: tuple[int, ...]
  bias_shape: Optional[tuple[int, ...]]
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self) -> tuple[Array, Optional[Array]]:
    kernel = self.param('kernel', self.kernel_init, self.kernel_shape)
    bias = (self.param('bias', nn.initializers.zeros, self.bias_shape)
            if self.bias_shape is not None else None)
    return kernel, bias


def embed_patches(images: Array, kernel: Array, bias: Array, dtype: Any) -> Array:
  """Non-overlapping P x P patches -> D with `embedding/{kernel (P,P,3,D), bias}`.

  Equal to the strided convolution of the original ViT, computed as a reshape
  and one matmul, which XLA:CPU runs faster than a convolution.
  """
  b, h, w, c = images.shape
  p, d = kernel.shape[0], kernel.shape[-1]
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, (h // p) * (w // p), p * p * c).astype(dtype)
  return x @ kernel.reshape(p * p * c, d).astype(dtype) + bias.astype(dtype)


def _log_size_bias(size: Optional[Array]) -> Optional[Array]:
  """Proportional attention: log(size) of each key, as a (B, 1, 1, N) logit bias.

  A key standing for s merged tokens gets the softmax weight of s copies of
  itself; the bias broadcasts over heads and queries.
  """
  if size is None:
    return None
  return jnp.log(size)[:, None, None, :, 0]


def _attention_einsum(q: Array, k: Array, v: Array, size: Optional[Array]) -> Array:
  """softmax(q k^T / sqrt(hd) + log size) v on (B, N, H, hd) inputs, for XLA:CPU."""
  hd = q.shape[-1]
  # (B, H, N, hd): heads become a leading batch dimension of both attention
  # matmuls. XLA:CPU runs 'bhqd,bhkd' batched dots several times faster than
  # the same dots on the (B, N, H, hd) layout, where the batch dims are not
  # leading; the transposes fuse with the bias add that produced q, k, v.
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * (hd ** -0.5), k).astype(jnp.float32)
  bias = _log_size_bias(size)
  if bias is not None:
    logits = logits + bias
  # Softmax with the normalisation deferred past the value matmul: divide the
  # (B, H, N, hd) output by the row sums instead of the (B, H, N, N) weights,
  # saving one pass over the N x N matrix (same result up to round-off).
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v)
  out = out / e.sum(axis=-1, keepdims=True).astype(v.dtype)
  return out.transpose(0, 2, 1, 3)


def _attention_jax(q: Array, k: Array, v: Array, size: Optional[Array]) -> Array:
  """The same attention through `jax.nn.dot_product_attention` ((B, N, H, hd) in and out).

  `implementation=None` lets JAX pick the implementation (JAX 0.10 picks XLA
  on every backend; choosing cuDNN's fused kernel is left to JAX). q, k, v
  stay in the (B, N, H, hd) layout the projections produce: no transposes.
  """
  return jax.nn.dot_product_attention(
      q, k, v, bias=_log_size_bias(size), scale=q.shape[-1] ** -0.5,
      implementation=None)


def _class_attention(q: Array, k: Array, size: Optional[Array]) -> Array:
  """(B, H, N) float32: softmax over keys of the class-token query's logits.

  Computed from q[:, 0] and k alone (one query: cheap), with the log-size bias
  when proportional attention is on, so either attention implementation can
  return it.
  """
  hd = q.shape[-1]
  logits = jnp.einsum('bhd,bnhd->bhn', q[:, 0] * (hd ** -0.5), k).astype(jnp.float32)
  bias = _log_size_bias(size)
  if bias is not None:
    logits = logits + bias[:, :, 0]
  return jax.nn.softmax(logits, axis=-1)


def _attention_masked(q: Array, k: Array, v: Array, size: Optional[Array],
                      mask: Optional[Array], eps: float,
                      keep_self: bool) -> tuple[Array, Array]:
  """Attention whose keys are weighted by a token mask; also returns the weights.

  softmax(q k^T / sqrt(hd) + log size) with exp(.) multiplied by mask (B, N)
  before normalising (+ eps, `ltmp_lib.masked_softmax`); with keep_self every
  query also keeps its own key (DiffRate's search). Returns (out (B, N, H, hd),
  probs (B, H, N, N) float32). The (B, H, N, N) weights are materialised, for
  the methods that score tokens by the attention they receive.
  """
  hd = q.shape[-1]
  q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q * (hd ** -0.5), k).astype(jnp.float32)
  bias = _log_size_bias(size)
  if bias is not None:
    logits = logits + bias
  n = logits.shape[-1]
  if mask is None:
    mask = jnp.ones(logits.shape[:1] + (n,), jnp.float32)
  mask = mask.astype(jnp.float32)
  if keep_self:
    w = mask[:, None, None, :]
    w = w + (1.0 - w) * jnp.eye(n, dtype=jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))) * w
    probs = ((e + eps / n) / (e.sum(axis=-1, keepdims=True) + eps) if eps else
             e / e.sum(axis=-1, keepdims=True))
  else:
    probs = ltmp_lib.masked_softmax(logits, mask, eps)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
  return out.transpose(0, 2, 1, 3), probs


class Attention(nn.Module):
  """Multi-head self-attention with LoRA on q/k/v and proportional attention.

  Returns the attention output and the merge metric: the keys (after LoRA)
  averaged over heads, (B, N, D/H).

  `implementation` chooses how softmax(q k^T / sqrt(hd) + log size) v is
  computed; both use the same parameters and give the same result up to
  round-off. 'einsum' is our own two batched matmuls, tuned for XLA:CPU (see
  the module docstring). 'dot_product_attention' hands q, k, v and the
  log-size bias to `jax.nn.dot_product_attention`, the entry point through
  which JAX chooses an accelerator's attention kernel, so GPU/TPU runs get
  whatever JAX makes fastest there without a change here.

  `return_cls_attn`: also return the class token's attention (B, H, N)
  (`_class_attention`). `return_mean_attn`: also return the attention each
  token receives, averaged over heads and queries (B, N). Given a token
  `mask` (B, N) (or asked for the mean attention), the weights are computed
  explicitly (`_attention_masked`) whatever `implementation` says.
  """
  num_heads: int
  qkv_bias: bool
  lora_rank: int
  lora_dropout: float
  lora_init: str
  dtype: Any
  implementation: str
  fact_scale: float     # FacT (pyra_jax/models/fact.py), used when `fact` is given
  fact_dropout: float
  # Wiring, not config: set by the block when its method needs them.
  return_cls_attn: bool = False   # also return the class token's attention (B, H, N)
  return_value_norm: bool = False  # also return |v_j| over all heads (B, N) (ATS)
  return_mean_attn: bool = False  # instead, the attention each key receives (B, N) (LTMP)

  @nn.compact
  def __call__(self, x: Array, size: Optional[Array], *, train: bool,
               fact: Optional[dict[str, Any]] = None,
               mask: Optional[Array] = None, mask_eps: float = 0.0,
               mask_keep_self: bool = False) -> tuple[Array, ...]:
    b, n, d = x.shape
    h = self.num_heads
    hd = d // h
    bias_shape = (h, hd) if self.qkv_bias else None
    delta = None
    if self.lora_rank > 0:
      delta = LoRA(rank=self.lora_rank, dropout=self.lora_dropout,
                   init_scheme=self.lora_init, dtype=self.dtype,
                   name='lora')(x, train=train)  # (B, N, 3D)
    fact_delta = None
    if fact is not None:
      fact_delta = fact_lib.FactDelta(self.fact_scale, self.fact_dropout, self.dtype,
                                      name='fact_delta')
    heads = []
    for i, name in enumerate(('query', 'key', 'value')):
      # Three (D, D) matmuls, not one on the concatenated (D, 3D) kernel: the
      # concatenation is a copy of the kernels on every call that XLA does not
      # hoist (parameters are arguments), ~9% of a merged ViT-B's time on CPU.
      kernel, bias = ParamsOnly((d, h, hd), bias_shape, name=name)()
      y = x @ kernel.reshape(d, d).astype(self.dtype)
      if bias is not None:
        y = y + bias.reshape(d).astype(self.dtype)
      if delta is not None:
        y = y + delta[..., i * d:(i + 1) * d]
      if fact_delta is not None:
        y = y + fact_delta(x, fact, name, train=train)
      heads.append(y.reshape(b, n, h, hd))
    q, k, v = heads  # (B, N, H, hd)
    extra = None
    if mask is not None or self.return_mean_attn:
      out, probs = _attention_masked(q, k, v, size, mask, mask_eps, mask_keep_self)
      if self.return_mean_attn:
        extra = probs.mean(axis=(1, 2))
      elif self.return_cls_attn:
        extra = probs[:, :, 0, :]
    else:
      if self.implementation == 'dot_product_attention':
        out = _attention_jax(q, k, v, size)
      else:
        out = _attention_einsum(q, k, v, size)
      if self.return_cls_attn:
        extra = _class_attention(q, k, size)
    out = out.reshape(b, n, d)
    w_out, b_out = ParamsOnly((h, hd, d), (d,), name='out')()
    y = out @ w_out.reshape(d, d).astype(self.dtype) + b_out.astype(self.dtype)
    if fact_delta is not None:
      y = y + fact_delta(out, fact, 'out', train=train)
    result = (y, k.mean(axis=2))
    if extra is not None:
      result += (extra,)
    if self.return_value_norm:
      result += (jnp.linalg.norm(v.reshape(b, n, d).astype(jnp.float32), axis=-1),)
    return result


class MlpBlock(nn.Module):
  """Dense -> exact (erf) GELU -> Dense, as timm and the authors' code.

  With `fact`, FacT's increments are added to both Dense outputs.
  """
  mlp_dim: int
  dtype: Any
  fact_scale: float
  fact_dropout: float

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               fact: Optional[dict[str, Any]] = None) -> Array:
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    fact_delta = None
    if fact is not None:
      fact_delta = fact_lib.FactDelta(self.fact_scale, self.fact_dropout, self.dtype,
                                      name='fact_delta')
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init, bias_init=bias_init,
                 name='Dense_0')(x)
    if fact_delta is not None:
      h = h + fact_delta(x, fact, 'fc1', train=train)
    h = activations.gelu(h)
    y = nn.Dense(d, dtype=self.dtype, kernel_init=init, bias_init=bias_init,
                 name='Dense_1')(h)
    if fact_delta is not None:
      y = y + fact_delta(h, fact, 'fc2', train=train)
    return y


class LayerScale(nn.Module):
  """DINOv2's per-channel residual scale, `LayerScale_i/scale (D,)`.

  Initialised to 1 here; pretrained DINOv2 weights overwrite it.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x * self.param('scale', nn.initializers.ones, (x.shape[-1],)).astype(x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops a sample's whole residual branch, scaled by 1/keep."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    return nn.Dropout(self.rate, broadcast_dims=(1, 2), deterministic=False)(x)


class LtmpThresholds(nn.Module):
  """`ltmp/{merge_threshold, prune_threshold}` (1,): LTMP's learned thresholds.

  Kept in [0, 1] by the training step (`ltmp_lib.project_thresholds`), as the
  method clamps them after every update.
  """
  merge_init: float
  prune_init: float

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    merge = self.param('merge_threshold', nn.initializers.constant(self.merge_init), (1,))
    prune = self.param('prune_threshold', nn.initializers.constant(self.prune_init), (1,))
    return merge[0], prune[0]


class DiffRateLogits(nn.Module):
  """`diffrate/{prune_logits, merge_logits}` (K,): the search's rate distributions."""
  num_candidates: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    shape = (self.num_candidates,)
    return (self.param('prune_logits', nn.initializers.zeros, shape),
            self.param('merge_logits', nn.initializers.zeros, shape))


class EncoderBlock(nn.Module):
  """One transformer block, reducing tokens after attention.

  How depends on `method` (docs/algorithm.md §1 and §16-17): tome/pyra merge `r`
  tokens (pyra also modulates), tofu prunes (`prune`) or MLERP-merges, evit
  keeps the attentive tokens and fuses the others into one, ats samples N - r
  slots and masks repeated picks (the mask travels in `size`, see
  methods/ats.py); LTMP and DiffRate reduce by their own rules, reading
  `settings` (sorted (name, value) pairs of the `model.<method>_*` config
  fields; for EViT its reorganising layers `evit_active_layers`, for ATS its
  `ats_layers`) and, for DiffRate with fixed rates, `kept` = (prune_kept,
  merge_kept) of this layer. `mask` (B, N) carries the active tokens of the
  mask-based forms (LTMP, the DiffRate search); it is None otherwise. Returns
  (x, size, source, mask, aux): aux is what the FLOPs regulariser needs from
  this layer (or None).
  """
  num_heads: int
  mlp_dim: int
  r: int
  method: str  # a METHODS entry
  prune: bool  # tofu: this layer prunes instead of merging
  modulation: str  # 'none' = ToMe; else a PyraGenerator variant
  modulation_rank: int
  wr_init: str
  pyra_ln_eps: float
  distilled: bool
  prop_attn: bool
  qkv_bias: bool
  layerscale: bool
  ln_eps: float
  drop_path: float
  lora_rank: int
  lora_dropout: float
  lora_init: str
  dtype: Any
  attention: str  # an ATTENTION_IMPLEMENTATIONS entry
  # The PEFT modules (lora_rank is 0 when peft != 'lora').
  peft: str  # a PEFT_MODULES entry
  peft_dim: int
  peft_dropout: float
  adapter_init: str
  convpass_scale: float
  convpass_init: str
  fact_variant: str
  fact_rank: int
  fact_scale: float
  fact_dropout: float
  snf_flow_length: int
  layer: int
  settings: tuple[tuple[str, Any], ...]
  kept: tuple[int, int]

  @nn.compact
  def __call__(self, x: Array, size: Optional[Array], source: Optional[Array],
               mask: Optional[Array] = None, *, train: bool,
               fact: Optional[dict[str, Any]] = None
               ) -> tuple[Array, Optional[Array], Optional[Array], Optional[Array], Any]:
    cfg = dict(self.settings)
    num_protected = 1 + int(self.distilled)
    method = self.method
    search = method == 'diffrate' and cfg.get('diffrate_search', False)
    aux = None
    convpass = None
    if self.peft == 'convpass':
      convpass = Convpass(dim=self.peft_dim, dropout=self.peft_dropout,
                          init_scheme=self.convpass_init, scale=self.convpass_scale,
                          dtype=self.dtype, name='convpass')
    # FacT: the shared factors come from the Encoder; a tt layer adds its own cores.
    if self.peft == 'fact' and self.fact_variant == 'tt':
      fact = dict(fact, cores=fact_lib.FactLayerCores(
          self.fact_rank, self.mlp_dim // x.shape[-1], name='fact')())
    fact_kw = dict(fact_scale=self.fact_scale, fact_dropout=self.fact_dropout)
    snf = (SNF(self.snf_flow_length, self.dtype, name='snf')
           if self.peft == 'snf' else None)
    shortcut = x if snf is None else snf(x, 'attn')  # SNF: a flow on the shortcut
    h = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm_0')(x)
    # EViT reorganises at its active layers (also at keep = M - 1, which removes
    # no token); ATS samples where r > 0 and at model.ats_layers (K = all).
    evit_here = method == 'evit' and (
        self.r > 0 or self.layer in cfg.get('evit_active_layers', ()))
    ats_here = method == 'ats' and (self.r > 0 or self.layer in cfg.get('ats_layers', ()))
    needs_cls = evit_here or ats_here
    # ATS's `size` is its 0/1 mask, which attention must respect whatever
    # prop_attn says; evit has no sizes (None).
    attn_size = size if (self.prop_attn or method == 'ats') else None
    attn_kwargs = {}
    if method == 'ltmp':
      attn_kwargs = dict(mask=mask, mask_eps=ltmp_lib.TRAIN_EPS if train else 0.0)
    elif search:
      attn_kwargs = dict(mask=mask, mask_eps=diffrate_lib.TRAIN_EPS if train else 0.0,
                         mask_keep_self=True)
    y, metric, *extra = Attention(
        num_heads=self.num_heads, qkv_bias=self.qkv_bias,
        lora_rank=self.lora_rank, lora_dropout=self.lora_dropout,
        lora_init=self.lora_init, dtype=self.dtype,
        implementation=self.attention,
        return_cls_attn=needs_cls or method == 'diffrate',
        return_value_norm=needs_cls and method == 'ats',
        return_mean_attn=method == 'ltmp', **fact_kw,
        name='MultiHeadDotProductAttention_0')(h, attn_size, train=train, fact=fact,
                                               **attn_kwargs)
    if self.layerscale:
      y = LayerScale(name='LayerScale_0')(y)
    x = shortcut + DropPath(self.drop_path)(y, train=train)
    if convpass is not None:  # beside attention, on the tokens before this merge
      y = convpass.attn_branch(h, source, num_protected, train=train)
      x = x + DropPath(self.drop_path)(y, train=train)

    # The token reduction, named in the compiled program's op names (what the
    # step profile, pyra_jax/profiling.py, attributes to 'merge').
    with jax.named_scope('merge'):
      if self.r > 0 and method == 'tofu':
        x, size, plan = tofu_lib.tofu(x, size, metric, self.r, prune_layer=self.prune,
                                      distill_token=self.distilled)
        if source is not None and plan is not None:
          # A pruned source's patches leave with it (its row contributes zeros
          # to the max); a merged one's join its destination.
          drop = (lambda src, dst: jnp.zeros_like(src)) if self.prune else None
          source = merge_lib.merge(source, plan, distill_token=self.distilled,
                                   reduce='max', modulate=drop)
      elif evit_here:
        keep = x.shape[1] - num_protected - 1 - self.r
        x = evit_lib.evit_reorganize(x, extra[0], keep, num_protected=num_protected)
      elif ats_here:
        if size is None:
          size = jnp.ones(x.shape[:2] + (1,), x.dtype)
        x, size = ats_lib.ats_sample(x, size, extra[0], extra[1],
                                     x.shape[1] - num_protected - self.r,
                                     num_protected=num_protected)
      elif method == 'ltmp':
        merge_t, prune_t = LtmpThresholds(cfg['ltmp_merge_init'], cfg['ltmp_prune_init'],
                                          name='ltmp')()
        if size is None:
          size = jnp.ones(x.shape[:2] + (1,), x.dtype)
        if mask is None:
          mask = jnp.ones(x.shape[:2], jnp.float32)
        x, size, mask = ltmp_lib.merge_then_prune(
            x, size, mask, metric, extra[0], merge_t, prune_t, tau=cfg['ltmp_tau'],
            num_protected=num_protected)
        aux = mask.mean()
      elif search:
        if size is None:
          size = jnp.ones(x.shape[:2] + (1,), x.dtype)
        if mask is None:
          mask = jnp.ones(x.shape[:2], jnp.float32)
        cands = diffrate_lib.candidates(x.shape[1] - num_protected, cfg['diffrate_granularity'])
        if self.layer == 0:  # The method never compresses the first block.
          n = jnp.asarray(float(x.shape[1]))
          aux = (n, n)
        else:
          prune_logits, merge_logits = DiffRateLogits(len(cands), name='diffrate')()
          x, size, mask, prune_kept, merge_kept = diffrate_lib.search_step(
              x, size, mask, extra[0], prune_logits, merge_logits, cands,
              num_protected=num_protected)
          aux = (prune_kept, merge_kept)
      elif method == 'diffrate':
        prune_kept, merge_kept = self.kept
        if prune_kept < x.shape[1] or merge_kept < prune_kept:
          if size is None:
            size = jnp.ones(x.shape[:2] + (1,), x.dtype)
          x, size, source = diffrate_lib.compress(
              x, size, source, extra[0], prune_kept=prune_kept, merge_kept=merge_kept,
              num_protected=num_protected)
      elif self.r > 0:
        plan = merge_lib.bipartite_soft_matching(
            metric, self.r, class_token=True, distill_token=self.distilled)
        modulate = None
        if self.modulation != 'none':
          modulate = PyraGenerator(r=self.r, modulation=self.modulation,
                                   rank=self.modulation_rank, wr_init=self.wr_init,
                                   ln_eps=self.pyra_ln_eps, name='pyra')
        if size is None:
          size = jnp.ones(x.shape[:2] + (1,), x.dtype)
        x, size = merge_lib.merge_wavg(x, size, plan, distill_token=self.distilled,
                                       modulate=modulate)
        if source is not None:
          source = merge_lib.merge_source(source, plan, distill_token=self.distilled)

    shortcut = x if snf is None else snf(x, 'mlp')
    h = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, **fact_kw, name='MlpBlock_0')(
        h, train=train, fact=fact)
    if self.layerscale:
      y = LayerScale(name='LayerScale_1')(y)
    y = DropPath(self.drop_path)(y, train=train)
    if self.peft == 'adapter':  # on the (dropped-path) MLP output, as the authors'
      y = y + Adapter(dim=self.peft_dim, dropout=self.peft_dropout,
                      init_scheme=self.adapter_init, dtype=self.dtype,
                      name='adapter')(y, train=train)
    x = shortcut + y
    if convpass is not None:  # beside the MLP, on the merged tokens
      y = convpass.mlp_branch(h, source, num_protected, train=train)
      x = x + DropPath(self.drop_path)(y, train=train)
    return x, size, source, mask, aux


class VisionTransformer(nn.Module):
  """ViT with LoRA on q/k/v, ToMe merging and PYRA modulation.

  `apply({'params': p}, images, train=False)` -> logits (B, num_classes). In
  training pass `rngs={'dropout': key}` (LoRA dropout, stochastic depth).
  `apply(..., features=True)` -> the class token after the final LayerNorm,
  (B, width) float32: what the head reads, so `head(features)` is the logits
  (of the 'cls' head for a DeiT model; its distillation token is not
  returned). It is the image's embedding for probes, retrieval or a head of
  one's own, computed with the same merging as the logits. With
  `trace_source=True`, `mutable=['intermediates']` returns each block's
  (B, N_out, N_in) 0/1 source matrix under `intermediates/source_{i}`; each
  block's token sizes are always sown as `intermediates/size_{i}`.

  Build it with `build_model(config.model)`: every field below except
  `trace_source` comes from the config (configs/common.py holds the defaults
  and their meaning), so no module here carries a default of its own that
  could drift from the config's.
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  schedule: tuple[int, ...]
  modulation: str
  modulation_rank: int
  wr_init: str
  pyra_ln_eps: float
  prop_attn: bool
  qkv_bias: bool
  layerscale: bool
  ln_eps: float
  distilled: bool
  distilled_eval: str
  distilled_train: str  # 'cls' | 'avg' (resolved: `distilled_train_head`)
  drop_path: float
  head_init_std: float
  lora_rank: int
  lora_dropout: float
  lora_init: str
  attention: str
  peft: str
  peft_dim: int
  peft_dropout: float
  adapter_init: str
  convpass_scale: float
  convpass_init: str
  fact_variant: str
  fact_rank: int
  fact_scale: float
  fact_dropout: float
  fact_tk_layout: str
  snf_flow_length: int
  snf_blocks: Optional[int]  # None: every block
  dtype: Any
  method: str
  tofu_prune_layers: int
  settings: tuple[tuple[str, Any], ...]  # the method's model.<method>_* fields
  diffrate_kept: tuple[tuple[int, int], ...]  # per layer; () unless DiffRate with rates
  trace_source: bool = False  # a debugging output, not a config field

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, features: bool = False) -> Array:
    p = self.patch_size
    if self.trace_source and self.method in CLS_ATTN_METHODS:
      raise ValueError(f'trace_source follows merges (tome, pyra, tofu), not {self.method}.')
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'Image size {images.shape[1:3]} is not a multiple of the patch size {p}.')
    kernel, bias = ParamsOnly((p, p, images.shape[-1], self.width), (self.width,),
                              name='embedding')()
    x = embed_patches(images, kernel, bias, self.dtype)
    b = x.shape[0]
    prefix = [self.param('cls', nn.initializers.zeros, (1, 1, self.width))]
    if self.distilled:
      prefix.append(self.param('dist', nn.initializers.zeros, (1, 1, self.width)))
    prefix = [jnp.broadcast_to(t.astype(x.dtype), (b, 1, self.width)) for t in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)
    block = dict(
        num_heads=self.num_heads, mlp_dim=self.mlp_dim, modulation=self.modulation,
        modulation_rank=self.modulation_rank, wr_init=self.wr_init,
        pyra_ln_eps=self.pyra_ln_eps, distilled=self.distilled, prop_attn=self.prop_attn,
        qkv_bias=self.qkv_bias, layerscale=self.layerscale, ln_eps=self.ln_eps,
        lora_rank=self.lora_rank, lora_dropout=self.lora_dropout,
        lora_init=self.lora_init, attention=self.attention, dtype=self.dtype,
        peft=self.peft, peft_dim=self.peft_dim, peft_dropout=self.peft_dropout,
        adapter_init=self.adapter_init,
        convpass_scale=self.convpass_scale, convpass_init=self.convpass_init,
        fact_variant=self.fact_variant, fact_rank=self.fact_rank,
        fact_scale=self.fact_scale, fact_dropout=self.fact_dropout,
        fact_tk_layout=self.fact_tk_layout,
        snf_flow_length=self.snf_flow_length, snf_blocks=self.snf_blocks,
        method=self.method, tofu_prune_layers=self.tofu_prune_layers)
    x = Encoder(schedule=self.schedule, drop_path=self.drop_path,
                trace_source=self.trace_source, block=tuple(sorted(block.items())),
                method=self.method, settings=self.settings,
                diffrate_kept=self.diffrate_kept,
                name='Transformer')(x, train=train)

    cls_feature = x[:, 0].astype(jnp.float32)
    if features:  # Before the head, so the head's parameters are not needed.
      return cls_feature
    head_init = nn.initializers.truncated_normal(stddev=self.head_init_std)
    logits = nn.Dense(self.num_classes, kernel_init=head_init, name='head',
                      dtype=jnp.float32)(cls_feature)
    if self.distilled:
      logits_dist = nn.Dense(self.num_classes, kernel_init=head_init, name='head_dist',
                             dtype=jnp.float32)(x[:, 1].astype(jnp.float32))
      if (self.distilled_train if train else self.distilled_eval) == 'avg':
        logits = 0.5 * (logits + logits_dist)
    return logits


class Encoder(nn.Module):
  """`Transformer/`: position embeddings, the blocks, the final LayerNorm.

  `block` holds the EncoderBlock fields shared by every layer, as sorted
  (name, value) pairs so the module stays hashable.

  LTMP and the DiffRate search add a FLOPs regulariser to the training loss:
  its value is sown as `losses/flops_penalty` (apply with
  `mutable=['losses']`, as `train.training_loss` does), and the relative
  FLOPs it measures as `intermediates/flops_fraction`.
  """
  schedule: tuple[int, ...]
  drop_path: float
  trace_source: bool
  block: tuple[tuple[str, Any], ...]
  method: str
  settings: tuple[tuple[str, Any], ...]
  diffrate_kept: tuple[tuple[int, int], ...]

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    block = dict(self.block)
    tofu_prune_layers = block.pop('tofu_prune_layers')
    fact_tk_layout = block.pop('fact_tk_layout')
    snf_blocks = block.pop('snf_blocks')
    depth = len(self.schedule)
    x = AddPositionEmbs(name='posembed_input')(x)
    size = None
    source = None
    # Convpass needs each token's input positions once tokens merge (convpass.py).
    track = self.trace_source or (block['peft'] == 'convpass' and any(self.schedule))
    if track:
      source = jnp.broadcast_to(jnp.eye(x.shape[1], dtype=x.dtype), (x.shape[0],) + (x.shape[1],) * 2)
    fact = None
    if block['peft'] == 'fact':  # FacT's factors shared by all layers: Transformer/fact
      mlp_slices = block['mlp_dim'] // x.shape[-1]
      fact = fact_lib.FactShared(
          block['fact_variant'], block['fact_rank'],
          depth * fact_lib.slices_per_layer(mlp_slices), name='fact')(x.shape[-1])
    mask = None
    num_tokens, width = x.shape[1], x.shape[2]
    aux = []
    for i in range(depth):
      rate = self.drop_path * i / max(depth - 1, 1)  # linear 0 -> drop_path
      layer_fact = fact
      if fact is not None and 'cores' in fact:  # tk: this layer's rows of the tensor
        layer_fact = dict(fact, cores=fact_lib.layer_cores(fact['cores'], i, mlp_slices,
                                                           fact_tk_layout))
      kept = self.diffrate_kept[i] if self.diffrate_kept else (0, 0)
      layer_block = block
      if block['peft'] == 'snf' and snf_blocks is not None and i >= snf_blocks:
        # SNF adapts the first snf_blocks blocks only: this one is a plain
        # block (LoRA is already off: lora_rank is 0 for any module but LoRA).
        layer_block = dict(block, peft='lora')
      x, size, source, mask, a = EncoderBlock(
          r=self.schedule[i], drop_path=rate, prune=i < tofu_prune_layers, layer=i,
          settings=self.settings, kept=kept, name=f'encoderblock_{i}', **layer_block)(
              x, size, source, mask, train=train, fact=layer_fact)
      aux.append(a)
      if size is not None:
        self.sow('intermediates', f'size_{i}', size)
      if self.trace_source:
        self.sow('intermediates', f'source_{i}', source)
      if mask is not None:
        self.sow('intermediates', f'mask_{i}', mask)
    if aux and aux[0] is not None:
      fraction, penalty = _flops_regulariser(self.method, dict(self.settings), aux,
                                             num_tokens, width, block['mlp_dim'] / width)
      self.sow('losses', 'flops_penalty', penalty,
               init_fn=lambda: 0.0, reduce_fn=lambda _, v: v)
      self.sow('intermediates', 'flops_fraction', fraction)
    return nn.LayerNorm(epsilon=block['ln_eps'], dtype=block['dtype'], name='encoder_norm')(x)


def _flops_regulariser(method: str, cfg: dict, aux: list, num_tokens: int,
                       width: int, mlp_ratio: float) -> tuple[Array, Array]:
  """(FLOPs fraction, penalty toward the method's target) (docs/algorithm.md §17)."""
  if method == 'ltmp':
    fraction = ltmp_lib.flops_ratio(aux, num_tokens=num_tokens, width=width,
                                    mlp_ratio=mlp_ratio)
    return fraction, ltmp_lib.flops_penalty(fraction, cfg['ltmp_flops_target'],
                                            cfg['ltmp_flops_weight'])
  full = schedules.vit_flops([0] * len(aux), num_tokens=num_tokens, width=width,
                             mlp_ratio=mlp_ratio)
  fraction = diffrate_lib.search_flops(aux, num_tokens=num_tokens, width=width,
                                       mlp_ratio=mlp_ratio) / full
  return fraction, diffrate_lib.flops_penalty(
      fraction, ratio=cfg['diffrate_flops_ratio'], full_flops=full,
      form=cfg['diffrate_flops_loss'], weight=cfg['diffrate_flops_weight'])


class AddPositionEmbs(nn.Module):
  """`posembed_input/pos_embedding (1, N, D)`, learned, covering the prefix tokens."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                    (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


def _parse_variant(variant: str) -> tuple[tuple[int, int, int, int], int]:
  m = re.fullmatch(r'(\w+)/(\d+)', variant or '')
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f'model.variant {variant!r} is not one of '
                     f'{[k + "/16" for k in VARIANTS]} (any patch size after the slash).')
  return VARIANTS[m.group(1)], int(m.group(2))


# Config fields the variant supplies when they are unset (None): its table row,
# and the patch size from its name ('B/16' -> 16).
_FROM_VARIANT = ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')
# Config fields that become the VisionTransformer field of the same name as they are.
_AS_IS = ('modulation_rank', 'wr_init', 'pyra_ln_eps', 'prop_attn', 'qkv_bias',
          'layerscale', 'ln_eps', 'distilled_eval', 'drop_path', 'head_init_std',
          'lora_rank', 'lora_dropout', 'lora_init', 'attention', 'peft_dropout',
          'convpass_scale', 'fact_variant', 'fact_scale', 'fact_dropout')


# The allowed values of the model section's numeric and enumerated fields
# (configs/common.py documents each), checked by `model_kwargs` whatever the
# method or module, so a value that would train without effect is refused up
# front. Bounds that depend on the model (a layer count, the FLOPs a method
# can reach) are checked where they are known, below.
_PROBABILITY = 'a dropout probability; 1 or more would drop every input, so nothing behind it trains'
MODEL_FIELDS: dict[str, Range | Choices] = {
    'image_size': Range(1, integer=True, why='the input resolution in pixels'),
    'ln_eps': Range(0, low_open=True, why="the backbone's LayerNorm epsilon"),
    'drop_path': Range(0, 1, high_open=True, why=(
        'the stochastic depth rate, the probability of dropping a residual branch')),
    'head_init_std': Range(0, why="the standard deviation of the new head's init"),
    'lora_rank': Range(0, integer=True, why='0 disables LoRA'),
    'lora_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'lora_init': Choices(LORA_INITS),
    'peft_dim': Range(1, integer=True, why='the bottleneck width of adapter / convpass'),
    'peft_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'convpass_scale': Range(0, low_open=True, why=(
        "the bypasses' output scale; at 0 they would never train")),
    'adapter_init': Choices(ADAPTER_INITS),
    'convpass_init': Choices(CONVPASS_INITS),
    'fact_variant': Choices(fact_lib.FACT_VARIANTS),
    'fact_tk_layout': Choices(fact_lib.FACT_TK_LAYOUTS),
    'fact_rank': Range(1, integer=True, why="FacT's rank r"),
    'fact_scale': Range(0, low_open=True, why="FacT's scale s; at 0 FacT would never train"),
    'fact_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'snf_flow_length': Range(0, integer=True, why="SNF's number of planar flow steps"),
    'modulation_rank': Range(1, integer=True, why="the rank s of modulation='low_rank'"),
    'wr_init': Choices(WR_INITS),
    'pyra_ln_eps': Range(0, low_open=True, why="the generators' LayerNorm epsilon"),
    'evit_keep_rate': Range(0, 1, low_open=True, high_open=True, why=(
        'the fraction of tokens kept at each EViT layer, e.g. 0.7')),
    'tofu_prune_layers': Range(0, integer=True, why='how many leading layers prune'),
    'ltmp_tau': Range(0, low_open=True, why=(
        "the sigmoid temperature of the masks' gradient (the method's training script uses 0.5)")),
    'ltmp_merge_init': Range(0, 1, why='thresholds live in [0, 1] (cosine similarity)'),
    'ltmp_prune_init': Range(0, 1, why='thresholds live in [0, 1] (mean attention)'),
    'ltmp_flops_target': Range(0, 1, low_open=True, why='the FLOPs fraction to keep'),
    'ltmp_flops_weight': Range(0, why='0 trains without the FLOPs target'),
    'diffrate_flops_ratio': Range(1, why='uncompressed / searched FLOPs'),
    'diffrate_flops_weight': Range(0, why='0 searches without the FLOPs target'),
    'diffrate_flops_loss': Choices(diffrate_lib.FLOPS_LOSSES),
    'diffrate_granularity': Range(1, integer=True, why='tokens between candidate rates; the method uses 4'),
    'diffrate_search_epochs': Range(1, integer=True, why='epochs of --mode=search'),
}


def _field(model_config: ml_collections.ConfigDict, name: str) -> Any:
  """`model_config.<name>`, refusing a config that lacks the field.

  The base config is the only place a model default lives, so a missing field
  is an error rather than a silent second default.
  """
  if name not in model_config:
    raise ValueError(
        f'The model config has no field model.{name}: start it from '
        'pyra_jax.configs.common.get_base_config(), which defines every field.')
  return model_config[name]


def _positive_or_unset(name: str, value: Any, unset_means: str) -> Optional[int]:
  if value is not None and (isinstance(value, bool) or
                            not isinstance(value, numbers.Integral) or value <= 0):
    raise ValueError(f'model.{name} must be a positive integer or unset ({unset_means}), '
                     f'got {value!r}.')
  return value


def evit_layers(model_config: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """`model.evit_layers` as 0-based ints ('' = EViT's own 3, 6, 9 of 12, scaled)."""
  layers = _layer_list(model_config, 'evit_layers', depth)
  return schedules.evit_default_layers(depth) if layers is None else layers


def ats_layers(model_config: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """`model.ats_layers` as 0-based ints: layers that sample even where the
  schedule removes nothing (K = all tokens, ATS's own setting); '' = none."""
  layers = _layer_list(model_config, 'ats_layers', depth)
  return () if layers is None else layers


def _layer_list(model_config: ml_collections.ConfigDict, name: str,
                depth: int) -> Optional[tuple[int, ...]]:
  """A comma-separated list of 0-based layers (sorted), None for ''."""
  spec = _field(model_config, name)
  if isinstance(spec, (list, tuple)):
    parts = list(spec)
  else:
    spec = str(spec).strip()
    if not spec:
      return None
    parts = [p for p in spec.replace('(', '').replace(')', '').split(',') if p.strip()]
  try:
    layers = tuple(int(p) for p in parts)
  except (TypeError, ValueError):
    raise ConfigError(f'model.{name} = {spec!r}: give 0-based layer numbers '
                      "separated by commas, e.g. '3,6,9'.") from None
  for l in layers:
    if not 0 <= l < depth:
      raise ConfigError(f'model.{name} has layer {l}, but the model has {depth} '
                        f'layers (0-based: 0 to {depth - 1}): remove it or lower it.')
  if len(set(layers)) != len(layers):
    raise ConfigError(f'model.{name} = {spec!r} names a layer twice.')
  return tuple(sorted(layers))


def _evit_schedule(c: ml_collections.ConfigDict, target: Optional[tuple[int, ...]], *,
                   depth: int, num_patches: int, num_protected: int, width: int,
                   mlp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """EViT's (per-layer r, per-layer kept count, 0 = no reorganisation): from
  its keep rate, or (target given) the keep rate whose FLOPs match the target
  schedule's (docs/algorithm.md §16.1)."""
  layers = evit_layers(c, depth)
  keep_rate = _field(c, 'evit_keep_rate')
  if (isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real)
      or not 0.0 < keep_rate < 1.0):
    raise ConfigError(f'model.evit_keep_rate must be between 0 and 1 (the fraction of '
                      f'tokens kept at each EViT layer, e.g. 0.7), got {keep_rate!r}.')
  n0 = num_patches + num_protected
  if target is not None:
    flops = schedules.vit_flops(target, num_tokens=n0, width=width, mlp_ratio=mlp / width)
    keep_rate = schedules.evit_keep_rate_for_flops(
        flops, layers, depth=depth, num_tokens=n0, num_protected=num_protected,
        width=width, mlp_ratio=mlp / width)
  kw = dict(depth=depth, num_tokens=n0, num_protected=num_protected)
  return (schedules.evit_schedule(keep_rate, layers, **kw),
          schedules.evit_keeps(keep_rate, layers, **kw))


def model_kwargs(model_config: ml_collections.ConfigDict, *,
                 num_classes: Optional[int] = None, dtype: Any = None) -> dict[str, Any]:
  """Resolves a config's `model` section into VisionTransformer fields.

  Every field is read from the config (configs/common.py holds the defaults);
  the unset ones (None) come from the variant, and `num_classes` from the
  argument (the task's class count) when the config leaves it unset. Every
  check that can fail on user input happens here, so a bad variant, method or
  schedule is reported before anything is traced. `dtype` is the run's compute
  dtype (config.dtype, outside the model section); None computes in float32.
  """
  c = model_config
  (width, depth, heads, mlp), patch = _parse_variant(_field(c, 'variant'))
  arch = dict(zip(_FROM_VARIANT, (width, depth, heads, mlp, patch)))
  for name in _FROM_VARIANT:
    value = _positive_or_unset(name, _field(c, name), 'from the variant')
    if value is not None:
      arch[name] = value
  width, depth, heads, mlp, patch = (arch[k] for k in _FROM_VARIANT)
  if width % heads:
    raise ValueError(f'model.width {width} is not divisible by model.num_heads {heads}.')
  image_size = _field(c, 'image_size')
  check_fields(c, {'image_size': MODEL_FIELDS['image_size']}, 'model.')  # Used next.
  if image_size % patch:
    raise ValueError(f'model.image_size {image_size} is not a multiple of the patch size {patch}.')
  n_classes = _positive_or_unset('num_classes', _field(c, 'num_classes'),
                                 "the task's class count")
  if n_classes is None:
    n_classes = num_classes
  if not n_classes or n_classes <= 0:
    raise ValueError('model.num_classes is unset: set it, or pass the task\'s class count.')
  method = _field(c, 'method')
  if method not in METHODS:
    raise ValueError(f'model.method must be one of {METHODS}, got {method!r}.')
  modulation = _field(c, 'modulation') if method == 'pyra' else 'none'
  if method == 'pyra' and modulation not in MODULATIONS:
    raise ValueError(f'model.modulation must be one of {MODULATIONS}, got {modulation!r}.')
  attention = _field(c, 'attention')
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, '
                     f'got {attention!r}.')
  peft = _peft_kwargs(c, width=width, mlp=mlp)
  if peft['peft'] == 'convpass' and method not in MERGING_METHODS:
    raise ConfigError(
        f"model.peft='convpass' lays tokens on the patch grid through the merge's source "
        f"matrix, which model.method={method!r} does not keep: use it with "
        f"{', '.join(MERGING_METHODS)}, or another module (model.peft).")
  distilled = _field(c, 'distilled')
  distilled_train = distilled_train_head(c)  # Also checks distilled_eval.
  num_protected = 1 + int(distilled)
  num_patches = (image_size // patch) ** 2
  # EViT's fields are read (and so must exist) whatever the method, like every
  # other model field; _evit_schedule interprets them when method == 'evit'.
  for name in ('evit_layers', 'evit_keep_rate', 'evit_match_flops', 'ats_layers'):
    _field(c, name)
  tofu_prune_layers = _field(c, 'tofu_prune_layers')
  if method == 'tofu' and (isinstance(tofu_prune_layers, bool) or
                           not isinstance(tofu_prune_layers, numbers.Integral)
                           or not 0 <= tofu_prune_layers <= depth):
    raise ConfigError(f'model.tofu_prune_layers must be an integer from 0 to the depth '
                      f'{depth} (how many leading layers prune), got {tofu_prune_layers!r}.')
  settings, diffrate_kept = _method_settings(
      c, method, depth=depth, num_patches=num_patches, num_protected=num_protected,
      width=width, mlp_ratio=mlp / width)
  if method in ('peft', 'ltmp') or (method == 'diffrate' and not diffrate_kept):
    schedule = (0,) * depth
  elif method == 'diffrate':
    schedule = diffrate_lib.rates_to_schedule(diffrate_kept, num_patches + num_protected)
  elif method == 'evit' and not _field(c, 'evit_match_flops'):
    schedule, evit_keeps = _evit_schedule(c, None, depth=depth, num_patches=num_patches,
                                          num_protected=num_protected, width=width, mlp=mlp)
  else:
    spec = _field(c, 'schedule')
    if isinstance(spec, (list, tuple)):
      spec = tuple(spec)
    schedule = schedules.resolve_schedule(
        spec, depth=depth, num_patches=num_patches, num_protected=num_protected,
        width=width, mlp_ratio=mlp / width)
    if method == 'evit':  # the schedule is only the FLOPs target
      schedule, evit_keeps = _evit_schedule(c, schedule, depth=depth,
                                            num_patches=num_patches,
                                            num_protected=num_protected, width=width,
                                            mlp=mlp)
  if method == 'evit':  # the layers that reorganise, also those at r = 0 (keep = M - 1)
    settings = (('evit_active_layers', tuple(l for l, k in enumerate(evit_keeps) if k)),)
  elif method == 'ats':  # the block samples where r > 0 and at model.ats_layers
    settings = (('ats_layers', ats_layers(c, depth)),)
  # Last, so the checks above that know the model (its depth, the FLOPs a
  # method can reach) speak first; nothing above misbehaves on a value the
  # table refuses.
  check_fields(c, MODEL_FIELDS, 'model.')
  if dtype is None:
    dtype = jnp.float32
  kwargs = dict(
      num_classes=n_classes, schedule=schedule, modulation=modulation,
      distilled=distilled, distilled_train=distilled_train, dtype=jnp.dtype(dtype),
      method=method,
      tofu_prune_layers=tofu_prune_layers, settings=settings,
      diffrate_kept=diffrate_kept, **arch,
      **{name: _field(c, name) for name in _AS_IS})
  kwargs.update(peft)
  return kwargs


def _peft_kwargs(c: ml_collections.ConfigDict, *, width: int, mlp: int) -> dict[str, Any]:
  """model.peft and its module's fields, checked; any module but LoRA turns LoRA off."""
  peft = _field(c, 'peft')
  if peft not in PEFT_MODULES:
    raise ValueError(f'model.peft must be one of {PEFT_MODULES}, got {peft!r}.')
  out = dict(peft=peft, peft_dim=_field(c, 'peft_dim'),
             adapter_init=_field(c, 'adapter_init'),
             convpass_init=_field(c, 'convpass_init'), fact_rank=_field(c, 'fact_rank'),
             fact_tk_layout=_field(c, 'fact_tk_layout'),
             snf_flow_length=_field(c, 'snf_flow_length'),
             snf_blocks=_positive_or_unset('snf_blocks', _field(c, 'snf_blocks'),
                                           'every block'))
  if peft != 'lora':  # another module replaces LoRA: lora_rank is ignored
    out['lora_rank'] = 0
  peft_dim = out['peft_dim']
  if peft in ('adapter', 'convpass') and (isinstance(peft_dim, bool) or not isinstance(
      peft_dim, numbers.Integral) or peft_dim <= 0):
    raise ValueError(f'model.peft_dim must be a positive integer for model.peft={peft!r}, '
                     f'got {peft_dim!r}.')
  if peft == 'adapter' and out['adapter_init'] not in ADAPTER_INITS:
    raise ValueError(f'model.adapter_init must be one of {ADAPTER_INITS}, '
                     f'got {out["adapter_init"]!r}.')
  if peft == 'convpass' and out['convpass_init'] not in CONVPASS_INITS:
    raise ValueError(f'model.convpass_init must be one of {CONVPASS_INITS}, '
                     f'got {out["convpass_init"]!r}.')
  if peft == 'fact':
    if _field(c, 'fact_variant') not in fact_lib.FACT_VARIANTS:
      raise ValueError(f'model.fact_variant must be one of {fact_lib.FACT_VARIANTS}, '
                       f'got {c.fact_variant!r}.')
    if out['fact_tk_layout'] not in fact_lib.FACT_TK_LAYOUTS:
      raise ValueError(f'model.fact_tk_layout must be one of {fact_lib.FACT_TK_LAYOUTS}, '
                       f'got {out["fact_tk_layout"]!r}.')
    if mlp % width:
      raise ValueError(f'FacT cuts the MLP kernels into (D, D) slices, so model.mlp_dim '
                       f'({mlp}) must be a multiple of model.width ({width}).')
  return out  # fact_rank, snf_flow_length, ...: MODEL_FIELDS


# The model.<method>_* fields each method reads (configs/common.py documents them).
METHOD_FIELDS = {
    'ltmp': ('ltmp_tau', 'ltmp_merge_init', 'ltmp_prune_init', 'ltmp_flops_target',
             'ltmp_flops_weight'),
    'diffrate': ('diffrate_search', 'diffrate_granularity', 'diffrate_flops_ratio',
                 'diffrate_flops_weight', 'diffrate_flops_loss'),
}


def _method_settings(c: ml_collections.ConfigDict, method: str, *, depth: int,
                     num_patches: int, num_protected: int, width: int,
                     mlp_ratio: float) -> tuple[tuple, tuple]:
  """(settings, diffrate_kept) of LTMP / DiffRate, checked; ((), ()) otherwise.

  Every method's fields must exist whatever the method (a config missing one is
  refused by name, as for every other model field).
  """
  for name in sum(METHOD_FIELDS.values(), ()) + ('diffrate_rates', 'diffrate_search_epochs'):
    _field(c, name)
  if method not in METHOD_FIELDS:
    return (), ()
  cfg = {name: _field(c, name) for name in METHOD_FIELDS[method]}
  num_tokens = num_patches + num_protected
  # The fields' own ranges (tau > 0, thresholds in [0, 1], weights >= 0) are
  # MODEL_FIELDS'; here the bounds that depend on the model.
  if method == 'ltmp':
    target = cfg['ltmp_flops_target']
    least = float(ltmp_lib.flops_ratio([1.0 / num_tokens] * depth, num_tokens=num_tokens,
                                       width=width, mlp_ratio=mlp_ratio))
    if not least <= target <= 1.0:
      raise ConfigError(
          f'model.ltmp_flops_target = {target}: the FLOPs fraction to keep must lie '
          f'between {least:.3f} (only the class token left after the first block) and 1.')
    return tuple(sorted(cfg.items())), ()
  g = cfg['diffrate_granularity']
  if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g < num_patches:
    raise ConfigError(f'model.diffrate_granularity = {g!r}: use an int from 1 to '
                      f'{num_patches - 1} (tokens between candidate rates; the method uses 4).')
  if cfg['diffrate_search']:
    if cfg['diffrate_flops_loss'] not in diffrate_lib.FLOPS_LOSSES:
      raise ConfigError(f'model.diffrate_flops_loss = {cfg["diffrate_flops_loss"]!r}: use '
                        "'ratio' (weight * (FLOPs fraction - 1/ratio)^2) or 'authors' "
                        "(the method's 5 * (GFLOPs - target)^2).")
    ratio = cfg['diffrate_flops_ratio']
    reach = diffrate_lib.max_flops_ratio(depth=depth, num_patches=num_patches,
                                         num_protected=num_protected, granularity=g,
                                         width=width, mlp_ratio=mlp_ratio)
    if not 1.0 <= ratio <= reach:
      raise ConfigError(
          f'model.diffrate_flops_ratio = {ratio}: the search can reach FLOPs ratios from '
          f'1 to {reach:.2f} on this model (the first block is never compressed); '
          'choose a target in that range.')
    return tuple(sorted(cfg.items())), ()
  kept = diffrate_lib.read_rates(_field(c, 'diffrate_rates'), depth=depth,
                                 num_tokens=num_tokens, num_protected=num_protected)
  return tuple(sorted(cfg.items())), tuple(kept)


def build_model(model_config: ml_collections.ConfigDict, *,
                num_classes: Optional[int] = None, dtype: Any = None,
                trace_source: bool = False) -> VisionTransformer:
  """The one entry point: a config's `model` section -> VisionTransformer."""
  return VisionTransformer(**model_kwargs(model_config, num_classes=num_classes, dtype=dtype),
                           trace_source=trace_source)


def deployed_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the deployed model: LoRA folded in (rank 0), no dropout.

  FacT folds too (`fact.fold_fact`), so its deployed model is the plain ViT
  (peft='lora', rank 0). A module that cannot fold (Adapter, Convpass, SNF)
  stays in the deployed model, with its parameters, under the same config
  (docs/algorithm.md §13).
  """
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.lora_rank = 0
  c.lora_dropout = 0.0
  c.drop_path = 0.0
  if 'peft_dropout' in c:
    c.peft_dropout = 0.0
  if c.get('peft') == 'fact':
    c.peft = 'lora'
  if 'fact_dropout' in c:
    c.fact_dropout = 0.0
  return c


def fold_peft(params: Any, model_config: ml_collections.ConfigDict) -> Any:
  """The trained params folded for `deployed_config(model_config)`.

  LoRA and FacT fold into the frozen kernels; other modules are kept as they are.
  """
  from pyra_jax.models import lora  # pylint: disable=g-import-not-at-top
  if model_config.get('peft', 'lora') == 'fact' or fact_lib.has_fact(params):
    params = fact_lib.fold_fact(params, model_config.fact_scale,
                                tk_layout=model_config.fact_tk_layout)
  if model_config.get('peft', 'lora') == 'lora' and model_config.lora_rank > 0:
    params = lora.fold_lora(params)
  return params


def num_tokens(model: VisionTransformer, image_size: int) -> list[int]:
  """Tokens entering each block and after the last one, for `model` at `image_size`."""
  prefix = 1 + int(model.distilled)
  return schedules.token_counts(model.schedule, (image_size // model.patch_size) ** 2 + prefix)

