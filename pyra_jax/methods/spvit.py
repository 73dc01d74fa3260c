"""SPViT (Kong et al., ECCV 2022): learned token selectors and a package token.

Definition (docs/algorithm.md §18), transcribed from the authors' code
(PeiyanFlying/SPViT, `vit_l2_3keep_senet.py`, the model of
`main_l2_vit_3keep_senet.py`). At each pruning layer a small selector scores
every non-protected token keep/prune:

  * the selector (`MultiheadPredictorLG`): the tokens' channels split into the
    H heads' slices; one MLP shared by all heads (LayerNorm -> Linear -> GELU,
    then [own first half | the policy-weighted mean of the second half over
    the tokens] -> hd/2 -> hd/4 -> 2) gives per-head keep/prune logits; a
    squeeze-excitation on the per-head channel means (H -> H/2 -> H, sigmoid)
    weighs the heads: the score is the weighted mean over heads of the
    log-softmax (for the decision) and of the softmax (for the package token);
  * training: hard Gumbel-softmax decisions (straight-through), tokens stay in
    the arrays and attention ignores the pruned ones (masked softmax that keeps
    each query's own key, eps 1e-6); a ratio loss weight * mean_l (kept
    fraction_l - keep_ratio_l)^2 pulls each layer's kept fraction of the
    patches to its keep ratio;
  * the pruned tokens are packaged into ONE token appended after the others,
    sum_i s_i x_i with s_i the soft keep score (not renormalised); package
    tokens are never pruned again; the class (and DeiT's distillation) token is
    never scored;
  * inference: the keep_l = round(keep_ratio_l * num_patches) patch tokens with
    the highest keep score stay (static count per layer, so one compilation),
    the others form the package token.

Where ours differs from the authors' code: the pruning happens after the
layer's attention (the block's reduction point), not before its block; at
inference the kept count is the static keep ratio rather than the random
Gumbel decision the code also draws at evaluation, and the package token is
the training form (score-weighted) rather than the inference file's mean.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import schedules
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Range
from pyra_jax.methods import base
from pyra_jax.methods import ltmp
from pyra_jax.models import activations

Array = jax.Array
# The training softmax's eps (the original's softmax_with_policy in training).
TRAIN_EPS = 1e-6
# The original's LayerNorm and Linear initialisation (PyTorch LayerNorm eps;
# trunc_normal(std=.02) weights and zero biases, VisionTransformerDiffPruning._init_weights).
LN_EPS = 1e-5
_INIT = nn.initializers.truncated_normal(stddev=0.02)


class Selector(nn.Module):
  """The per-layer token selector: (log-score, soft score) (B, M, 2), keep or None.

  x (B, M, C) the non-protected tokens; policy (B, M) 1 for active tokens
  (the global feature averages over them). Index 0 of the last axis is keep.
  With `gumbel` (training) also the hard Gumbel-softmax keep decision (B, M),
  drawn from the 'dropout' rng.
  """
  num_heads: int

  @nn.compact
  def __call__(self, x: Array, policy: Array, *, gumbel: bool = False
               ) -> tuple[Array, Array, Optional[Array]]:
    b, m, c = x.shape
    h = self.num_heads
    hd = c // h
    dense = lambda f, name: nn.Dense(f, kernel_init=_INIT, name=name)
    # Squeeze-excitation over heads on each head's channel mean (the original
    # AdaptiveAvgPool2d((n, H)) of (B, n, C): contiguous C/H slices).
    heads = x.reshape(b, m, h, hd)
    w = dense(max(h // 2, 1), 'senet_0')(heads.mean(axis=-1))
    w = jax.nn.sigmoid(dense(h, 'senet_1')(activations.gelu(w)))  # (B, M, H)
    # One MLP shared by all heads (the original repeats one module object).
    y = nn.LayerNorm(epsilon=LN_EPS, name='in_norm')(heads)
    y = activations.gelu(dense(hd, 'in_fc')(y))  # (B, M, H, hd)
    half = hd // 2
    p = policy.astype(y.dtype)[:, :, None, None]
    glob = (y[..., half:] * p).sum(axis=1, keepdims=True) / p.sum(axis=1, keepdims=True)
    y = jnp.concatenate([y[..., :half], jnp.broadcast_to(glob, y[..., half:].shape)], -1)
    y = activations.gelu(dense(hd // 2, 'out_0')(y))
    y = activations.gelu(dense(hd // 4, 'out_1')(y))
    logits = dense(2, 'out_2')(y).astype(jnp.float32)  # (B, M, H, 2)
    w = w.astype(jnp.float32)[..., None]
    wsum = w.sum(axis=2)
    log_score = (jax.nn.log_softmax(logits) * w).sum(axis=2) / wsum
    soft_score = (jax.nn.softmax(logits) * w).sum(axis=2) / wsum
    keep = gumbel_hard_keep(log_score, self.make_rng('dropout')) if gumbel else None
    return log_score, soft_score, keep


def gumbel_hard_keep(log_score: Array, key: Array) -> Array:
  """F.gumbel_softmax(log_score, tau=1, hard=True)[..., 0]: the hard keep decision
  forward, the soft one's gradient (straight-through)."""
  g = jax.random.gumbel(key, log_score.shape, jnp.float32)
  soft = jax.nn.softmax(log_score + g, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
  # hard + (soft - soft) is exactly hard forward (the 0/1 mask), soft's gradient.
  return (hard + (soft - jax.lax.stop_gradient(soft)))[..., 0]


def spvit_train_reduce(x: Array, mask: Array, keep: Array, soft_keep: Array, *,
                       num_protected: int, num_packages: int) -> tuple[Array, Array]:
  """Training: the package token of the newly pruned tokens, appended; new mask.

  x (B, N, C), mask (B, N) the active tokens, keep (B, M) the hard decisions
  and soft_keep (B, M) the soft keep scores of the M = N - P non-protected
  tokens, of which the last `num_packages` are earlier package tokens (always
  kept). Returns x (B, N + 1, C) and the mask (B, N + 1).
  """
  p = num_protected
  prev = mask[:, p:]
  keep = keep * prev
  if num_packages:
    keep = jnp.concatenate(
        [keep[:, :-num_packages], jnp.ones_like(keep[:, -num_packages:])], axis=1)
  drop = prev - keep
  package = jnp.einsum('bm,bmc->bc', (soft_keep * drop).astype(x.dtype), x[:, p:])
  x = jnp.concatenate([x, package[:, None]], axis=1)
  mask = jnp.concatenate([jnp.ones_like(mask[:, :p]), keep,
                          jnp.ones_like(mask[:, :1])], axis=1)
  return x, mask


def spvit_prune(x: Array, log_keep: Array, soft_keep: Array, keep: int, *,
                num_protected: int, num_packages: int) -> Array:
  """Inference: keep the `keep` best-scored patch tokens, package the others.

  x (B, N, C); log_keep, soft_keep (B, M) the scores of the M = N - P
  non-protected tokens (the last `num_packages` are earlier package tokens,
  kept as they are). Returns [prefix, kept (highest score first), earlier
  packages, new package]: (B, P + keep + num_packages + 1, C).
  """
  p = num_protected
  rest = x[:, p:]
  m = rest.shape[1] - num_packages
  patches = rest[:, :m]
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(log_keep[:, :m]), keep)
  kept = jnp.take_along_axis(patches, idx[..., None], axis=1)
  is_kept = jnp.zeros((x.shape[0], m), bool).at[jnp.arange(x.shape[0])[:, None], idx].set(True)
  w = jnp.where(is_kept, 0.0, soft_keep[:, :m]).astype(x.dtype)
  package = jnp.einsum('bm,bmc->bc', w, patches)[:, None]
  return jnp.concatenate([x[:, :p], kept, rest[:, m:], package], axis=1)


