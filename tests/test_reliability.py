"""Nothing a user does loses their work: each case through the command line.

The cases of README "Reliability": exports never delete, retention keeps the
latest checkpoint, one run per workdir, a damaged checkpoint falls back to the
newest readable one, bad loop settings end in one sentence, a divergence keeps
a checkpoint whose loss was finite and can be continued with a changed lr, and
a torn metrics line does not stop a resume. Runs go through `pyra_jax.main`
in this process (the flag parsing and error handling a user meets), except
where a second process is the point (the workdir lock).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyra_jax import checkpointing
from pyra_jax import metrics
from tests.helpers.cli import ROOT, TINY, copy_of, one_sentence, reset_flags, run_main
from tests.helpers.cli import run_tiny as main
from tests.helpers.data import require_offline_mnist
from tests.helpers.runs import checkpoint_steps, trained_params

require_offline_mnist(module_level=True)


# ---------------------------------------------------------------------------
# 1. Exports never delete.
# ---------------------------------------------------------------------------

def test_export_into_the_workdir_or_a_foreign_folder_is_refused(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  before = sorted(str(p.relative_to(wd)) for p in wd.rglob('*'))
  for target in (wd, tmp_path, wd / 'checkpoints', wd / 'checkpoints' / '99'):
    code, out, err = main(capsys, monkeypatch, wd, '--mode=export',
                          f'--export_dir={target}')
    assert one_sentence(code, err), (target, err)
  assert 'would replace the checkpoints' in err or 'checkpoint folder' in err
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'notes.txt').write_text('my notes')
  code, out, err = main(capsys, monkeypatch, wd, '--mode=export', f'--export_dir={mine}')
  assert one_sentence(code, err) and 'not empty (notes.txt)' in err
  assert (mine / 'notes.txt').read_text() == 'my notes'
  assert sorted(str(p.relative_to(wd)) for p in wd.rglob('*')) == before
  assert checkpoint_steps(wd) == [25, 50]


def test_export_replaces_an_earlier_export_and_fills_an_empty_folder(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  target = tmp_path / 'deploy'
  target.mkdir()  # Empty: fine.
  code, out, err = main(capsys, monkeypatch, wd, '--mode=export',
                        f'--export_dir={target}', '--checkpoint_step=25')
  assert code == 0, err
  first = json.loads((target / 'config' / 'metadata').read_text())['export_info']
  # A leftover of a killed export beside it is ours to clear.
  (tmp_path / '.deploy.staging').mkdir()
  code, out, err = main(capsys, monkeypatch, wd, '--mode=export', f'--export_dir={target}')
  assert code == 0, err
  second = json.loads((target / 'config' / 'metadata').read_text())['export_info']
  assert (first['step'], second['step']) == (25, 50)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['deploy', 'wd']
  code, out, err = main(capsys, monkeypatch, wd, '--mode=eval', f'--export_dir={target}')
  assert code == 0 and 'val200 accuracy' in out


# ---------------------------------------------------------------------------
# 2. Retention keeps at least the latest checkpoint.
# ---------------------------------------------------------------------------

def test_keep_checkpoints_zero_is_refused_and_one_keeps_the_latest(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  code, out, err = main(capsys, monkeypatch, wd, '--config.keep_checkpoints=0')
  assert one_sentence(code, err) and 'config.keep_checkpoints = 0' in err
  assert checkpoint_steps(wd) == [25, 50]
  fresh = tmp_path / 'keep1'
  code, out, err = main(capsys, monkeypatch, fresh, '--config.keep_checkpoints=1')
  assert code == 0, err
  assert checkpoint_steps(fresh) == [50]
  code, out, err = main(capsys, monkeypatch, fresh, '--mode=eval')
  assert code == 0 and 'checkpoint step 50' in out


# ---------------------------------------------------------------------------
# 3. One run per workdir.
# ---------------------------------------------------------------------------

def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(
    tmp_path, capsys, monkeypatch):
  wd = tmp_path / 'busy'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = subprocess.Popen(
      [sys.executable, '-m', 'pyra_jax.main', *TINY, f'--workdir={wd}',
       '--config.num_epochs=40'], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock = checkpointing.WorkdirLock(str(wd))
    deadline = time.time() + 90
    while lock.holder().get('pid') != first.pid:
      assert time.time() < deadline and first.poll() is None, 'no lock taken'
      time.sleep(0.2)
    code, out, err = main(capsys, monkeypatch, wd)
    assert one_sentence(code, err)
    assert f'in use by another run (pid {first.pid}' in err
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The killed run's lock file is still there; its flock died with it.
  assert lock.holder().get('pid') == first.pid
  code, out, err = main(capsys, monkeypatch, wd, '--config.num_epochs=1')
  # Taken over: the run starts (and then refuses the other config if the
  # killed run got as far as a checkpoint, or trains from scratch).
  assert 'in use by another run' not in err
  assert code == 0 or 'num_epochs: 40 -> 1' in err


# ---------------------------------------------------------------------------
# 4. A damaged latest checkpoint falls back to the newest readable one.
# ---------------------------------------------------------------------------

def _damage(step_dir: Path, how: str) -> None:
  if how == 'empty_meta':
    (step_dir / 'meta' / 'metadata').write_text('')
  else:  # Truncate every array data file of the params item.
    files = [p for p in (step_dir / 'params').rglob('*')
             if p.is_file() and p.parent.name == 'd']
    assert files
    for p in files:
      p.write_bytes(p.read_bytes()[:10])


@pytest.mark.parametrize('how', ['truncated_arrays', 'empty_meta'])
def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(
    tiny_workdir, tmp_path, capsys, monkeypatch, how):
  wd = copy_of(tiny_workdir, tmp_path)
  _damage(wd / 'checkpoints' / '50', how)
  code, out, err = main(capsys, monkeypatch, wd, '--mode=eval')
  assert code == 0, err
  assert 'checkpoint step 50' in out and 'using step 25' in out
  assert 'checkpoint step 25: val200 accuracy' in out
  results = json.loads((tiny_workdir / 'results.json').read_text())
  assert f'{100 * results["evals"][0]["accuracy"]:.2f}%' in out
  code, out, err = main(capsys, monkeypatch, wd, '--mode=eval', '--checkpoint_step=50')
  assert one_sentence(code, err) and 'step 50' in err and 'damaged' in err
  # Training resumes from 25, sets 50 aside (not deleted), and ends exactly
  # where the uninterrupted run ended.
  code, out, err = main(capsys, monkeypatch, wd)
  assert code == 0, err
  assert (wd / 'checkpoints_unreadable' / '50').is_dir()
  assert checkpoint_steps(wd) == [25, 50]
  s, resumed = trained_params(wd)
  _, uninterrupted = trained_params(tiny_workdir)
  assert s == 50
  for k in uninterrupted:
    np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)


def test_no_readable_checkpoint_is_one_sentence(tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  for s in (25, 50):
    _damage(wd / 'checkpoints' / str(s), 'empty_meta')
  code, out, err = main(capsys, monkeypatch, wd, '--mode=eval')
  assert one_sentence(code, err) and 'No checkpoint' in err and 'can be read' in err


# ---------------------------------------------------------------------------
# 6. Loop settings that cannot work end in one sentence naming the field.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('override,message', [
    ('--config.log_every_steps=0', 'config.log_every_steps = 0'),
    ('--config.checkpoint_every_steps=0', 'config.checkpoint_every_steps = 0'),
    ('--config.dtype=float16', "config.dtype = 'float16'"),
    ('--config.warmup_epochs=-1', 'config.warmup_epochs = -1'),
    ('--config.eval_batch_size=0', 'config.eval_batch_size = 0'),
    ('--config.model.schedule=flops:abc', "config.model.schedule = 'flops:abc'"),
])
def test_bad_loop_settings_name_their_field(tmp_path, capsys, monkeypatch,
                                            override, message):
  code, out, err = main(capsys, monkeypatch, tmp_path / 'wd', override)
  assert one_sentence(code, err) and message in err, err
  assert not (tmp_path / 'wd' / 'checkpoints').exists()


def test_an_unset_folder_data_dir_is_named(tmp_path, capsys, monkeypatch):
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:source=folder',
                            f'--workdir={tmp_path / "wd"}')
  assert one_sentence(code, err) and 'config.data.data_dir is not set' in err, err


def test_a_workdir_that_is_a_file_is_one_sentence(tmp_path, capsys, monkeypatch):
  f = tmp_path / 'file'
  f.write_text('mine')
  for mode in ('train', 'eval', 'export'):
    code, out, err = main(capsys, monkeypatch, f, f'--mode={mode}')
    assert one_sentence(code, err) and 'is a file' in err, (mode, err)
  assert f.read_text() == 'mine'


def test_a_seed_mismatch_is_blamed_on_the_seed(tiny_workdir, capsys, monkeypatch):
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=eval', '--config.seed=1')
  assert one_sentence(code, err)
  assert 'config.seed: 0 -> 1' in err and 'model_init' in err
  assert 'file at config.model_init' not in err


# ---------------------------------------------------------------------------
# 7. Divergence keeps a checkpoint whose loss was finite; the advice works.
# ---------------------------------------------------------------------------

def test_divergence_keeps_a_finite_checkpoint_and_the_suggested_fix_resumes(
    tmp_path, capsys, monkeypatch):
  wd = tmp_path / 'diverge'
  every_step = ['--config.checkpoint_every_steps=1', '--config.num_epochs=1']
  code, out, err = main(capsys, monkeypatch, wd, '--config.lr=1e30', *every_step)
  assert one_sentence(code, err) and 'The loss became nan at step' in err
  bad = int(err.split('The loss became nan at step ')[1].split()[0])
  # The checkpoint whose parameters gave the NaN is set aside, not deleted;
  # the one left as latest gave a finite loss at the next step.
  assert (wd / 'checkpoints_diverged' / str(bad - 1)).is_dir()
  assert checkpoint_steps(wd)[-1] == bad - 2
  logged = {r['step']: r['loss'] for r in metrics.read_metrics(str(wd)) if 'loss' in r}
  assert np.isfinite(logged[bad - 1])
  assert f'finite loss is step {bad - 2}' in err
  assert '--allow_config_change=lr,grad_clip_norm' in err
  # Without asking, the changed lr is refused, and the message names the flag.
  code, out, err = main(capsys, monkeypatch, wd, '--config.lr=0.03', *every_step)
  assert one_sentence(code, err) and '--allow_config_change=lr' in err
  # Asking for it explicitly (what the message says) continues the run.
  code, out, err = main(capsys, monkeypatch, wd, '--config.lr=0.03',
                        '--config.grad_clip_norm=1.0', *every_step,
                        '--allow_config_change=lr,grad_clip_norm')
  assert code == 0, err
  results = json.loads((wd / 'results.json').read_text())
  assert results['config_changes'] == [{'step': bad - 2, 'changes': {
      'grad_clip_norm': [0.0, 1.0], 'lr': [1e30, 0.03]}}]
  events = [r for r in metrics.read_metrics(str(wd)) if 'config_change' in r]
  assert [e['step'] for e in events] == [bad - 2]
  # Only optimisation fields may change this way.
  code, out, err = main(capsys, monkeypatch, wd, '--config.model.lora_rank=2',
                        '--allow_config_change=model.lora_rank')
  assert one_sentence(code, err) and 'model.lora_rank cannot change' in err


# ---------------------------------------------------------------------------
# 8. A torn last metrics line (a kill mid-write) does not stop the resume.
# ---------------------------------------------------------------------------

def test_a_torn_metrics_line_does_not_stop_the_resume(tiny_workdir, tmp_path, capsys,
                                                      monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  shutil.rmtree(wd / 'checkpoints' / '50')  # Killed between step 25 and 50.
  with open(wd / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 51, "lo')
  code, out, err = main(capsys, monkeypatch, wd)
  assert code == 0, err
  lines = (wd / 'metrics.jsonl').read_text().splitlines()
  assert all(json.loads(l) for l in lines)
  ref = (tiny_workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l).get('loss') for l in lines] == [json.loads(l).get('loss') for l in ref]
  reset_flags()


def test_every_user_error_class_is_one_pyra_error():
  """main prints any PyraError as one sentence; every error class a module
  raises for users derives from it (and from ValueError, as before)."""
  from pyra_jax import errors  # pylint: disable=g-import-not-at-top
  from pyra_jax import benchmark, optim, schedules  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import export  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import common as ckpt_common  # pylint: disable=g-import-not-at-top
  from pyra_jax.data import DataError  # pylint: disable=g-import-not-at-top
  for cls in (optim.ConfigError, errors.ConfigError, errors.TrainingError,
              schedules.ScheduleError, DataError, ckpt_common.CheckpointError,
              checkpointing.CheckpointMismatchError, checkpointing.WorkdirInUseError,
              checkpointing.CheckpointUnreadableError, export.ExportError,
              benchmark.BenchmarkError):
    assert issubclass(cls, errors.PyraError) and issubclass(cls, ValueError), cls
