"""DiffRate: differentiable per-layer compression rates (Chen et al., ICCV 2023).

docs/algorithm.md §17.2. Every block, between attention and the MLP:

  sort   the image tokens by class attention (mean over heads), descending;
         the protected prefix (class, distillation token) stays first;
  prune  keep the first `prune_kept` tokens (counts include the prefix);
  merge  the tokens after position `merge_kept` are merged into the first
         `merge_kept` (not into the prefix): each goes to its most
         cosine-similar kept token (similarity of the tokens themselves), the
         destination becomes the plain mean of itself and its sources; sizes
         (for proportional attention) add, a source's size scaled by its
         similarity (unclamped at fixed rates; the search clamps every size
         at >= 1 first, as the method's two code paths do).

Deployed and trained with fixed rates, both counts are static Python ints per
layer: real token reduction, one compilation.

The search (Differentiable Discrete Proxy) learns, per layer and for pruning
and merging separately, logits alpha over candidate kept counts c_k = P, P-g,
P-2g, ... (P patches, granularity g). With p = softmax(alpha):
  kept  = ceil(sum_k c_k p_k) + prefix, with a straight-through ceil;
  mask  token j (sorted order) has hard value [j < kept] (tokens already
        inactive stay inactive) and the gradient of its keep probability
        sum_k p_k [j < c_k + prefix].
Inactive tokens stay in the arrays (static shapes); attention ignores them
as keys except for each token's own key. The FLOPs of the kept counts
(straight-through min over prune and merge) are pulled toward the target
with weight * (FLOPs / full - 1 / ratio)^2 (or the method's own form,
`flops_penalty`). Block 0 is never compressed.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pyra_jax import schedules
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Choices, Range
from pyra_jax.methods import base

Array = jax.Array
RATES_FILE = 'diffrate_rates.json'
# The search's masked softmax adds eps / N to the numerator and eps to the sum.
TRAIN_EPS = 1e-6


# ---------------------------------------------------------------------------
# Fixed rates (training after the search, and deployment).
# ---------------------------------------------------------------------------

def sort_by_class_attention(cls_attn: Array, num_protected: int) -> Array:
  """(B, H, N) class attention -> (B, N) order: prefix, then descending score.

  Ties keep the lower index first (stable sort).
  """
  score = cls_attn.mean(axis=1)[:, num_protected:]
  order = jnp.argsort(-score, axis=-1, stable=True) + num_protected
  prefix = jnp.broadcast_to(jnp.arange(num_protected, dtype=order.dtype),
                            (order.shape[0], num_protected))
  return jnp.concatenate([prefix, order], axis=1)


def _gather(x: Array, idx: Array) -> Array:
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def merge_plan(x: Array, kept: int, num_protected: int) -> tuple[Array, Array]:
  """(node_max, node_idx) (B, N - kept): each source's best kept destination.

  Cosine similarity of the (gradient-stopped) tokens; the prefix is never a
  destination.
  """
  t = jax.lax.stop_gradient(x).astype(jnp.float32)
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  sim = jnp.einsum('bic,bjc->bij', t[:, kept:], t[:, :kept])
  sim = sim.at[:, :, :num_protected].set(-jnp.inf)
  return sim.max(axis=-1), sim.argmax(axis=-1)


def merge_mean(x: Array, node_idx: Array, kept: int) -> Array:
  """Destinations become the mean of themselves and their sources."""
  dst, src = x[:, :kept], x[:, kept:]
  add = jax.vmap(lambda d, i, s: d.at[i].add(s))
  total = add(dst, node_idx, src)
  count = add(jnp.ones(dst.shape[:2] + (1,), x.dtype), node_idx,
              jnp.ones(src.shape[:2] + (1,), x.dtype))
  return total / count


def merge_size(size: Array, node_max: Array, node_idx: Array, kept: int) -> Array:
  """Sizes at fixed rates: sources scaled by their similarity, then summed.

  Unclamped, as the method's deployed forward (only its search clamps, see
  `search_step`). A destination whose sources point away from it (negative
  cosine) can end at size <= 0, where log(size) is undefined (the method's
  code gives -inf or NaN there); such a size is floored at the smallest
  normal float, so its key gets no weight instead of a NaN.
  """
  scaled = size[:, kept:] * node_max[..., None]
  add = jax.vmap(lambda d, i, s: d.at[i].add(s))
  merged = add(size[:, :kept], node_idx, scaled)
  return jnp.maximum(merged, jnp.finfo(merged.dtype).tiny)


def compress(x: Array, size: Array, source: Optional[Array], cls_attn: Array, *,
             prune_kept: int, merge_kept: int, num_protected: int
             ) -> tuple[Array, Array, Optional[Array]]:
  """One block of DiffRate with fixed (static) kept counts.

  x (B, N, D), size (B, N, 1), source (B, N, N0) or None, cls_attn (B, H, N).
  Returns (B, merge_kept, ...) arrays. Requires merge_kept <= prune_kept <= N.
  """
  order = sort_by_class_attention(cls_attn, num_protected)[:, :prune_kept]
  x, size = _gather(x, order), _gather(size, order)
  if source is not None:
    source = _gather(source, order)
  if merge_kept < prune_kept:
    node_max, node_idx = merge_plan(x, merge_kept, num_protected)
    new_x = merge_mean(x, node_idx, merge_kept)
    size = merge_size(size, node_max, node_idx, merge_kept)
    if source is not None:
      source = jax.vmap(lambda d, i, s: d.at[i].max(s))(
          source[:, :merge_kept], node_idx, source[:, merge_kept:])
    x = new_x
  return x, size, source


def normalise_rates(prune_kept: Sequence[int], merge_kept: Sequence[int],
                    num_tokens: int) -> list[tuple[int, int]]:
  """Per layer (prune, merge) counts that can run: each <= the tokens entering.

  As the method's own inference does, a count above the tokens available keeps
  them all, and merging never keeps more than pruning did.
  """
  n, out = num_tokens, []
  for p, m in zip(prune_kept, merge_kept):
    p = min(int(p), n)
    m = min(int(m), p)
    out.append((p, m))
    n = m
  return out


def rates_to_schedule(rates: Sequence[tuple[int, int]], num_tokens: int) -> tuple[int, ...]:
  """Tokens removed per layer (the `schedule` the FLOPs counter reads)."""
  n, out = num_tokens, []
  for _, m in rates:
    out.append(n - m)
    n = m
  return tuple(out)


def read_rates(spec: str, *, depth: int, num_tokens: int,
               num_protected: int) -> list[tuple[int, int]]:
  """`model.diffrate_rates`: a rates file written by the search, or inline.

  Inline form: 'p0,p1,...;m0,m1,...' (kept counts per layer, prefix included).
  """
  if not spec:
    raise ConfigError(
        "model.diffrate_rates is empty: run the search first (python -m pyra_jax.main "
        "--config=<setting> --mode=search --workdir=DIR), then set "
        f"--config.model.diffrate_rates=DIR/{RATES_FILE}.")
  if ';' in spec and not os.path.exists(spec):
    try:
      p_str, m_str = spec.split(';')
      prune = [int(v) for v in p_str.split(',') if v.strip()]
      merge = [int(v) for v in m_str.split(',') if v.strip()]
    except ValueError:
      raise ConfigError(
          f"model.diffrate_rates = {spec!r}: write 'p0,p1,...;m0,m1,...' (kept token "
          'counts per layer) or the path of a rates file from --mode=search.') from None
    where = 'model.diffrate_rates'
  else:
    if not os.path.isfile(spec):
      raise ConfigError(
          f'model.diffrate_rates = {spec!r}: no such file; it is written by '
          f'--mode=search as <search workdir>/{RATES_FILE}.')
    try:
      with open(spec) as f:
        data = json.load(f)
      prune, merge = list(data['prune_kept']), list(data['merge_kept'])
    except (OSError, ValueError, KeyError, TypeError):
      raise ConfigError(
          f'{spec} is not a DiffRate rates file (JSON with prune_kept and merge_kept '
          'lists): give the file written by --mode=search.') from None
    if data.get('num_tokens', num_tokens) != num_tokens:
      raise ConfigError(
          f'{spec} was searched for {data["num_tokens"]} tokens but this model has '
          f'{num_tokens}: search again with this model (image size, patch size).')
    where = spec
  if len(prune) != depth or len(merge) != depth:
    raise ConfigError(
        f'{where} gives {len(prune)} prune and {len(merge)} merge counts but the '
        f'model has {depth} layers: give one of each per layer.')
  for layer, v in enumerate(list(prune) + list(merge)):
    # A rates file is JSON, which may hold NaN or fractions: every count must
    # be a whole number (NaN would pass the range test below).
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
      raise ConfigError(f'{where}: kept count {v!r} (layer {layer % depth}) is not a '
                        'whole number of tokens: give the file written by --mode=search.')
    if v <= num_protected or v > num_tokens:
      raise ConfigError(
          f'{where}: kept count {v} (layer {layer % depth}) is outside '
          f'{num_protected + 1}..{num_tokens}: every layer keeps at least one image token '
          'and at most all of them.')
  return normalise_rates(prune, merge, num_tokens)


def write_rates(path: str, rates: Sequence[tuple[int, int]], *, num_tokens: int,
                extra: Optional[dict] = None) -> None:
  data = {'prune_kept': [p for p, _ in rates], 'merge_kept': [m for _, m in rates],
          'num_tokens': num_tokens, **(extra or {})}
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# The search: Differentiable Discrete Proxy, in static shapes.
# ---------------------------------------------------------------------------

def candidates(num_patches: int, granularity: int) -> np.ndarray:
  """Kept patch counts P, P - g, ... > 0 (the prefix is added on top)."""
  return np.arange(num_patches, 0, -granularity, dtype=np.float32)


def ste_ceil(v: Array) -> Array:
  return v + jax.lax.stop_gradient(jnp.ceil(v) - v)


def expected_kept(logits: Array, cands: np.ndarray, num_protected: int) -> Array:
  """ceil(sum_k c_k softmax(alpha)_k) + prefix (straight-through ceil)."""
  p = jax.nn.softmax(logits)
  return ste_ceil(jnp.dot(jnp.asarray(cands), p)) + num_protected


def keep_probability(logits: Array, cands: np.ndarray, num_tokens: int,
                     num_protected: int) -> Array:
  """(N,) P(kept count > j) = sum_k p_k [j < c_k + prefix]."""
  p = jax.nn.softmax(logits)
  j = jnp.arange(num_tokens)[:, None]
  return ((j < jnp.asarray(cands)[None, :] + num_protected) * p[None, :]).sum(-1)


def ddp_mask(logits: Array, cands: np.ndarray, kept: Array, last: Array,
             num_tokens: int, num_protected: int) -> Array:
  """(N,) straight-through mask: 0 at sorted positions kept <= j < last, else 1."""
  prob = keep_probability(logits, cands, num_tokens, num_protected)
  j = jnp.arange(num_tokens)
  hard = jnp.where((j >= kept) & (j < last), 0.0, 1.0)
  return hard + (prob - jax.lax.stop_gradient(prob))


def search_step(x: Array, size: Array, mask: Array, cls_attn: Array,
                prune_logits: Array, merge_logits: Array, cands: np.ndarray, *,
                num_protected: int) -> tuple[Array, Array, Array, Array, Array]:
  """One block of the search (training forward, masks instead of removal).

  x (B, N, D), size (B, N, 1), mask (B, N) the active tokens, cls_attn
  (B, H, N) from the masked attention. Returns (x, size, mask, prune_kept,
  merge_kept), the kept counts as straight-through scalars, the arrays in
  the new sorted order.
  """
  n = x.shape[1]
  order = sort_by_class_attention(cls_attn, num_protected)
  x, size = _gather(x, order), _gather(size, order)
  mask = jnp.take_along_axis(mask, order, axis=1)
  last = jax.lax.stop_gradient(mask[0]).sum()
  prune_kept = expected_kept(prune_logits, cands, num_protected)
  pk = jax.lax.stop_gradient(prune_kept)
  pm = ddp_mask(prune_logits, cands, pk, last, n, num_protected)
  mask = mask * jnp.where(pk < last, pm, 1.0)[None, :]
  mid = jnp.minimum(last, pk)

  merge_kept = expected_kept(merge_logits, cands, num_protected)
  mk = jax.lax.stop_gradient(merge_kept)
  j = jnp.arange(n)
  is_src = (j >= mk) & (j < mid)                  # merged away
  is_dst = (j < mk) & (j >= num_protected)        # may receive
  t = jax.lax.stop_gradient(x).astype(jnp.float32)
  t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  sim = jnp.einsum('bic,bjc->bij', t, t)
  sim = jnp.where(is_dst[None, None, :], sim, -jnp.inf)
  node_max, node_idx = sim.max(axis=-1), sim.argmax(axis=-1)   # (B, N)
  w = is_src.astype(x.dtype)[None, :, None]                    # (1, N, 1)
  add = jax.vmap(lambda d, i, s: d.at[i].add(s))
  total = add(x, node_idx, x * w)
  count = add(jnp.ones_like(size), node_idx, jnp.broadcast_to(w, size.shape))
  merging = mk < mid
  x = jnp.where(merging, total / count, x)
  in_front = (j < mid)[None, :, None]
  scaled = jnp.where(is_src[None, :, None], size * jnp.where(
      jnp.isfinite(node_max), node_max, 1.0)[..., None], size)
  scaled = jnp.where(in_front, jnp.maximum(scaled, 1.0), size)
  merged_size = add(scaled, node_idx, scaled * w)
  size = jnp.where(merging, merged_size, size)
  mm = ddp_mask(merge_logits, cands, mk, mid, n, num_protected)
  mask = mask * jnp.where(merging, mm, 1.0)[None, :]
  return x, size, mask, prune_kept, merge_kept


def ste_min(n: Array, a: Array, b: Array) -> Array:
  """min(n, a, b) forward; the gradient goes to a and b (not n), as the method's."""
  v = jnp.minimum(jax.lax.stop_gradient(n), jnp.minimum(a, b))
  ga = a - jax.lax.stop_gradient(a)
  gb = b - jax.lax.stop_gradient(b)
  return jax.lax.stop_gradient(v) + ga + gb


