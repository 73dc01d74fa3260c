"""The benchmark tool end to end on a tiny ViT, and the accuracy/throughput plot."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pyra_jax import benchmark
from pyra_jax import throughput
from pyra_jax.experiments import plots
from pyra_jax.training import setup
from pyra_jax.training import steps
from tests.helpers.cli import ROOT
from tests.helpers.models import tiny_config

# A config file as a user would write one: get_config() on top of the base.
TINY_CONFIG = '''
from pyra_jax.configs import common

def get_config(arg=None):
  config = common.get_base_config()
  m = config.model
  m.variant, m.image_size, m.patch_size = 'Ti/8', 32, 8
  m.width, m.depth, m.num_heads, m.mlp_dim = 32, 2, 2, 64
  m.lora_rank, m.schedule, m.num_classes = 4, '4,2', 10
  return config
'''


def _flops(schedule, num_tokens=17, width=32):
  """Blocks' FLOPs written out from the formula of docs/algorithm.md §3."""
  total, n = 0, num_tokens
  for r in schedule:
    total += 2 * (4 * n * width ** 2 + 2 * n * n * width)
    n -= r
    total += 2 * (2 * 2 * n * width ** 2)  # mlp_dim 64 = 2 x width
  return total


def test_forward_cli_writes_sane_json(tmp_path):
  cfg = tmp_path / 'tiny_bench.py'
  cfg.write_text(TINY_CONFIG)
  out = tmp_path / 'bench' / 'tiny.json'
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.benchmark', f'--config={cfg}', '--num_iters=3',
       '--warmup=1', '--matmul_size=128', '--batch_size=4', f'--out={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'No recompilation' in proc.stdout
  res = json.loads(out.read_text())
  assert res['mode'] == 'forward' and res['recompiled'] is False
  assert res['settings']['batch_size'] == 4 and res['settings']['rounds'] >= 3
  assert res['matmul']['size'] == 128 and res['matmul']['gflops_per_s'] > 0
  models = res['models']
  assert list(models) == ['peft', 'tome', 'pyra']
  # The config's schedule '4,2' on 16 patches + class token, and none for peft.
  assert models['peft']['schedule'] == [0, 0]
  assert models['tome']['schedule'] == models['pyra']['schedule'] == [4, 2]
  assert models['pyra']['tokens'] == [17, 13, 11]
  full, merged = _flops([0, 0]), _flops([4, 2])
  for name, m in models.items():
    want = full if name == 'peft' else merged
    assert m['gflops'] == pytest.approx(want / 1e9, rel=1e-12)
    assert m['flops_ratio'] == pytest.approx(full / want, rel=1e-12)
    assert m['images_per_sec'] > 0 and m['speedup'] > 0 and m['matmul_fraction'] > 0
    assert m['images_per_sec'] == pytest.approx(4 / m['seconds'])
    assert m['traces'] == 1 and m['recompiled'] is False
  assert models['peft']['speedup'] == 1.0
  # Paired speed-up: the median over rounds of the within-round time ratio.
  rounds = {k: np.asarray(m['round_seconds']) for k, m in models.items()}
  assert all(len(t) == res['settings']['rounds'] for t in rounds.values())
  assert models['pyra']['speedup'] == pytest.approx(
      np.median(rounds['peft'] / rounds['pyra']))
  # Its spread: the extremes and quartiles of the same per-round ratios.
  ratios = rounds['peft'] / rounds['pyra']
  spread = models['pyra']['speedup_spread']
  assert spread['min'] == pytest.approx(ratios.min()) and spread['max'] == pytest.approx(ratios.max())
  assert spread['rounds'] == len(ratios)
  assert spread['min'] <= spread['q25'] <= models['pyra']['speedup'] <= spread['q75'] <= spread['max']
  assert models['pyra']['speedup_of_medians'] == pytest.approx(
      models['pyra']['images_per_sec'] / models['peft']['images_per_sec'])
  assert res['pyra_cost_over_tome'] == pytest.approx(
      1 - np.median(rounds['tome'] / rounds['pyra']))
  mm = np.asarray(res['matmul']['round_seconds'])
  assert models['tome']['matmul_fraction'] == pytest.approx(np.median(
      (4 * merged / rounds['tome']) / (2 * 128 ** 3 / mm)))
  assert 0 < res['merge_ops']['seconds']
  # The dense-matmul ceiling: timed in the same rounds, paired like the models.
  gb = res['gemm_bound']
  dense = {k: np.asarray(g['round_seconds']) for k, g in gb.items()}
  assert gb['peft']['speedup_bound'] == 1.0
  assert gb['tome']['speedup_bound'] == pytest.approx(
      np.median(dense['peft'] / dense['tome']))
  assert gb['pyra']['speedup_over_bound'] == pytest.approx(
      models['pyra']['speedup'] / gb['pyra']['speedup_bound'])
  assert 'speed-up bound' in proc.stdout


