"""LTMP: learned-threshold token merging and pruning (Bonnaerens & Dambre, TMLR 2023).

docs/algorithm.md §17.1. Every block, between attention and the MLP:

  merge  ToMe's bipartite split (A = even, B = odd positions); each active A
         token's best cosine similarity to a B token (mean keys) is compared
         with the layer's merge threshold: m = [sim > theta_m]. A merged source
         adds its size-weighted value and its size to its destination and
         becomes inactive (mask 0). The class token is never a source, the
         distillation token (B[0]) never a destination.
  prune  importance = the attention a token receives, averaged over heads and
         queries (of the masked softmax); a merged destination takes the max of
         its own and its sources' importance. Active tokens with importance <=
         theta_p become inactive. The class (and distillation) token's
         importance is +inf: never pruned.

Masks are straight-through: the forward value is the hard 0/1 decision, the
gradient is that of sigmoid((score - theta) / tau). Training and inference
therefore run the same forward; only the thresholds' gradients are "soft".

Token order, as the method's code: a block returns the A tokens, then the B
tokens (with DeiT's distillation token, B[0], moved to position 1 so the
protected prefix stays first), so the next block's even/odd split is drawn
on this new order. Static shapes: inactive tokens stay in the arrays and
attention ignores them as keys (`masked_attention`), so the token count that
runs is the full one in every layer; the mask only changes which tokens
influence the class token. The FLOPs LTMP *would* cost with tokens actually
removed is `flops_ratio` of the mean masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Range
from pyra_jax.methods import base

Array = jax.Array
# The method's training softmax adds eps / K to the numerator and eps to the sum.
TRAIN_EPS = 1e-5
THRESHOLD_NAMES = ('merge_threshold', 'prune_threshold')


def threshold_mask(score: Array, threshold: Array, tau: float) -> Array:
  """[score > threshold] forward, d sigmoid((score - threshold) / tau) backward."""
  soft = jax.nn.sigmoid((score - threshold) / tau)
  hard = (score > threshold).astype(soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))


def masked_softmax(logits: Array, mask: Array, eps: float = 0.0) -> Array:
  """softmax over the last axis with keys weighted by `mask` (B, K).

  exp(l - max) * mask / (sum + eps), plus eps / K in the numerator when eps > 0
  (LTMP trains with eps = 1e-5 for stability; inference uses eps = 0, a plain
  softmax over the active keys). logits (B, H, Q, K) float32.
  """
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  e = e * mask[:, None, None, :].astype(e.dtype)
  if eps:
    return (e + eps / e.shape[-1]) / (e.sum(axis=-1, keepdims=True) + eps)
  return e / e.sum(axis=-1, keepdims=True)


class LtmpState(NamedTuple):
  x: Array        # (B, N, D)
  size: Array     # (B, N, 1): patches each token stands for
  mask: Array     # (B, N): 1 active, 0 merged away or pruned (straight-through)


def merge_then_prune(x: Array, size: Array, mask: Array, metric: Array,
                     importance: Array, merge_threshold: Array,
                     prune_threshold: Array, *, tau: float,
                     num_protected: int = 1) -> LtmpState:
  """One LTMP block's reduction (after attention, before the MLP).

  x (B, N, D) the tokens after the attention residual; size (B, N, 1); mask
  (B, N) the active tokens entering; metric (B, N, C) the head-mean keys;
  importance (B, N) the mean attention each token received; thresholds
  scalars. `num_protected` = 1 (class token) or 2 (class + distillation).
  Returns the new tokens, sizes and mask, same shapes, in the order
  [A, B] (even input positions, then odd ones; see the module docstring).
  """
  hard_active = jax.lax.stop_gradient(mask) > 0
  metric = jax.lax.stop_gradient(metric)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  metric = metric * hard_active[..., None].astype(metric.dtype)
  a, bb = metric[:, ::2], metric[:, 1::2]
  scores = jnp.einsum('bic,bjc->bij', a, bb).astype(jnp.float32)
  scores = scores.at[:, 0, :].set(-jnp.inf)          # class token: not a source
  if num_protected > 1:
    scores = scores.at[:, :, 0].set(-jnp.inf)        # distillation token: not a destination
  node_max = scores.max(axis=-1)
  node_idx = scores.argmax(axis=-1)
  m = threshold_mask(node_max, merge_threshold, tau)  # (B, NA)
  m = jnp.where(jnp.isfinite(node_max), m, 0.0)       # protected: no mask, no gradient
  m_stop = jax.lax.stop_gradient(m)
  src_active = hard_active[:, ::2]
  a_mask = jnp.where(src_active, 1.0 - m, mask[:, ::2])

  xs = x * size
  src_x, dst_x = xs[:, ::2], xs[:, 1::2]
  src_s, dst_s = size[:, ::2], size[:, 1::2]
  add = jax.vmap(lambda d_, i, s_: d_.at[i].add(s_))
  dst_x = add(dst_x, node_idx, src_x * m_stop[..., None].astype(xs.dtype))
  dst_s = add(dst_s, node_idx, src_s * m_stop[..., None].astype(size.dtype))
  src_imp = importance[:, ::2] * m_stop
  src_imp = src_imp.at[:, 0].set(0.0)
  dst_imp = jax.vmap(lambda d_, i, s_: d_.at[i].max(s_))(importance[:, 1::2], node_idx, src_imp)

  # The method's order: the A set, then the B set. A distillation token (B[0])
  # is moved next to the class token (A[0]), so the prefix stays in front.
  def a_then_b(ev, od):
    if num_protected > 1:
      return jnp.concatenate([ev[:, :1], od[:, :1], ev[:, 1:], od[:, 1:]], axis=1)
    return jnp.concatenate([ev, od], axis=1)
  xs = a_then_b(src_x, dst_x)
  size = a_then_b(src_s, dst_s)
  new_mask = a_then_b(a_mask.astype(mask.dtype), mask[:, 1::2])
  imp = a_then_b(importance[:, ::2], dst_imp)
  imp = imp.at[:, :num_protected].set(jnp.inf)

  p = threshold_mask(imp, prune_threshold, tau)
  p = jnp.where(jnp.isfinite(imp), p, 1.0)
  new_mask = jnp.where(jax.lax.stop_gradient(new_mask) > 0, p.astype(mask.dtype), new_mask)
  return LtmpState(xs / size, size, new_mask)


def flops_ratio(kept: Sequence[Array], *, num_tokens: int, width: int,
                mlp_ratio: float = 4.0) -> Array:
  """LTMP's FLOPs of the blocks relative to the uncompressed model.

  kept[l] is the fraction of the N tokens active after block l's reduction
  (the mean of its mask); block l's attention runs on kept[l-1] * N tokens
  (kept[-1] = 1) and its MLP on kept[l] * N. Per block, with n = N:
  (4 k n D^2 + 2 (k n)^2 D + 2 mlp_ratio k' n D^2) / (4 n D^2 + 2 n^2 D +
  2 mlp_ratio n D^2), averaged over the blocks (all blocks cost the same
  uncompressed, so this is the ratio of the sums).
  """
  n, d = float(num_tokens), float(width)
  full = 4 * n * d * d + 2 * n * n * d + 2 * mlp_ratio * n * d * d
  total = 0.0
  prev = 1.0
  for k in kept:
    total = total + (4 * prev * n * d * d + 2 * (prev * n) ** 2 * d
                     + 2 * mlp_ratio * k * n * d * d) / full
    prev = k
  return total / len(kept)


def flops_penalty(ratio: Array, target: float, weight: float) -> Array:
  """weight * (ratio - target)^2: pulls the kept FLOPs toward the target."""
  return weight * jnp.square(ratio - target)


def effective_tokens(masks: Sequence[Array]) -> list[float]:
  """Mean number of active tokens after each block (host floats, for reports)."""
  return [float(jnp.mean(jnp.sum(m, axis=-1))) for m in masks]


def project_thresholds(params: Any) -> Any:
  """Clamps every `ltmp/*_threshold` leaf into [0, 1] (the method does this
  after each optimiser step: similarity and mean attention live there)."""
  def clip(path, leaf):
    names = [getattr(k, 'key', str(k)) for k in path]
    if len(names) >= 2 and names[-2] == 'ltmp' and names[-1] in THRESHOLD_NAMES:
      return jnp.clip(leaf, 0.0, 1.0)
    return leaf
  return jax.tree_util.tree_map_with_path(clip, params)


class LtmpThresholds(nn.Module):
  """`ltmp/{merge_threshold, prune_threshold}` (1,): one block's learned thresholds.

  Kept in [0, 1] by the training step (`LTMP.project`), as the method clamps
  them after every update.
  """
  merge_init: float
  prune_init: float

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    merge = self.param('merge_threshold', nn.initializers.constant(self.merge_init), (1,))
    prune = self.param('prune_threshold', nn.initializers.constant(self.prune_init), (1,))
    return merge[0], prune[0]


@dataclasses.dataclass(frozen=True)
class LTMP(base.TokenReducer):
  """Merges then prunes by learned thresholds in every block, masking tokens.

  Data dependent, so the schedule is all zeros (every token runs); the FLOPs
  the masks would save are pulled toward `flops_target` by the regulariser.
  """
  tau: float
  merge_init: float
  prune_init: float
  flops_target: float
  flops_weight: float

  name: ClassVar[str] = 'ltmp'
  has_regulariser: ClassVar[bool] = True
  masks_tokens: ClassVar[bool] = True
  config_fields: ClassVar[tuple[str, ...]] = (
      'ltmp_tau', 'ltmp_merge_init', 'ltmp_prune_init', 'ltmp_flops_target',
      'ltmp_flops_weight')
  field_ranges: ClassVar[dict] = {
      'ltmp_tau': Range(0, low_open=True, why=(
          "the sigmoid temperature of the masks' gradient (the method's training script "
          'uses 0.5)')),
      'ltmp_merge_init': Range(0, 1, why='thresholds live in [0, 1] (cosine similarity)'),
      'ltmp_prune_init': Range(0, 1, why='thresholds live in [0, 1] (mean attention)'),
      'ltmp_flops_target': Range(0, 1, low_open=True, why='the FLOPs fraction to keep'),
      'ltmp_flops_weight': Range(0, why='0 trains without the FLOPs target'),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'LTMP':
    # The fields' own ranges are `field_ranges`'; here the bound that depends
    # on the model.
    target = c.ltmp_flops_target
    least = float(flops_ratio([1.0 / geo.num_tokens] * geo.depth, num_tokens=geo.num_tokens,
                              width=geo.width, mlp_ratio=geo.mlp_ratio))
    if not least <= target <= 1.0:
      raise ConfigError(
          f'model.ltmp_flops_target = {target}: the FLOPs fraction to keep must lie '
          f'between {least:.3f} (only the class token left after the first block) and 1.')
    return cls(schedule=(0,) * geo.depth, num_protected=geo.num_protected,
               tau=c.ltmp_tau, merge_init=c.ltmp_merge_init, prune_init=c.ltmp_prune_init,
               flops_target=target, flops_weight=c.ltmp_flops_weight)

  def attention(self, layer: int, *, train: bool) -> base.AttentionRequest:
    return base.AttentionRequest(mean_attn=True, masked=True,
                                 mask_eps=TRAIN_EPS if train else 0.0)

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    merge_t, prune_t = LtmpThresholds(self.merge_init, self.prune_init, name='ltmp')()
    tokens = tokens.with_size().with_mask()
    x, size, mask = merge_then_prune(
        tokens.x, tokens.size, tokens.mask, attended.metric, attended.mean_attn,
        merge_t, prune_t, tau=self.tau, num_protected=self.num_protected)
    return tokens._replace(x=x, size=size, mask=mask), mask.mean()

  def regulariser(self, aux: list[Any], geo: base.Geometry) -> tuple[Array, Array]:
    fraction = flops_ratio(aux, num_tokens=geo.num_tokens, width=geo.width,
                           mlp_ratio=geo.mlp_ratio)
    return fraction, flops_penalty(fraction, self.flops_target, self.flops_weight)

  def project(self, trainable: Any) -> Any:
    return project_thresholds(trainable)

  def masked_flops(self, keep_fractions: list[Array], *, num_tokens: int, width: int,
                   mlp_ratio: float) -> Array:
    return flops_ratio(keep_fractions, num_tokens=num_tokens, width=width,
                       mlp_ratio=mlp_ratio)
