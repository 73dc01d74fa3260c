"""The study runner (pyra_jax.experiments.study): plan, resumption, summary statistics.

The end-to-end test trains two tiny runs (configs/tiny.py model, random init,
offline MNIST, 1 epoch) and checks that a second invocation retrains nothing.
The statistics are checked on hand-written results files against numpy.
"""

import datetime
import json
import os

import ml_collections
import numpy as np
import pytest

from pyra_jax import checkpointing
from pyra_jax.experiments import study
from pyra_jax.experiments import study_small
from tests.helpers.cli import ROOT, cli
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_config


def tiny_study_config(stages=None) -> ml_collections.ConfigDict:
  config = tiny_config(num_epochs=1, eval_every_epochs=0, checkpoint_every_steps=1000)
  s = config.study = ml_collections.ConfigDict()
  s.tasks = {'mnist': dict(source='mnist', task='mnist',
                           train_split='train800', eval_split='val200'),
             'other': dict(source='mnist', task='mnist')}
  s.variants = {'peft': dict(method='peft', merges=False),
                'tome': dict(method='tome'),
                'pyra': dict(method='pyra', modulation='pyra'),
                'big': dict(method='tome', lora_rank=8),
                # A shallower backbone: a top-level field under `config`.
                'shallow': dict(method='peft', merges=False, depth=1,
                                config=dict(model_init_first_blocks=True))}
  s.schedules = {'none': 'none', 'high': '4,2', 'low': '2,1'}
  s.delete_checkpoints = True
  # Two seeds of one cell: one compilation serves both runs.
  s.stages = stages or [dict(name='main', tasks=('mnist',),
                             variants=('pyra',), schedules=('high',),
                             seeds=(0, 1), bench=False)]
  return config


def test_plan_order_seeds_outermost_and_no_duplicates():
  config = tiny_study_config([
      dict(name='a', tasks=('mnist',), variants=('peft', 'tome'),
           schedules=('low', 'high'), seeds=(0, 1), bench=True),
      # Repeats mnist-tome-high-s0 (must not run twice), adds a new task.
      dict(name='b', tasks=('mnist', 'other'), variants=('tome',),
           schedules=('high',), seeds=(0,), bench=False),
  ])
  names = [item.name for item in study.plan(config)]
  assert names == [
      'mnist-peft-none-s0', 'mnist-tome-low-s0', 'mnist-tome-high-s0',
      'mnist-peft-none-s1', 'mnist-tome-low-s1', 'mnist-tome-high-s1',
      'bench-low', 'bench-high',
      'other-tome-high-s0',
  ]
  picked = [i.name for i in study.select(study.plan(config), 'stage:b,*-low-s1')]
  assert picked == ['mnist-tome-low-s1', 'other-tome-high-s0']
  with pytest.raises(study.StudyError, match='matches nothing'):
    study.select(study.plan(config), 'nothing-*')


def test_unknown_names_are_rejected():
  config = tiny_study_config([dict(name='x', tasks=('mnist',), variants=('lora',),
                                   schedules=('high',), seeds=(0,))])
  with pytest.raises(study.StudyError, match="unknown variants \\['lora'\\]"):
    study.plan(config)
  config = tiny_study_config([dict(name='x', tasks=('mnist',), variants=('peft',),
                                   schedules=('high',), seeds=(0,),
                                   bench_variants=('tome',))])
  with pytest.raises(study.StudyError, match="bench_variants lists 'tome'"):
    study.plan(config)


def test_cell_config_applies_task_variant_schedule_seed():
  config = tiny_study_config()
  c = study.cell_config(config, study.Cell('s', 'other', 'big', 'low', 2))
  assert (c.model.method, c.model.lora_rank, c.model.schedule, c.seed) == (
      'tome', 8, '2,1', 2)
  assert c.data.train_split == 'train800val200' and 'study' not in c
  c = study.cell_config(config, study.Cell('s', 'mnist', 'peft', 'none', 0))
  assert (c.model.method, c.model.schedule, c.data.eval_split) == (
      'peft', 'none', 'val200')
  assert config.model.lora_rank == 4  # The study's base is untouched.


def test_variant_sets_top_level_fields_under_config():
  config = tiny_study_config()
  c = study.cell_config(config, study.Cell('s', 'mnist', 'shallow', 'none', 0))
  assert (c.model.depth, c.model_init_first_blocks, c.model.schedule) == (1, True, 'none')
  assert 'config' not in c.model
  c = study.cell_config(config, study.Cell('s', 'mnist', 'peft', 'none', 0))
  assert (c.model.depth, c.model_init_first_blocks) == (2, False)


