"""Settings that cannot work are refused before anything trains, and the VTAB
protocol never reports other runs' results as its own: through the command line.

Each value below used to be accepted and to train without effect, or to fail
late under another field's name (a NaN at step 1 blamed on the lr), or to end
in a traceback. Refusals happen before any data is read or anything is
compiled (except the head-size check, which needs the task's class count), so
those cases take a fraction of a second. The VTAB cases run `python -m
pyra_jax.vtab` on a protocol folder whose finished runs are written here (their
results.json, with the config each run of the protocol stores), so that only
the diverging selection run trains.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from pyra_jax import checkpointing
from pyra_jax import vtab
from pyra_jax.training import checks
from pyra_jax.training import steps
from tests.helpers.cli import ROOT, one_sentence, reset_flags, run_main
from tests.helpers.cli import run_tiny as main
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import VTAB_QUICK as QUICK
from tests.helpers.models import quick_vtab_config

require_offline_mnist(module_level=True)


def nothing_trained(workdir: Path) -> bool:
  return not (workdir / 'checkpoints').exists() and not (workdir / 'results.json').exists()


# ---------------------------------------------------------------------------
# Every rate, probability, count and optimiser setting is checked for its range.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('args,message', [
    # Merging schedules: NaN and inf compared false with every bound and gave
    # no merging at all (flops:) or an OverflowError (the ramp's inflection).
    (['--config.model.schedule=flops:nan'], "config.model.schedule = 'flops:nan'"),
    (['--config.model.schedule=flops:inf'], "config.model.schedule = 'flops:inf'"),
    (['--config.model.depth=12', '--config.model.schedule=16,.5e999'],
     "the inflection of 'r,inflection' must be a finite number"),
    # Model fields: rates and probabilities in range, counts with their sign.
    (['--config.model.lora_dropout=1.5'], 'model.lora_dropout = 1.5: use a number in [0, 1)'),
    (['--config.model.lora_dropout=1.0'], 'model.lora_dropout = 1.0: use a number in [0, 1)'),
    (['--config.model.drop_path=-0.5'], 'model.drop_path = -0.5: use a number in [0, 1)'),
    (['--config.model.lora_rank=-1'], 'model.lora_rank = -1: use an integer >= 0'),
    (['--config.model.peft_dropout=nan'], 'model.peft_dropout = nan: use a number in [0, 1)'),
    (['--config.model.fact_dropout=2.0'], 'model.fact_dropout = 2.0'),
    (['--config.model.fact_scale=0'], 'model.fact_scale = 0.0: use a finite number > 0'),
    (['--config.model.convpass_scale=-1'], 'model.convpass_scale = -1.0'),
    (['--config.model.peft_dim=-8'], 'model.peft_dim = -8: use an integer >= 1'),
    (['--config.model.fact_rank=0'], 'model.fact_rank = 0'),
    (['--config.model.snf_flow_length=-2'], 'model.snf_flow_length = -2: use an integer >= 0'),
    (['--config.model.modulation_rank=0'], 'model.modulation_rank = 0'),
    (['--config.model.head_init_std=-0.02'], 'model.head_init_std = -0.02'),
    (['--config.model.ln_eps=0'], 'model.ln_eps = 0.0: use a finite number > 0'),
    (['--config.model.image_size=0'], 'model.image_size = 0: use an integer >= 1'),
    (['--config.model.evit_keep_rate=nan'], 'model.evit_keep_rate = nan'),
    (['--config.model.tofu_prune_layers=-1'], 'model.tofu_prune_layers = -1'),
    (['--config.model.ltmp_flops_weight=inf'], 'model.ltmp_flops_weight = inf'),
    (['--config.model.diffrate_flops_weight=-1'], 'model.diffrate_flops_weight = -1.0'),
    (['--config.model.diffrate_search_epochs=0'], 'model.diffrate_search_epochs = 0'),
    (['--config.model.wr_init=gaussian'], "model.wr_init = 'gaussian': use one of 'uniform', 'normal'"),
    # Optimiser and loop fields: non-finite ones are refused by name.
    (['--config.lr=inf'], 'config.lr = inf: use a finite number > 0'),
    (['--config.pyra_lr=nan'], 'config.pyra_lr = nan: use a finite number >= 0, or -1'),
    (['--config.diffrate_lr=inf'], 'config.diffrate_lr = inf'),
    (['--config.min_lr=inf'], 'config.min_lr = inf'),
    (['--config.warmup_init_lr=inf'], 'config.warmup_init_lr = inf'),
    (['--config.weight_decay=inf'], 'config.weight_decay = inf: use a finite number >= 0'),
    (['--config.b1=1.0'], 'config.b1 = 1.0: use a number in [0, 1)'),
    (['--config.b2=-0.1'], 'config.b2 = -0.1'),
    (['--config.eps=0'], 'config.eps = 0.0: use a finite number > 0'),
    (['--config.grad_clip_norm=inf'], 'config.grad_clip_norm = inf'),
    (['--config.distill.temperature=inf'], 'config.distill.temperature = inf'),
    (['--config.distill.weight=-1'], 'config.distill.weight = -1.0'),
    (['--config.data.shuffle_buffer=0'], 'config.data.shuffle_buffer = 0: use an integer >= 1'),
    # A seed jax.random cannot take (it ended in an OverflowError).
    (['--config.seed=100000000000000000000'],
     'config.seed = 100000000000000000000: use an integer from -2**63 to 2**63 - 1'),
    # A head smaller than the task's labels (NaN at step 1, blamed on the lr).
    (['--config.model.num_classes=3'],
     "config.model.num_classes = 3, but task 'mnist' has 10 classes"),
])
def test_a_setting_outside_its_range_is_refused_before_training(
    tmp_path, capsys, monkeypatch, args, message):
  wd = tmp_path / 'wd'
  code, out, err = main(capsys, monkeypatch, wd, *args)
  assert one_sentence(code, err), err
  assert message in err, err
  assert 'Trainable parameters' not in out and nothing_trained(wd)


def test_a_rates_file_with_a_nan_count_is_refused(tmp_path, capsys, monkeypatch):
  # The tiny model: 16 patches + the class token, 2 layers. JSON takes NaN,
  # which passed the kept-count range test.
  rates = tmp_path / 'diffrate_rates.json'
  rates.write_text('{"prune_kept": [17, NaN], "merge_kept": [17, 13], "num_tokens": 17}')
  wd = tmp_path / 'wd'
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=diffrate',
                            f'--workdir={wd}', f'--config.model.diffrate_rates={rates}')
  reset_flags()
  assert one_sentence(code, err), err
  assert f'{rates}: kept count nan (layer 1) is not a whole number' in err, err
  assert nothing_trained(wd)


# ---------------------------------------------------------------------------
# Batches: an eval batch larger than the split is the split; a batch whose
# activations cannot fit in memory is refused before anything is compiled.
# ---------------------------------------------------------------------------

# The tiny model's activations, from its shapes (configs/tiny.py): 32 px images
# in 8 px patches, 16 + 1 tokens, merging 4 then 2 (17 -> 13 -> 11 tokens), 2
# heads, MLP 64, float32. A lower bound on what one image needs: the float32
# image, and per block the (heads, N, N) attention weights and the (N', mlp)
# MLP layer; in evaluation the largest of those, in training all of them.
TOKENS, HEADS, MLP, IMAGE = (17, 13, 11), 2, 64, 32 * 32 * 3 * 4
BLOCKS = [(HEADS * TOKENS[l] ** 2 * 4, TOKENS[l + 1] * MLP * 4) for l in range(2)]
TRAIN_IMAGE = IMAGE + sum(a + m for a, m in BLOCKS)
EVAL_IMAGE = IMAGE + max(max(a, m) for a, m in BLOCKS)


def test_an_eval_batch_larger_than_the_split_evaluates_it_in_one_batch(
    tiny_workdir, capsys, monkeypatch):
  seen = []
  evaluate = steps.evaluate

  def guarded(run, step, trainable, data):
    seen.append(data.batch_size)
    # The old behaviour allocated a million padded images (12 GB here): stop
    # before that instead of letting the machine swap.
    assert data.batch_size <= 200, f'an eval batch of {data.batch_size} images'
    return evaluate(run, step, trainable, data)

  monkeypatch.setattr(steps, 'evaluate', guarded)
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=eval',
                        '--config.eval_batch_size=1000000')
  assert code == 0, err
  assert seen == [200]  # val200 in one batch (one device).
  results = json.loads((tiny_workdir / 'results.json').read_text())
  assert (f'checkpoint step 50: val200 accuracy {100 * results["final_accuracy"]:.2f}% '
          '(') in out


def test_a_batch_whose_activations_exceed_the_memory_is_refused(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  assert jax.device_count() == 1
  # Training: room for 10 images' activations, the batch is 40.
  monkeypatch.setattr(checks, 'available_memory_bytes', lambda: 10 * TRAIN_IMAGE + 5)
  wd = tmp_path / 'wd'
  code, out, err = main(capsys, monkeypatch, wd)
  assert one_sentence(code, err), err
  assert 'config.batch_size = 40: one training step needs at least' in err, err
  assert 'so that a micro-batch holds at most 10 images' in err, err
  assert nothing_trained(wd)
  # The same batch in 4 micro-batches of 10 fits; it is refused for something
  # else here only to keep this test from training (the eval batch, 64 > 62).
  monkeypatch.setattr(checks, 'available_memory_bytes',
                      lambda: max(10 * TRAIN_IMAGE, 62 * EVAL_IMAGE))
  code, out, err = main(capsys, monkeypatch, wd, '--config.grad_accum_steps=4')
  assert one_sentence(code, err), err
  assert 'config.eval_batch_size = 64: one evaluation batch needs at least' in err, err
  assert 'use config.eval_batch_size = 62 or less' in err, err
  assert nothing_trained(wd)
  # Evaluating a finished run: the same check, before the first batch.
  monkeypatch.setattr(checks, 'available_memory_bytes', lambda: 30 * EVAL_IMAGE)
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=eval')
  assert one_sentence(code, err), err
  assert 'use config.eval_batch_size = 30 or less' in err, err


def test_benchmark_refuses_a_negative_batch_in_one_sentence():
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.benchmark', '--config=configs/tiny.py',
       '--batch_size=-3'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      'Error: --batch_size = -3: use an integer >= 0 (images per call; 0: 8 on CPU, '
      '64 otherwise).'], proc.stderr


# ---------------------------------------------------------------------------
# The VTAB protocol: a rerun with other settings is refused, naming the fields.
# ---------------------------------------------------------------------------

GRID = QUICK['vtab.pyra_lr_grid']  # (1e-3, 3e-2)
# The command line of the quick VTAB protocol (quick_vtab_config).
QUICK_FLAGS = [f'--config.{k}={v}' for k, v in QUICK.items() if k != 'vtab.pyra_lr_grid']


def vtab_cli(workdir, *args, grid=GRID, config='configs/tiny.py'):
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.vtab', f'--config={config}', *QUICK_FLAGS,
       f'--config.vtab.pyra_lr_grid=({",".join(str(v) for v in grid)})',
       f'--workdir={workdir}', *args], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return proc.returncode, proc.stdout, proc.stderr


def fake_run(path: Path, config, accuracy: float) -> None:
  """A finished run's results.json, as `train` writes it (the fields read back)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / 'results.json').write_text(json.dumps({
      'final_accuracy': accuracy, 'max_accuracy_paper_protocol': accuracy,
      'evals': [], 'num_test_images': 4000 if config.data.eval_split == 'test' else 200,
      'eval_split': config.data.eval_split, 'steps': 25, 'wall_time_s': 1.0,
      'train_images_per_sec': None, 'trainable_params': {},
      'config': checkpointing.config_to_dict(config), 'config_changes': []}))


