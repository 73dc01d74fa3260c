"""Slow numpy transcriptions of FacT and SNF from their definitions (docs/algorithm.md §14-15).

FacT: the weight increment of slice i is ΔW_i = s · U Σ_i V, built here as an
explicit (D, D) matrix with loops over its entries (no factorised shortcut),
with Σ_i a learned core (tt) or Σ_i[a, b] = Σ_c C[a, b, c] P[i, c] (tk); the
increments of fc1 / fc2 are their m slices placed side by side (columns) /
stacked (rows). SNF: each token goes through z = μ + e^{log σ} ⊙ x, then
z += u_k tanh(w_k · z + b_k), one token at a time.

The block is reference_merge's (merging, PYRA) with these two modules added
where their definitions put them. Used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np

from tests import reference_merge as ref


def fact_increment(u, v, core, scale):
  """ΔW = s · U Σ V, entry by entry: ΔW[p, q] = s Σ_a Σ_b U[p, a] Σ[a, b] V[b, q]."""
  d, r = u.shape
  out = np.zeros((d, v.shape[1]))
  for a in range(r):
    for b in range(r):
      out += scale * core[a, b] * np.outer(u[:, a], v[b, :])
  return out


def fact_layer_cores(p: dict, layer: int, variant: str, mlp_slices: int) -> list:
  """The 4 + 2m cores of one layer in slice order q, k, v, out, fc1_0.., fc2_0.."""
  shared = p['Transformer']['fact']
  n = 4 + 2 * mlp_slices
  if variant == 'tt':
    f = p['Transformer'][f'encoderblock_{layer}']['fact']
    return ([f[k] for k in ('query', 'key', 'value', 'out')] + list(f['fc1']) + list(f['fc2']))
  c, fac = shared['core'], shared['factors']
  r = c.shape[0]
  cores = []
  for i in range(layer * n, (layer + 1) * n):
    s = np.zeros((r, r))
    for a in range(r):
      for b in range(r):
        s[a, b] = sum(c[a, b, k] * fac[i, k] for k in range(r))
    cores.append(s)
  return cores


def fact_layer_increments(p, layer, variant, scale, mlp_slices):
  """{'query'.. 'out': (D, D), 'fc1': (D, mD), 'fc2': (mD, D)}."""
  u, v = p['Transformer']['fact']['u'], p['Transformer']['fact']['v']
  inc = [fact_increment(u, v, c, scale) for c in fact_layer_cores(p, layer, variant, mlp_slices)]
  out = dict(zip(('query', 'key', 'value', 'out'), inc[:4]))
  out['fc1'] = np.concatenate(inc[4:4 + mlp_slices], axis=1)
  out['fc2'] = np.concatenate(inc[4 + mlp_slices:], axis=0)
  return out


def snf_flow(x, f):
  """The shortcut flow on every token of x (B, N, D), one token at a time."""
  out = np.zeros_like(x)
  k = f['planar_w'].shape[0] if 'planar_w' in f else 0
  for bi in range(x.shape[0]):
    for t in range(x.shape[1]):
      z = f['mu'] + np.exp(f['log_sigma']) * x[bi, t]
      for i in range(k):
        z = z + f['planar_u'][i] * math.tanh(float(np.dot(f['planar_w'][i], z)) + f['planar_b'][i])
      out[bi, t] = z
  return out


def vit_forward(p: dict, images: np.ndarray, schedule, *, num_heads: int, peft: str,
                fact_variant: str = 'tt', fact_scale: float = 1.0, pyra: bool = False,
                ln_eps: float = 1e-6, pyra_eps: float = 1e-5) -> np.ndarray:
  """Logits of our parameter tree with FacT or SNF, merging per `schedule`."""
  kernel = np.asarray(p['embedding']['kernel'])
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
  x = np.concatenate([cls, x], 1) + p['Transformer']['posembed_input']['pos_embedding']
  size = np.ones(x.shape[:2] + (1,))
  hd = dim // num_heads
  for li, r in enumerate(schedule):
    blk = p['Transformer'][f'encoderblock_{li}']
    att = blk['MultiHeadDotProductAttention_0']
    mlp = blk['MlpBlock_0']
    w = {k: att[k]['kernel'].reshape(dim, dim) for k in ('query', 'key', 'value')}
    w['out'] = att['out']['kernel'].reshape(dim, dim)
    w['fc1'], w['fc2'] = mlp['Dense_0']['kernel'], mlp['Dense_1']['kernel']
    if peft == 'fact':
      inc = fact_layer_increments(p, li, fact_variant, fact_scale, w['fc1'].shape[1] // dim)
      w = {k: w[k] + inc[k] for k in w}
    shortcut = snf_flow(x, blk['snf']['attn']) if peft == 'snf' else x
    ln0 = blk['LayerNorm_0']
    y = ref.layer_norm(x, ln0['scale'], ln0['bias'], ln_eps)
    q, k, v = ((y @ w[n] + att[n]['bias'].reshape(dim)).reshape(bsz, -1, num_heads, hd)
               for n in ('query', 'key', 'value'))
    out = np.zeros_like(q)
    for bi in range(bsz):
      for hh in range(num_heads):
        logits = q[bi, :, hh] @ k[bi, :, hh].T / math.sqrt(hd) + np.log(size[bi, :, 0])[None, :]
        e = np.exp(logits - logits.max(-1, keepdims=True))
        out[bi, :, hh] = (e / e.sum(-1, keepdims=True)) @ v[bi, :, hh]
    x = shortcut + out.reshape(bsz, -1, dim) @ w['out'] + att['out']['bias']
    if r > 0:
      plans = ref.match(k.mean(2), r)
      mod = None
      if pyra:
        g = blk['pyra']
        mod = lambda s, d_, g=g: ref.pyra_modulate(s, d_, g['w_r'], g['w_d'], g['norm']['scale'],
                                                   g['norm']['bias'], pyra_eps)
      x, size = ref.merge_wavg(x, size, plans, modulate=mod)
    shortcut = snf_flow(x, blk['snf']['mlp']) if peft == 'snf' else x
    ln1 = blk['LayerNorm_1']
    y = ref.layer_norm(x, ln1['scale'], ln1['bias'], ln_eps)
    y = ref.gelu(y @ w['fc1'] + mlp['Dense_0']['bias'])
    x = shortcut + y @ w['fc2'] + mlp['Dense_1']['bias']
  en = p['Transformer']['encoder_norm']
  x = ref.layer_norm(x, en['scale'], en['bias'], ln_eps)
  return x[:, 0] @ p['head']['kernel'] + p['head']['bias']
