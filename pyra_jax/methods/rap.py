"""RaP (Li et al., CVPR 2022): random channel pruning, for a ViT's heads and MLP units.

Definition (docs/algorithm.md §18.2). The prunable channels of a block are its
attention heads (a head's q, k, v kernel slices, biases and its rows of the
output projection go together) and its MLP hidden units (a column of fc1, its
bias and the row of fc2). A pruned model keeps, per block, a static number of
heads and units, so its parameter shapes shrink and it is a real smaller ViT:
the reducer's `block_widths(layer)` gives the widths the block builds with.

The search (`pyra_jax.training.stages`, stage 2) samples channel
configurations at random under the FLOPs budget, selects the channels of each
configuration by their L1 norm, scores each candidate cheaply (the loss of the
pruned model on a few training batches, no fine-tuning) and keeps the best.
The authors' repository holds no code (its one commit has a README and a
licence), so the sampling rule and the scoring are our reading of the paper;
docs/algorithm.md §18.2 says which is which.

No tokens are removed: `schedule` is all zeros.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from pyra_jax import schedules
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Range
from pyra_jax.methods import base

Array = jax.Array
WIDTHS_FILE = 'rap_widths.json'
# A candidate lands at most this far below the budget (the counts are integers).
BUDGET_TOLERANCE = 0.03


def block_flops(heads: int, mlp: int, *, num_tokens: int, width: int, head_dim: int) -> float:
  """FLOPs (2 x multiply-adds) of one block with `heads` heads and `mlp` units.

  As `schedules.vit_flops` with E = heads * head_dim the q/k/v width:
  2(4 N D E + 2 N^2 E) for attention, 2(2 N D M) for the MLP.
  """
  n, d, e = num_tokens, width, heads * head_dim
  return 2 * (4 * n * d * e + 2 * n * n * e) + 2 * (2 * n * d * mlp)


def flops_fraction(heads: Sequence[int], mlps: Sequence[int], geo: base.Geometry) -> float:
  """The pruned blocks' FLOPs over the unpruned ones'."""
  hd = geo.width // geo.num_heads
  kw = dict(num_tokens=geo.num_tokens, width=geo.width, head_dim=hd)
  pruned = sum(block_flops(h, m, **kw) for h, m in zip(heads, mlps))
  return pruned / (geo.depth * block_flops(geo.num_heads, geo.mlp_dim, **kw))


def counts(fractions: np.ndarray, full: int) -> list[int]:
  """Channels kept for keep fractions in [0, 1]: ceil(f * full), at least 1."""
  return [max(1, min(full, int(math.ceil(f * full - 1e-9)))) for f in fractions]


def sample_candidate(rng: np.random.Generator, geo: base.Geometry, target: float
                     ) -> Optional[tuple[list[int], list[int]]]:
  """One random configuration (heads, units per block) within the budget, or None.

  Each block's head and unit keep fractions are drawn uniformly in [0, 1], then
  all multiplied by one factor c (fractions capped at 1) found by bisection so
  the configuration's FLOPs fraction is the largest not above `target`. The
  draw sets how the budget is spread over the blocks; the factor meets it.
  None if the rounded result lands more than BUDGET_TOLERANCE below the target.
  """
  u_h = rng.uniform(0.0, 1.0, geo.depth)
  u_m = rng.uniform(0.0, 1.0, geo.depth)

  def config(c):
    return (counts(np.minimum(c * u_h, 1.0), geo.num_heads),
            counts(np.minimum(c * u_m, 1.0), geo.mlp_dim))

  lo, hi = 0.0, 1.0 / max(min(u_h.min(), u_m.min()), 1e-6)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    if flops_fraction(*config(mid), geo) <= target:
      lo = mid
    else:
      hi = mid
  heads, mlps = config(lo)
  f = flops_fraction(heads, mlps, geo)
  if f > target or f < target - BUDGET_TOLERANCE:
    return None
  return heads, mlps


def l1_keep(norms: np.ndarray, keep: int) -> list[int]:
  """Indices of the `keep` channels of largest L1 norm (ties: lower index), ascending."""
  order = sorted(range(len(norms)), key=lambda i: (-float(norms[i]), i))
  return sorted(order[:keep])


def _block(flat: Mapping[str, Any], layer: int) -> dict[str, np.ndarray]:
  p = f'Transformer/encoderblock_{layer}/'
  return {k[len(p):]: np.asarray(v) for k, v in flat.items() if k.startswith(p)}


def channel_norms(flat: Mapping[str, Any], layer: int) -> tuple[np.ndarray, np.ndarray]:
  """(per-head, per-unit) L1 norms of block `layer` in a flat parameter dict.

  A head's: its q, k, v kernel slices (with LoRA folded in) and its output rows;
  a unit's: its fc1 column and its fc2 row.
  """
  b = _block(flat, layer)
  a = 'MultiHeadDotProductAttention_0/'
  kernels = [b[a + f'{n}/kernel'] for n in ('query', 'key', 'value')]  # (D, H, hd)
  if a + 'lora/down' in b:
    delta = b[a + 'lora/down'] @ b[a + 'lora/up']
    w = kernels[0].shape[1] * kernels[0].shape[2]
    kernels = [k + delta[:, i * w:(i + 1) * w].reshape(k.shape) for i, k in enumerate(kernels)]
  heads = sum(np.abs(k).sum(axis=(0, 2)) for k in kernels)
  heads = heads + np.abs(b[a + 'out/kernel']).sum(axis=(1, 2))
  units = (np.abs(b['MlpBlock_0/Dense_0/kernel']).sum(axis=0)
           + np.abs(b['MlpBlock_0/Dense_1/kernel']).sum(axis=1))
  return heads, units


def select_channels(flat: Mapping[str, Any], heads: Sequence[int], mlps: Sequence[int]
                    ) -> tuple[list[list[int]], list[list[int]]]:
  """Per block, the kept head and unit indices (largest L1 norm)."""
  head_idx, unit_idx = [], []
  for layer, (h, m) in enumerate(zip(heads, mlps)):
    hn, un = channel_norms(flat, layer)
    head_idx.append(l1_keep(hn, h))
    unit_idx.append(l1_keep(un, m))
  return head_idx, unit_idx


def prune_params(flat: Mapping[str, Any], head_idx: Sequence[Sequence[int]],
                 unit_idx: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
  """The flat parameters of the pruned model: the kept heads' and units' slices.

  LoRA's up-projection keeps the columns of the kept heads in each of q, k, v,
  so the retrained LoRA continues from the first stage's.
  """
  out = {k: np.asarray(v) for k, v in flat.items()}
  a = 'MultiHeadDotProductAttention_0/'
  for layer, (hi, ui) in enumerate(zip(head_idx, unit_idx)):
    p = f'Transformer/encoderblock_{layer}/'
    hi, ui = np.asarray(hi), np.asarray(ui)
    q = out[p + a + 'query/kernel']
    full_heads, hd = q.shape[1], q.shape[2]
    for n in ('query', 'key', 'value'):
      out[p + a + f'{n}/kernel'] = out[p + a + f'{n}/kernel'][:, hi]
      if p + a + f'{n}/bias' in out:
        out[p + a + f'{n}/bias'] = out[p + a + f'{n}/bias'][hi]
    out[p + a + 'out/kernel'] = out[p + a + 'out/kernel'][hi]
    if p + a + 'lora/up' in out:
      up = out[p + a + 'lora/up']
      cols = np.concatenate([(i * full_heads + h) * hd + np.arange(hd)
                             for i in range(3) for h in hi])
      out[p + a + 'lora/up'] = up[:, cols]
    m = p + 'MlpBlock_0/'
    out[m + 'Dense_0/kernel'] = out[m + 'Dense_0/kernel'][:, ui]
    out[m + 'Dense_0/bias'] = out[m + 'Dense_0/bias'][ui]
    out[m + 'Dense_1/kernel'] = out[m + 'Dense_1/kernel'][ui]
  return out


def uniform_widths(geo: base.Geometry, target: float) -> str:
  """Inline widths keeping one fraction of every block's heads and units, the
  largest within the budget: a searched configuration's stand-in where no search
  ran (the benchmark times the FLOPs level, not a search's choice)."""
  best = '1,' * (geo.depth - 1) + '1;' + '1,' * (geo.depth - 1) + '1'
  for i in range(1, 1001):
    f = i / 1000
    h = counts(np.full(geo.depth, f), geo.num_heads)
    m = counts(np.full(geo.depth, f), geo.mlp_dim)
    if flops_fraction(h, m, geo) > target:
      break
    best = ','.join(map(str, h)) + ';' + ','.join(map(str, m))
  return best


def write_widths(path: str, heads, mlps, head_idx, unit_idx, extra: Mapping[str, Any]) -> None:
  with open(path, 'w') as f:
    json.dump(dict(heads=list(map(int, heads)), mlp=list(map(int, mlps)),
                   head_index=[list(map(int, i)) for i in head_idx],
                   mlp_index=[list(map(int, i)) for i in unit_idx], **extra),
              f, indent=1)


def parse_widths(spec: Any, geo: base.Geometry) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
  """`model.rap_widths`: '' (unpruned), a rap_widths.json, or 'h0,h1,..;m0,m1,..'."""
  spec = str(spec).strip()
  if not spec:
    return None
  if spec.endswith('.json') or os.path.isdir(spec):
    path = os.path.join(spec, WIDTHS_FILE) if os.path.isdir(spec) else spec
    try:
      with open(path) as f:
        d = json.load(f)
      heads, mlps = tuple(d['heads']), tuple(d['mlp'])
    except (OSError, ValueError, KeyError):
      raise ConfigError(f'model.rap_widths = {spec!r} is not a readable {WIDTHS_FILE} '
                        "(run RaP's pruning stage first, or give 'h0,h1,...;m0,m1,...').") from None
  else:
    try:
      h, m = spec.split(';')
      heads = tuple(int(v) for v in h.split(','))
      mlps = tuple(int(v) for v in m.split(','))
    except ValueError:
      raise ConfigError(f'model.rap_widths = {spec!r}: give the kept heads and MLP units '
                        "per block as 'h0,h1,...;m0,m1,...' or a rap_widths.json.") from None
  if (len(heads) != geo.depth or len(mlps) != geo.depth
      or not all(1 <= h <= geo.num_heads for h in heads)
      or not all(1 <= m <= geo.mlp_dim for m in mlps)):
    raise ConfigError(f'model.rap_widths = {spec!r}: give {geo.depth} head counts in '
                      f'1..{geo.num_heads} and {geo.depth} unit counts in 1..{geo.mlp_dim}.')
  return heads, mlps


def budget(c: ml_collections.ConfigDict, geo: base.Geometry) -> float:
  """The FLOPs fraction RaP prunes to: model.schedule's (the setting's budget)."""
  kw = dict(num_tokens=geo.num_tokens, width=geo.width, mlp_ratio=geo.mlp_ratio)
  return (schedules.vit_flops(base.config_schedule(c, geo), **kw)
          / schedules.vit_flops((0,) * geo.depth, **kw))


def check_budget(target: float, geo: base.Geometry) -> None:
  """Refuses a budget below the smallest prunable model (one head, one unit per block)."""
  least = flops_fraction([1] * geo.depth, [1] * geo.depth, geo)
  if target < least + BUDGET_TOLERANCE:
    raise ConfigError(
        f'RaP cannot reach a FLOPs fraction of {target:.3f}: one head and one MLP unit '
        f'per block already cost {least:.3f}; choose a milder model.schedule.')


@dataclasses.dataclass(frozen=True)
class RaP(base.TokenReducer):
  """A structurally pruned model: `heads[l]` heads and `mlps[l]` MLP units in block l."""
  heads: Optional[tuple[int, ...]]
  mlps: Optional[tuple[int, ...]]
  target: float

  name: ClassVar[str] = 'rap'
  traces_source: ClassVar[bool] = True
  config_fields: ClassVar[tuple[str, ...]] = (
      'rap_widths', 'rap_candidates', 'rap_score_batches', 'stage1_workdir')
  field_ranges: ClassVar[dict] = {
      'rap_candidates': Range(1, integer=True, why='random configurations RaP scores'),
      'rap_score_batches': Range(1, integer=True, why=(
          'training batches each RaP candidate is scored on')),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'RaP':
    if c.peft != 'lora':
      raise ConfigError(
          f"model.method='rap' prunes heads and MLP units, to which model.peft="
          f"{c.peft!r} attaches full-width parameters: use model.peft='lora'.")
    if geo.num_heads < 2 and geo.mlp_dim < 2:
      raise ConfigError('model.method=\'rap\' needs a backbone with channels to prune '
                        '(more than one head or MLP unit per block).')
    target = budget(c, geo)
    check_budget(target, geo)
    widths = parse_widths(c.rap_widths, geo)
    heads, mlps = widths if widths is not None else (None, None)
    return cls(schedule=(0,) * geo.depth, num_protected=geo.num_protected,
               heads=heads, mlps=mlps, target=target)

  def block_widths(self, layer: int) -> Optional[tuple[int, int]]:
    if self.heads is None:
      return None
    return self.heads[layer], self.mlps[layer]
