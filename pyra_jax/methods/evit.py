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

import jax
import jax.numpy as jnp

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