def test_train_mode_times_the_real_training_step(tmp_path):
  """The timed step is steps.make_train_step's, fed like the training loop feeds
  it; every field is reported; the breakdown adds up; nothing recompiles."""
  config = _load_config(tmp_path)
  res = benchmark.run_train(config, batch_size=16, num_iters=20, min_seconds=1.0,
                            warmup=1, matmul_size=64, methods=('peft', 'pyra'))
  assert res['mode'] == 'train' and res['recompiled'] is False
  rounds = res['settings']['rounds']
  assert rounds >= 20
  models = res['models']
  # The step run_train timed is the memoised object a training run of the same
  # config gets, and it compiled once: the timed calls added no cache entry.
  run = benchmark.train_run(config, 'pyra', image_size=32, num_classes=10,
                            dtype='float32')
  step_fn = steps.make_train_step(run, benchmark.BENCH_STEPS_PER_EPOCH)
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access
  # Its first call from a fresh state, as the training loop makes it (step 1:
  # index 0, the run's dropout key, AdamW state from the run's optimiser),
  # gives the same parameters bit for bit as the benchmark's first call.
  batch = benchmark.synthetic_batch(run, 16)
  tx_init = steps.make_optimizer(run, benchmark.BENCH_STEPS_PER_EPOCH)[2]
  tr = run.replicate(run.trainable)
  want, _, _ = step_fn(tr, run.replicate(tx_init(tr)), run.frozen, batch,
                       np.int32(0), run.replicate(setup.dropout_key(run.config)))
  calls = benchmark.TrainStepCalls(run, batch)
  assert calls.step_fn is step_fn
  calls.call_step()
  jax.tree.map(np.testing.assert_array_equal, want, calls.trainable)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()),
                                         want, run.trainable))
  assert any(changed)  # a real update, not a no-op
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access

  for name, m in models.items():
    assert m['traces'] == 1 and m['recompiled'] is False
    assert m['images_per_sec'] == pytest.approx(16 / m['seconds'])
    assert len(m['round_seconds']) == rounds
    # FLOPs of the compiled programs (XLA's count): the step does at least
    # what forward+backward does, which does more than the forward, which does
    # more than our counter's forward of the blocks alone (no embedding, head).
    g = m['breakdown_gflops']
    assert g['step'] == m['gflops']
    assert g['step'] >= g['fwd_bwd'] > g['forward'] >= g['forward_no_rng']
    assert g['forward_no_rng'] > m['forward_gflops_blocks'] > 0
    assert m['gflops_per_s'] == pytest.approx(m['gflops'] * 16 / m['seconds'])
    b = m['breakdown']
    for part in ('forward', 'backward'):
      assert b[part] > 0, (name, part, b)
    # The RNG and optimiser parts are differences of medians of a fraction of a
    # millisecond on the tiny model: only bounded by timing noise here, so that
    # a loaded machine cannot fail the test (they are positive on a quiet one).
    for part in ('rng', 'optimizer'):
      assert b[part] > -0.2 * b['step'], (name, part, b)
    assert b['sum'] == pytest.approx(b['step'], rel=0.3)
    assert b['step'] == pytest.approx(m['seconds'])
    ma = m['memory_analysis']
    # At least the arguments (every parameter + optimiser state) are resident.
    assert m['peak_bytes'] >= ma['argument_size_in_bytes'] > 0
  assert models['peft']['speedup'] == 1.0
  assert models['pyra']['speedup'] == pytest.approx(np.median(
      np.asarray(models['peft']['round_seconds'])
      / np.asarray(models['pyra']['round_seconds'])))
  # PYRA's model has more trainable state (its generators) than PEFT's.
  assert (models['pyra']['memory_analysis']['argument_size_in_bytes']
          > models['peft']['memory_analysis']['argument_size_in_bytes'])
  table = benchmark.format_table(res)
  assert 'steps.make_train_step' in table and 'optimizer' in table


def test_train_mode_refuses_an_export_in_one_sentence(tmp_path):
  cfg = tmp_path / 'tiny_bench.py'
  cfg.write_text(TINY_CONFIG)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.benchmark', f'--config={cfg}', '--mode=train',
       f'--params={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'Error: --mode=train times the training step on random weights of the right '
      'shapes (an export has LoRA folded in): drop --params.')