def test_a_field_added_since_a_run_counts_as_its_default(tmp_path):
  """results.json written before model_init_first_blocks existed: still the
  same recipe where the cell keeps the default, another where it does not."""
  config = tiny_study_config([dict(name='m', tasks=('mnist',),
                                   variants=('peft', 'shallow'), seeds=(0,),
                                   schedules=('high',))])
  for variant in ('peft', 'shallow'):
    cell = study.Cell('m', 'mnist', variant, 'none', 0)
    _fake_result(config, str(tmp_path), cell, 0.5)
    path = os.path.join(study.workdir_of(str(tmp_path), cell), 'results.json')
    with open(path) as f:
      res = json.load(f)
    del res['config']['model_init_first_blocks']  # as a run from before the field
    with open(path, 'w') as f:
      json.dump(res, f)
  peft, shallow = study.plan(config)
  assert study.is_done(str(tmp_path), peft, config)
  with pytest.raises(study.StudyError,
                     match=r'another config.*model_init_first_blocks: False -> True'):
    study.is_done(str(tmp_path), shallow, config)


def test_deadline_in_the_past_launches_nothing(tmp_path):
  config = tiny_study_config()
  past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
  calls = []
  statuses = study.run_study(config, str(tmp_path), deadline=past,
                             train_fn=lambda *a: calls.append(a), log=lambda _: None)
  assert [s['status'] for s in statuses] == ['not_started'] * 2
  assert not calls and not (tmp_path / 'runs').exists()
  when = study.parse_deadline('04:30', datetime.datetime(
      2026, 1, 1, 3, 0, tzinfo=datetime.timezone.utc))
  assert when == datetime.datetime(2026, 1, 1, 4, 30, tzinfo=datetime.timezone.utc)


def _fake_result(config, outdir, cell, acc, **config_changes):
  """A results.json as pyra_jax.training writes it (the cell's config inside)."""
  workdir = study.workdir_of(outdir, cell)
  os.makedirs(workdir, exist_ok=True)
  cfg = checkpointing.config_to_dict(study.cell_config(config, cell))
  cfg.update(config_changes)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({'final_accuracy': acc, 'max_accuracy_paper_protocol': acc + 0.01,
               'wall_time_s': 10.0, 'train_images_per_sec': 50.0,
               'config': cfg}, f)


def test_finished_run_of_another_recipe_is_an_error(tmp_path):
  config = tiny_study_config()
  cell = study.Cell('main', 'mnist', 'pyra', 'high', 0)
  _fake_result(config, str(tmp_path), cell, 0.5, lr=1.0)
  with pytest.raises(study.StudyError, match=r'another config.*lr: 1\.0 -> 0\.03'):
    study.run_study(config, str(tmp_path), train_fn=None, log=lambda _: None)
  _fake_result(config, str(tmp_path), cell, 0.5)  # The same recipe: skipped.
  statuses = study.run_study(config, str(tmp_path), max_runs=0,
                             train_fn=lambda *a: None, log=lambda _: None)
  assert [s['status'] for s in statuses] == ['skipped', 'not_started']


def test_summary_statistics_and_paired_differences(tmp_path):
  config = tiny_study_config([
      dict(name='m', tasks=('mnist',), variants=('peft', 'tome', 'pyra'),
           schedules=('high',), seeds=(0, 1, 2))])
  acc = {'peft': [0.90, 0.80, 0.85], 'tome': [0.70, 0.75, 0.60],
         'pyra': [0.72, 0.74, 0.69]}
  for variant, values in acc.items():
    sched = 'none' if variant == 'peft' else 'high'
    for seed, a in enumerate(values[:2] if variant == 'pyra' else values):
      cell = study.Cell('m', 'mnist', variant, sched, seed)
      _fake_result(config, str(tmp_path), cell, a)
  summary = study.summarize(config, str(tmp_path))
  cells = {c['variant']: c for c in summary['cells']}
  for variant, values in acc.items():
    v = 100 * np.array(values[:2] if variant == 'pyra' else values)
    assert cells[variant]['n'] == len(v)
    np.testing.assert_allclose(cells[variant]['mean'], v.mean(), rtol=1e-12)
    np.testing.assert_allclose(cells[variant]['std'], v.std(ddof=1), rtol=1e-12)
  claims = {d['comparison']: d for d in summary['claims']}
  # Paired over the seeds both have: pyra has seeds 0 and 1 only.
  d = claims['pyra_high - tome_high']
  np.testing.assert_allclose(d['diffs'], [2.0, -1.0], atol=1e-9)
  assert (d['n'], d['wins']) == (2, 1)
  np.testing.assert_allclose(d['std'], np.std([2.0, -1.0], ddof=1), rtol=1e-9)
  np.testing.assert_allclose(claims['tome_high - peft']['mean'], -50 / 3, rtol=1e-9)
  md = study.summary_markdown(summary)
  assert '| mnist | pyra | high (4,2) | 2 | 73.00 +- 1.41 |' in md


