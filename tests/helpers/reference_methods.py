"""Slow numpy transcriptions of LTMP, DiffRate and EViT as their authors' code runs.

Written from reading the original repositories (Mxbonn/ltmp `lt_mergeprune.py`,
OpenGVLab/DiffRate `patch/deit.py` + `merge.py`, youweiliang/evit `evit.py`),
in loops over the batch and the tokens, no vectorised tricks, so a bug in
`pyra_jax/methods/` cannot be mirrored here. Hard (forward) values only. The
distillation-token handling (num_protected = 2) is ours: the originals have no
such token; it follows docs/algorithm.md §16-17. Used by
tests/test_methods_ltmp_diffrate.py and tests/test_competitors.py.
"""

from __future__ import annotations

import math

import numpy as np

from tests.helpers.reference_merge import attention, embed, gelu, layer_norm


def ltmp_block(x, size, mask, metric, importance, merge_t, prune_t, num_protected=1):
  """LTMP merge-then-prune on (B, N, ...) arrays, as the original block.

  The even positions form set A, the odd ones set B; the block returns the A
  tokens, then the B tokens (the original's torch.cat), so the next block's
  split is drawn on that order. With a distillation token (B[0]) it moves
  next to the class token: [A0, B0, A1.., B1..]. Returns (x, size, mask).
  """
  b, n, _ = x.shape
  a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
  if num_protected > 1:
    order = [a_idx[0], b_idx[0]] + a_idx[1:] + b_idx[1:]
  else:
    order = a_idx + b_idx
  out_x, out_s, out_m = np.empty_like(x), np.empty_like(size), np.empty_like(mask)
  for bi in range(b):
    xs = [x[bi, i] * size[bi, i, 0] for i in range(n)]
    sz = [float(size[bi, i, 0]) for i in range(n)]
    mk = [float(mask[bi, i]) for i in range(n)]
    imp = [float(importance[bi, i]) for i in range(n)]
    imp[0] = math.inf                      # the class token's score (set in attention)
    unit = []
    for i in range(n):
      v = metric[bi, i] / np.sqrt((metric[bi, i] ** 2).sum())
      unit.append(v * mk[i])               # inactive tokens: similarity 0
    new_mask, new_imp = list(mk), list(imp)
    new_xs, new_sz = [v.copy() for v in xs], list(sz)
    for i in a_idx:
      best, best_j = -math.inf, b_idx[0]
      if i != 0:                           # the class token's row is -inf
        for j in b_idx:
          if num_protected > 1 and j == 1:
            continue                       # the distillation token receives nothing
          s = float(np.dot(unit[i], unit[j]))
          if s > best:
            best, best_j = s, j
      merged = best > merge_t
      if mk[i] > 0:                        # inactive sources keep their 0
        new_mask[i] = 0.0 if merged else 1.0
      if merged:
        new_xs[best_j] = new_xs[best_j] + xs[i]
        new_sz[best_j] += sz[i]
        new_imp[best_j] = max(new_imp[best_j], imp[i])
    for i in range(n):
      if i == 0 or (num_protected > 1 and i == 1):
        continue                           # never pruned
      if new_mask[i] > 0 and not new_imp[i] > prune_t:
        new_mask[i] = 0.0
    for pos, i in enumerate(order):
      out_x[bi, pos] = new_xs[i] / new_sz[i]
      out_s[bi, pos, 0] = new_sz[i]
      out_m[bi, pos] = new_mask[i]
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


