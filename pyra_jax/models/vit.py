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
from pyra_jax.methods import diffrate as diffrate_lib
from pyra_jax.methods import ltmp as ltmp_lib
from pyra_jax.errors import ConfigError
from pyra_jax.models.lora import LoRA
from pyra_jax.models.pyra import MODULATIONS, PyraGenerator

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
           'ltmp', 'diffrate',
           )
# How Attention computes softmax(q k^T / sqrt(hd) + log size) v (config.model.attention).
ATTENTION_IMPLEMENTATIONS = ('einsum', 'dot_product_attention')


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
  return_cls_attn: bool
  return_mean_attn: bool

  @nn.compact
  def __call__(self, x: Array, size: Optional[Array], *, train: bool,
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
    out = out @ w_out.reshape(d, d).astype(self.dtype) + b_out.astype(self.dtype)
    if extra is not None:
      return out, k.mean(axis=2), extra
    return out, k.mean(axis=2)


class MlpBlock(nn.Module):
  """Dense -> exact (erf) GELU -> Dense, as timm and the authors' code."""
  mlp_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=init, bias_init=bias_init,
                 name='Dense_0')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=init, bias_init=bias_init,
                    name='Dense_1')(x)


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

  ToMe/PYRA merge `r` tokens when r > 0; LTMP and DiffRate (`method`) reduce
  by their own rules (`pyra_jax/methods/`), reading `settings` (sorted
  (name, value) pairs of the `model.<method>_*` config fields) and, for
  DiffRate with fixed rates, `kept` = (prune_kept, merge_kept) of this layer.
  `mask` (B, N) carries the active tokens of the mask-based forms (LTMP, the
  DiffRate search); it is None otherwise. Returns (x, size, source, mask, aux):
  aux is what the FLOPs regulariser needs from this layer (or None).
  """
  num_heads: int
  mlp_dim: int
  r: int
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
  method: str
  layer: int
  settings: tuple[tuple[str, Any], ...]
  kept: tuple[int, int]

  @nn.compact
  def __call__(self, x: Array, size: Optional[Array], source: Optional[Array],
               mask: Optional[Array] = None, *, train: bool
               ) -> tuple[Array, Optional[Array], Optional[Array], Optional[Array], Any]:
    cfg = dict(self.settings)
    num_protected = 1 + int(self.distilled)
    search = self.method == 'diffrate' and cfg.get('diffrate_search', False)
    aux = None
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm_0')(x)
    attn_kwargs = {}
    if self.method == 'ltmp':
      attn_kwargs = dict(mask=mask, mask_eps=ltmp_lib.TRAIN_EPS if train else 0.0)
    elif search:
      attn_kwargs = dict(mask=mask, mask_eps=diffrate_lib.TRAIN_EPS if train else 0.0,
                         mask_keep_self=True)
    outs = Attention(num_heads=self.num_heads, qkv_bias=self.qkv_bias,
                     lora_rank=self.lora_rank, lora_dropout=self.lora_dropout,
                     lora_init=self.lora_init, dtype=self.dtype,
                     implementation=self.attention,
                     return_cls_attn=self.method == 'diffrate',
                     return_mean_attn=self.method == 'ltmp',
                     name='MultiHeadDotProductAttention_0')(
                         y, size if self.prop_attn else None, train=train, **attn_kwargs)
    y, metric = outs[:2]
    if self.layerscale:
      y = LayerScale(name='LayerScale_0')(y)
    x = x + DropPath(self.drop_path)(y, train=train)

    if self.method == 'ltmp':
      merge_t, prune_t = LtmpThresholds(cfg['ltmp_merge_init'], cfg['ltmp_prune_init'],
                                        name='ltmp')()
      if size is None:
        size = jnp.ones(x.shape[:2] + (1,), x.dtype)
      if mask is None:
        mask = jnp.ones(x.shape[:2], jnp.float32)
      x, size, mask = ltmp_lib.merge_then_prune(
          x, size, mask, metric, outs[2], merge_t, prune_t, tau=cfg['ltmp_tau'],
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
            x, size, mask, outs[2], prune_logits, merge_logits, cands,
            num_protected=num_protected)
        aux = (prune_kept, merge_kept)
    elif self.method == 'diffrate':
      prune_kept, merge_kept = self.kept
      if prune_kept < x.shape[1] or merge_kept < prune_kept:
        if size is None:
          size = jnp.ones(x.shape[:2] + (1,), x.dtype)
        x, size, source = diffrate_lib.compress(
            x, size, source, outs[2], prune_kept=prune_kept, merge_kept=merge_kept,
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

    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name='MlpBlock_0')(y)
    if self.layerscale:
      y = LayerScale(name='LayerScale_1')(y)
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
  drop_path: float
  head_init_std: float
  lora_rank: int
  lora_dropout: float
  lora_init: str
  attention: str
  dtype: Any
  method: str
  settings: tuple[tuple[str, Any], ...]  # the method's model.<method>_* fields
  diffrate_kept: tuple[tuple[int, int], ...]  # per layer; () unless DiffRate with rates
  trace_source: bool = False  # a debugging output, not a config field

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, features: bool = False) -> Array:
    p = self.patch_size
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
        lora_init=self.lora_init, attention=self.attention, dtype=self.dtype)
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
      if self.distilled_eval == 'avg':
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
    depth = len(self.schedule)
    x = AddPositionEmbs(name='posembed_input')(x)
    size = None
    source = None
    if self.trace_source:
      source = jnp.broadcast_to(jnp.eye(x.shape[1], dtype=x.dtype), (x.shape[0],) + (x.shape[1],) * 2)
    mask = None
    num_tokens, width = x.shape[1], x.shape[2]
    aux = []
    for i in range(depth):
      rate = self.drop_path * i / max(depth - 1, 1)  # linear 0 -> drop_path
      kept = self.diffrate_kept[i] if self.diffrate_kept else (0, 0)
      x, size, source, mask, a = EncoderBlock(
          r=self.schedule[i], drop_path=rate, method=self.method, layer=i,
          settings=self.settings, kept=kept, name=f'encoderblock_{i}', **block)(
              x, size, source, mask, train=train)
      aux.append(a)
      if size is not None:
        self.sow('intermediates', f'size_{i}', size)
      if source is not None:
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
  """(FLOPs fraction, penalty toward the method's target) (docs/algorithm.md §10)."""
  if method == 'ltmp':
    fraction = ltmp_lib.flops_ratio(aux, num_tokens=num_tokens, width=width,
                                    mlp_ratio=mlp_ratio)
    return fraction, ltmp_lib.flops_penalty(fraction, cfg['ltmp_flops_target'],
                                            cfg['ltmp_flops_weight'])
  full = schedules.vit_flops([0] * len(aux), num_tokens=num_tokens, width=width,
                             mlp_ratio=mlp_ratio)
  fraction = diffrate_lib.search_flops(aux, num_tokens=num_tokens, width=width,
                                       mlp_ratio=mlp_ratio) / full
  return fraction, cfg['diffrate_flops_weight'] * jnp.square(
      fraction - 1.0 / cfg['diffrate_flops_ratio'])


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
          'lora_rank', 'lora_dropout', 'lora_init', 'attention')


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
  distilled = _field(c, 'distilled')
  num_protected = 1 + int(distilled)
  num_patches = (image_size // patch) ** 2
  settings, diffrate_kept = _method_settings(
      c, method, depth=depth, num_patches=num_patches, num_protected=num_protected,
      width=width, mlp_ratio=mlp / width)
  if method in ('peft', 'ltmp') or (method == 'diffrate' and not diffrate_kept):
    schedule = (0,) * depth
  elif method == 'diffrate':
    schedule = diffrate_lib.rates_to_schedule(diffrate_kept, num_patches + num_protected)
  else:
    spec = _field(c, 'schedule')
    if isinstance(spec, (list, tuple)):
      spec = tuple(spec)
    schedule = schedules.resolve_schedule(
        spec, depth=depth, num_patches=num_patches, num_protected=num_protected,
        width=width, mlp_ratio=mlp / width)
  if dtype is None:
    dtype = jnp.float32
  return dict(
      num_classes=n_classes, schedule=schedule, modulation=modulation,
      distilled=distilled, dtype=jnp.dtype(dtype), method=method,
      settings=settings, diffrate_kept=diffrate_kept, **arch,
      **{name: _field(c, name) for name in _AS_IS})


# The model.<method>_* fields each method reads (configs/common.py documents them).
METHOD_FIELDS = {
    'ltmp': ('ltmp_tau', 'ltmp_merge_init', 'ltmp_prune_init', 'ltmp_flops_target',
             'ltmp_flops_weight'),
    'diffrate': ('diffrate_search', 'diffrate_granularity', 'diffrate_flops_ratio',
                 'diffrate_flops_weight'),
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
  if method == 'ltmp':
    if not cfg['ltmp_tau'] > 0:
      raise ConfigError(f'model.ltmp_tau = {cfg["ltmp_tau"]}: the sigmoid temperature '
                        'must be positive (the method uses 0.1).')
    for name in ('ltmp_merge_init', 'ltmp_prune_init'):
      if not 0.0 <= cfg[name] <= 1.0:
        raise ConfigError(f'model.{name} = {cfg[name]}: thresholds live in [0, 1] '
                          '(cosine similarity, mean attention).')
    if cfg['ltmp_flops_weight'] < 0:
      raise ConfigError(f'model.ltmp_flops_weight = {cfg["ltmp_flops_weight"]}: use a '
                        'weight >= 0 (0 trains without the FLOPs target).')
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
    ratio = cfg['diffrate_flops_ratio']
    reach = diffrate_lib.max_flops_ratio(depth=depth, num_patches=num_patches,
                                         num_protected=num_protected, granularity=g,
                                         width=width, mlp_ratio=mlp_ratio)
    if not 1.0 <= ratio <= reach:
      raise ConfigError(
          f'model.diffrate_flops_ratio = {ratio}: the search can reach FLOPs ratios from '
          f'1 to {reach:.2f} on this model (the first block is never compressed); '
          'choose a target in that range.')
    if cfg['diffrate_flops_weight'] < 0:
      raise ConfigError(f'model.diffrate_flops_weight = {cfg["diffrate_flops_weight"]}: '
                        'use a weight >= 0.')
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
  """The config of the deployed model: LoRA folded in (rank 0), no dropout."""
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.lora_rank = 0
  c.lora_dropout = 0.0
  c.drop_path = 0.0
  return c


def num_tokens(model: VisionTransformer, image_size: int) -> list[int]:
  """Tokens entering each block and after the last one, for `model` at `image_size`."""
  prefix = 1 + int(model.distilled)
  return schedules.token_counts(model.schedule, (image_size // model.patch_size) ** 2 + prefix)