def test_single_value_std_is_nan():
  mean, std = study.mean_std([0.5])
  assert mean == 0.5 and np.isnan(std)


def test_end_to_end_tiny_runs_then_resume_skips(tmp_path):
  require_offline_mnist()
  pytest.importorskip('matplotlib')
  from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = tiny_study_config()
  out = str(tmp_path / 'runs_root')
  calls = []

  def counting_train(cfg, workdir):
    calls.append(workdir)
    return loop.train_and_evaluate(cfg, workdir)

  statuses = study.run_study(config, out, train_fn=counting_train, log=lambda _: None)
  assert [s['status'] for s in statuses] == ['done', 'done']
  assert len(calls) == 2
  paths = [os.path.join(out, 'runs', n, 'results.json')
           for n in ('mnist-pyra-high-s0', 'mnist-pyra-high-s1')]
  mtimes = [os.path.getmtime(p) for p in paths]
  for p in paths:
    with open(p) as f:
      res = json.load(f)
    assert res['num_test_images'] == 200 and 0.0 <= res['final_accuracy'] <= 1.0
    assert not os.path.exists(os.path.join(os.path.dirname(p), 'checkpoints'))
  with open(paths[1]) as f:
    res = json.load(f)
  assert (res['config']['model']['method'], res['config']['seed']) == ('pyra', 1)

  publish = tmp_path / 'docs'
  summary = study.write_summary(config, out, str(publish))
  [cell] = summary['cells']
  assert (cell['variant'], cell['n'], cell['seeds']) == ('pyra', 2, [0, 1])
  for name in ('summary.json', 'summary.md', 'acc_vs_throughput_mnist.png',
               'runs/mnist-pyra-high-s0.json'):
    assert (publish / name).is_file(), name

  statuses = study.run_study(config, out, train_fn=counting_train, log=lambda _: None)
  assert [s['status'] for s in statuses] == ['skipped', 'skipped']
  assert len(calls) == 2  # Nothing retrained.
  assert [os.path.getmtime(p) for p in paths] == mtimes


def test_bench_times_the_three_deployed_models(tmp_path):
  config = tiny_study_config([dict(name='b', tasks=('mnist',), variants=('pyra',),
                                   schedules=('high',), seeds=(0,), bench=True,
                                   bench_variants=('shallow',))])
  config.study.bench_batch_size, config.study.bench_iters = 2, 2
  config.study.bench_matmul_size = 32
  statuses = study.run_study(config, str(tmp_path), only='bench-*', log=lambda _: None)
  assert [s['name'] for s in statuses] == ['bench-high', 'bench-shallow']
  bench = study.load_bench(str(tmp_path))
  assert set(bench['high']['models']) == {'peft', 'tome', 'pyra'}
  # The shallower variant is its own model, with its own depth (random init:
  # the benchmark builds the model, it loads no weights), timed in the same
  # rounds as the full-depth model, its speed-up reference.
  shallow = bench['shallow']['models']
  assert set(shallow) == {'peft', 'reference'}
  assert bench['shallow']['config']['depth'] == 1
  assert shallow['peft']['flops_ratio'] == pytest.approx(config.model.depth)
  assert study.throughput_of(config, 'shallow', 'none', bench) == (
      shallow['peft']['images_per_sec'])
  assert study.speedup_of(config, 'shallow', 'none', bench) == pytest.approx(np.median(
      np.asarray(shallow['reference']['round_seconds'])
      / np.asarray(shallow['peft']['round_seconds'])))
  assert study.speedup_of(config, 'pyra', 'high', bench) == (
      bench['high']['models']['pyra']['speedup'])
  assert study.speedup_of(config, 'peft', 'none', bench) == 1.0
  assert study.speedup_of(config, 'big', 'low', bench) is None
  # Ablation variants take their method's timing; peft the median over files.
  assert study.throughput_of(config, 'pyra', 'high', bench) == (
      bench['high']['models']['pyra']['images_per_sec'])
  assert study.throughput_of(config, 'peft', 'none', bench) == (
      bench['high']['models']['peft']['images_per_sec'])
  assert study.throughput_of(config, 'tome', 'low', bench) is None


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path):
  from pyra_jax import errors  # pylint: disable=g-import-not-at-top
  config = tiny_study_config()
  calls = []

  def train_fn(cfg, workdir):
    calls.append(cfg.seed)
    if cfg.seed == 0:
      raise errors.TrainingError('The loss became nan at step 3')
    _fake_result(config, str(tmp_path), study.Cell('main', 'mnist', 'pyra', 'high', 1), 0.5)
    return {'final_accuracy': 0.5}

  statuses = study.run_study(config, str(tmp_path), train_fn=train_fn, log=lambda _: None)
  assert [s['status'] for s in statuses] == ['failed', 'done'] and calls == [0, 1]
  statuses = study.run_study(config, str(tmp_path), train_fn=train_fn, log=lambda _: None)
  assert [s['status'] for s in statuses] == ['skipped', 'skipped'] and calls == [0, 1]
  summary = study.summarize(config, str(tmp_path))
  assert summary['failed_runs'] == ['mnist-pyra-high-s0']
  assert [c['n'] for c in summary['cells']] == [1]