def diffrate_block(x, size, cls_attn, prune_kept, merge_kept, num_protected=1,
                   clamp=False):
  """DiffRate with fixed counts: sort by class attention, prune, merge by mean.

  clamp=False is the original's deployed (eval) forward: each source's size is
  multiplied by its similarity and added to its destination's. clamp=True is
  its training (search) forward: every size among the kept tokens is clamped
  at >= 1 after that scaling, before the sum.
  """
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
      fix = (lambda v: max(v, 1.0)) if clamp else (lambda v: v)
      sizes = [fix(v) for v in s[:merge_kept]]
      for i in range(merge_kept, prune_kept):
        best, best_j = -math.inf, None
        for j in range(num_protected, merge_kept):
          sim = float(np.dot(unit[i], unit[j]))
          if sim > best:
            best, best_j = sim, j
        sums[best_j] = sums[best_j] + t[i]
        counts[best_j] += 1
        sizes[best_j] += fix(s[i] * best)
      t = [v / c for v, c in zip(sums, counts)]
      s = sizes
    xs_out.append(np.stack(t))
    sz_out.append(np.array(s)[:, None])
  return np.stack(xs_out), np.stack(sz_out)


def evit_block(x, cls_attn, keep):
  """EViT's reorganisation for one layer (class token only, as the original):
  the `keep` tokens the class token attends to most (head mean), highest
  first, then one token, the attention-weighted sum of the others."""
  outs = []
  for xb, ab in zip(x, cls_attn):
    a = ab.mean(axis=0)[1:]
    order = sorted(range(len(a)), key=lambda j: (-a[j], j))
    kept, rest = order[:keep], order[keep:]
    fused = sum(a[j] * xb[1 + j] for j in rest)
    outs.append(np.stack([xb[0]] + [xb[1 + j] for j in kept] + [fused]))
  return np.stack(outs)


def vit_forward(p: dict, images: np.ndarray, *, method: str, num_heads: int,
                depth: int, ln_eps: float = 1e-6, diffrate_kept=(), evit_keep_rate=0.7,
                evit_layers=(), prop_attn: bool = True) -> np.ndarray:
  """The class feature (after the final LayerNorm: what the head reads) of our
  parameter tree, eval mode, with LTMP, DiffRate (fixed rates) or EViT run
  as the authors' code runs them; class token only.

  ltmp: each block's thresholds from `p` (`ltmp/merge_threshold`, ...), the
  attention weights keys by the mask, importance = mean attention received,
  the metric = keys averaged over heads, `ltmp_block` ([A, B] order).
  diffrate: `diffrate_kept` = ((prune, merge), ...) per layer, `diffrate_block`
  without the clamp. evit: at `evit_layers`, keep = ceil(rate * M) of the M
  image tokens; a layer reorganises unless that keeps all M (keep = M - 1
  reorganises too).
  """
  x = embed(p, images, np.float64)
  bsz, dim = x.shape[0], x.shape[-1]
  size = np.ones(x.shape[:2] + (1,))
  mask = np.ones(x.shape[:2])
  for li in range(depth):
    blk = p['Transformer'][f'encoderblock_{li}']
    ln0 = blk['LayerNorm_0']
    y = layer_norm(x, ln0['scale'], ln0['bias'], ln_eps)
    use_size = size if (prop_attn and method != 'evit') else None
    out, probs, k = attention(y, blk['MultiHeadDotProductAttention_0'], use_size,
                               mask if method == 'ltmp' else None, num_heads)
    x = x + out
    if method == 'ltmp':
      th = blk['ltmp']
      x, size, mask = ltmp_block(x, size, mask, k.mean(2), probs.mean(axis=(1, 2)),
                                 float(th['merge_threshold'][0]),
                                 float(th['prune_threshold'][0]))
    elif method == 'diffrate':
      pk, mk = diffrate_kept[li]
      if pk < x.shape[1] or mk < pk:
        x, size = diffrate_block(x, size, probs[:, :, 0, :], pk, mk)
    elif method == 'evit' and li in evit_layers:
      m = x.shape[1] - 1
      keep = max(math.ceil(evit_keep_rate * m - 1e-9), 1)
      if keep < m:
        x = evit_block(x, probs[:, :, 0, :], keep)
    ln1 = blk['LayerNorm_1']
    y = layer_norm(x, ln1['scale'], ln1['bias'], ln_eps)
    mlp = blk['MlpBlock_0']
    hid = gelu(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + hid @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  en = p['Transformer']['encoder_norm']
  return layer_norm(x[:, :1], en['scale'], en['bias'], ln_eps)[:, 0]
