"""`python -m pyra_jax.benchmark --curve`: measured speed-up against FLOPs ratio.

What each choice of `speedup:<x>` (or `flops:<ratio>`) buys on this device:
for every merging method asked for (PYRA: the Eq. 8 family; ToMe: its
constant-r family), `points` schedules spread evenly over the family's FLOPs
ratios are timed as deployed models against the uncompressed model in the
same rounds (`speedup_timer.make_timer`, the timing `speedup:` itself uses);
each family has its own rounds, with its own uncompressed model in them.
Printed as a table, written as JSON with --out and, with --curve_png, as a
plot (matplotlib) with the line speed-up = FLOPs ratio for reference.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ml_collections

from pyra_jax import speedup
from pyra_jax import speedup_timer
from pyra_jax.errors import ScheduleError

FAMILY_NAMES = {'pyra': 'PYRA, Eq. 8 (F/f)', 'tome': 'ToMe, constant r',
                'tofu': 'ToFu, Eq. 8 (F/f)', 'ats': 'ATS, Eq. 8 (F/f)'}


def curve(config: ml_collections.ConfigDict, *, methods: Sequence[str], points: int,
          batch: int, rounds: int,
          timer: Optional[speedup.Timer] = None) -> dict[str, Any]:
  """Times `points` schedules of each method's family; returns the curve as a dict.

  timer: a stand-in for the real timing (tests), called per family.
  """
  methods = [m for m in methods if m in speedup.METHODS]
  if not methods:
    raise ScheduleError(
        f'--curve times the schedule families of {speedup.METHODS}: add one '
        'of them to --methods.')
  out: dict[str, Any] = {'batch': batch, 'rounds': rounds, 'families': {}}
  for m in methods:
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.method = m
    if m == 'pyra' and c.model.modulation == 'none':
      c.model.modulation = 'pyra'
    geo, about = speedup_timer.geometry_and_about(c)
    out.setdefault('about', {k: v for k, v in about.items() if k not in ('method', 'modulation')})
    cands = speedup.spread(speedup.family(m, geo), points)
    t = timer if timer is not None else speedup_timer.make_timer(c, batch, rounds)
    got = t(cands)
    out['families'][m] = [
        {'param': cd.param, 'schedule': speedup.schedule_text(m, cd),
         'per_layer': list(cd.schedule), 'flops_ratio': cd.flops_ratio, **got[cd.key]}
        for cd in cands]
  return out


def format_curve(res: dict[str, Any]) -> str:
  """The table: one row per timed schedule, each family by rising FLOPs ratio."""
  a = res['about']
  lines = [f"measured speed-up vs FLOPs ratio on {a['device_kind']}, image "
           f"{a['image_size']}, batch {res['batch']}, {res['rounds']} rounds "
           '(paired with the uncompressed model in the same rounds)']
  lines.append(f"{'family':20} {'param':>6} {'FLOPs ratio':>11} {'speed-up':>8} "
               f"{'img/s':>9}  schedule")
  for m, rows in res['families'].items():
    for r in rows:
      lines.append(f"{FAMILY_NAMES[m]:20} {r['param']:6.3g} {r['flops_ratio']:10.2f}x "
                   f"{r['speedup']:7.2f}x {r['images_per_sec']:9.1f}  {r['schedule']}")
  return '\n'.join(lines)


def plot_curve(res: dict[str, Any], path: str, title: str = '') -> None:
  """Writes the plot as a PNG (matplotlib, imported here: only --curve_png needs it)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
  top = 1.0
  for (m, rows), marker in zip(res['families'].items(), 'os^v'):
    xs = [r['flops_ratio'] for r in rows]
    ys = [r['speedup'] for r in rows]
    top = max([top] + xs + ys)
    ax.plot(xs, ys, marker=marker, label=FAMILY_NAMES[m])
  ax.plot([1, top], [1, top], 'k:', lw=1, label='speed-up = FLOPs ratio')
  a = res['about']
  ax.set_xlabel('FLOPs ratio (uncompressed / merged, blocks only)')
  ax.set_ylabel('measured speed-up (deployed model)')
  ax.set_title(title or f"{a['backbone']['variant']} at {a['image_size']} px, "
               f"batch {res['batch']}", fontsize=10)
  ax.text(0.01, -0.16, a['device_kind'], transform=ax.transAxes, fontsize=7)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