def _fake_metrics(outdir, cell, losses):
  workdir = study.workdir_of(outdir, cell)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch, loss in enumerate(losses, 1):
      f.write(json.dumps({'epoch': epoch, 'loss': loss}) + '\n')
      f.write(json.dumps({'epoch': epoch, 'eval_accuracy': 0.5}) + '\n')


def test_curve_plot_is_drawn_only_with_every_variant(tmp_path):
  pytest.importorskip('matplotlib')
  config = tiny_study_config()
  out = str(tmp_path)
  _fake_metrics(out, study.Cell('', 'mnist', 'peft', 'none', 0), [2.0, 1.0])
  _fake_metrics(out, study.Cell('', 'mnist', 'tome', 'high', 0), [2.0, 1.5])
  png = tmp_path / 'c.png'
  # pyra has no run yet: a two-sided plot would pass for the full comparison.
  assert not study.plot_curves(config, out, 'mnist', ('high',), 0, str(png))
  assert not png.exists()
  assert not study.plot_curves(config, out, 'mnist', ('high',), 0, str(png),
                               variants=('tome', 'no_such_variant'))
  _fake_metrics(out, study.Cell('', 'mnist', 'pyra', 'high', 0), [2.0, 1.4])
  assert study.plot_curves(config, out, 'mnist', ('high',), 0, str(png))
  assert png.is_file()
  # The configured plots replace the default; the stem names the file.
  config.study.curve_plots = {'cmp': dict(schedules=('high',),
                                          variants=('tome', 'pyra'))}
  assert study.curve_plots(config.study) == {
      'cmp': {'schedules': ('high',), 'variants': ('tome', 'pyra')}}
  del config.study['curve_plots']
  assert set(study.curve_plots(config.study)) == {'curves'}


def study_cli(*args):
  return cli(*args, module='pyra_jax.experiments.study')


def test_shipped_study_config_plans_its_grid_from_the_command_line(tmp_path):
  # The commands of docs/results.md: the config by its path in the clone.
  rc, out, err = study_cli('--config=pyra_jax/experiments/study_small.py',
                           f'--outdir={tmp_path}', '--dry_run')
  assert rc == 0, err[-2000:]
  lines = out.split('\n')[:-1]
  assert lines and all(line.startswith('todo ') for line in lines)
  names = [line[len('todo '):] for line in lines]
  assert len(set(names)) == len(names)
  assert names[0].startswith('bench-')  # Timings first, on the quiet machine.
  # Run names docs/results.md selects by hand.
  assert {'mnist-pyra-high-s2', 'cifar10-tome-low-s0', 'cifar10-peft_d4-none-s2',
          'mnist-pyra_e20-high-s1', 'bench-peft_d4'} <= set(names)
  assert not any(tmp_path.iterdir())  # A dry run writes nothing.


def test_shipped_study_config_finds_the_shared_data_beside_the_repository():
  # The CIFAR-10 folder is located from the config file's own place in the
  # clone: <clone>/../shared/data/vtab1k.
  config = study_small.get_config()
  assert config.study.tasks.cifar10.data_dir == str(
      ROOT.parent / 'shared' / 'data' / 'vtab1k')


def test_study_command_without_config_says_what_to_do(tmp_path):
  rc, _, err = study_cli(f'--outdir={tmp_path}')
  assert rc != 0 and 'Traceback' not in err
  assert err.strip().split('\n')[-1] == (
      'Error: --config is required (e.g. pyra_jax/experiments/study_small.py).')
