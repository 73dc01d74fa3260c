"""Nothing lost, round two: finished runs, concurrent evaluations, permissions,
runs in progress, a missing peer, and the machine's errors, through the CLI.

Each test runs the command a user runs (`pyra_jax.main`, in this process with
its flag parsing and error handling, or in a subprocess where a second process,
a signal or a dropped privilege is the point) on a copy of one finished tiny
run, and checks what is left on disk as well as what is printed.

Permission cases: the tests may run as root, whom `chmod` does not stop. Then
the command runs in a subprocess started with `setpriv`, which removes the
capabilities that let root ignore file permissions (CAP_DAC_OVERRIDE,
CAP_DAC_READ_SEARCH) from that process only; as another user it runs directly.
A read-only file system is simulated by making the workdir's creation raise
EROFS (the same OSError a read-only mount gives). A full disk is a real one:
a file-size limit (RLIMIT_FSIZE) makes the real writes of Orbax fail with
EFBIG; TensorBoard's writer thread gets ENOSPC from a patched file write.
"""

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from pyra_jax.training import evaluation
from pyra_jax.training import records
from tests.helpers.cli import ROOT, TINY, cli, copy_of, one_sentence, reset_flags, run_main
from tests.helpers.cli import run_tiny as main
from tests.helpers.data import require_offline_mnist
from tests.helpers.runs import checkpoint_steps, trained_params

require_offline_mnist(module_level=True)

TWO_STAGE = ['--mode=eval', '--two_stage']