def fake_protocol(root: Path, grid=GRID, accuracies=(0.25, 0.5), final_lr=3e-2,
                  final_accuracy=0.625) -> Path:
  """A finished PYRA protocol on mnist, as the CLI's command above makes it."""
  config = quick_vtab_config(**{'vtab.pyra_lr_grid': tuple(grid)})
  for v, a in zip(grid, accuracies):
    fake_run(root / 'mnist' / 'select' / f'pyra_lr={vtab.format_lr(v)}',
             vtab.run_config(config, 'mnist', 'select', v), a)
  fake_run(root / 'mnist' / 'final', vtab.run_config(config, 'mnist', 'final', final_lr),
           final_accuracy)
  return root


def tree(root: Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file()}


@pytest.mark.parametrize('config,args,fields', [
    ('configs/tiny.py', ['--config.lr=1e-6', '--config.seed=5'],
     ['lr: 0.03 -> 1e-06', 'seed: 0 -> 5']),
    ('configs/tiny.py:method=tome', [], ["model.method: 'pyra' -> 'tome'"]),
])
def test_vtab_refuses_to_report_runs_of_other_settings(tmp_path, config, args, fields):
  root = fake_protocol(tmp_path / 'vtab')
  before = tree(root)
  code, out, err = vtab_cli(root, *args, config=config)
  assert one_sentence(code, err), err
  assert 'holds a finished run' in err and 'of a different config' in err, err
  for f in fields:
    assert f in err, err
  assert tree(root) == before  # Nothing trained, no summary of the old runs.