def keep_counts(ratios: Sequence[float], num_patches: int) -> tuple[int, ...]:
  """Patch tokens kept at each pruning layer: ratio * num_patches, rounded half up."""
  return tuple(int(math.floor(r * num_patches + 0.5)) for r in ratios)


def spvit_schedule(keeps: Sequence[int], layers: Sequence[int], *, depth: int,
                   num_patches: int) -> tuple[int, ...]:
  """Tokens removed per block at inference: k_prev - k - 1 at a pruning layer
  (its k_prev - k pruned tokens leave, one package token joins)."""
  out, prev = [0] * depth, num_patches
  for l, k in zip(layers, keeps):
    out[l] = prev - k - 1
    prev = k
  return tuple(out)


def check_keeps(keeps: Sequence[int], ratios: Sequence[float], num_patches: int) -> None:
  """Refuses kept counts that are not strictly decreasing from num_patches, >= 1."""
  prev = num_patches
  for r, k in zip(ratios, keeps):
    if not 1 <= k < prev:
      raise ConfigError(
          f'model.spvit_keep_ratios {tuple(ratios)} keep {tuple(keeps)} of {num_patches} '
          'patch tokens: each layer must keep at least one token and fewer than the layer '
          'before (ratios of the patches, decreasing, in (0, 1)); change the ratios.')
    prev = k


