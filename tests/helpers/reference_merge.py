"""Slow, obviously-correct numpy transcriptions of docs/algorithm.md §1-2.

Loops over the batch, the pairs and the tokens; no vectorised tricks, so a bug in
the fast path cannot be mirrored here. Used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np


def match(metric: np.ndarray, r: int, class_token: bool = True,
          distill_token: bool = False):
  """Per-sample bipartite matching -> lists (src_idx, dst_idx, unm_idx)."""
  out = []
  for m in metric:
    m = m / np.sqrt((m ** 2).sum(-1, keepdims=True))
    a, b = m[0::2], m[1::2]
    r_eff = min(r, (len(m) - int(class_token) - int(distill_token)) // 2)
    node_max, node_idx = [], []
    for i in range(len(a)):
      best, best_j = -math.inf, 0
      for j in range(len(b)):
        s = float(np.dot(a[i], b[j]))
        if (class_token and i == 0) or (distill_token and j == 0):
          s = -math.inf
        if s > best:
          best, best_j = s, j
      node_max.append(best)
      node_idx.append(best_j)
    order = sorted(range(len(a)), key=lambda i: (-node_max[i], i))
    src = order[:r_eff]
    unm = sorted(order[r_eff:]) if class_token else order[r_eff:]
    out.append((src, [node_idx[i] for i in src], unm))
  return out


def merge(x: np.ndarray, plans, distill_token: bool = False, modulate=None,
          reduce: str = 'sum') -> np.ndarray:
  """Applies per-sample plans to (B, N, C) tokens; modulate(src, dst) optional."""
  outs = []
  for xb, (src, dst, unm) in zip(x, plans):
    a, b = xb[0::2], xb[1::2].copy()
    src_tok = np.stack([a[i] for i in src]) if src else np.zeros((0, xb.shape[1]))
    if modulate is not None:
      dst_tok = np.stack([b[j] for j in dst])
      src_tok = modulate(src_tok, dst_tok)
    for k, j in enumerate(dst):
      b[j] = b[j] + src_tok[k] if reduce == 'sum' else np.maximum(b[j], src_tok[k])
    unm_tok = [a[i] for i in unm]
    if distill_token:
      rows = [unm_tok[0], b[0]] + unm_tok[1:] + list(b[1:])
    else:
      rows = unm_tok + list(b)
    outs.append(np.stack(rows))
  return np.stack(outs)


def merge_wavg(x, size, plans, distill_token=False, modulate=None):
  y = merge(x * size, plans, distill_token, modulate)
  s = merge(size, plans, distill_token)
  return y / s, s


def layer_norm(x, scale, bias, eps):
  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    v = x[idx]
    mu = v.mean()
    var = ((v - mu) ** 2).mean()
    out[idx] = (v - mu) / np.sqrt(var + eps) * scale + bias
  return out


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def pyra_modulate(src, dst, w_r, w_d, scale, bias, eps=1e-5):
  """Eqs. 5-7 for one sample: src, dst (r, D); w_r (r, 1); w_d (1, D)."""
  r, d = src.shape
  m = layer_norm(src + dst, scale, bias, eps)
  out = np.empty_like(src)
  for c in range(d):
    channel = 2 * sigmoid(sum(w_r[i, 0] * m[i, c] for i in range(r)))
    for i in range(r):
      token = 2 * sigmoid(sum(m[i, k] * w_d[0, k] for k in range(d))) - 1
      out[i, c] = src[i, c] + src[i, c] * channel * token
  return out


def gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def quick_gelu(z):
  return z / (1.0 + np.exp(-1.702 * z))


def adapter(y, a):
  """The authors' Adapter on the MLP output y: y + up(QuickGELU(down(y)))."""
  return y + quick_gelu(y @ a['down']['kernel'] + a['down']['bias']) @ a['up']['kernel'] \
      + a['up']['bias']


def conv3x3_tokens(z, kernel, bias, source, num_prefix=1):
  """Convpass's 3x3 conv (zero padding) for tokens that may be merged.

  z (B, N, k); kernel (3, 3, k, k) as [row offset + 1, column offset + 1, in, out];
  source (B, N, N0) 0/1, row n marking the input positions token n covers. Each
  position takes the value of the token covering it; a prefix position is a 1x1
  image (only the centre tap); each token gets the mean over its positions.
  """
  bsz, n, _ = z.shape
  n0 = source.shape[2]
  g = int(round(math.sqrt(n0 - num_prefix)))
  out = np.zeros((bsz, n, kernel.shape[-1]))
  for bi in range(bsz):
    owner = [int(np.flatnonzero(source[bi, :, m])[0]) for m in range(n0)]
    value = [z[bi, owner[m]] for m in range(n0)]
    conv = []
    for m in range(n0):
      acc = bias.copy()
      if m < num_prefix:
        acc = acc + value[m] @ kernel[1, 1]
      else:
        i, j = divmod(m - num_prefix, g)
        for di in (-1, 0, 1):
          for dj in (-1, 0, 1):
            if 0 <= i + di < g and 0 <= j + dj < g:
              acc = acc + value[num_prefix + (i + di) * g + (j + dj)] @ kernel[di + 1, dj + 1]
      conv.append(acc)
    for t in range(n):
      covered = [m for m in range(n0) if source[bi, t, m] == 1]
      out[bi, t] = sum(conv[m] for m in covered) / len(covered)
  return out


