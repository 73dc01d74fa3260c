"""The Vision Transformer of pyra_jax: frozen backbone + PEFT module + token reduction.

Parameter names and shapes follow the linen layout of
google-research/vision_transformer (docs/architecture.md has the full tree), so
converted checkpoints load by name. The block's order of operations is
docs/algorithm.md §1: LN -> attention (q/k/v + LoRA, proportional attention) ->
residual -> token reduction (the configured method, `methods.base.TokenReducer`:
ToMe's merge with PYRA's generators by default) -> LN -> MLP -> residual. The
module fields are few and grouped: `BlockSettings` (the backbone's options),
`PeftSettings` (the trainable module's), the reducer (the method's).

Speed notes (docs/performance.md; measured with `pyra_jax.benchmark`):
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

import dataclasses
import numbers
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import registry
from pyra_jax import schedules
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Choices, Range, check_fields
from pyra_jax.methods import ltmp as ltmp_lib
from pyra_jax.methods.base import Attended, AttentionRequest, Geometry, TokenReducer, Tokens
from pyra_jax.models import activations
from pyra_jax.models import fact as fact_lib
from pyra_jax.models.adapter import Adapter
from pyra_jax.models.convpass import Convpass
from pyra_jax.models.lora import LoRA
from pyra_jax.models.peft import FIELD_RANGES as PEFT_FIELD_RANGES
from pyra_jax.models.peft import PeftSettings
from pyra_jax.models.snf import SNF

Array = jax.Array

# name -> (width, depth, num_heads, mlp_dim); the patch size comes from '/NN'.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}
# How Attention computes softmax(q k^T / sqrt(hd) + log size) v (config.model.attention).
ATTENTION_IMPLEMENTATIONS = ('einsum', 'dot_product_attention')
# A distilled (DeiT) model's logits: 'cls' (the class token's head) or 'avg'
# (the mean of it and the distillation token's head_dist), in evaluation
# (model.distilled_eval) and in training (model.distilled_train; 'as_eval':
# the evaluation's, the behaviour before the two could differ).
DISTILLED_HEADS = ('cls', 'avg')
DISTILLED_TRAIN = ('as_eval',) + DISTILLED_HEADS
# What the head reads (config.model.pool): the class token, or the global
# average of the patch tokens (MAE's fine-tuning, `global_average_pool`).
POOLS = ('cls', 'gap')


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
  """Multi-head self-attention with the PEFT module on q/k/v and proportional attention.

  Returns the attention output and an `Attended`: the merge metric (the keys
  after LoRA, averaged over heads, (B, N, D/H)) and whatever the block's token
  reduction asked for in `request` (the class token's attention, the value
  norms, the attention each token receives).

  `implementation` chooses how softmax(q k^T / sqrt(hd) + log size) v is
  computed; both use the same parameters and give the same result up to
  round-off. 'einsum' is our own two batched matmuls, tuned for XLA:CPU (see
  the module docstring). 'dot_product_attention' hands q, k, v and the
  log-size bias to `jax.nn.dot_product_attention`, the entry point through
  which JAX chooses an accelerator's attention kernel, so GPU/TPU runs get
  whatever JAX makes fastest there without a change here.

  Given a token `mask` (B, N) (or asked for the mean attention), the weights
  are computed explicitly (`_attention_masked`) whatever `implementation` says.
  """
  num_heads: int
  qkv_bias: bool
  peft: PeftSettings
  dtype: Any
  implementation: str
  request: AttentionRequest = AttentionRequest()
  head_dim: Optional[int] = None  # None: D / num_heads; set when heads are pruned (RaP)

  @nn.compact
  def __call__(self, x: Array, size: Optional[Array], *, train: bool,
               fact: Optional[dict[str, Any]] = None,
               mask: Optional[Array] = None) -> tuple[Array, Attended]:
    b, n, d = x.shape
    h = self.num_heads
    hd = self.head_dim or d // h
    e = h * hd  # the q/k/v width: D, or fewer with pruned heads
    peft, request = self.peft, self.request
    bias_shape = (h, hd) if self.qkv_bias else None
    delta = None
    if peft.lora_rank > 0:
      delta = LoRA(rank=peft.lora_rank, dropout=peft.lora_dropout,
                   init_scheme=peft.lora_init, dtype=self.dtype,
                   out_dim=None if e == d else e,
                   name='lora')(x, train=train)  # (B, N, 3E)
    fact_delta = None
    if fact is not None:
      fact_delta = fact_lib.FactDelta(peft.fact_scale, peft.fact_dropout, self.dtype,
                                      name='fact_delta')
    heads = []
    for i, name in enumerate(('query', 'key', 'value')):
      # Three (D, D) matmuls, not one on the concatenated (D, 3D) kernel: the
      # concatenation is a copy of the kernels on every call that XLA does not
      # hoist (parameters are arguments), ~9% of a merged ViT-B's time on CPU.
      kernel, bias = ParamsOnly((d, h, hd), bias_shape, name=name)()
      y = x @ kernel.reshape(d, e).astype(self.dtype)
      if bias is not None:
        y = y + bias.reshape(e).astype(self.dtype)
      if delta is not None:
        y = y + delta[..., i * e:(i + 1) * e]
      if fact_delta is not None:
        y = y + fact_delta(x, fact, name, train=train)
      heads.append(y.reshape(b, n, h, hd))
    q, k, v = heads  # (B, N, H, hd)
    cls_attn = mean_attn = value_norm = None
    if mask is not None or request.mean_attn:
      out, probs = _attention_masked(q, k, v, size, mask, request.mask_eps,
                                     request.mask_keep_self)
      if request.mean_attn:
        mean_attn = probs.mean(axis=(1, 2))
      elif request.cls_attn:
        cls_attn = probs[:, :, 0, :]
    else:
      if self.implementation == 'dot_product_attention':
        out = _attention_jax(q, k, v, size)
      else:
        out = _attention_einsum(q, k, v, size)
      if request.cls_attn:
        cls_attn = _class_attention(q, k, size)
    out = out.reshape(b, n, e)
    w_out, b_out = ParamsOnly((h, hd, d), (d,), name='out')()
    y = out @ w_out.reshape(e, d).astype(self.dtype) + b_out.astype(self.dtype)
    if fact_delta is not None:
      y = y + fact_delta(out, fact, 'out', train=train)
    if request.value_norm:
      value_norm = jnp.linalg.norm(v.reshape(b, n, e).astype(jnp.float32), axis=-1)
    return y, Attended(k.mean(axis=2), cls_attn=cls_attn, value_norm=value_norm,
                       mean_attn=mean_attn)


class MlpBlock(nn.Module):
  """Dense -> exact (erf) GELU -> Dense, as timm and the authors' code.

  With `fact`, FacT's increments are added to both Dense outputs.
  """
  mlp_dim: int
  dtype: Any
  peft: PeftSettings

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False,
               fact: Optional[dict[str, Any]] = None) -> Array:
    d = x.shape[-1]
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=1e-6)
    fact_delta = None
    if fact is not None:
      fact_delta = fact_lib.FactDelta(self.peft.fact_scale, self.peft.fact_dropout,
                                      self.dtype, name='fact_delta')
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


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The backbone's block options shared by every layer (configs/common.py)."""
  qkv_bias: bool
  layerscale: bool
  ln_eps: float
  prop_attn: bool   # log(size) of each key enters the attention logits
  attention: str    # an ATTENTION_IMPLEMENTATIONS entry
  dtype: Any


