"""The command line: help, rejected overrides, user errors, and the four modes.

Help and flag errors run in subprocesses (they must exit, and must not print a
traceback); they import no JAX, so they are quick. train/eval/export run
in-process through `pyra_jax.main`'s own flag parsing and `main`.
"""

import json

import pytest

from pyra_jax import main as main_lib
from tests.helpers.cli import cli, copy_of, reset_flags, run_main


def test_helpfull_documents_every_config_field():
  rc, out, err = cli('--config=configs/vitb_high.py', '--helpfull')
  text = out + err
  assert "--config.model.schedule='vitb_high'" in text
  assert '--config.pyra_lr=-1.0' in text
  assert 'PYRA generators; -1: same as lr' in text  # The doc from common.py.
  assert '--workdir' in text and '--checkpoint_step' in text  # absl's own help.
  from pyra_jax.configs import vitb_high  # pylint: disable=g-import-not-at-top
  for field in main_lib._flatten(vitb_high.get_config().to_dict()):  # pylint: disable=protected-access
    assert f'--config.{field}=' in text, field


def test_field_docs_follow_the_comments_of_common_py():
  docs = main_lib.field_docs()
  assert docs['config.model.lora_init'].startswith("'zeros': B = 0")
  assert "'trunc_normal'" in docs['config.model.lora_init']  # Continuation line.
  assert docs['config.model.method'].startswith("Token merging. 'peft' (no merging) | 'tome' | 'pyra'")
  assert docs['config.data.task'].startswith('a VTAB-1k task name')
  assert 'first group that matches wins' in docs['config.trainable']


def test_misspelt_override_is_rejected_with_the_valid_names():
  rc, out, err = cli('--config=configs/vitb_high.py', '--config.modle.lora_rank=4',
                     '--workdir=/tmp/unused')
  assert rc == 2 and 'Traceback' not in err
  assert "Did you mean 'model'?" in err
  assert 'Valid fields of config: b1, b2, batch_size' in err
  rc, out, err = cli('--config=configs/vitb_high.py', '--config.model.lora_rnk=4')
  assert rc == 2 and "Did you mean 'lora_rank'" in err and 'Traceback' not in err


@pytest.mark.parametrize('args,message', [
    (['--config=configs/vitb_high.py:tsk=dtd'], 'keys from task, method'),
    (['--config=configs/no_such.py'], 'not found'),
    (['--config=configs/vitb_high.py', '--config.model.lora_rank=abc'], 'lora_rank=abc'),
    (['--config=configs/vitb_high.py', '--mode=fit'], 'train|eval|export'),
    (['--config=configs/vitb_high.py', '--mode=eval'], 'needs --workdir'),
    # Multi-host flags: refused before JAX tries to reach a coordinator.
    (['--config=configs/tiny.py', '--workdir=/tmp/unused', '--num_processes=2'],
     'missing --coordinator_address, --process_id'),
    (['--config=configs/tiny.py', '--workdir=/tmp/unused', '--multihost',
      '--coordinator_address=localhost:1', '--num_processes=2', '--process_id=2'],
     '--process_id=2 is not in 0 .. 1'),
    (['--config=configs/tiny.py', '--workdir=/tmp/unused', '--multihost',
      '--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
     'has no port'),
])
def test_bad_command_lines_fail_with_one_sentence(args, message):
  rc, out, err = cli(*args)
  assert rc != 0 and message in err and 'Traceback' not in err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('override,message', [
    ('--config.grad_accum_steps=3', 'config.batch_size = 40 is not divisible by '
     'config.grad_accum_steps = 3'),
    ('--config.grad_accum_steps=0', 'config.grad_accum_steps = 0: use an integer >= 1 '
     '(micro-batches per update; 1: no accumulation)'),
    ('--config.model.attention=flash', "model.attention must be one of ('einsum', "
     "'dot_product_attention'), got 'flash'"),
])
def test_bad_accelerator_options_fail_with_one_sentence(tmp_path, capsys, monkeypatch,
                                                        override, message):
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py',
                            f'--workdir={tmp_path}', override)
  reset_flags()
  assert code == 1 and message in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_train_eval_export_modes(tiny_run, tmp_path, capsys, monkeypatch):
  # Train: the session's tiny run is this command line's training (trained
  # through main once, what it printed kept); eval and export run on a copy.
  wd = copy_of(tiny_run.workdir, tmp_path, 'run')
  common = ['--config=configs/tiny.py', f'--workdir={wd}',
            '--config.data.eval_split=val200', '--config.log_every_steps=1',
            '--config.eval_batch_size=64']  # tests.helpers.cli.TINY
  out = tiny_run.stdout
  results = json.loads((wd / 'results.json').read_text())
  final = f'{100 * results["final_accuracy"]:.2f}%'
  assert f'final accuracy (val200, 200 images): {final}' in out
  assert 'paper protocol (max over periodic evals)' in out
  # configs/tiny.py: PYRA on 2 blocks of width 32 merging (4, 2), LoRA rank 4.
  lora, generators, norms, head = 2 * (32 * 4 + 4 * 96), 2 * 32 + 6, 2 * 2 * 32, 32 * 10 + 10
  trained = results['trainable_params']
  assert (trained['lora'], trained['generators'], trained['generator_norms'],
          trained['head']) == (lora, generators, norms, head)
  assert f'Trainable parameters: {lora + generators + norms + head:,} = ' in out

  code, out, _ = run_main(capsys, monkeypatch, *common, '--mode=eval')
  assert code == 0 and f'checkpoint step 50: val200 accuracy {final}' in out
  code, out, _ = run_main(capsys, monkeypatch, *common, '--mode=eval', '--checkpoint_step=7')
  assert code == 1 and 'available: [25, 50]' in out + _

  export_dir = tmp_path / 'deploy'
  code, out, _ = run_main(capsys, monkeypatch, *common, '--mode=export', f'--export_dir={export_dir}')
  assert code == 0 and (export_dir / 'params').is_dir()
  code, out, _ = run_main(capsys, monkeypatch, *common, '--mode=eval', f'--export_dir={export_dir}')
  assert code == 0 and 'val200 accuracy' in out

  # A user-caused error (missing data) is one line on stderr and exit code 1.
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:source=folder,data_dir=/nonexistent',
                            f'--workdir={tmp_path / "other"}')
  assert code == 1 and err.startswith('Error: ') and len(err.strip().splitlines()) == 1
  reset_flags()
