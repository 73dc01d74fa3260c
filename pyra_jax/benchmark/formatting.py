"""The console table of a benchmark result and the step-profile table."""

from __future__ import annotations

from typing import Any

from pyra_jax import profiling


def format_table(res: dict[str, Any]) -> str:
  """The console table (one row per model) and the notes under it."""
  s, mm = res['settings'], res['matmul']
  lines = [(f"preset={s['preset']} " if s.get('preset') else '') +
           f"mode={res['mode']} batch={s['batch_size']} image={s['image_size']} "
           f"dtype={s['dtype']} rounds={s['rounds']} ({s['seconds']:.1f} s) "
           f"load avg before/after={res['load_average']['before']}/"
           f"{res['load_average']['after']}",
           f"matmul {mm['size']}^3: {mm['gflops_per_s']:.1f} GFLOP/s "
           f"(fastest round {mm['gflops_per_s_best']:.1f})"]
  w = max([6] + [len(m) for m in res['models']])
  hdr = (f"{'model':{w}} {'img/s':>7} {'GFLOPs':>7} {'speed-up':>8} {'FLOPs ratio':>11} "
         f"{'su/ratio':>8} {'GFLOP/s':>8} {'% matmul':>8}")
  if res['mode'] == 'train':
    hdr += f" {'peak MiB':>9}"
  lines.append(hdr)
  for m, r in res['models'].items():
    row = (f"{m:{w}} {r['images_per_sec']:7.2f} {r['gflops']:7.4g} {r['speedup']:7.2f}x "
           f"{r['flops_ratio']:10.2f}x {r['speedup_over_flops_ratio']:8.1%} "
           f"{r['gflops_per_s']:8.1f} {r['matmul_fraction']:8.1%}")
    if res['mode'] == 'train':
      row += f" {r.get('peak_bytes', 0) / 2**20:9.0f}"
    lines.append(row)
  lines.append('img/s: median round; speed-up and % matmul: median over rounds of '
               'the ratio within a round.')
  if res['mode'] == 'train':
    lines.append('train: the real step (training.steps.make_train_step); GFLOPs per image of the '
                 'whole compiled step (XLA cost analysis); peak memory: '
                 + next(iter(res['models'].values())).get('peak_source', 'n/a'))
    lines.append('step breakdown, ms per batch (by subtraction of separately compiled '
                 'programs, paired within rounds; not a profile):')
    for m, r in res['models'].items():
      b = r['breakdown']
      lines.append(f"  {m:{w}} forward {b['forward'] * 1e3:8.1f}  RNG {b['rng'] * 1e3:7.1f}  "
                   f"backward {b['backward'] * 1e3:8.1f}  optimizer {b['optimizer'] * 1e3:7.1f}"
                   f"  sum {b['sum'] * 1e3:8.1f}  step {b['step'] * 1e3:8.1f}")
  if any('profile' in r for r in res['models'].values()):
    lines.append(format_profiles({m: r['profile'] for m, r in res['models'].items()
                                  if 'profile' in r}))
  if 'gemm_bound' in res:
    lines.append('dense-layer matmuls alone, at each model\'s token counts '
                 '(the ceiling for its speed-up on this machine):')
    for m, g in res['gemm_bound'].items():
      lines.append(f"  {m:{w}} {g['gflops_per_s']:7.1f} GFLOP/s ({g['matmul_fraction']:.1%} "
                   f"of the matmul rate): speed-up bound {g['speedup_bound']:.2f}x, "
                   f"model achieves {g['speedup_over_bound']:.1%} of it")
  if 'merge_ops' in res:
    mo = res['merge_ops']
    lines.append(f"merge ops alone ({mo['model']}): {mo['seconds'] * 1e3:.1f} ms per batch, "
                 f"{mo['share_of_model']:.1%} of the model's time")
  if 'pyra_cost_over_tome' in res:
    lines.append(f"PYRA throughput cost over ToMe (same schedule): "
                 f"{res['pyra_cost_over_tome']:.1%}")
  if res['recompiled']:
    bad = [m for m, r in res['models'].items() if r['recompiled']]
    lines.append(f'WARNING: recompilation between calls in {bad} (traces > 1).')
  else:
    lines.append('No recompilation between calls (one trace per model).')
  return '\n'.join(lines)


def format_profiles(profiles: dict[str, dict[str, Any]]) -> str:
  """One table, models side by side, so a part that grows or vanishes between
  the uncompressed and the merged steps (matmuls, merge) reads across a row."""
  names = list(profiles)
  lines = ['step profile, ms per step (jax.profiler; each HLO op attributed by the '
           'code it came from, pyra_jax/profiling.py):',
           f"  {'phase / part':28}" + ''.join(f'{m:>12}' for m in names)]
  for ph in profiling.PHASES:
    for part in profiling.PARTS:
      vals = [p['ms'][ph].get(part, 0.0) for p in profiles.values()]
      if any(vals):
        lines.append(f'  {ph + " / " + part:28}' + ''.join(f'{v:12.1f}' for v in vals))
  lines.append(f"  {'all ops':28}" + ''.join(f"{p['ops_ms']:12.1f}" for p in profiles.values()))
  lines.append(f"  {'wall time (profiled)':28}" + ''.join(
      f"{p['wall_ms']:12.1f}" for p in profiles.values()))
  return '\n'.join(lines)
