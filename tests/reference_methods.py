"""Slow numpy transcriptions of LTMP and DiffRate, written from their definitions.

docs/algorithm.md §17 (and the methods' papers): loops over the batch and the
tokens, no vectorised tricks, so a bug in `pyra_jax/methods/` cannot be mirrored
here. Hard (forward) values only; used by tests/test_methods_ltmp_diffrate.py.
"""

from __future__ import annotations

import math

import numpy as np


def ltmp_block(x, size, mask, metric, importance, merge_t, prune_t, num_protected=1):
  """LTMP merge-then-prune on (B, N, ...) arrays; tokens stay in their positions.

  Returns (x, size, mask) after the block's reduction.
  """
  x, size, mask = x.copy(), size.copy(), mask.copy()
  b, n, _ = x.shape
  out_x, out_s, out_m = np.empty_like(x), np.empty_like(size), np.empty_like(mask)
  for bi in range(b):
    xs = [x[bi, i] * size[bi, i, 0] for i in range(n)]
    sz = [float(size[bi, i, 0]) for i in range(n)]
    mk = [float(mask[bi, i]) for i in range(n)]
    imp = [float(importance[bi, i]) for i in range(n)]
    unit = []
    for i in range(n):
      v = metric[bi, i] / np.sqrt((metric[bi, i] ** 2).sum())
      unit.append(v if mk[i] > 0 else np.zeros_like(v))
    new_mask = list(mk)
    new_imp = list(imp)
    new_xs = [v.copy() for v in xs]
    new_sz = list(sz)
    for i in range(0, n, 2):               # set A: even positions
      if i == 0:
        continue                           # the class token is never merged
      best, best_j = -math.inf, None
      for j in range(1, n, 2):             # set B: odd positions
        if num_protected > 1 and j == 1:
          continue                         # the distillation token receives nothing
        s = float(np.dot(unit[i], unit[j]))
        if s > best:
          best, best_j = s, j
      merged = best > merge_t
      if mk[i] > 0:
        new_mask[i] = 0.0 if merged else 1.0
      if merged:
        new_xs[best_j] = new_xs[best_j] + xs[i]
        new_sz[best_j] += sz[i]
        new_imp[best_j] = max(new_imp[best_j], imp[i])
    for i in range(n):
      if i < num_protected:
        continue                           # never pruned
      if new_mask[i] > 0 and not new_imp[i] > prune_t:
        new_mask[i] = 0.0
    for i in range(n):
      out_x[bi, i] = new_xs[i] / new_sz[i]
      out_s[bi, i, 0] = new_sz[i]
      out_m[bi, i] = new_mask[i]
  return out_x, out_s, out_m


def masked_softmax(logits, mask, eps=0.0):
  """(B, H, Q, K) weights of the keys, each key's exp weighted by mask (B, K)."""
  out = np.empty_like(logits)
  b, h, q, k = logits.shape
  for bi in range(b):
    for hi in range(h):
      for qi in range(q):
        row = logits[bi, hi, qi]
        e = np.exp(row - row.max()) * mask[bi]
        out[bi, hi, qi] = (e + eps / k) / (e.sum() + eps)
  return out


def block_flops(n_in, n_out, d, mlp_ratio=4.0):
  """2 x MACs of one block: q, k, v, out projections, the two attention
  products on n_in tokens, the MLP on n_out tokens."""
  return 2 * (4 * n_in * d * d + 2 * n_in * n_in * d) + 2 * (2 * mlp_ratio * n_out * d * d)


def diffrate_block(x, size, cls_attn, prune_kept, merge_kept, num_protected=1):
  """DiffRate with fixed counts: sort by class attention, prune, merge by mean."""
  b = x.shape[0]
  xs_out, sz_out = [], []
  for bi in range(b):
    score = cls_attn[bi].mean(axis=0)
    rest = list(range(num_protected, x.shape[1]))
    rest.sort(key=lambda i: (-score[i], i))
    order = list(range(num_protected)) + rest
    order = order[:prune_kept]
    t = [x[bi, i].copy() for i in order]
    s = [float(size[bi, i, 0]) for i in order]
    if merge_kept < prune_kept:
      unit = [v / np.sqrt((v ** 2).sum()) for v in t]
      sums = [v.copy() for v in t[:merge_kept]]
      counts = [1] * merge_kept
      sizes = [max(v, 1.0) for v in s[:merge_kept]]
      for i in range(merge_kept, prune_kept):
        best, best_j = -math.inf, None
        for j in range(num_protected, merge_kept):
          sim = float(np.dot(unit[i], unit[j]))
          if sim > best:
            best, best_j = sim, j
        sums[best_j] = sums[best_j] + t[i]
        counts[best_j] += 1
        sizes[best_j] += max(s[i] * best, 1.0)
      t = [v / c for v, c in zip(sums, counts)]
      s = sizes
    xs_out.append(np.stack(t))
    sz_out.append(np.array(s)[:, None])
  return np.stack(xs_out), np.stack(sz_out)