def convpass_bypass(h, c, source, scale):
  """s · up(QuickGELU(conv(QuickGELU(down(h))))) (dropout off)."""
  z = quick_gelu(h @ c['down']['kernel'] + c['down']['bias'])
  z = quick_gelu(conv3x3_tokens(z, c['conv']['kernel'], c['conv']['bias'], source))
  return scale * (z @ c['up']['kernel'] + c['up']['bias'])


def embed(p: dict, images: np.ndarray, kernel_dtype=None) -> np.ndarray:
  """Patch embedding by an explicit loop over the patches, then the class token
  and position embeddings: (B, 1 + N, D). `kernel_dtype`: cast the kernel first."""
  kernel = np.asarray(p['embedding']['kernel'], kernel_dtype)
  patch, dim = kernel.shape[0], kernel.shape[-1]
  bsz, h, w, _ = images.shape
  x = np.zeros((bsz, (h // patch) * (w // patch), dim))
  for bi in range(bsz):
    t = 0
    for gy in range(h // patch):
      for gx in range(w // patch):
        tile = images[bi, gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch]
        x[bi, t] = np.einsum('ijc,ijcd->d', tile, kernel) + p['embedding']['bias']
        t += 1
  cls = np.broadcast_to(np.asarray(p['cls']), (bsz, 1, dim))
  x = np.concatenate([cls, x], 1) + np.asarray(p['Transformer']['posembed_input']['pos_embedding'])
  return x


def attention(y, att, size, mask, num_heads):
  """Multi-head attention of our parameter tree (LoRA unfolded), float64.

  Keys get the log-size bias when `size` is given and weight 0 where `mask`
  is 0. Returns (output after the projection, weights (B, H, N, N), keys
  (B, N, H, hd))."""
  bsz, n, dim = y.shape
  hd = dim // num_heads
  proj = lambda name: np.einsum('bnd,dhk->bnhk', y, att[name]['kernel']) + att[name]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  if 'lora' in att:
    delta = (y @ att['lora']['down']) @ att['lora']['up']
    q = q + delta[..., :dim].reshape(q.shape)
    k = k + delta[..., dim:2 * dim].reshape(k.shape)
    v = v + delta[..., 2 * dim:].reshape(v.shape)
  out = np.zeros_like(q)
  probs = np.zeros((bsz, num_heads, n, n))
  for bi in range(bsz):
    for hh in range(num_heads):
      logits = q[bi, :, hh] @ k[bi, :, hh].T / math.sqrt(hd)
      if size is not None:
        logits = logits + np.log(size[bi, :, 0])[None, :]
      e = np.exp(logits - logits.max(-1, keepdims=True))
      if mask is not None:
        e = e * mask[bi][None, :]
      probs[bi, hh] = e / e.sum(-1, keepdims=True)
      out[bi, :, hh] = probs[bi, hh] @ v[bi, :, hh]
  out = np.einsum('bnhk,hkd->bnd', out, att['out']['kernel']) + att['out']['bias']
  return out, probs, k


def vit_forward(p: dict, images: np.ndarray, schedule, *, num_heads: int,
                prop_attn: bool = True, pyra: bool = False, ln_eps: float = 1e-6,
                pyra_eps: float = 1e-5, peft: str = 'lora',
                convpass_scale: float = 1.0, pool: str = 'cls') -> np.ndarray:
  """A numpy forward of our parameter tree (LoRA unfolded), merging per schedule.

  peft='adapter' / 'convpass' adds the block's `adapter` / `convpass` modules
  (their definitions above); LoRA is used wherever the tree has it.
  """
  p = {k: v for k, v in p.items()}
  x = embed(p, images)
  bsz, num_patches = x.shape[0], x.shape[1] - 1
  size = np.ones(x.shape[:2] + (1,))
  source = np.broadcast_to(np.eye(x.shape[1]), (bsz,) + (x.shape[1],) * 2).copy()
  for li, r in enumerate(schedule):
    blk = p['Transformer'][f'encoderblock_{li}']
    ln0 = blk['LayerNorm_0']
    y = layer_norm(x, ln0['scale'], ln0['bias'], ln_eps)
    out, _, k = attention(y, blk['MultiHeadDotProductAttention_0'],
                          size if prop_attn else None, None, num_heads)
    x = x + out
    if peft == 'convpass':
      x = x + convpass_bypass(y, blk['convpass']['attn'], source, convpass_scale)
    if r > 0:
      plans = match(k.mean(2), r)
      mod = None
      if pyra:
        g = blk['pyra']
        mod = lambda s, d_: pyra_modulate(s, d_, g['w_r'], g['w_d'], g['norm']['scale'],
                                          g['norm']['bias'], pyra_eps)
      x, size = merge_wavg(x, size, plans, modulate=mod)
      source = merge(source, plans)
    ln1 = blk['LayerNorm_1']
    y = layer_norm(x, ln1['scale'], ln1['bias'], ln_eps)
    mlp = blk['MlpBlock_0']
    m = gelu(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    m = m @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    if peft == 'adapter':
      m = adapter(m, blk['adapter'])
    x = x + m
    if peft == 'convpass':
      x = x + convpass_bypass(y, blk['convpass']['mlp'], source, convpass_scale)
  if pool == 'gap':  # MAE's global_pool as ToMe's MAE patch weights it by size
    pooled = (x * size)[:, 1:, :].sum(1) / num_patches
    fc = p['fc_norm']
    feature = layer_norm(pooled, fc['scale'], fc['bias'], ln_eps)
    return feature @ p['head']['kernel'] + p['head']['bias']
  en = p['Transformer']['encoder_norm']
  x = layer_norm(x, en['scale'], en['bias'], ln_eps)
  return x[:, 0] @ p['head']['kernel'] + p['head']['bias']