def test_train_mode_prints_the_step_profile(tmp_path):
  cfg = tmp_path / 'tiny_bench.py'
  cfg.write_text(TINY_CONFIG)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda *a: subprocess.run(
      [sys.executable, '-m', 'pyra_jax.benchmark', f'--config={cfg}', *a], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=600)
  out = tmp_path / 'b.json'
  # One model keeps this fast (the profile of an uncompressed step, with no merge
  # part, is covered in tests/test_profiling.py).
  proc = run('--mode=train', '--methods=pyra', '--num_iters=1', '--warmup=1',
             '--matmul_size=64', '--profile_calls=1', f'--out={out}')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  i = next(k for k, l in enumerate(lines) if l.startswith('step profile, ms per step'))
  assert lines[i + 1].split()[-1] == 'pyra'
  rows = {l[:30].strip(): l[30:].split() for l in lines[i + 2:] if l.startswith('  ')}
  for row in ('forward / dense matmul', 'backward / dense matmul', 'forward / merge',
              'backward / merge', 'all ops'):
    assert float(rows[row][0]) > 0, (row, rows)
  res = json.loads(out.read_text())
  assert res['models']['pyra']['profile']['num_calls'] == 1
  bad = run('--profile_calls=2')
  assert bad.returncode != 0 and 'Traceback' not in bad.stderr
  assert '--profile_calls profiles the training step: add --mode=train.' in bad.stderr


def _load_config(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'tiny_cfg.py'
  path.write_text(TINY_CONFIG)
  spec = importlib.util.spec_from_file_location('tiny_cfg', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def test_dense_layers_call_is_the_models_matmuls_at_its_token_counts(tmp_path):
  """Same result as a numpy chain over the model's own kernels; FLOPs as written."""
  config = _load_config(tmp_path)
  cfg = throughput.method_config(config.model, 'tome', image_size=32, num_classes=10)
  params = throughput.init_params(cfg, 32)
  model, deployed_params = throughput.deployed(cfg, 32, jnp.float32, params)
  call, flops = benchmark.dense_layers_call(model, 3, 32, deployed_params, jnp.float32)
  got = np.asarray(call())
  # Independent: tokens 17 -> 13 -> 11 (schedule '4,2'), width 32, mlp 64.
  tokens, d = [17, 13, 11], 32
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, 17, d)), np.float64)
  want_flops = 0
  for i in range(2):
    blk = deployed_params['Transformer'][f'encoderblock_{i}']
    att, mlp = blk['MultiHeadDotProductAttention_0'], blk['MlpBlock_0']
    k = {n: np.asarray(att[n]['kernel'], np.float64).reshape(d, d)
         for n in ('query', 'key', 'value', 'out')}
    x = x[:, :tokens[i]]
    y = (x @ k['query'] + x @ k['key'] + x @ k['value']) @ k['out']
    x = (y[:, :tokens[i + 1]] @ np.asarray(mlp['Dense_0']['kernel'], np.float64)
         ) @ np.asarray(mlp['Dense_1']['kernel'], np.float64)
    want_flops += 2 * 3 * (4 * tokens[i] * d * d + 2 * tokens[i + 1] * d * 64)
  assert got.shape == (3, 11, d)
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
  assert flops == want_flops


def test_recompilation_is_detected():
  f = throughput.Traced(lambda x: x + 1)
  f(jnp.zeros(2))
  f(jnp.ones(2))
  assert f.traces == 1
  f(jnp.zeros(3))  # a new shape: a second trace, which the tool reports
  assert f.traces == 2


def test_round_robin_interleaves_calls():
  order = []
  calls = {'a': lambda: order.append('a'), 'b': lambda: order.append('b')}
  times = throughput.round_robin(calls, num_iters=3, min_seconds=0.0, warmup=1)
  assert order == ['a', 'b'] + ['a', 'b'] * 3  # warm-up, then a, b per round
  assert [len(t) for t in times.values()] == [3, 3]


def _result(path, task, acc, method, schedule, throughput=None):
  data = {'final_accuracy': acc,
          'config': {'data': {'task': task},
                     'model': {'variant': 'Ti/8', 'image_size': 32, 'width': 32,
                               'depth': 2, 'num_heads': 2, 'mlp_dim': 64,
                               'num_classes': 10, 'method': method,
                               'schedule': schedule}}}
  if throughput is not None:
    data['throughput'] = throughput
  path.write_text(json.dumps(data))