def search_flops(kept: Sequence[tuple[Array, Array]], *, num_tokens: int,
                 width: int, mlp_ratio: float = 4.0) -> Array:
  """Blocks' FLOPs (2 x MACs, as `schedules.vit_flops`) of the searched counts."""
  n = jnp.asarray(float(num_tokens))
  d = float(width)
  total = 0.0
  for prune, merge in kept:
    total = total + 2 * (4 * n * d * d + 2 * n * n * d)
    n = ste_min(n, prune, merge)
    total = total + 2 * (2 * mlp_ratio * n * d * d)
  return total


# `model.diffrate_flops_loss`: how the search's FLOPs term is formed.
FLOPS_LOSSES = ('ratio', 'authors')
# The method's code: loss += 5 * (GFLOPs - target GFLOPs)^2, GFLOPs counted as
# multiply-accumulates / 1e9 (blocks, patch embedding and classifier).
AUTHORS_FLOPS_WEIGHT = 5.0


def flops_penalty(fraction: Array, *, ratio: float, full_flops: float, form: str,
                  weight: float) -> Array:
  """The search's FLOPs term, pulling the searched FLOPs toward full / ratio.

  fraction = blocks' FLOPs (2 x MACs, `search_flops`) / the uncompressed
  blocks' `full_flops`. form 'ratio': weight * (fraction - 1/ratio)^2.
  form 'authors': the method's 5 * (G - G_target)^2 with G in GMACs, the
  target G_target being the model's GMACs at the target ratio; the patch
  embedding and classifier terms are the same in G and G_target, so
  G - G_target = (fraction - 1/ratio) * full_flops / 2e9 (`weight` unused).
  """
  gap = fraction - 1.0 / ratio
  if form == 'ratio':
    return weight * jnp.square(gap)
  if form == 'authors':
    return AUTHORS_FLOPS_WEIGHT * jnp.square(gap * (full_flops / 2e9))
  raise ValueError(f'diffrate flops loss {form!r} is not one of {FLOPS_LOSSES}.')