class EncoderBlock(nn.Module):
  """One transformer block: LN -> attention -> residual -> token reduction -> LN -> MLP.

  The reduction is the model's `reducer` (a `methods.base.TokenReducer`: ToMe,
  PYRA, EViT, ...; docs/algorithm.md §1 and §16-17), asked first what this
  layer's attention must return, then to reduce the tokens after the
  attention residual. Returns the new tokens and what the reducer's
  regulariser needs from this layer (or None).
  """
  num_heads: int
  mlp_dim: int
  arch: BlockSettings
  peft: PeftSettings
  reducer: TokenReducer
  layer: int
  drop_path: float

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool,
               fact: Optional[dict[str, Any]] = None) -> tuple[Tokens, Any]:
    arch, peft = self.arch, self.peft
    x, size, source, mask = tokens
    num_protected = self.reducer.num_protected
    convpass = None
    if peft.module == 'convpass':
      convpass = Convpass(dim=peft.dim, dropout=peft.dropout,
                          init_scheme=peft.convpass_init, scale=peft.convpass_scale,
                          dtype=arch.dtype, name='convpass')
    # FacT: the shared factors come from the Encoder; a tt layer adds its own cores.
    if peft.module == 'fact' and peft.fact_variant == 'tt':
      fact = dict(fact, cores=fact_lib.FactLayerCores(
          peft.fact_rank, self.mlp_dim // x.shape[-1], name='fact')())
    snf = SNF(peft.snf_flow_length, arch.dtype, name='snf') if peft.module == 'snf' else None
    shortcut = x if snf is None else snf(x, 'attn')  # SNF: a flow on the shortcut
    h = nn.LayerNorm(epsilon=arch.ln_eps, dtype=arch.dtype, name='LayerNorm_0')(x)
    request = self.reducer.attention(self.layer, train=train)
    attn_size = size if (arch.prop_attn or request.size_bias) else None
    # A structurally pruned model (RaP) keeps fewer heads and MLP units here.
    heads, mlp_dim = self.reducer.block_widths(self.layer) or (self.num_heads, self.mlp_dim)
    y, attended = Attention(
        num_heads=heads, qkv_bias=arch.qkv_bias, peft=peft, dtype=arch.dtype,
        implementation=arch.attention, request=request,
        head_dim=x.shape[-1] // self.num_heads,
        name='MultiHeadDotProductAttention_0')(
            h, attn_size, train=train, fact=fact, mask=mask if request.masked else None)
    if arch.layerscale:
      y = LayerScale(name='LayerScale_0')(y)
    x = shortcut + DropPath(self.drop_path)(y, train=train)
    if convpass is not None:  # beside attention, on the tokens before this merge
      y = convpass.attn_branch(h, source, num_protected, train=train)
      x = x + DropPath(self.drop_path)(y, train=train)

    # The token reduction, named in the compiled program's op names (what the
    # step profile, pyra_jax/profiling.py, attributes to 'merge').
    with jax.named_scope('merge'):
      (x, size, source, mask), aux = self.reducer.reduce(
          self.layer, Tokens(x, size, source, mask), attended, train=train)

    shortcut = x if snf is None else snf(x, 'mlp')
    h = nn.LayerNorm(epsilon=arch.ln_eps, dtype=arch.dtype, name='LayerNorm_1')(x)
    y = MlpBlock(mlp_dim=mlp_dim, dtype=arch.dtype, peft=peft, name='MlpBlock_0')(
        h, train=train, fact=fact)
    if arch.layerscale:
      y = LayerScale(name='LayerScale_1')(y)
    y = DropPath(self.drop_path)(y, train=train)
    if peft.module == 'adapter':  # on the (dropped-path) MLP output, as the authors'
      y = y + Adapter(dim=peft.dim, dropout=peft.dropout, init_scheme=peft.adapter_init,
                      dtype=arch.dtype, name='adapter')(y, train=train)
    x = shortcut + y
    if convpass is not None:  # beside the MLP, on the merged tokens
      y = convpass.mlp_branch(h, source, num_protected, train=train)
      x = x + DropPath(self.drop_path)(y, train=train)
    return Tokens(x, size, source, mask), aux


class VisionTransformer(nn.Module):
  """ViT with a PEFT module (LoRA by default) and a token reduction (ToMe, PYRA, ...).

  `apply({'params': p}, images, train=False)` -> logits (B, num_classes). In
  training pass `rngs={'dropout': key}` (LoRA dropout, stochastic depth).
  `apply(..., features=True)` -> the class token after the final LayerNorm
  (model.pool='gap': the size-weighted mean of the patch tokens after
  `fc_norm`), (B, width) float32: what the head reads, so `head(features)` is the logits
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
  arch: BlockSettings
  peft: PeftSettings
  reducer: TokenReducer   # model.method, with its per-layer counts
  distilled: bool
  distilled_eval: str
  distilled_train: str  # 'cls' | 'avg' (resolved: `distilled_train_head`)
  drop_path: float
  head_init_std: float
  pool: str  # 'cls' | 'gap' (POOLS; config model.pool)
  trace_source: bool = False  # a debugging output, not a config field

  @property
  def method(self) -> str:
    return self.reducer.name

  @property
  def schedule(self) -> tuple[int, ...]:
    """Tokens removed in each block (what FLOPs and token counts read)."""
    return self.reducer.schedule

  @property
  def dtype(self) -> Any:
    return self.arch.dtype

  @property
  def modulation(self) -> str:
    """PYRA's generator form; 'none' for a method without generators."""
    return getattr(self.reducer, 'modulation', 'none')

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, features: bool = False) -> Array:
    p = self.patch_size
    if self.trace_source and not self.reducer.traces_source:
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
    tokens = Encoder(num_heads=self.num_heads, mlp_dim=self.mlp_dim, arch=self.arch,
                     peft=self.peft, reducer=self.reducer, drop_path=self.drop_path,
                     trace_source=self.trace_source, final_norm=self.pool == 'cls',
                     name='Transformer')(x, train=train)
    x = tokens.x
    if self.pool == 'gap':
      pooled = global_average_pool(tokens, self.reducer.num_protected)
      cls_feature = nn.LayerNorm(epsilon=self.arch.ln_eps, dtype=jnp.float32,
                                 name='fc_norm')(pooled)
    else:
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


def global_average_pool(tokens: Tokens, num_protected: int) -> Array:
  """(B, D) float32: the mean of the patch tokens, the class (and distillation)
  token excluded, as MAE's `global_pool`.

  Merged tokens count by their size: sum_i s_i x_i / sum_i s_i over the patch
  tokens is the mean over the original patches, which is what ToMe's MAE patch
  (tome/patch/mae.py) computes as sum_i s_i x_i / T. A token a method masked
  out (LTMP, DiffRate's search) has weight 0.
  """
  x = tokens.x[:, num_protected:].astype(jnp.float32)
  w = jnp.ones(x.shape[:2] + (1,), jnp.float32)
  if tokens.size is not None:
    w = tokens.size[:, num_protected:].astype(jnp.float32)
  if tokens.mask is not None:
    w = w * tokens.mask[:, num_protected:, None].astype(jnp.float32)
  return (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1e-6)


class Encoder(nn.Module):
  """`Transformer/`: position embeddings, the blocks, the final LayerNorm.

  Returns the final `Tokens` (with their sizes and masks, which a pooled head
  reads); `x` after the final LayerNorm `encoder_norm`, or without it when
  `final_norm` is False (model.pool='gap': MAE removes the final norm and
  normalises the pooled feature instead, `fc_norm`).

  A method that learns its compression (`reducer.has_regulariser`: LTMP, the
  DiffRate search) adds a FLOPs regulariser to the training loss: its value
  is sown as `losses/flops_penalty` (apply with `mutable=['losses']`, as the
  training step does), and the relative FLOPs it measures as
  `intermediates/flops_fraction`.
  """
  num_heads: int
  mlp_dim: int
  arch: BlockSettings
  peft: PeftSettings
  reducer: TokenReducer
  drop_path: float
  trace_source: bool
  final_norm: bool  # False for model.pool='gap'

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tokens:
    peft, reducer = self.peft, self.reducer
    depth = len(reducer.schedule)
    x = AddPositionEmbs(name='posembed_input')(x)
    source = None
    # Convpass needs each token's input positions once tokens merge (convpass.py).
    if self.trace_source or (peft.module == 'convpass' and any(reducer.schedule)):
      source = jnp.broadcast_to(jnp.eye(x.shape[1], dtype=x.dtype),
                                (x.shape[0],) + (x.shape[1],) * 2)
    fact = None
    if peft.module == 'fact':  # FacT's factors shared by all layers: Transformer/fact
      mlp_slices = self.mlp_dim // x.shape[-1]
      fact = fact_lib.FactShared(
          peft.fact_variant, peft.fact_rank,
          depth * fact_lib.slices_per_layer(mlp_slices), name='fact')(x.shape[-1])
    num_tokens, width = x.shape[1], x.shape[2]
    tokens = Tokens(x, None, source, None)
    aux = []
    for i in range(depth):
      rate = self.drop_path * i / max(depth - 1, 1)  # linear 0 -> drop_path
      layer_fact = fact
      if fact is not None and 'cores' in fact:  # tk: this layer's rows of the tensor
        layer_fact = dict(fact, cores=fact_lib.layer_cores(fact['cores'], i, mlp_slices,
                                                           peft.fact_tk_layout))
      tokens, a = EncoderBlock(
          num_heads=self.num_heads, mlp_dim=self.mlp_dim, arch=self.arch,
          peft=peft.at_layer(i), reducer=reducer, layer=i, drop_path=rate,
          name=f'encoderblock_{i}')(tokens, train=train, fact=layer_fact)
      aux.append(a)
      if tokens.size is not None:
        self.sow('intermediates', f'size_{i}', tokens.size)
      if self.trace_source:
        self.sow('intermediates', f'source_{i}', tokens.source)
      if tokens.mask is not None:
        self.sow('intermediates', f'mask_{i}', tokens.mask)
    if reducer.has_regulariser:
      geo = Geometry(depth=depth, num_patches=num_tokens - reducer.num_protected,
                     num_protected=reducer.num_protected, width=width,
                     mlp_dim=self.mlp_dim)
      fraction, penalty = reducer.regulariser(aux, geo)
      self.sow('losses', 'flops_penalty', penalty,
               init_fn=lambda: 0.0, reduce_fn=lambda _, v: v)
      self.sow('intermediates', 'flops_fraction', fraction)
    if not self.final_norm:
      return tokens
    return tokens._replace(x=nn.LayerNorm(epsilon=self.arch.ln_eps, dtype=self.arch.dtype,
                                          name='encoder_norm')(tokens.x))


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

# The allowed values of the backbone's own numeric fields (configs/common.py
# documents each). With the PEFT modules' (`peft.FIELD_RANGES`) and every
# method's (`TokenReducer.field_ranges`) they form the model section's table,
# checked by `model_kwargs` whatever the method or module, so a value that
# would train without effect is refused up front. Bounds that depend on the
# model (a layer count, the FLOPs a method can reach) are checked where they
# are known, in the method's `from_config`.
BACKBONE_FIELDS: dict[str, Range | Choices] = {
    'image_size': Range(1, integer=True, why='the input resolution in pixels'),
    'ln_eps': Range(0, low_open=True, why="the backbone's LayerNorm epsilon"),
    'drop_path': Range(0, 1, high_open=True, why=(
        'the stochastic depth rate, the probability of dropping a residual branch')),
    'head_init_std': Range(0, why="the standard deviation of the new head's init"),
    'pool': Choices(POOLS, why=(
        "the class token, or MAE's global average of the patch tokens with fc_norm")),
}


def model_field_ranges() -> dict[str, Range | Choices]:
  """The model section's table: the backbone's, the PEFT modules' and every method's."""
  table = dict(BACKBONE_FIELDS, **PEFT_FIELD_RANGES)
  for reducer in registry.methods().values():
    table.update(reducer.field_ranges)
  return table


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


# Every model field a module or method reads besides the backbone's; each must
# exist whatever the method (a config missing one is refused by name).
PEFT_CONFIG_FIELDS = ('peft', 'lora_rank', 'lora_dropout', 'lora_init', 'peft_dim',
                       'peft_dropout', 'adapter_init', 'convpass_scale', 'convpass_init',
                       'fact_variant', 'fact_rank', 'fact_scale', 'fact_dropout',
                       'fact_tk_layout', 'snf_flow_length', 'snf_blocks')


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
  check_fields(c, {'image_size': BACKBONE_FIELDS['image_size']}, 'model.')  # Used next.
  if image_size % patch:
    raise ValueError(f'model.image_size {image_size} is not a multiple of the patch size {patch}.')
  n_classes = _positive_or_unset('num_classes', _field(c, 'num_classes'),
                                 "the task's class count")
  if n_classes is None:
    n_classes = num_classes
  if not n_classes or n_classes <= 0:
    raise ValueError('model.num_classes is unset: set it, or pass the task\'s class count.')
  reducer_cls = registry.method(_field(c, 'method'))
  attention = _field(c, 'attention')
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, '
                     f'got {attention!r}.')
  for name in PEFT_CONFIG_FIELDS:
    _field(c, name)
  peft = PeftSettings.from_config(c, width=width, mlp=mlp)
  if peft.module == 'convpass' and not reducer_cls.keeps_source:
    keeping = [n for n, r in registry.methods().items() if r.keeps_source]
    raise ConfigError(
        f"model.peft='convpass' lays tokens on the patch grid through the merge's source "
        f"matrix, which model.method={reducer_cls.name!r} does not keep: use it with "
        f"{', '.join(keeping)}, or another module (model.peft).")
  distilled = _field(c, 'distilled')
  distilled_train = distilled_train_head(c)  # Also checks distilled_eval.
  for reducer in registry.methods().values():  # Each method's fields, whatever the method.
    for name in reducer.config_fields:
      _field(c, name)
  _field(c, 'schedule')
  geo = Geometry(depth=depth, num_patches=(image_size // patch) ** 2,
                 num_protected=1 + int(distilled), width=width, mlp_dim=mlp,
                 num_heads=heads)
  reducer = reducer_cls.from_config(c, geo)
  # Last, so the checks above that know the model (its depth, the FLOPs a
  # method can reach) speak first; nothing above misbehaves on a value the
  # table refuses.
  check_fields(c, model_field_ranges(), 'model.')
  pool = _field(c, 'pool')
  if pool == 'gap' and distilled:
    raise ConfigError("model.pool='gap' pools the patch tokens for one head; a distilled "
                      "(DeiT) model has two token heads: use model.pool='cls'.")
  block = BlockSettings(
      qkv_bias=_field(c, 'qkv_bias'), layerscale=_field(c, 'layerscale'),
      ln_eps=_field(c, 'ln_eps'), prop_attn=_field(c, 'prop_attn'), attention=attention,
      dtype=jnp.dtype(jnp.float32 if dtype is None else dtype))
  return dict(
      num_classes=n_classes, patch_size=patch, width=width, depth=depth,
      num_heads=heads, mlp_dim=mlp, arch=block, peft=peft, reducer=reducer,
      distilled=distilled, distilled_eval=_field(c, 'distilled_eval'),
      distilled_train=distilled_train, drop_path=_field(c, 'drop_path'),
      head_init_std=_field(c, 'head_init_std'), pool=pool)


def build_model(model_config: ml_collections.ConfigDict, *,
                num_classes: Optional[int] = None, dtype: Any = None,
                trace_source: bool = False) -> VisionTransformer:
  """The one entry point: a config's `model` section -> VisionTransformer."""
  return VisionTransformer(**model_kwargs(model_config, num_classes=num_classes, dtype=dtype),
                           trace_source=trace_source)



def rap_uniform_widths(model_config: ml_collections.ConfigDict) -> str:
  """RaP's widths (`model.rap_widths`) when no search has run: one keep fraction
  for every block, at the schedule's FLOPs (the level a search would meet;
  `methods.rap.uniform_widths`). What the benchmark times and `param_counts`
  counts for RaP before its stage 2."""
  from pyra_jax.methods import rap as rap_lib  # pylint: disable=g-import-not-at-top
  as_peft = ml_collections.ConfigDict(model_config.to_dict())
  as_peft.method = 'peft'
  kw = model_kwargs(as_peft, num_classes=1)
  geo = Geometry(
      depth=kw['depth'], num_patches=(model_config.image_size // kw['patch_size']) ** 2,
      num_protected=1 + int(kw['distilled']), width=kw['width'], mlp_dim=kw['mlp_dim'],
      num_heads=kw['num_heads'])
  return rap_lib.uniform_widths(geo, rap_lib.budget(model_config, geo))


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

