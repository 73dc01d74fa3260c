"""ToFu, Token Fusion (Kim et al., WACV 2024): ToMe's matching, then prune or MLERP-merge.

Definition (docs/algorithm.md §16.2). The plan is ToMe's bipartite soft
matching on the head-mean keys (`merge.bipartite_soft_matching`: r sources of
set A, each paired with its most similar token of set B; the class token
and the distillation token are never sources).
  * Early layers prune: the r sources are dropped; their destinations are left
    as they are (value and size).
  * Later layers merge with MLERP, the norm-preserving merge: each output
    token is the size-weighted average of its group G (a destination and the
    sources matched to it, as ToMe's merge_wavg), rescaled to the largest norm
    in the group:  m = avg_G(x) * max_{i in G} |x_i| / |avg_G(x)|.
    A token that received no source keeps its value (its group is itself).
Sizes add as in ToMe in merging layers, so proportional attention applies.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import merge as merge_lib
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Range
from pyra_jax.methods import base

Array = jax.Array


def prune(x: Array, size: Array, plan: merge_lib.MergePlan, *,
          distill_token: bool = False) -> tuple[Array, Array]:
  """Drops the plan's sources: a merge in which the sources contribute nothing."""
  drop = lambda src, dst: jnp.zeros_like(src)
  return (merge_lib.merge(x, plan, distill_token=distill_token, modulate=drop),
          merge_lib.merge(size, plan, distill_token=distill_token, modulate=drop))


def mlerp_merge(x: Array, size: Array, plan: merge_lib.MergePlan, *,
                distill_token: bool = False, eps: float = 1e-6) -> tuple[Array, Array]:
  """ToMe's size-weighted average merge, rescaled to each group's largest norm."""
  avg, size = merge_lib.merge_wavg(x, size, plan, distill_token=distill_token)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  max_norm = merge_lib.merge(norm, plan, distill_token=distill_token, reduce='max')
  avg_norm = jnp.linalg.norm(avg, axis=-1, keepdims=True)
  return avg * (max_norm / jnp.maximum(avg_norm, eps)), size


def tofu(x: Array, size: Optional[Array], metric: Array, r: int, *, prune_layer: bool,
         distill_token: bool = False) -> tuple[Array, Array, Optional[merge_lib.MergePlan]]:
  """One ToFu step on (B, N, C) tokens: r tokens fewer, pruned or MLERP-merged."""
  if size is None:
    size = jnp.ones(x.shape[:2] + (1,), x.dtype)
  plan = merge_lib.bipartite_soft_matching(metric, r, class_token=True,
                                           distill_token=distill_token)
  if plan is None:
    return x, size, None
  fn = prune if prune_layer else mlerp_merge
  x, size = fn(x, size, plan, distill_token=distill_token)
  return x, size, plan


@dataclasses.dataclass(frozen=True)
class ToFu(base.TokenReducer):
  """Removes schedule[l] tokens in block l: pruned in the first `prune_layers`
  blocks, MLERP-merged after them."""
  prune_layers: int

  name: ClassVar[str] = 'tofu'
  config_fields: ClassVar[tuple[str, ...]] = ('tofu_prune_layers',)
  field_ranges: ClassVar[dict] = {
      'tofu_prune_layers': Range(0, integer=True, why='how many leading layers prune'),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'ToFu':
    n = c.tofu_prune_layers
    if (isinstance(n, bool) or not isinstance(n, numbers.Integral)
        or not 0 <= n <= geo.depth):
      raise ConfigError(f'model.tofu_prune_layers must be an integer from 0 to the depth '
                        f'{geo.depth} (how many leading layers prune), got {n!r}.')
    return cls(schedule=base.config_schedule(c, geo), num_protected=geo.num_protected,
               prune_layers=n)

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    r = self.schedule[layer]
    if r <= 0:
      return tokens, None
    pruning = layer < self.prune_layers
    x, size, plan = tofu(tokens.x, tokens.size, attended.metric, r, prune_layer=pruning,
                         distill_token=self.distilled)
    source = tokens.source
    if source is not None and plan is not None:
      # A pruned source's patches leave with it (its row contributes zeros to
      # the max); a merged one's join its destination.
      drop = (lambda src, dst: jnp.zeros_like(src)) if pruning else None
      source = merge_lib.merge(source, plan, distill_token=self.distilled,
                               reduce='max', modulate=drop)
    return tokens._replace(x=x, size=size, source=source), None