def test_plot_writes_png_and_joins_benchmarks(tmp_path):
  _result(tmp_path / 'a.json', 'dtd', 0.50, 'pyra', '4,2')
  _result(tmp_path / 'b.json', 'cifar100', 0.70, 'pyra', [4, 2])  # same model
  _result(tmp_path / 'c.json', 'dtd', 0.80, 'peft', 'none', throughput=100.0)
  (tmp_path / 'broken.json').write_text('{not json')
  (tmp_path / 'noacc.json').write_text(json.dumps({'config': {}}))
  bench = {'config': {'variant': 'Ti/8', 'image_size': 32, 'width': 32, 'depth': 2,
                      'num_heads': 2, 'mlp_dim': 64, 'num_classes': 10,
                      'schedule': '4,2', 'method': 'pyra'},
           'settings': {'image_size': 32},
           'models': {'tome': {'method': 'tome', 'images_per_sec': 150.0},
                      'pyra': {'method': 'pyra', 'images_per_sec': 140.0}}}
  (tmp_path / 'bench.json').write_text(json.dumps(bench))
  out = tmp_path / 'plot.png'
  plots.main(['--results', str(tmp_path / '*.json'), '--benchmarks',
              str(tmp_path / 'bench.json'), '--out', str(out)])
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  points = plots.collect(sorted(str(p) for p in tmp_path.glob('[abc].json')),
                         plots.benchmark_table([str(tmp_path / 'bench.json')]))
  by_method = {p['method']: p for p in points}
  assert len(points) == 2
  assert by_method['pyra']['accuracy'] == pytest.approx(60.0)  # mean of two tasks
  assert by_method['pyra']['num_runs'] == 2
  assert by_method['pyra']['images_per_sec'] == 140.0  # joined from the benchmark
  assert by_method['peft']['images_per_sec'] == 100.0  # its own `throughput` key
  assert by_method['pyra']['gflops'] == pytest.approx(_flops([4, 2]) / 1e9)


def test_plot_falls_back_to_gflops_without_throughput(tmp_path):
  _result(tmp_path / 'a.json', 'dtd', 0.5, 'tome', '4,2')
  out = tmp_path / 'p.png'
  plots.main(['--results', str(tmp_path / 'a.json'), '--out', str(out)])
  assert out.stat().st_size > 0


def test_reference_model_is_timed_in_the_same_rounds():
  """A shallower model timed with the full one: speed-ups are over the full one."""
  config = tiny_config(model=dict(depth=3, schedule='none', num_classes=10))
  full = config.model.copy_and_resolve_references()
  config.model.depth = 1
  res = throughput.run_forward(config, batch_size=2, num_iters=3, warmup=1,
                               matmul_size=64, methods=('peft',), reference_model=full)
  models = res['models']
  assert list(models) == ['peft', 'reference']
  assert models['reference']['speedup'] == 1.0 and models['peft']['baseline'] == 'reference'
  rounds = {k: np.asarray(v['round_seconds']) for k, v in models.items()}
  assert len(rounds['peft']) == len(rounds['reference']) == res['settings']['rounds']
  assert models['peft']['speedup'] == pytest.approx(
      np.median(rounds['reference'] / rounds['peft']))
  # FLOPs from the formula: 1 block against 3, no merging.
  assert models['peft']['gflops'] == pytest.approx(_flops([0]) / 1e9, rel=1e-12)
  assert models['reference']['gflops'] == pytest.approx(_flops([0, 0, 0]) / 1e9, rel=1e-12)
  assert models['peft']['flops_ratio'] == pytest.approx(3.0, rel=1e-12)


def test_round_robin_warms_up_for_the_given_seconds():
  import time  # pylint: disable=g-import-not-at-top
  order = []
  calls = {'a': lambda: (order.append('a'), time.sleep(0.01))}
  t0 = time.perf_counter()
  times = throughput.round_robin(calls, num_iters=2, min_seconds=0.0, warmup=1,
                                warmup_seconds=0.1)
  assert time.perf_counter() - t0 >= 0.1 + 2 * 0.01
  # 1 compile call + at least 0.1 s / 0.01 s untimed calls (fewer if sleeps
  # overshoot), then 2 timed.
  assert len(order) >= 1 + 2 + 2 and len(times['a']) == 2


def test_paper_preset_is_the_authors_timing_and_flags_override_it():
  defaults = {'batch_size': 8, 'num_iters': 5, 'min_seconds': 0.0, 'warmup_seconds': 0.0}
  # The authors' test_model_latency: batch 512, 10 s warm-up, 10 s timed.
  paper = benchmark.settings_from_flags('paper', {}, defaults)
  assert (paper['batch_size'], paper['warmup_seconds'], paper['min_seconds']) == (512, 10.0, 10.0)
  assert benchmark.settings_from_flags('', {}, defaults) == defaults
  mixed = benchmark.settings_from_flags('paper', {'batch_size': 4}, defaults)
  assert (mixed['batch_size'], mixed['warmup_seconds']) == (4, 10.0)


