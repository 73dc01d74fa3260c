"""Merging schedules: how many tokens each layer merges, and what that costs.

A schedule is a tuple of Python ints, one per layer, fixed at trace time so every
token count is static under jit (one compilation, no padding). This module turns
the ways people write schedules into that tuple, checks it against the model
(loudly, at construction, naming the layer), and counts FLOPs.

Forms accepted by `resolve_schedule` (docs/algorithm.md §3):
  * a name from `NAMED_SCHEDULES` ('vitb_high', ...), or 'none';
  * an int r: ToMe's constant schedule;
  * 'r,inflection' (or a (int, float) tuple): ToMe's linear ramp;
  * 'flops:<ratio>': the Eq. 8 schedule whose FLOPs ratio is closest to <ratio>
    (capped per layer like ToMe's forms: at low ratios Eq. 8 asks the last layer
    for more than half its tokens);
  * not here: 'speedup:<x>[@batch]' needs timing on the device, so the commands
    replace it by the schedule it chooses before any model is built
    (pyra_jax/speedup.py); reaching this module it is an error;
  * an explicit list/tuple of ints, or a string 'r0,r1,...' with one int per layer.

ToMe's own forms (int, ramp) are capped per layer exactly as ToMe caps them at run
time, so `16` on ViT-B/16 gives the same model as in ToMe. Explicit lists and named
schedules are taken literally: an entry that exceeds what its layer can merge is an
error, not a silent cap, because a user who wrote it expects it to happen.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union
from pyra_jax.errors import ScheduleError  # pylint: disable=unused-import

ScheduleSpec = Union[str, int, Sequence[int], tuple]

NAMED_SCHEDULES: dict[str, tuple[int, ...]] = {
    # Table 13 and the authors' code. ViT-B low: the paper's text says 16 in every
    # layer; the code trims the last layer to 10 so the count never hits the cap.
    'vitb_low': (16,) * 11 + (10,),
    'vitb_high': (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3),
    'vitl_low': (8,) * 23 + (6,),
    'vitl_high': (20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3,
                  2, 2, 1, 1, 1, 1),
    'deitb_low': (16,) * 6 + (10,) * 6,
    'deitb_high': (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3),
}



def max_merge(num_tokens: int, num_protected: int) -> int:
  """The most tokens one bipartite merge can remove: half the unprotected ones."""
  return max((num_tokens - num_protected) // 2, 0)


def tome_constant(r: int, depth: int) -> list[int]:
  """ToMe's int form: the same r in every layer (capped later, as ToMe does)."""
  return [int(r)] * depth


def tome_inflection(r: int, inflection: float, depth: int) -> list[int]:
  """ToMe's (r, inflection) form: a linear ramp whose mean is r.

  inflection = -0.5 decreases, 0 is constant, +0.5 increases (ToMe's parse_r).
  """
  min_val = int(r * (1.0 - inflection))
  max_val = 2 * r - min_val
  step = (max_val - min_val) / (depth - 1) if depth > 1 else 0.0
  return [int(min_val + step * i) for i in range(depth)]


def eq8_schedule(depth: int, num_patches: int, exponent_ratio: float,
                 tokens_left: int = 4) -> list[int]:
  """Eq. 8: r_l = floor((g(l-1) - g(l)) * (T - t)), g(x) = (1 - x/L)^(F/f - 1).

  `exponent_ratio` is the F/f of the paper; T = num_patches, t = tokens_left.
  With F/f = 3.685 and t = 4 it gives (40, 34, 28, 24, 19, 15, 11, 8, 5, 3, 1, 0):
  the first two layers of the hand-set ViT-B/16 high schedule, 188 tokens merged
  in all against its 192.
  """
  if exponent_ratio < 1:
    raise ScheduleError(f'Eq. 8 needs F/f >= 1, got {exponent_ratio}.')
  g = lambda x: (1.0 - x / depth) ** (exponent_ratio - 1.0)
  return [int(math.floor((g(l - 1) - g(l)) * (num_patches - tokens_left)))
          for l in range(1, depth + 1)]


