"""ATS, Adaptive Token Sampling (Fayyaz et al., ECCV 2022), in static shapes.

Definition (docs/algorithm.md §16.3). At a sampling layer, after attention and
its residual, over the M = N - P tokens after the protected prefix (class token,
and DeiT's distillation token):
  1. score  s_j = (sum over heads of the class token's attention to j) * |v_j|,
     |v_j| the norm of token j's value vector (all heads concatenated), then
     normalised to sum 1 (tokens masked out earlier score 0);
  2. sort the scores ascending, take their cumulative sum and min-max
     normalise it to [0, 1] (the CDF);
  3. K sample points evenly spaced from the smallest non-zero CDF value to 1
     (ATS's fixed, deterministic inverse-transform sampling);
  4. each point picks the token whose CDF value is closest (the first such);
  5. duplicates collapse: a token picked twice is kept once.
The number of distinct tokens varies per image (<= K). Static shapes instead:
the layer outputs P + K slots (the picked tokens in sampling order) and a 0/1
mask that is 0 on a repeated pick; later layers compute every slot, and
attention ignores masked keys (the mask enters as a log-size bias of log 0).
So the FLOPs computed are those of a fixed K, not of the distinct count: that
is the cost of keeping one compilation (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax.methods import base

Array = jax.Array


def sample_points(cdf: Array, k: int) -> Array:
  """ATS's K evenly spaced points from the smallest non-zero CDF value to 1: (B, K)."""
  start = jnp.min(jnp.where(cdf > 0, cdf, jnp.inf), axis=1, keepdims=True)
  start = jnp.where(jnp.isfinite(start), start, 1.0)
  if k == 1:
    return jnp.ones_like(start)
  steps = jnp.arange(k, dtype=cdf.dtype)[None] / (k - 1)
  return start + steps * (1.0 - start)


def ats_sample(x: Array, mask: Array, cls_attn: Array, value_norm: Array, k: int, *,
               num_protected: int = 1) -> tuple[Array, Array]:
  """Samples k of the unprotected tokens; returns (tokens, mask) of P + k slots.

  x: (B, N, C); mask: (B, N, 1) 1 = a live token, 0 = a slot masked earlier;
  cls_attn: (B, H, N) the class token's attention (softmax over keys);
  value_norm: (B, N) |v_j|. The picks carry no gradient (indices).
  """
  b, n, _ = x.shape
  p = num_protected
  if not 0 < k <= n - p:
    raise ValueError(f'ATS samples 0 < k <= {n - p} tokens, got {k}.')
  live = jax.lax.stop_gradient(mask[:, p:, 0]).astype(jnp.float32)
  score = jax.lax.stop_gradient(
      cls_attn.astype(jnp.float32).sum(axis=1)[:, p:] *
      value_norm.astype(jnp.float32)[:, p:]) * live
  score = score / jnp.maximum(score.sum(axis=1, keepdims=True), 1e-30)
  order = jnp.argsort(score, axis=1, stable=True)  # ascending
  cdf = jnp.cumsum(jnp.take_along_axis(score, order, axis=1), axis=1)
  lo, hi = cdf[:, :1], cdf[:, -1:]
  cdf = (cdf - lo) / jnp.maximum(hi - lo, 1e-30)
  ys = sample_points(cdf, k)  # (B, k)
  pick = jnp.argmin(jnp.abs(ys[:, :, None] - cdf[:, None, :]), axis=2)  # (B, k)
  # A pick is new if no earlier point made the same pick.
  same = pick[:, :, None] == pick[:, None, :]  # (B, k, k)
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)[None]
  first = ~jnp.any(same & earlier, axis=2)
  idx = jnp.take_along_axis(order, pick, axis=1)  # token index among the M
  valid = first & (jnp.take_along_axis(live, idx, axis=1) > 0)
  tokens = jnp.take_along_axis(x[:, p:], idx[..., None], axis=1)
  out = jnp.concatenate([x[:, :p], tokens], axis=1)
  out_mask = jnp.concatenate(
      [jnp.ones((b, p), mask.dtype), valid.astype(mask.dtype)], axis=1)[..., None]
  return out, out_mask


@dataclasses.dataclass(frozen=True)
class ATS(base.TokenReducer):
  """Samples N - P - schedule[l] slots where schedule[l] > 0, and at `layers`
  (all N - P slots: ATS's own setting, where the schedule removes none).

  The 0/1 slot mask travels as the token size, so attention always receives
  it (`size_bias`), whatever model.prop_attn says.
  """
  layers: tuple[int, ...]

  name: ClassVar[str] = 'ats'
  traces_source: ClassVar[bool] = False
  config_fields: ClassVar[tuple[str, ...]] = ('ats_layers',)

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'ATS':
    layers = base.layer_list(c, 'ats_layers', geo.depth)
    return cls(schedule=base.config_schedule(c, geo), num_protected=geo.num_protected,
               layers=() if layers is None else layers)

  def samples(self, layer: int) -> bool:
    return self.schedule[layer] > 0 or layer in self.layers

  def attention(self, layer: int, *, train: bool) -> base.AttentionRequest:
    here = self.samples(layer)
    return base.AttentionRequest(cls_attn=here, value_norm=here, size_bias=True)

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    if not self.samples(layer):
      return tokens, None
    tokens = tokens.with_size()
    k = tokens.x.shape[1] - self.num_protected - self.schedule[layer]
    x, size = ats_sample(tokens.x, tokens.size, attended.cls_attn, attended.value_norm, k,
                         num_protected=self.num_protected)
    return tokens._replace(x=x, size=size), None
