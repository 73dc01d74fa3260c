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

from typing import Optional

import jax
import jax.numpy as jnp

from pyra_jax import merge as merge_lib

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