def cap_schedule(schedule: Sequence[int], num_tokens: int,
                 num_protected: int) -> list[int]:
  """Caps each layer's r at what it can merge, as ToMe does at run time."""
  out, n = [], num_tokens
  for r in schedule:
    r = min(r, max_merge(n, num_protected))
    out.append(r)
    n -= r
  return out


def token_counts(schedule: Sequence[int], num_tokens: int) -> list[int]:
  """Tokens entering each block, plus the count after the last one (len L+1)."""
  counts = [num_tokens]
  for r in schedule:
    counts.append(counts[-1] - r)
  return counts


def vit_flops(schedule: Sequence[int], *, num_tokens: int, width: int,
              mlp_ratio: float = 4.0) -> float:
  """FLOPs (2 x multiply-adds) of the transformer blocks with a schedule.

  docs/algorithm.md §3: a block with N tokens entering and N' after its merge costs
  2(4ND^2 + 2N^2 D) for attention and 2(2 * mlp_ratio * N' D^2) for the MLP
  (= 2(8N'D^2) at the standard ratio 4). Patch embedding and head are not counted,
  matching the paper's 34.9 GFLOPs for ViT-B/16 at 224.
  """
  d = width
  total = 0.0
  n = num_tokens
  for r in schedule:
    total += 2 * (4 * n * d * d + 2 * n * n * d)
    n = n - r
    total += 2 * (2 * mlp_ratio * n * d * d)
  return total


def schedule_for_flops_ratio(target_ratio: float, *, depth: int, num_patches: int,
                             num_protected: int, width: int, mlp_ratio: float = 4.0,
                             tokens_left: int = 4) -> list[int]:
  """Solves Eq. 8 for the F/f whose schedule's FLOPs ratio is closest to target.

  Each candidate schedule is capped per layer before its FLOPs are counted.
  """
  num_tokens = num_patches + num_protected
  full = vit_flops([0] * depth, num_tokens=num_tokens, width=width, mlp_ratio=mlp_ratio)

  def capped(e: float) -> list[int]:
    return cap_schedule(eq8_schedule(depth, num_patches, e, tokens_left), num_tokens,
                        num_protected)

  def ratio(e: float) -> float:
    sched = capped(e)
    return full / vit_flops(sched, num_tokens=num_tokens, width=width,
                            mlp_ratio=mlp_ratio)

  if target_ratio < 1.0:
    raise ScheduleError(f'A FLOPs ratio below 1 is not a speed-up: {target_ratio}.')
  # After capping, the ratio is not monotonic in F/f at the extremes, so scan a
  # fine grid (cheap: pure Python on a dozen ints) rather than bisect.
  grid = [1.0 + 0.005 * i for i in range(4000)]
  best = min(grid, key=lambda e: abs(ratio(e) - target_ratio))
  if abs(ratio(best) - target_ratio) > 0.05 * target_ratio:
    reach = max(ratio(e) for e in grid)
    raise ScheduleError(
        f'FLOPs ratio {target_ratio} is out of reach of Eq. 8 for {depth} layers and '
        f'{num_patches} patches (at most {reach:.2f}); give an explicit schedule.')
  return capped(best)