def test_paper_preset_through_the_command_line_with_small_overrides(tmp_path):
  cfg = tmp_path / 'tiny_bench.py'
  cfg.write_text(TINY_CONFIG)
  out = tmp_path / 'paper.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.benchmark', f'--config={cfg}', '--preset=paper',
       '--batch_size=4', '--warmup_seconds=0.5', '--min_seconds=0.3', '--methods=peft',
       '--matmul_size=64', '--gemm_bound=false', f'--out={out}'],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
      text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith('preset=paper mode=forward batch=4 ')
  s = json.loads(out.read_text())['settings']
  assert s['preset'] == 'paper' and s['batch_size'] == 4
  assert s['warmup_seconds'] == 0.5 and s['seconds'] >= 0.3 and s['rounds'] >= 1
def test_every_method_at_two_schedules_in_one_run():
  """The competing methods (docs/algorithm.md §16) timed with the others, each
  compressing method at both schedules, in the same rounds; one trace each."""
  config = tiny_config(model=dict(num_classes=10, tofu_prune_layers=1))
  res = throughput.run_forward(
      config, batch_size=2, num_iters=2, warmup=1, matmul_size=64,
      methods=('peft', 'tome', 'pyra', 'evit', 'evit_own', 'tofu', 'ats', 'diffrate'),
      schedules_=('4,2', '6,3'))
  models = res['models']
  assert list(models) == ['peft', 'tome@4,2', 'tome@6,3', 'pyra@4,2', 'pyra@6,3',
                          'evit@4,2', 'evit@6,3', 'evit_own', 'tofu@4,2', 'tofu@6,3',
                          'ats@4,2', 'ats@6,3', 'diffrate@4,2', 'diffrate@6,3']
  assert not res['recompiled'] and all(v['traces'] == 1 for v in models.values())
  for sched, r in (('4,2', [4, 2]), ('6,3', [6, 3])):
    # PYRA's generators are sized by each schedule's r_l (one init per schedule);
    # DiffRate without searched rates keeps the schedule's counts.
    for method in ('tome', 'pyra', 'tofu', 'ats', 'diffrate'):
      assert models[f'{method}@{sched}']['schedule'] == r
      assert models[f'{method}@{sched}']['gflops'] == pytest.approx(_flops(r) / 1e9)
    # EViT's keep rate is solved to the schedule's FLOPs (within 5 %).
    assert models[f'evit@{sched}']['gflops'] == pytest.approx(_flops(r) / 1e9, rel=0.05)
  # EViT's own keep rate 0.7 at layers 0 and 1 (3, 6, 9 of 12 scaled to 2 layers):
  # ceil(0.7 * 16) = 12 kept + 1 fused; then ceil(0.7 * 13) = 10 kept + 1 fused.
  assert models['evit_own']['tokens'] == [17, 14, 12]
  # ATS: the static slots are ToMe's counts; the distinct live tokens are no more.
  ats = models['ats@6,3']
  assert ats['tokens'] == [17, 11, 8]
  assert all(live <= slots for live, slots in zip(ats['live_tokens'], ats['tokens'][1:]))


def test_diffrate_without_searched_rates_is_timed_at_the_schedules_token_counts():
  """No search has run: DiffRate keeps, per layer, the tokens ToMe keeps at the
  same schedule (merged, none pruned), so its FLOPs are the schedule's."""
  from pyra_jax.configs import vitb_high  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = vitb_high.get_config().model
  for sched in ('vitb_low', 'vitb_high', '8'):
    dr = throughput.method_config(model, 'diffrate', image_size=224, num_classes=10,
                                 schedule=sched)
    tome = throughput.method_config(model, 'tome', image_size=224, num_classes=10,
                                   schedule=sched)
    r = vit.model_kwargs(tome)['reducer'].schedule
    prune, merge = ([int(v) for v in half.split(',')] for half in dr.diffrate_rates.split(';'))
    n = [197]
    for ri in r:
      n.append(n[-1] - ri)
    assert prune == n[:-1] and merge == n[1:]  # written out from the definition
    assert vit.model_kwargs(dr)['reducer'].schedule == r
  given = throughput.method_config(
      ml_collections.ConfigDict(dict(model.to_dict(), diffrate_rates='x.json')),
      'diffrate', image_size=224, num_classes=10)
  assert given.diffrate_rates == 'x.json'  # searched rates are used as given