def max_flops_ratio(*, depth: int, num_patches: int, num_protected: int,
                    granularity: int, width: int, mlp_ratio: float = 4.0) -> float:
  """The largest full/compressed FLOPs ratio the search can reach.

  Block 0 is never compressed; every other block keeps at least the smallest
  candidate (plus the prefix).
  """
  n0 = num_patches + num_protected
  least = int(candidates(num_patches, granularity)[-1]) + num_protected
  sched = ([0, n0 - least] + [0] * (depth - 2))[:depth]
  full = schedules.vit_flops([0] * depth, num_tokens=n0, width=width, mlp_ratio=mlp_ratio)
  best = schedules.vit_flops(sched, num_tokens=n0, width=width, mlp_ratio=mlp_ratio)
  return full / best


def final_rates(kept_logits: Sequence[tuple[np.ndarray, np.ndarray]], *,
                num_patches: int, num_protected: int, granularity: int
                ) -> list[tuple[int, int]]:
  """The searched counts: ceil(expected kept) + prefix, layer 0 uncompressed."""
  cands = candidates(num_patches, granularity)
  n0 = num_patches + num_protected
  out = [(n0, n0)]
  for prune, merge in kept_logits:
    # The same float32 computation as the search's forward, so the file holds
    # exactly the counts the search's last steps ran with.
    count = lambda a: int(expected_kept(jnp.asarray(a, jnp.float32), cands, num_protected))
    out.append((count(prune), count(merge)))
  return normalise_rates([p for p, _ in out], [m for _, m in out], n0)


