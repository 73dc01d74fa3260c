"""Slow numpy transcriptions of FacT and SNF (docs/algorithm.md §14-15).

FacT: the weight increment of slice i is ΔW_i = s · U Σ_i V, built here as an
explicit (D, D) matrix with loops over its entries (no factorised shortcut),
with Σ_i a learned core (tt) or Σ_i[a, b] = Σ_c C[a, b, c] P[i, c] (tk); the
increments of fc1 / fc2 are their m slices placed side by side (columns) /
stacked (rows). FacT-TK's MLP slices also in the FacT code's own layout
(`fact_tk_authors_mlp`, written from its `fact_forward_mlp`). SNF: each token
goes through z = μ + e^{log σ} ⊙ x, then z += u_k tanh(w_k · z + b_k), one
token at a time, in the blocks SNF adapts. The Adapter's init as the PYRA
authors' model is built (`authors_adapter_as_built`), with timm's
`trunc_normal_` transcribed.

The block is reference_merge's (merging, PYRA) with these two modules added
where their definitions put them. Used only by the tests.
"""

from __future__ import annotations

import math

import numpy as np

from tests.helpers import reference_merge as ref


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


def fact_tk_authors_mlp(u, v, cores, scale, m):
  """FacT-TK's fc1 (D, mD) and fc2 (mD, D) increments as the FacT code makes them.

  Written from `fact_forward_mlp` of JieShibo/PETL-ViT FacT/fact_tk.py (m = 4
  there). `cores` are the layer's 2m products of C with P's rows (their
  `FacTc @ FacTp[:, idx:idx + 8]`, an (r, r, 2m) tensor T with T[a, b, j] =
  cores[j][a, b]). Their fc1 core is T[:, :, :m] reshaped to (r, m·r) in
  PyTorch's row-major order, entry [a, b·m + j] = T[a, b, j]; the input times U,
  times that matrix, is split into m chunks of r, chunk p times V giving output
  columns [pD, (p+1)D). Their fc2 core is T[:, :, m:] reshaped the same way; the
  m input slices of D, each times U, are laid end to end (entry p·r + q) and
  multiplied by its transpose, then V. Built here as explicit matrices.
  """
  r = u.shape[1]
  d = u.shape[0]
  mats = []
  for group in (cores[:m], cores[m:]):
    big = np.zeros((r, m * r))  # the (r, m·r) reshape, index by index
    for a in range(r):
      for b in range(r):
        for j in range(m):
          big[a, b * m + j] = group[j][a, b]
    mats.append(big)
  fc1 = np.zeros((d, m * v.shape[1]))
  fc2 = np.zeros((m * d, v.shape[1]))
  for p_ in range(m):
    chunk1 = mats[0][:, p_ * r:(p_ + 1) * r]          # xU (a) -> chunk p (q)
    fc1[:, p_ * v.shape[1]:(p_ + 1) * v.shape[1]] = fact_increment(u, v, chunk1, scale)
    chunk2 = mats[1][:, p_ * r:(p_ + 1) * r].T        # x_p U (q) -> h (a)
    fc2[p_ * d:(p_ + 1) * d] = fact_increment(u, v, chunk2, scale)
  return fc1, fc2


def fact_layer_increments(p, layer, variant, scale, mlp_slices, tk_layout='paper'):
  """{'query'.. 'out': (D, D), 'fc1': (D, mD), 'fc2': (mD, D)}; tk_layout as
  model.fact_tk_layout ('authors': `fact_tk_authors_mlp`)."""
  u, v = p['Transformer']['fact']['u'], p['Transformer']['fact']['v']
  cores = fact_layer_cores(p, layer, variant, mlp_slices)
  inc = [fact_increment(u, v, c, scale) for c in cores]
  out = dict(zip(('query', 'key', 'value', 'out'), inc[:4]))
  out['fc1'] = np.concatenate(inc[4:4 + mlp_slices], axis=1)
  out['fc2'] = np.concatenate(inc[4 + mlp_slices:], axis=0)
  if variant == 'tk' and tk_layout == 'authors':
    out['fc1'], out['fc2'] = fact_tk_authors_mlp(u, v, cores[4:], scale, mlp_slices)
  return out


def timm_trunc_normal(rng, shape, std, a=-2.0, b=2.0):
  """timm 0.5.4's `trunc_normal_(tensor, mean=0, std=std, a=-2, b=2)`.

  Uniform on [2·Φ(a/std) − 1, 2·Φ(b/std) − 1], erfinv, times std·√2, clamped
  to [a, b]: a and b are in the tensor's units, not in standard deviations.
  """
  from scipy import special  # pylint: disable=g-import-not-at-top
  cdf = lambda z: (1.0 + math.erf(z / math.sqrt(2.0))) / 2.0
  lo, hi = cdf(a / std), cdf(b / std)
  t = rng.uniform(2 * lo - 1, 2 * hi - 1, size=shape)
  return np.clip(special.erfinv(t) * std * math.sqrt(2.0), a, b)


def authors_adapter_as_built(rng, dim, k):
  """The Adapter's (down_w (k, D), down_b, up_w (D, k), up_b) after the PYRA
  authors' model is built: their Adapter class first draws Xavier-uniform
  weights and N(0, 1e-6) biases (`Adapter.init_weights`), then the model's
  `init_weights('')` applies `_init_vit_weights` to every nn.Linear, the
  Adapter's `ln1`/`ln2` included: trunc_normal_(std=.02) weights, zero biases."""
  out = []
  for fan_out, fan_in in ((k, dim), (dim, k)):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    w = rng.uniform(-bound, bound, (fan_out, fan_in))   # the class's own init ...
    bias = rng.normal(0.0, 1e-6, fan_out)
    w = timm_trunc_normal(rng, (fan_out, fan_in), 0.02)  # ... overwritten by the model's
    bias = np.zeros(fan_out)
    out += [w, bias]
  return tuple(out)


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
                ln_eps: float = 1e-6, pyra_eps: float = 1e-5, fact_tk_layout: str = 'paper',
                snf_blocks=None) -> np.ndarray:
  """Logits of our parameter tree with FacT or SNF, merging per `schedule`.

  SNF acts in the first `snf_blocks` blocks (None: all); the others are plain."""
  x = ref.embed(p, images)
  bsz, dim = x.shape[0], x.shape[-1]
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
      inc = fact_layer_increments(p, li, fact_variant, fact_scale, w['fc1'].shape[1] // dim,
                                  fact_tk_layout)
      w = {k: w[k] + inc[k] for k in w}
    snf = peft == 'snf' and (snf_blocks is None or li < snf_blocks)
    shortcut = snf_flow(x, blk['snf']['attn']) if snf else x
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
    shortcut = snf_flow(x, blk['snf']['mlp']) if snf else x
    ln1 = blk['LayerNorm_1']
    y = ref.layer_norm(x, ln1['scale'], ln1['bias'], ln_eps)
    y = ref.gelu(y @ w['fc1'] + mlp['Dense_0']['bias'])
    x = shortcut + y @ w['fc2'] + mlp['Dense_1']['bias']
  en = p['Transformer']['encoder_norm']
  x = ref.layer_norm(x, en['scale'], en['bias'], ln_eps)
  return x[:, 0] @ p['head']['kernel'] + p['head']['bias']
