"""Slow numpy transcriptions of SPViT's and RaP's core steps, as their authors wrote them.

SPViT: PeiyanFlying/SPViT `vit_l2_3keep_senet.py` (MultiheadPredictorLG.forward,
lines 363-403; the package token and policy of VisionTransformerDiffPruning.forward,
lines 531-583), written as loops over samples, tokens and heads (the original
loops over heads too), PyTorch layout (a Linear is y = x W^T + b; we take
our (in, out) kernels as W^T). Used by tests/test_spvit_rap.py.
"""

from __future__ import annotations

import math

import numpy as np

from tests.helpers.reference_merge import gelu, layer_norm


def _linear(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def spvit_predictor(x, policy, p, num_heads):
  """MultiheadPredictorLG.forward: x (B, N, C), policy (B, N, 1) -> (log score, softmax score).

  p: our parameter dict of the selector (senet_0/1, in_norm, in_fc, out_0/1/2),
  one set shared by all heads as in the original (one module object repeated).
  """
  x = np.asarray(x, np.float64)
  policy = np.asarray(policy, np.float64)
  b, n, c = x.shape
  hd = c // num_heads
  multihead_score = np.zeros((b, n, 2))
  multihead_soft = np.zeros((b, n, 2))
  # AdaptiveAvgPool2d((n, H)) over the channel axis: bin i = channels
  # [floor(i C / H), ceil((i + 1) C / H)).
  x_head = np.zeros((b, n, num_heads))
  for i in range(num_heads):
    lo, hi = (i * c) // num_heads, -((-(i + 1) * c) // num_heads)
    x_head[:, :, i] = x[:, :, lo:hi].mean(axis=-1)
  head_w = 1 / (1 + np.exp(-_linear(gelu(_linear(x_head, p['senet_0'])), p['senet_1'])))
  head_w_sum = head_w.sum(axis=2, keepdims=True)
  for i in range(num_heads):
    xs = x[:, :, hd * i:hd * (i + 1)]
    xs = gelu(_linear(layer_norm(xs, np.asarray(p['in_norm']['scale'], np.float64),
                                 np.asarray(p['in_norm']['bias'], np.float64), 1e-5),
                      p['in_fc']))
    half = hd // 2
    local = xs[:, :, :half]
    glob = np.zeros((b, 1, hd - half))
    for bi in range(b):
      num = np.zeros(hd - half)
      for t in range(n):
        num += xs[bi, t, half:] * policy[bi, t, 0]
      glob[bi, 0] = num / policy[bi, :, 0].sum()
    xs = np.concatenate([local, np.broadcast_to(glob, (b, n, hd - half))], axis=-1)
    logits = _linear(gelu(_linear(gelu(_linear(xs, p['out_0'])), p['out_1'])), p['out_2'])
    for bi in range(b):
      for t in range(n):
        sm = _softmax(logits[bi, t])
        multihead_soft[bi, t] += sm * head_w[bi, t, i]
        multihead_score[bi, t] += np.log(sm) * head_w[bi, t, i]
  return multihead_score / head_w_sum, multihead_soft / head_w_sum


def spvit_train_step(x, prev_decision, pred_score, softmax_score, gumbel, p_count):
  """One pruning location of VisionTransformerDiffPruning.forward in training.

  x (B, N, C) all tokens with the class token first; prev_decision (B, N - 1 -
  p_count, 1) (patches only, as the original keeps it); gumbel (B, N - 1, 2)
  the Gumbel noise F.gumbel_softmax draws. Returns (x with the package token
  appended, policy (B, N + 1, 1), hard_keep_decision (B, patches, 1)).
  """
  b = x.shape[0]
  spatial_x = x[:, 1:]
  if p_count:
    prev_decision = np.concatenate([prev_decision, np.ones((b, p_count, 1))], axis=1)
  hard_all = np.zeros(pred_score.shape[:2] + (1,))
  for bi in range(b):
    for t in range(pred_score.shape[1]):
      y = pred_score[bi, t] + gumbel[bi, t]
      hard_all[bi, t, 0] = 1.0 if y[0] >= y[1] else 0.0
  hard_all = hard_all * prev_decision
  if p_count:
    hard_keep = np.concatenate([hard_all[:, :-p_count], np.ones((b, p_count, 1))], axis=1)
  else:
    hard_keep = hard_all
  hard_drop = (1 - hard_keep) - (1 - prev_decision)
  placeholder = softmax_score[:, :, 0:1] * hard_drop
  rep = np.zeros((b, 1, x.shape[-1]))
  for bi in range(b):
    for t in range(spatial_x.shape[1]):
      rep[bi, 0] += spatial_x[bi, t] * placeholder[bi, t, 0]
  x = np.concatenate([x, rep], axis=1)
  if p_count:
    hard_keep = hard_keep[:, :-p_count]
  policy = np.concatenate([np.ones((b, 1, 1)), hard_keep, np.ones((b, p_count + 1, 1))], axis=1)
  return x, policy, hard_keep


def spvit_ratio_loss(keep_decisions, keep_ratios, ratio_weight):
  """DiffPruningLoss (losses_l2.py:113-120) without the classification term."""
  pred_loss = 0.0
  for score, ratio in zip(keep_decisions, keep_ratios):
    pos_ratio = score.mean(1)
    pred_loss = pred_loss + ((pos_ratio - ratio) ** 2).mean()
  return ratio_weight * pred_loss / len(keep_ratios)


def spvit_infer_step(x, log_keep, soft_keep, keep, p_count):
  """Our inference form, per sample: the `keep` patch tokens of highest keep
  log-score (ties to the lower index), then earlier packages, then the
  package token sum(soft keep score * token) over the others."""
  b, n, _ = x.shape
  out = []
  m = n - 1 - p_count
  for bi in range(b):
    order = sorted(range(m), key=lambda t: (-log_keep[bi, t], t))
    kept = order[:keep]
    rep = np.zeros(x.shape[-1])
    for t in range(m):
      if t not in kept:
        rep += soft_keep[bi, t] * x[bi, 1 + t]
    rows = [x[bi, 0]] + [x[bi, 1 + t] for t in kept] + [x[bi, 1 + m + j] for j in range(p_count)]
    out.append(np.stack(rows + [rep]))
  return np.stack(out)


def spvit_keeps(ratios, num_patches):
  return [int(math.floor(r * num_patches + 0.5)) for r in ratios]


# --------------------------------------------------------------------------- #
# RaP. Its authors' repository (ofsoundof/random_channel_pruning) holds no code,
# so these follow the paper's description (docs/algorithm.md §18.2), in loops:
# per-channel L1 norms, the largest kept, and the FLOPs of a pruned block.


def rap_block_flops(heads, mlp, n, d, hd):
  """2 x multiply-adds of one block, term by term."""
  e = heads * hd
  qkv = 3 * n * d * e
  logits = n * n * e
  weighted = n * n * e
  proj = n * e * d
  fc = 2 * n * d * mlp
  return 2 * (qkv + logits + weighted + proj + fc)


def rap_l1_keep(block, keep_heads, keep_units):
  """Kept head and unit indices of one block (a dict of our parameter names),
  ascending, by L1 norm (LoRA folded into q/k/v first), ties to the lower index."""
  a = 'MultiHeadDotProductAttention_0/'
  q = block[a + 'query/kernel']
  d, h, hd = q.shape
  delta = None
  if a + 'lora/down' in block:
    delta = np.asarray(block[a + 'lora/down'], np.float64) @ np.asarray(block[a + 'lora/up'],
                                                                          np.float64)
  head_norm = []
  for head in range(h):
    s = 0.0
    for i, name in enumerate(('query', 'key', 'value')):
      k = np.asarray(block[a + f'{name}/kernel'], np.float64)
      for row in range(d):
        for c in range(hd):
          v = k[row, head, c]
          if delta is not None:
            v += delta[row, i * h * hd + head * hd + c]
          s += abs(v)
    out = np.asarray(block[a + 'out/kernel'], np.float64)
    s += np.abs(out[head]).sum()
    head_norm.append(s)
  w0 = np.asarray(block['MlpBlock_0/Dense_0/kernel'], np.float64)
  w1 = np.asarray(block['MlpBlock_0/Dense_1/kernel'], np.float64)
  unit_norm = [np.abs(w0[:, j]).sum() + np.abs(w1[j]).sum() for j in range(w0.shape[1])]

  def top(norms, k):
    chosen = []
    for _ in range(k):
      best = None
      for i, v in enumerate(norms):
        if i not in chosen and (best is None or v > norms[best]):
          best = i
      chosen.append(best)
    return sorted(chosen)
  return top(head_norm, keep_heads), top(unit_norm, keep_units)
