"""EViT (Liang et al., ICLR 2022): keep the attentive tokens, fuse the rest into one.

Definition (docs/algorithm.md §16.1). At a reorganisation layer, after attention
and its residual, with a = the class token's attention over the tokens averaged
over heads:
  * the protected prefix (class token, and DeiT's distillation token) stays;
  * of the other M tokens, the `keep` with the highest a stay, highest first;
  * the remaining M - keep ("inattentive") tokens are fused into ONE token,
    sum_i a_i x_i: weighted by their attention, not renormalised (EViT's own
    definition: the weights are a slice of a softmax, so they sum to < 1);
  * output: [prefix, kept tokens, fused token], P + keep + 1 tokens.
The fused token is an ordinary token in later layers (it can be kept or fused
again). The choice of tokens carries no gradient (indices); the fused token's
weights do (they are attention probabilities).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import schedules
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Range
from pyra_jax.methods import base

Array = jax.Array


def evit_reorganize(x: Array, cls_attn: Array, keep: int, *,
                    num_protected: int = 1) -> Array:
  """Keeps the `keep` most attended tokens and fuses the others into one.

  x: (B, N, C) tokens; cls_attn: (B, H, N) the class token's attention
  (softmax over the N keys, per head). Returns (B, num_protected + keep + 1, C).
  """
  b, n, c = x.shape
  p = num_protected
  if not 0 < keep < n - p:
    raise ValueError(f'EViT keeps 0 < keep < {n - p} tokens, got {keep}.')
  a = cls_attn.mean(axis=1)[:, p:].astype(x.dtype)  # (B, M)
  rest = x[:, p:]
  # top_k orders by value, highest first, ties to the lower index.
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(a), keep)  # (B, keep)
  kept = jnp.take_along_axis(rest, idx[..., None], axis=1)
  is_kept = jnp.zeros(a.shape, bool).at[jnp.arange(b)[:, None], idx].set(True)
  w = jnp.where(is_kept, 0.0, a)
  fused = jnp.einsum('bm,bmc->bc', w, rest)[:, None]
  return jnp.concatenate([x[:, :p], kept, fused], axis=1)


def evit_layers(c: ml_collections.ConfigDict, depth: int) -> tuple[int, ...]:
  """`model.evit_layers` as 0-based ints ('' = EViT's own 3, 6, 9 of 12, scaled)."""
  layers = base.layer_list(c, 'evit_layers', depth)
  return schedules.evit_default_layers(depth) if layers is None else layers


@dataclasses.dataclass(frozen=True)
class EViT(base.TokenReducer):
  """Reorganises at `active_layers`: keeps the attentive tokens, fuses the rest.

  schedule[l] = M - keep - 1 tokens removed at a reorganising layer; a layer
  keeping M - 1 of its M tokens still reorganises (schedule 0, listed in
  active_layers), as EViT's code does.
  """
  active_layers: tuple[int, ...]

  name: ClassVar[str] = 'evit'
  traces_source: ClassVar[bool] = False
  config_fields: ClassVar[tuple[str, ...]] = (
      'evit_layers', 'evit_keep_rate', 'evit_match_flops')
  field_ranges: ClassVar[dict] = {
      'evit_keep_rate': Range(0, 1, low_open=True, high_open=True, why=(
          'the fraction of tokens kept at each EViT layer, e.g. 0.7')),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'EViT':
    """From its keep rate, or (evit_match_flops) the keep rate whose FLOPs match
    model.schedule's (docs/algorithm.md §16.1)."""
    target = base.config_schedule(c, geo) if c.evit_match_flops else None
    layers = evit_layers(c, geo.depth)
    keep_rate = c.evit_keep_rate
    if (isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real)
        or not 0.0 < keep_rate < 1.0):
      raise ConfigError(f'model.evit_keep_rate must be between 0 and 1 (the fraction of '
                        f'tokens kept at each EViT layer, e.g. 0.7), got {keep_rate!r}.')
    kw = dict(depth=geo.depth, num_tokens=geo.num_tokens, num_protected=geo.num_protected)
    if target is not None:
      flops = schedules.vit_flops(target, num_tokens=geo.num_tokens, width=geo.width,
                                  mlp_ratio=geo.mlp_ratio)
      keep_rate = schedules.evit_keep_rate_for_flops(
          flops, layers, width=geo.width, mlp_ratio=geo.mlp_ratio, **kw)
    keeps = schedules.evit_keeps(keep_rate, layers, **kw)
    return cls(schedule=schedules.evit_schedule(keep_rate, layers, **kw),
               num_protected=geo.num_protected,
               active_layers=tuple(l for l, k in enumerate(keeps) if k))

  def reorganises(self, layer: int) -> bool:
    return self.schedule[layer] > 0 or layer in self.active_layers

  def attention(self, layer: int, *, train: bool) -> base.AttentionRequest:
    return base.AttentionRequest(cls_attn=self.reorganises(layer))

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    if not self.reorganises(layer):
      return tokens, None
    keep = tokens.x.shape[1] - self.num_protected - 1 - self.schedule[layer]
    x = evit_reorganize(tokens.x, attended.cls_attn, keep, num_protected=self.num_protected)
    return tokens._replace(x=x), None