def parse_ratios(spec: Any, num_layers: int) -> Optional[tuple[float, ...]]:
  """`model.spvit_keep_ratios` as floats ('' -> None: from the budget)."""
  if isinstance(spec, (list, tuple)):
    parts = list(spec)
  else:
    spec = str(spec).strip()
    if not spec:
      return None
    parts = [p for p in spec.split(',') if p.strip()]
  try:
    ratios = tuple(float(p) for p in parts)
  except (TypeError, ValueError):
    raise ConfigError(f'model.spvit_keep_ratios = {spec!r}: give one kept fraction per '
                      "pruning layer, separated by commas, e.g. '0.7,0.49,0.34'.") from None
  if len(ratios) != num_layers or not all(0.0 < r < 1.0 for r in ratios):
    raise ConfigError(f'model.spvit_keep_ratios = {spec!r}: give {num_layers} fractions '
                      'in (0, 1), one per pruning layer (model.spvit_layers).')
  return ratios


def ratios_for_flops(target: float, layers: Sequence[int], *, depth: int,
                     num_patches: int, num_protected: int, width: int,
                     mlp_ratio: float) -> tuple[float, ...]:
  """Keep ratios base^1, base^2, ... whose deployed FLOPs are closest to `target`.

  The geometric rule of the authors' training script (the commented
  KEEP_RATE = [base_rate, base_rate ** 2, base_rate ** 3]), base on a 0.001
  grid. Raises ConfigError when even the best is more than 5 % off.
  """
  n0 = num_patches + num_protected

  def flops(base_rate):
    ratios = tuple(base_rate ** (j + 1) for j in range(len(layers)))
    keeps = keep_counts(ratios, num_patches)
    prev = num_patches
    for k in keeps:
      if not 1 <= k < prev:
        return None
      prev = k
    return schedules.vit_flops(
        spvit_schedule(keeps, layers, depth=depth, num_patches=num_patches),
        num_tokens=n0, width=width, mlp_ratio=mlp_ratio)

  best, best_err = None, None
  for i in range(1, 1000):
    f = flops(i / 1000)
    if f is not None and (best_err is None or abs(f - target) < best_err):
      best, best_err = i / 1000, abs(f - target)
  if best is None or best_err > 0.05 * target:
    raise ConfigError(
        f'SPViT at layers {tuple(layers)} cannot reach the FLOPs of model.schedule '
        'within 5 %: move model.spvit_layers earlier, or give model.spvit_keep_ratios.')
  return tuple(best ** (j + 1) for j in range(len(layers)))


def default_layers_for_flops(target: float, *, depth: int, **kw) -> tuple[
    tuple[int, ...], tuple[float, ...]]:
  """The default pruning layers (`model.spvit_layers=''`) and their keep ratios.

  The method's layers (3, 6, 9 of 12, scaled to the depth) when their geometric
  keep ratios reach `target` within 5 %. Otherwise (the paper's high levels:
  the tokens must go before block 3 for the FLOPs to fall far enough) the same
  spacing from block 0 (0, 3, 6): of the layers moved earlier together, these
  reach the FLOPs with the mildest keep ratios (on ViT-B/16 high 0.50, 0.25,
  0.12 of the patches, where 2, 5, 8 would keep 0.24, 0.06, 0.01). Raises
  ConfigError (ratios_for_flops's) when neither reaches it.
  """
  layers = schedules.evit_default_layers(depth)
  try:
    return layers, ratios_for_flops(target, layers, depth=depth, **kw)
  except ConfigError:
    moved = tuple(l - layers[0] for l in layers)
    return moved, ratios_for_flops(target, moved, depth=depth, **kw)