def assert_same_params(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def snapshot(workdir):
  """The bytes of every file outside the checkpoints (the run's records)."""
  wd = Path(workdir)
  return {str(p.relative_to(wd)): p.read_bytes() for p in sorted(wd.rglob('*'))
          if p.is_file() and 'checkpoints' not in p.parts[len(wd.parts)]
          and not p.name.startswith('.')}


# ---------------------------------------------------------------------------
# A finished run is reported, not rewritten; a continued one keeps what
# results.json held.
# ---------------------------------------------------------------------------

def test_rerunning_a_finished_run_reports_it_and_rewrites_nothing(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  code, out, err = main(capsys, monkeypatch, wd, *TWO_STAGE, '--checkpoint_step=25')
  assert code == 0, err
  before = snapshot(wd)
  entry = json.loads(before['results.json'])['two_stage']
  assert [e['step'] for e in entry] == [25]
  assert json.loads(before['results.json'])['train_images_per_sec'] is not None
  code, out, err = main(capsys, monkeypatch, wd)
  assert code == 0, err
  assert snapshot(wd) == before  # results.json, metrics.jsonl, TensorBoard: same bytes.
  assert checkpoint_steps(wd) == [25, 50]
  assert 'holds a finished run' in out and 'nothing was trained or rewritten' in out
  recorded = json.loads(before['results.json'])
  assert f'final accuracy (val200, 200 images): {100 * recorded["final_accuracy"]:.2f}%' in out
  # Continued from step 25 (its step-50 checkpoint gone): the end is redone
  # exactly and results.json keeps the two-stage entry recorded before.
  shutil.rmtree(wd / 'checkpoints' / '50')
  code, out, err = main(capsys, monkeypatch, wd)
  assert code == 0, err
  after = json.loads((wd / 'results.json').read_text())
  assert after['two_stage'] == entry
  assert after['final_accuracy'] == recorded['final_accuracy']
  finals = [r for r in map(json.loads, (wd / 'metrics.jsonl').read_text().splitlines())
            if 'final_accuracy' in r]
  assert len(finals) == 1
  assert_same_params(trained_params(wd)[1], trained_params(tiny_workdir)[1])
  reset_flags()


# ---------------------------------------------------------------------------
# Concurrent two-stage evaluations each keep their entry.
# ---------------------------------------------------------------------------

def test_concurrent_two_stage_evaluations_keep_every_entry(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  """While one evaluation (through main) updates results.json, another
  records its entry: with the lock the second waits for the first and adds
  to what it wrote; without it, the first overwrites the second's entry."""
  wd = copy_of(tiny_workdir, tmp_path)
  other = {'step': 50, 'split': 'val200', 'accuracy': 0.5, 'correct': 100,
           'count': 200, 'trained': {'method': 'pyra', 'schedule': '4,2'},
           'evaluated': {'method': 'tome', 'schedule': '4,2', 'r_per_layer': [4, 2]}}
  real_write = records.write_json
  second = []

  def write_json(path, obj):
    if not second and path.endswith('results.json'):
      # The first evaluation has read results.json and is about to write it.
      t = threading.Thread(target=evaluation.record_two_stage, args=(str(wd), dict(other)))
      second.append(t)
      t.start()
      t.join(timeout=1.5)  # Finishes at once without a lock; waits with one.
    real_write(path, obj)
  monkeypatch.setattr(records, 'write_json', write_json)
  code, out, err = main(capsys, monkeypatch, wd, *TWO_STAGE, '--checkpoint_step=25')
  second[0].join(timeout=60)
  assert code == 0, err
  assert not second[0].is_alive()
  entries = json.loads((wd / 'results.json').read_text())['two_stage']
  assert sorted((e['step'], e['evaluated']['method']) for e in entries) == [
      (25, 'pyra'), (50, 'tome')]


# ---------------------------------------------------------------------------
# Permissions are not damage; a run's records are never overwritten from 0.
# ---------------------------------------------------------------------------

def test_a_checkpoint_without_read_permission_is_named_and_nothing_moves(
    tiny_workdir, tmp_path):
  wd = copy_of(tiny_workdir, tmp_path)
  before = snapshot(wd)
  locked = wd / 'checkpoints' / '50'
  locked.chmod(0)
  try:
    code, out, err = cli(*TINY, f'--workdir={wd}', privileged=False)
  finally:
    locked.chmod(0o755)
  assert one_sentence(code, err), err
  assert f'{locked} cannot be read (permission denied)' in err
  assert 'damaged' not in err.replace('not damaged', '')
  assert not (wd / 'checkpoints_unreadable').exists()
  assert checkpoint_steps(wd) == [25, 50]
  assert snapshot(wd) == before


def test_a_workdir_with_a_runs_records_but_no_checkpoint_is_refused(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  # What an earlier version left after finding every checkpoint unreadable.
  (wd / 'checkpoints').rename(wd / 'checkpoints_unreadable')
  before = snapshot(wd)
  code, out, err = main(capsys, monkeypatch, wd)
  assert one_sentence(code, err), err
  assert 'holds the records of a run' in err and 'no checkpoint' in err
  assert 'results.json' in err and 'checkpoints_unreadable/' in err
  assert snapshot(wd) == before
  # Checkpoints deleted, no results yet: the metrics past the first
  # checkpoint's step are records too.
  shutil.rmtree(wd / 'checkpoints_unreadable')
  (wd / 'results.json').unlink()
  before = snapshot(wd)
  code, out, err = main(capsys, monkeypatch, wd)
  assert one_sentence(code, err) and 'metrics.jsonl (up to step 50)' in err, err
  assert snapshot(wd) == before
  reset_flags()


def test_shrinking_num_epochs_below_the_trained_step_is_refused(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  wd = copy_of(tiny_workdir, tmp_path)
  before = snapshot(wd)
  code, out, err = main(capsys, monkeypatch, wd, '--config.num_epochs=1',
                        '--allow_config_change=num_epochs')
  assert one_sentence(code, err), err
  assert 'checkpoint at step 50' in err and '--config.num_epochs=2 or more' in err
  assert snapshot(wd) == before and checkpoint_steps(wd) == [25, 50]
  reset_flags()


# ---------------------------------------------------------------------------
# Eval and export while training runs on the workdir; Ctrl-C.
# ---------------------------------------------------------------------------

def test_eval_and_export_during_training_name_the_run_and_ctrl_c_stops_it(
    tmp_path, capsys, monkeypatch):
  """Training saves every step and keeps one checkpoint, so the step an eval
  lists is deleted while it reads it. Each eval/export says that training is
  in progress (naming its pid) and uses a checkpoint that stays readable,
  or refuses in one sentence; none calls the checkpoints damaged or sends
  the user to a new workdir. Ctrl-C then ends the training with exit 130."""
  wd = tmp_path / 'busy'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  log = tmp_path / 'training.err'
  with open(log, 'w') as err_file:
    training = subprocess.Popen(
        [sys.executable, '-m', 'pyra_jax.main', *TINY, f'--workdir={wd}',
         '--config.num_epochs=40', '--config.checkpoint_every_steps=1',
         '--config.keep_checkpoints=1'], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=err_file,
        # As from a terminal: pytest-xdist's workers ignore SIGINT, and a child
        # inherits that, so Ctrl-C would never reach it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.time() + 120
    while not (wd / 'checkpoints').is_dir() or not checkpoint_steps(wd):
      assert time.time() < deadline and training.poll() is None, 'no checkpoint'
      time.sleep(0.2)
    pid = training.pid
    outcomes = []
    for args in (['--mode=eval'],
                 ['--mode=export', f'--export_dir={tmp_path / "deploy"}']):
      code, out, err = main(capsys, monkeypatch, wd, *args)
      text = out + err
      assert 'Traceback' not in text and '--workdir' not in text, text
      assert 'damaged' not in text, text
      assert f'Training is in progress in {wd} (pid {pid} ' in text, text
      assert code == 0 or one_sentence(code, err), text
      outcomes.append(code)
    assert training.poll() is None, 'the training run must not be disturbed'
    assert 0 in outcomes
  finally:
    training.send_signal(signal.SIGINT)
    try:
      training.wait(timeout=60)
    except subprocess.TimeoutExpired:
      training.kill()
      raise
  err = log.read_text()
  assert training.returncode == 130, err[-3000:]
  assert 'interrupted, resume with the same command' in err
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  code, out, err = main(capsys, monkeypatch, wd, '--mode=eval')
  assert code == 0 and 'in progress' not in out, err
  reset_flags()


# ---------------------------------------------------------------------------
# Multi-host with a missing peer.
# ---------------------------------------------------------------------------

def test_a_missing_peer_is_announced_and_ends_after_the_timeout(tmp_path):
  with socket.socket() as s:  # A port nobody listens on: process 0 never came.
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  t0 = time.time()
  code, out, err = cli(*TINY, f'--workdir={tmp_path / "wd"}', '--num_processes=2',
                       '--process_id=1', f'--coordinator_address=localhost:{port}',
                       '--distributed_timeout=2', timeout=120)
  assert f'waiting for 2 processes at localhost:{port}' in out
  assert one_sentence(code, err), err
  assert 'within 2 s' in err and '--distributed_timeout' in err
  assert time.time() - t0 < 60
  assert not (tmp_path / 'wd').exists()


# ---------------------------------------------------------------------------
# The machine's errors: one sentence each, nothing lost.
# ---------------------------------------------------------------------------

@pytest.fixture
def file_size_limit():
  """Sets RLIMIT_FSIZE of this process (writes past it fail with EFBIG)."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill.

  def limit(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
  yield limit
  resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_during_a_checkpoint_save_is_one_sentence_and_resumes_exactly(
    tiny_workdir, tmp_path, capsys, monkeypatch, file_size_limit):
  wd = copy_of(tiny_workdir, tmp_path)
  shutil.rmtree(wd / 'checkpoints' / '50')  # Resume from 25; save 50 again.
  # The step-50 save writes a 65 KB Orbax metadata file; everything else the
  # resumed run writes (metrics, TensorBoard) stays under 32 KB.
  file_size_limit(32 * 1024)
  code, out, err = main(capsys, monkeypatch, wd)
  file_size_limit(resource.RLIM_INFINITY)
  assert one_sentence(code, err), err
  assert err.count('disk full') == 1 and 'File too large' in err
  assert checkpoint_steps(wd) == [25]
  assert_same_params(trained_params(wd, 25)[1], trained_params(tiny_workdir, 25)[1])
  code, out, err = main(capsys, monkeypatch, wd)
  assert code == 0, err
  assert checkpoint_steps(wd) == [25, 50]
  assert_same_params(trained_params(wd)[1], trained_params(tiny_workdir)[1])
  reset_flags()


def test_a_full_disk_in_tensorboards_writer_thread_is_one_sentence(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  import tensorboardX.record_writer  # pylint: disable=g-import-not-at-top
  wd = copy_of(tiny_workdir, tmp_path)
  shutil.rmtree(wd / 'checkpoints' / '50')
  real_write = tensorboardX.record_writer.RecordWriter.write

  def write(self, data):
    if threading.current_thread() is not threading.main_thread():
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(self, data)
  monkeypatch.setattr(tensorboardX.record_writer.RecordWriter, 'write', write)
  code, out, err = main(capsys, monkeypatch, wd)
  assert one_sentence(code, err), err
  assert err.count('disk full') == 1 and str(wd / 'tensorboard') in err
  assert 25 in checkpoint_steps(wd)
  reset_flags()


def test_an_empty_workdir_flag_writes_nothing_in_the_current_folder(
    tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for mode in ('train', 'eval', 'export'):
    code, out, err = run_main(capsys, monkeypatch, *TINY, '--workdir=', f'--mode={mode}')
    assert one_sentence(code, err, status=2) and '--workdir is empty' in err, err
  assert os.listdir(tmp_path) == []
  reset_flags()


def test_an_unwritable_workdir_is_one_sentence(tmp_path):
  parent = tmp_path / 'readonly'
  parent.mkdir()
  parent.chmod(0o555)
  try:
    code, out, err = cli(*TINY, f'--workdir={parent / "wd"}', privileged=False)
  finally:
    parent.chmod(0o755)
  assert one_sentence(code, err), err
  assert f'permission denied: {parent / "wd"}' in err
  assert os.listdir(parent) == []


def test_a_read_only_file_system_and_a_too_long_name_are_one_sentence(
    tmp_path, capsys, monkeypatch):
  long = tmp_path / ('x' * 300)
  code, out, err = main(capsys, monkeypatch, long)
  assert one_sentence(code, err) and 'file name too long' in err, err
  assert '255 characters' in err
  # A read-only mount: creating the workdir fails with EROFS (simulated).
  target = tmp_path / 'mnt' / 'wd'
  makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / 'mnt')):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return makedirs(path, *args, **kwargs)
  monkeypatch.setattr(os, 'makedirs', read_only)
  code, out, err = main(capsys, monkeypatch, target)
  assert one_sentence(code, err) and f'read-only file system: {target}' in err, err
  reset_flags()


# ---------------------------------------------------------------------------
# Quiet by default: a terminal shows the command's lines, not the libraries'.
# ---------------------------------------------------------------------------

# The libraries' start-up notices a user saw before (TensorFlow's oneDNN and CPU
# lines, XLA's TPU probing, Orbax's "read only"), as they appear on a terminal.
BANNERS = ('oneDNN', 'TF_ENABLE_ONEDNN_OPTS', 'cpu_feature_guard',
           'This TensorFlow binary is optimized', 'libtpu', 'is read only',
           'Unable to initialize backend', 'absl::InitializeLog')


def test_eval_prints_no_library_banner_unless_verbosity_is_given(tiny_workdir):
  # In a fresh process, as from a terminal where neither TF_CPP_MIN_LOG_LEVEL
  # nor JAX_PLATFORMS is set (JAX probes for accelerators).
  env = dict(os.environ)
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)
  env.pop('JAX_PLATFORMS', None)
  runs = {}
  for name, extra in (('quiet', []), ('verbose', ['--verbosity=0'])):
    proc = subprocess.run(
        [sys.executable, '-m', 'pyra_jax.main', *TINY, f'--workdir={tiny_workdir}',
         '--mode=eval', *extra], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[name] = proc.stdout + proc.stderr
  shown = [b for b in BANNERS if b in runs['quiet']]
  assert not shown, runs['quiet'][-3000:]
  assert 'checkpoint step 50: val200 accuracy' in runs['quiet']  # Its own result line.
  # --verbosity brings them back (and shows that the check above can fail).
  assert any(b in runs['verbose'] for b in BANNERS), runs['verbose'][-3000:]
