"""model.schedule = 'speedup:<x>[@batch]': the families, the choice, the caches, the refusal.

The families are checked against their definitions written out here (Eq. 8
and ToMe's constant r, capped per layer); the choice against a brute force
over the whole family with a deterministic fake timer (timing is not the
point there); one test times the tiny model for real; the CLI's refusal of a
target out of reach is read from a prefilled cache (no timing in the
subprocess).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from pyra_jax import recipe
from pyra_jax import schedules
from pyra_jax import speedup
from pyra_jax import speedup_curve
from pyra_jax import speedup_timer
from pyra_jax.configs import tiny
from pyra_jax.errors import ConfigError, ScheduleError
from pyra_jax.methods.base import Geometry
from pyra_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ViT-S/14 at 112 px (the demo) and the tiny config's model.
DEMO = Geometry(depth=12, num_patches=64, num_protected=1, width=384, mlp_dim=1536)
TINY = Geometry(depth=2, num_patches=16, num_protected=1, width=32, mlp_dim=64)


def block_flops(sched, geo):
  """FLOPs of the blocks, written out: attention on the N tokens entering,
  MLP on the N - r left after the merge (2 FLOPs per multiply-add)."""
  n, d, m, total = geo.num_patches + geo.num_protected, geo.width, geo.mlp_dim, 0
  for r in sched:
    total += 2 * (4 * n * d * d + 2 * n * n * d)
    n -= r
    total += 2 * 2 * n * d * m
  return total


def capped(sched, geo):
  n, out = geo.num_patches + geo.num_protected, []
  for r in sched:
    r = min(r, (n - geo.num_protected) // 2)
    out.append(r)
    n -= r
  return tuple(out)


def eq8_reference(geo, exponent):
  """Eq. 8: r_l = floor((g(l-1) - g(l)) (T - 4)), g(x) = (1 - x/L)^(F/f - 1)."""
  L, T = geo.depth, geo.num_patches
  g = [(1 - l / L) ** (exponent - 1) for l in range(L + 1)]
  return capped([math.floor((g[l - 1] - g[l]) * (T - 4)) for l in range(1, L + 1)], geo)


@pytest.mark.parametrize('geo', [DEMO, TINY])
def test_families_are_their_definitions(geo):
  eq8 = speedup.family('pyra', geo)
  want = {eq8_reference(geo, 1 + 0.005 * i) for i in range(4000)} - {(0,) * geo.depth}
  assert {c.schedule for c in eq8} == want
  tome = speedup.family('tome', geo)
  assert {c.schedule for c in tome} == {
      capped([r] * geo.depth, geo) for r in range(1, geo.num_patches + 2)}
  full = block_flops([0] * geo.depth, geo)
  for fam in (eq8, tome):
    ratios = [c.flops_ratio for c in fam]
    assert ratios == sorted(ratios)
    for c in fam:
      assert c.flops_ratio == pytest.approx(full / block_flops(c.schedule, geo), rel=1e-12)
      # What model.schedule becomes resolves to exactly this schedule.
      text = speedup.schedule_text('tome' if fam is tome else 'pyra', c)
      assert schedules.resolve_schedule(
          text, depth=geo.depth, num_patches=geo.num_patches, width=geo.width,
          mlp_ratio=geo.mlp_dim / geo.width) == c.schedule
  # flops:3.2 (the demo's schedule) is one of the Eq. 8 family.
  if geo is DEMO:
    assert schedules.resolve_schedule('flops:3.2', depth=12, num_patches=64, width=384) in {
        c.schedule for c in eq8}


def fake_speedup(c):
  """A deterministic device: speed-up grows slower than the FLOPs ratio."""
  return 1 + 0.6 * (c.flops_ratio - 1) ** 0.9


class CountingTimer:
  """A fake timer that counts the schedules it was asked to time."""

  def __init__(self, fn=fake_speedup):
    self.fn, self.calls, self.timed = fn, 0, 0

  def __call__(self, cands):
    self.calls += 1
    self.timed += len(cands)
    return {c.key: {'speedup': self.fn(c), 'images_per_sec': 100 * self.fn(c),
                    'uncompressed_images_per_sec': 100.0} for c in cands}


@pytest.mark.parametrize('method', ['pyra', 'tome'])
def test_choice_is_the_brute_force_pick_within_the_tolerance(method):
  fam = speedup.family(method, DEMO)
  tol = 0.05
  top = max(fake_speedup(c) for c in fam)
  for x in (1.05, 1.3, 1.7, 2.0, top * 0.99, top):
    timer = CountingTimer()
    got = speedup.choose(speedup.Request(f'speedup:{x}', x, None), fam, timer,
                         per_pass=6, tolerance=tol)
    s = got.measurement['speedup']
    assert s == fake_speedup(got.chosen) and s >= x
    best = min(fake_speedup(c) for c in fam if fake_speedup(c) >= x)  # timing everything
    if got.gap:  # nothing of the family lies between the pick and the one below x
      assert best == s
    else:
      assert not got.exhausted
      assert s <= x * (1 + tol)
      assert s - best <= tol * x
    assert timer.timed < len(fam) or len(fam) <= 6 * speedup.MAX_PASSES


def test_a_target_out_of_reach_is_refused_naming_the_best():
  fam = speedup.family('pyra', TINY)
  top = max(fake_speedup(c) for c in fam)
  with pytest.raises(ScheduleError) as e:
    speedup.choose(speedup.Request('speedup:9', 9.0, None), fam, CountingTimer(),
                   per_pass=3, tolerance=0.05, describe=' on cpu at batch 8')
  msg = str(e.value)
  assert f'at most speedup:{math.floor(top * 100) / 100:g}.' in msg
  assert f'measures {top:.2f}x on cpu at batch 8' in msg
  assert '\n' not in msg and msg.count('. ') == 0


def test_a_family_slower_than_uncompressed_is_refused_without_a_target():
  slow = CountingTimer(lambda c: 0.9 + 0.05 * c.flops_ratio)  # at most 0.98x on TINY
  with pytest.raises(ScheduleError, match=r"the best measures 0\.98x\), so merging does "
                     r"not pay here: time a larger batch \('speedup:<x>@<batch>'\)"):
    speedup.choose(speedup.Request('speedup:1.2', 1.2, None), speedup.family('pyra', TINY),
                   slow, per_pass=3, tolerance=0.05)


@pytest.mark.parametrize('spec,match', [
    ('speedup:', 'write'), ('speedup:abc', 'write'), ('speedup:2@x', 'write'),
    ('speedup:1', r'number > 1'), ('speedup:nan', 'number > 1'),
    ('speedup:inf', 'number > 1'), ('speedup:2@0', 'integer >= 1')])
def test_bad_requests_are_refused(spec, match):
  with pytest.raises(ScheduleError, match=match):
    speedup.parse(spec)


def test_parse():
  assert speedup.parse('speedup:2.5@16') == speedup.Request('speedup:2.5@16', 2.5, 16)
  assert speedup.parse(' speedup:3 ') == speedup.Request('speedup:3', 3.0, None)
  assert speedup.parse('flops:3') is None and speedup.parse(8) is None
  with pytest.raises(ScheduleError, match='chosen by timing'):
    schedules.resolve_schedule('speedup:2', depth=2, num_patches=16)


def tiny_config(tmp_path, spec):
  c = tiny.get_config()
  c.model.schedule = spec
  c.speedup.cache_dir = str(tmp_path / 'user_cache')
  return c


def test_a_resumed_run_times_nothing(tmp_path):
  wd, quiet = str(tmp_path / 'run'), lambda line: None
  timer = CountingTimer()
  c = tiny_config(tmp_path, 'speedup:1.3@16')
  rec = speedup_timer.resolve(c, wd, timer=timer, log=quiet)
  assert timer.calls >= 1 and rec['source'] == 'measured' and rec['batch'] == 16
  chosen = c.model.schedule
  assert not speedup.is_speedup(chosen)
  assert vit.build_model(c.model, num_classes=10).schedule == tuple(rec['chosen']['schedule'])
  assert rec['chosen']['speedup'] >= 1.3
  calls = timer.calls
  # Resume: the workdir's record answers.
  c2 = tiny_config(tmp_path, 'speedup:1.3@16')
  rec2 = speedup_timer.resolve(c2, wd, timer=timer, log=quiet)
  assert timer.calls == calls and c2.model.schedule == chosen
  assert rec2['source'] == 'workdir record'
  # Another workdir on this device: the user cache answers.
  c3 = tiny_config(tmp_path, 'speedup:1.3@16')
  rec3 = speedup_timer.resolve(c3, str(tmp_path / 'other'), timer=timer, log=quiet)
  assert timer.calls == calls and c3.model.schedule == chosen and rec3['source'] == 'cache'
  # The workdir keeps its own cache too (the user cache gone).
  os.remove(tmp_path / 'user_cache' / speedup.CACHE_FILE)
  os.remove(os.path.join(wd, speedup.RECORD_FILE))
  c4 = tiny_config(tmp_path, 'speedup:1.3@16')
  speedup_timer.resolve(c4, wd, timer=timer, log=quiet)
  assert timer.calls == calls and c4.model.schedule == chosen
  # Another batch is another key: timed again.
  c5 = tiny_config(tmp_path, 'speedup:1.3@32')
  speedup_timer.resolve(c5, wd, timer=timer, log=quiet)
  assert timer.calls > calls


def test_real_timing_on_the_tiny_model(tmp_path):
  """One real measurement (tiny model, batch 64, 3 rounds): the pick is what
  the docs promise of the numbers it was chosen on."""
  c = tiny_config(tmp_path, 'speedup:1.05@64')
  c.speedup.rounds, c.speedup.candidates = 3, 3
  x, tol = 1.05, c.speedup.tolerance
  try:
    rec = speedup_timer.resolve(c, str(tmp_path / 'run'), log=lambda line: None)
  except ScheduleError as e:  # too loaded a machine for any gain: still one sentence
    assert 'out of reach' in str(e) and '\n' not in str(e)
    return
  s = rec['chosen']['speedup']
  assert s >= x and rec['chosen']['images_per_sec'] > 0
  measured = {tuple(int(v) for v in m['schedule'].split(',')): m['speedup']
              for m in rec['measured']}
  assert measured[tuple(rec['chosen']['schedule'])] == s
  assert s == min(v for v in measured.values() if v >= x)
  assert rec['gap'] or rec['exhausted'] or s <= x * (1 + tol)
  if rec['gap']:  # the family has nothing left in between
    below = max((TINY_RATIO(k) for k, v in measured.items() if v < x), default=1.0)
    assert not [f for f in speedup.family('pyra', TINY)
                if below < f.flops_ratio < TINY_RATIO(tuple(rec['chosen']['schedule']))
                and f.schedule not in measured]


def TINY_RATIO(sched):  # pylint: disable=invalid-name
  return block_flops([0, 0], TINY) / block_flops(sched, TINY)


def test_cli_refuses_a_target_out_of_reach_in_one_sentence(tmp_path):
  c = tiny_config(tmp_path, 'speedup:50')
  recipe.apply(c)  # as the command does before anything else
  geo, about = speedup_timer.geometry_and_about(c)
  fam = speedup.family('pyra', geo)
  key = speedup.cache_key({**about, 'batch': speedup_timer.default_batch()})
  speedup.Cache(str(tmp_path / 'user_cache' / speedup.CACHE_FILE)).put(
      key, CountingTimer()(fam), {})
  top = max(fake_speedup(f) for f in fam)
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.main', '--config=configs/tiny.py',
       '--config.model.schedule=speedup:50', f'--config.speedup.cache_dir={tmp_path / "user_cache"}',
       f'--workdir={tmp_path / "run"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert err[-1].startswith('Error: ') and 'Traceback' not in proc.stderr
  assert f'at most speedup:{math.floor(top * 100) / 100:g}.' in err[-1]
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_curve_with_a_fake_timer(tmp_path):
  c = tiny.get_config()
  res = speedup_curve.curve(c, methods=('peft', 'tome', 'pyra'), points=4, batch=8,
                            rounds=1, timer=CountingTimer())
  assert list(res['families']) == ['tome', 'pyra']
  for m, rows in res['families'].items():
    fam = speedup.family(m, TINY)
    assert len(rows) == min(4, len(fam))
    assert rows[0]['flops_ratio'] == fam[0].flops_ratio
    assert rows[-1]['flops_ratio'] == fam[-1].flops_ratio
    for r in rows:
      assert r['speedup'] == pytest.approx(1 + 0.6 * (r['flops_ratio'] - 1) ** 0.9)
  text = speedup_curve.format_curve(res)
  assert text.count('\n') == 1 + sum(len(r) for r in res['families'].values())
  speedup_curve.plot_curve(res, str(tmp_path / 'c.png'))
  with open(tmp_path / 'c.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('field,value,match', [
    ('rounds', 0, 'config.speedup.rounds = 0: use an integer >= 1'),
    ('candidates', 1, 'config.speedup.candidates = 1: use an integer >= 2'),
    ('tolerance', 0.0, r'config.speedup.tolerance = 0.0: use a finite number > 0')])
def test_bad_speedup_settings_name_the_field(field, value, match):
  from pyra_jax.training import checks  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.speedup[field] = value
  with pytest.raises(ConfigError, match=match):
    checks.check_config(c)
  with pytest.raises(ConfigError, match=match):
    speedup.settings(c)


def test_training_records_the_choice_and_a_resumed_run_times_nothing(tmp_path, monkeypatch):
  """Through the training loop: killed after its first checkpoint and resumed,
  the run measures once; results.json holds the measurement."""
  from tests.helpers.data import require_offline_mnist  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tests.helpers.runs import Killed, kill_after  # pylint: disable=g-import-not-at-top
  require_offline_mnist()
  timer = CountingTimer()
  monkeypatch.setattr(speedup_timer, 'make_timer', lambda config, batch, rounds: timer)

  def cfg():
    c = tiny_config(tmp_path, 'speedup:1.3')
    # One epoch of 1,000 digits at batch 200: 5 steps, checkpoints at 2 and 4.
    c.num_epochs, c.warmup_epochs, c.batch_size, c.checkpoint_every_steps = 1, 0, 200, 2
    c.data.eval_split, c.eval_batch_size = 'val200', 200
    return c

  original = loop.train_batches
  monkeypatch.setattr(loop, 'train_batches', kill_after(3))
  wd = str(tmp_path / 'run')
  with pytest.raises(Killed):
    loop.train_and_evaluate(cfg(), wd)
  calls = timer.calls
  assert calls >= 1
  monkeypatch.setattr(loop, 'train_batches', original)
  results = loop.train_and_evaluate(cfg(), wd)
  assert timer.calls == calls and results['steps'] == 5
  rec = results['speedup_schedule']
  assert rec['request'] == 'speedup:1.3' and rec['chosen']['speedup'] >= 1.3
  with open(os.path.join(wd, 'results.json')) as f:
    assert json.load(f)['speedup_schedule']['schedule'] == results['config']['model']['schedule']