@dataclasses.dataclass(frozen=True)
class SPViT(base.TokenReducer):
  """Selectors at `layers`; `keeps` patch tokens kept there at inference."""
  layers: tuple[int, ...]
  ratios: tuple[float, ...]
  keeps: tuple[int, ...]
  num_heads: int
  num_patches: int
  ratio_weight: float

  name: ClassVar[str] = 'spvit'
  traces_source: ClassVar[bool] = False
  has_regulariser: ClassVar[bool] = True
  config_fields: ClassVar[tuple[str, ...]] = (
      'spvit_layers', 'spvit_keep_ratios', 'spvit_ratio_weight', 'stage1_workdir')
  field_ranges: ClassVar[dict] = {
      'spvit_ratio_weight': Range(0, why=(
          'the weight of the keep-ratio loss, e.g. 2.0')),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'SPViT':
    """From its keep ratios, or ('' ) the geometric ratios matching model.schedule's FLOPs."""
    layers = base.layer_list(c, 'spvit_layers', geo.depth)
    default_layers = layers is None
    if default_layers:
      layers = schedules.evit_default_layers(geo.depth)
    ratios = parse_ratios(c.spvit_keep_ratios, len(layers))
    if ratios is None:
      target = schedules.vit_flops(base.config_schedule(c, geo), num_tokens=geo.num_tokens,
                                   width=geo.width, mlp_ratio=geo.mlp_ratio)
      kw = dict(depth=geo.depth, num_patches=geo.num_patches,
                num_protected=geo.num_protected, width=geo.width, mlp_ratio=geo.mlp_ratio)
      if default_layers:  # moved earlier when they cannot reach the FLOPs
        layers, ratios = default_layers_for_flops(target, **kw)
      else:
        ratios = ratios_for_flops(target, layers, **kw)
    keeps = keep_counts(ratios, geo.num_patches)
    check_keeps(keeps, ratios, geo.num_patches)
    w = c.spvit_ratio_weight
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or w < 0:
      raise ConfigError(f'model.spvit_ratio_weight must be a number >= 0, got {w!r}.')
    return cls(schedule=spvit_schedule(keeps, layers, depth=geo.depth,
                                       num_patches=geo.num_patches),
               num_protected=geo.num_protected, layers=layers, ratios=ratios, keeps=keeps,
               num_heads=geo.num_heads, num_patches=geo.num_patches, ratio_weight=float(w))

  def attention(self, layer: int, *, train: bool) -> base.AttentionRequest:
    # Training masks the pruned tokens out of every later layer's keys.
    return base.AttentionRequest(masked=train and layer > self.layers[0],
                                 mask_eps=TRAIN_EPS, mask_keep_self=True)

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    if layer not in self.layers:
      if train and tokens.mask is not None:
        return tokens, (None, tokens.mask[:, self.num_protected:].sum(axis=1))
      return tokens, None
    j = self.layers.index(layer)
    p = self.num_protected
    selector = Selector(self.num_heads, name='spvit')
    if train:
      tokens = tokens.with_mask()
      prev = tokens.mask[:, p:]
      _, soft, keep = selector(tokens.x[:, p:], prev, gumbel=True)
      x, mask = spvit_train_reduce(tokens.x, tokens.mask, keep, soft[..., 0],
                                   num_protected=p, num_packages=j)
      kept = mask[:, p:p + self.num_patches].mean(axis=1)
      return base.Tokens(x, None, None, mask), (kept, mask[:, p:].sum(axis=1))
    rest = tokens.x[:, p:]
    log_score, soft, _ = selector(rest, jnp.ones(rest.shape[:2], rest.dtype))
    x = spvit_prune(tokens.x, log_score[..., 0], soft[..., 0], self.keeps[j],
                    num_protected=p, num_packages=j)
    return base.Tokens(x, None, None, None), None

  def regulariser(self, aux: list[Any], geo: base.Geometry) -> tuple[Array, Array]:
    """The ratio loss (DiffPruningLoss) and the FLOPs fraction the masks would cost.

    In evaluation (no masks) the deployed model's static fraction and no loss.
    """
    if all(a is None for a in aux):
      full = schedules.vit_flops((0,) * geo.depth, num_tokens=geo.num_tokens,
                                 width=geo.width, mlp_ratio=geo.mlp_ratio)
      pruned = schedules.vit_flops(self.schedule, num_tokens=geo.num_tokens,
                                   width=geo.width, mlp_ratio=geo.mlp_ratio)
      return jnp.asarray(pruned / full, jnp.float32), jnp.zeros((), jnp.float32)
    penalty = 0.0
    for j, l in enumerate(self.layers):
      penalty = penalty + jnp.mean(jnp.square(aux[l][0] - self.ratios[j]))
    penalty = self.ratio_weight * penalty / len(self.layers)
    kept = []
    for l in range(geo.depth):
      active = geo.num_patches if aux[l] is None else aux[l][1]
      kept.append(jnp.mean((active + geo.num_protected) / geo.num_tokens))
    fraction = ltmp.flops_ratio(kept, num_tokens=geo.num_tokens, width=geo.width,
                                mlp_ratio=geo.mlp_ratio)
    return fraction, penalty