def _parse(spec: ScheduleSpec, depth: int, num_patches: int, num_protected: int,
           width: int, mlp_ratio: float) -> tuple[list[int], bool]:
  """Returns (schedule, is_tome_form). ToMe forms get ToMe's run-time cap."""
  if isinstance(spec, bool):
    raise ScheduleError(f'Schedule must be a name, int or list, got {spec!r}.')
  if isinstance(spec, int):
    return tome_constant(spec, depth), True
  if isinstance(spec, str):
    s = spec.strip()
    if s in ('', 'none', '0'):
      return [0] * depth, False
    if s in NAMED_SCHEDULES:
      return list(NAMED_SCHEDULES[s]), False
    if s.startswith('speedup:'):
      raise ScheduleError(
          f'config.model.schedule = {spec!r} is chosen by timing on the device '
          'before the model is built: the commands and pyra_jax.train do it; in '
          'Python call pyra_jax.speedup_timer.resolve(config, workdir) first.')
    if s.startswith('flops:'):
      try:
        ratio = float(s.split(':', 1)[1])
      except ValueError:
        ratio = math.nan
      # NaN and inf compare false with every bound below, so they would pass
      # the search as the first candidate (no merging at all): refuse them here.
      if not math.isfinite(ratio):
        raise ScheduleError(
            f"config.model.schedule = {spec!r}: 'flops:' takes the FLOPs ratio "
            "to reach, a finite number >= 1 such as 'flops:3.5'.")
      return schedule_for_flops_ratio(
          ratio, depth=depth, num_patches=num_patches,
          num_protected=num_protected, width=width, mlp_ratio=mlp_ratio), False
    parts = [p for p in s.replace('(', '').replace(')', '').split(',') if p.strip()]
    try:
      if len(parts) == 1:
        return tome_constant(int(parts[0]), depth), True
      if len(parts) == 2 and '.' in parts[1] and depth != 2:
        return tome_inflection(int(parts[0]), _inflection(spec, parts[1]), depth), True
      return [int(p) for p in parts], False
    except ScheduleError:
      raise
    except ValueError:
      raise ScheduleError(
          f'Cannot read config.model.schedule = {spec!r}. Use a name ({", ".join(NAMED_SCHEDULES)}), '
          "an int, 'r,inflection', 'flops:<ratio>' or one int per layer.") from None
  spec = tuple(spec)
  if (len(spec) == 2 and isinstance(spec[1], float) and depth != 2):
    return tome_inflection(int(spec[0]), _inflection(spec, spec[1]), depth), True
  whole = lambda v: (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                     or isinstance(v, float) and v.is_integer())
  if not all(whole(v) for v in spec):
    raise ScheduleError(f'Schedule {spec!r}: give one whole number of tokens per layer.')
  return [int(v) for v in spec], False


def _inflection(spec: ScheduleSpec, value) -> float:
  """The inflection of ToMe's 'r,inflection' form, refusing NaN and inf
  (int(r * (1 - inf)) would end in an OverflowError, NaN in a ValueError)."""
  inflection = float(value)
  if not math.isfinite(inflection):
    raise ScheduleError(
        f"config.model.schedule = {spec!r}: the inflection of 'r,inflection' must be "
        'a finite number (ToMe uses -0.5 to 0.5, e.g. 16,-0.5).')
  return inflection


def resolve_schedule(spec: ScheduleSpec, *, depth: int, num_patches: int,
                     num_protected: int = 1, width: int = 768,
                     mlp_ratio: float = 4.0) -> tuple[int, ...]:
  """Turns any schedule form into a validated tuple of per-layer ints.

  Raises ScheduleError naming the layer and the numbers when the schedule has the
  wrong length, a negative entry, or merges more tokens than a layer can.
  """
  sched, is_tome_form = _parse(spec, depth, num_patches, num_protected, width,
                               mlp_ratio)
  if len(sched) != depth:
    raise ScheduleError(
        f'Schedule {spec!r} has {len(sched)} entries but the model has {depth} '
        f'layers: give one r per layer (or an int for a constant schedule).')
  n = num_patches + num_protected
  out = []
  for layer, r in enumerate(sched):
    if r < 0:
      raise ScheduleError(f'Schedule {spec!r}: layer {layer} has r = {r} < 0.')
    cap = max_merge(n, num_protected)
    if r > cap:
      if is_tome_form:
        r = cap  # ToMe caps at run time; we do the same, statically.
      else:
        raise ScheduleError(
            f'Schedule {spec!r}: layer {layer} merges r = {r} tokens, but it '
            f'receives {n} tokens ({num_protected} protected), so at most '
            f'{cap} can be merged. Lower r in layer {layer} or later ones.')
    out.append(int(r))
    n -= r
  return tuple(out)