class DiffRateLogits(nn.Module):
  """`diffrate/{prune_logits, merge_logits}` (K,): the search's rate distributions."""
  num_candidates: int

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    shape = (self.num_candidates,)
    return (self.param('prune_logits', nn.initializers.zeros, shape),
            self.param('merge_logits', nn.initializers.zeros, shape))


@dataclasses.dataclass(frozen=True)
class DiffRate(base.TokenReducer):
  """Fixed rates: `kept[l]` = (prune_kept, merge_kept) of block l, static. The
  search (`search=True`, --mode=search): masks by learned rate distributions
  and adds the FLOPs regulariser; its schedule is all zeros."""
  kept: tuple[tuple[int, int], ...]  # () in the search
  search: bool
  granularity: int
  flops_ratio: float
  flops_weight: float
  flops_loss: str

  name: ClassVar[str] = 'diffrate'
  config_fields: ClassVar[tuple[str, ...]] = (
      'diffrate_rates', 'diffrate_search', 'diffrate_granularity', 'diffrate_flops_ratio',
      'diffrate_flops_weight', 'diffrate_flops_loss', 'diffrate_search_epochs')
  field_ranges: ClassVar[dict] = {
      'diffrate_flops_ratio': Range(1, why='uncompressed / searched FLOPs'),
      'diffrate_flops_weight': Range(0, why='0 searches without the FLOPs target'),
      'diffrate_flops_loss': Choices(FLOPS_LOSSES),
      'diffrate_granularity': Range(1, integer=True, why=(
          'tokens between candidate rates; the method uses 4')),
      'diffrate_search_epochs': Range(1, integer=True, why='epochs of --mode=search'),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'DiffRate':
    # The fields' own ranges are `field_ranges`'; here the bounds that depend
    # on the model.
    g = c.diffrate_granularity
    if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g < geo.num_patches:
      raise ConfigError(f'model.diffrate_granularity = {g!r}: use an int from 1 to '
                        f'{geo.num_patches - 1} (tokens between candidate rates; the '
                        'method uses 4).')
    settings = dict(num_protected=geo.num_protected, granularity=g,
                    flops_ratio=c.diffrate_flops_ratio,
                    flops_weight=c.diffrate_flops_weight, flops_loss=c.diffrate_flops_loss)
    if c.diffrate_search:
      if c.diffrate_flops_loss not in FLOPS_LOSSES:
        raise ConfigError(f'model.diffrate_flops_loss = {c.diffrate_flops_loss!r}: use '
                          "'ratio' (weight * (FLOPs fraction - 1/ratio)^2) or 'authors' "
                          "(the method's 5 * (GFLOPs - target)^2).")
      ratio = c.diffrate_flops_ratio
      reach = max_flops_ratio(depth=geo.depth, num_patches=geo.num_patches,
                              num_protected=geo.num_protected, granularity=g,
                              width=geo.width, mlp_ratio=geo.mlp_ratio)
      if not 1.0 <= ratio <= reach:
        raise ConfigError(
            f'model.diffrate_flops_ratio = {ratio}: the search can reach FLOPs ratios '
            f'from 1 to {reach:.2f} on this model (the first block is never compressed); '
            'choose a target in that range.')
      return cls(schedule=(0,) * geo.depth, kept=(), search=True, **settings)
    kept = tuple(read_rates(c.diffrate_rates, depth=geo.depth, num_tokens=geo.num_tokens,
                            num_protected=geo.num_protected))
    return cls(schedule=rates_to_schedule(kept, geo.num_tokens), kept=kept, search=False,
               **settings)

  @property
  def has_regulariser(self) -> bool:  # type: ignore[override]
    return self.search

  def attention(self, layer: int, *, train: bool) -> base.AttentionRequest:
    if self.search:
      return base.AttentionRequest(cls_attn=True, masked=True, mask_keep_self=True,
                                   mask_eps=TRAIN_EPS if train else 0.0)
    return base.AttentionRequest(cls_attn=True)

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    if self.search:
      return self._search_layer(layer, tokens, attended)
    prune_kept, merge_kept = self.kept[layer]
    if not (prune_kept < tokens.x.shape[1] or merge_kept < prune_kept):
      return tokens, None
    tokens = tokens.with_size()
    x, size, source = compress(tokens.x, tokens.size, tokens.source, attended.cls_attn,
                               prune_kept=prune_kept, merge_kept=merge_kept,
                               num_protected=self.num_protected)
    return tokens._replace(x=x, size=size, source=source), None

  def _search_layer(self, layer: int, tokens: base.Tokens, attended: base.Attended
                    ) -> tuple[base.Tokens, Any]:
    tokens = tokens.with_size().with_mask()
    x = tokens.x
    if layer == 0:  # The method never compresses the first block.
      n = jnp.asarray(float(x.shape[1]))
      return tokens, (n, n)
    cands = candidates(x.shape[1] - self.num_protected, self.granularity)
    prune_logits, merge_logits = DiffRateLogits(len(cands), name='diffrate')()
    x, size, mask, prune_kept, merge_kept = search_step(
        x, tokens.size, tokens.mask, attended.cls_attn, prune_logits, merge_logits, cands,
        num_protected=self.num_protected)
    return tokens._replace(x=x, size=size, mask=mask), (prune_kept, merge_kept)

  def regulariser(self, aux: list[Any], geo: base.Geometry) -> tuple[Array, Array]:
    full = schedules.vit_flops([0] * len(aux), num_tokens=geo.num_tokens, width=geo.width,
                               mlp_ratio=geo.mlp_ratio)
    fraction = search_flops(aux, num_tokens=geo.num_tokens, width=geo.width,
                            mlp_ratio=geo.mlp_ratio) / full
    return fraction, flops_penalty(fraction, ratio=self.flops_ratio, full_flops=full,
                                   form=self.flops_loss, weight=self.flops_weight)