@pytest.mark.parametrize('summary_only', [False, True])
def test_vtab_damaged_results_are_one_sentence_naming_the_file(tmp_path, summary_only):
  root = fake_protocol(tmp_path / 'vtab')
  damaged = root / 'mnist' / 'select' / 'pyra_lr=1e-3' / 'results.json'
  damaged.write_text(damaged.read_text()[:40])
  code, out, err = vtab_cli(root, *(['--summary_only'] if summary_only else []))
  assert one_sentence(code, err), err
  assert f'{damaged} cannot be read' in err and 'delete it and rerun' in err, err


def test_vtab_workdir_that_is_a_file_or_a_missing_summary_folder(tmp_path):
  f = tmp_path / 'file'
  f.write_text('mine')
  for extra in ([], ['--summary_only']):
    code, out, err = vtab_cli(f, *extra)
    assert one_sentence(code, err) and 'is a file, not a folder' in err, err
  assert f.read_text() == 'mine'
  missing = tmp_path / 'mistyped'
  code, out, err = vtab_cli(missing, '--summary_only')
  assert one_sentence(code, err) and 'does not exist' in err, err
  assert not missing.exists()


def test_a_diverging_grid_value_is_recorded_as_failed_and_the_choice_goes_on(tmp_path):
  grid = (3e-2, 1e20)
  # The selection run of 3e-2 and the final run it leads to are finished; the
  # 1e20 one trains here, diverges, and is left out of the choice.
  root = fake_protocol(tmp_path / 'vtab', grid=grid, accuracies=(0.5,))
  code, out, err = vtab_cli(root, grid=grid)
  assert code == 0, err
  bad = root / 'mnist' / 'select' / f'pyra_lr={vtab.format_lr(1e20)}'
  record = json.loads((bad / vtab.DIVERGED_FILE).read_text())
  assert record['pyra_lr'] == 1e20 and 'became' in record['error']
  # The advice names the lr that diverged, the generators' one.
  assert '--config.pyra_lr=1e+19' in record['error'] and '--config.lr=' not in record['error']
  selection = json.loads((root / 'mnist' / 'selection.json').read_text())
  assert selection['chosen_pyra_lr'] == 3e-2 and selection['diverged'] == [1e20]
  summary = (root / 'summary.md').read_text()
  assert 'Selection runs that diverged (recorded as failed, left out of the choice): ' \
         'mnist pyra_lr=1e+20.' in summary
  assert '| other | mnist | 62.50 |' in summary
  # A rerun does not train the failed value again (it would diverge again),
  # and reads the finished runs of the same settings.
  before = tree(root)
  code, out, err = vtab_cli(root, grid=grid)
  assert code == 0, err
  assert 'mnist select pyra_lr=1e+20: diverged earlier' in out and 'training in' not in out
  assert 'mnist select pyra_lr=3e-2: finished earlier' in out
  assert 'mnist final: finished earlier' in out
  after = tree(root)
  assert {k: v for k, v in after.items() if not k.startswith('summary')} == {
      k: v for k, v in before.items() if not k.startswith('summary')}