# --------------------------------------------------------------------------- #
# The competing methods' per-layer counts (docs/algorithm.md §16)
# --------------------------------------------------------------------------- #
# Every method resolves to the same per-layer tuple: r_l, the tokens the layer
# removes net (its output has r_l fewer tokens than its input), so token counts
# (`token_counts`), FLOPs (`vit_flops`) and the static shapes are computed one
# way for all of them. tome/pyra/tofu: r_l merged (or pruned); ats: the layer
# outputs N_l - r_l slots (what the static shapes compute; repeated picks are
# masked, not removed); evit: r_l = M_l - keep_l - 1 (keep_l tokens kept and one
# fused token added, M_l the unprotected tokens).

# EViT's own placement for ViT-B/DeiT (12 layers): reorganise after the 4th,
# 7th and 10th block (0-based 3, 6, 9); other depths scale it.
EVIT_LAYERS_12 = (3, 6, 9)


def evit_default_layers(depth: int) -> tuple[int, ...]:
  """EViT's layers 3, 6, 9 of 12, scaled to `depth` (24 layers: 6, 12, 18;
  rounded down, repeats dropped: 2 layers -> 0, 1)."""
  return tuple(sorted({l * depth // 12 for l in EVIT_LAYERS_12}))


def evit_keeps(keep_rate: float, layers: Sequence[int], *, depth: int,
               num_tokens: int, num_protected: int) -> tuple[int, ...]:
  """Per layer, the tokens EViT keeps (0: the layer does not reorganise).

  At an EViT layer, keep = ceil(keep_rate * M) of its M unprotected tokens.
  A layer where that keeps all M is left alone (EViT's code returns the
  tokens unchanged); at keep = M - 1 EViT still reorders the tokens and fuses
  the least attended one, so that layer reorganises without removing a token.
  """
  out, n = [], num_tokens
  for l in range(depth):
    keep = 0
    if l in layers:
      m = n - num_protected
      keep = max(int(math.ceil(keep_rate * m - 1e-9)), 1)
      if keep >= m:
        keep = 0
    out.append(keep)
    if keep:
      n = num_protected + keep + 1
  return tuple(out)


def evit_schedule(keep_rate: float, layers: Sequence[int], *, depth: int,
                  num_tokens: int, num_protected: int) -> tuple[int, ...]:
  """Per-layer r of EViT keeping ceil(keep_rate * M) of M unprotected tokens:
  r = M - keep - 1 at a reorganising layer (0 at keep = M - 1), else 0."""
  keeps = evit_keeps(keep_rate, layers, depth=depth, num_tokens=num_tokens,
                     num_protected=num_protected)
  out, n = [], num_tokens
  for keep in keeps:
    r = n - num_protected - keep - 1 if keep else 0
    out.append(r)
    n -= r
  return tuple(out)


def evit_keep_rate_for_flops(target_flops: float, layers: Sequence[int], *, depth: int,
                             num_tokens: int, num_protected: int, width: int,
                             mlp_ratio: float = 4.0) -> float:
  """The keep rate (one for all EViT layers) whose FLOPs are closest to a target.

  Like `schedule_for_flops_ratio` for Eq. 8: a fine grid (0.001 steps) of the
  single free parameter. Raises ScheduleError when even the best is more than
  5 % off (e.g. high compression with late layers: the blocks before the first
  EViT layer alone cost more than the target).
  """
  def flops(k: float) -> float:
    return vit_flops(evit_schedule(k, layers, depth=depth, num_tokens=num_tokens,
                                   num_protected=num_protected),
                     num_tokens=num_tokens, width=width, mlp_ratio=mlp_ratio)

  grid = [i / 1000 for i in range(1, 1000)]
  best = min(grid, key=lambda k: abs(flops(k) - target_flops))
  if abs(flops(best) - target_flops) > 0.05 * target_flops:
    full = flops(1.0)
    raise ScheduleError(
        f'EViT at layers {tuple(layers)} cannot reach the FLOPs of model.schedule '
        f'(ratio {full / target_flops:.2f}x; the best keep rate gives '
        f'{full / flops(best):.2f}x): move model.evit_layers earlier, or set '
        'model.evit_match_flops=False and a keep rate.')
  return best
