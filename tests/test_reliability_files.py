"""Files a user hands over, damaged or odd: one sentence, never a traceback or debris.

Through the command line (`pyra_jax.main` in this process, as
test_reliability.py runs it, unless a second process or another user is the
point; `pyra_jax.convert`'s `main`): split files with a byte-order mark, bytes
that are not UTF-8, or lines naming a directory or a FIFO; files this user may
not read; export targets under a file, through a symbolic link, damaged, or
written by two exports at once; a training checkpoint or an export where the
other is expected; a Hub name that climbs out of its repository; an
interrupted conversion and weights holding NaN. One finished tiny run (and one
export of it) serves every export case; each test copies what it damages.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pyra_jax import convert as convert_lib
from pyra_jax.training import export as export_lib
from tests.helpers import reference_vit
from tests.helpers.cli import ROOT, TINY, NoCapture, one_sentence, reset_flags, run_main
from tests.helpers.cli import run_tiny as main
from tests.helpers.data import grey_id_images, require_offline_mnist, write_split
from tests.helpers.models import tiny_run_config

require_offline_mnist(module_level=True)


def export_step(path):
  """The checkpoint step an export was written from (its stored export_info)."""
  return json.loads((Path(path) / 'config' / 'metadata').read_text())[
      'export_info']['step']


@pytest.fixture(scope='module')
def exported(tiny_workdir, tmp_path_factory):
  """An export of the tiny run at step 50 (through main); copied when damaged."""
  out = tmp_path_factory.mktemp('files_export') / 'export'
  mp = pytest.MonkeyPatch()
  code, _, err = main(NoCapture(), mp, tiny_workdir, '--mode=export', f'--export_dir={out}')
  mp.undo()
  reset_flags()
  assert code == 0, err
  return out


# ---------------------------------------------------------------------------
# Split files of the VTAB-1k folder layout.
# ---------------------------------------------------------------------------

def write_folder(root: Path, n_train: int = 40, n_test: int = 6) -> Path:
  """<root>/shapes: grey PNGs of 3 classes, train.txt and test.txt (UTF-8)."""
  task = root / 'shapes'
  for split, n in (('train', n_train), ('test', n_test)):
    write_split(task, split, grey_id_images(n), [i % 3 for i in range(n)])
  return task


def folder_args(root: Path) -> list[str]:
  """A one-epoch run on <root>/shapes (the command of test_data_custom_folder)."""
  return [f'--config=configs/tiny.py:source=folder,data_dir={root},'
          'task=folder:shapes,method=peft', '--config.data.train_split=train',
          '--config.data.eval_split=test', '--config.num_epochs=1',
          '--config.warmup_epochs=0', '--config.eval_batch_size=8']


def test_a_split_file_with_a_byte_order_mark_is_read(exported, tmp_path, capsys,
                                                     monkeypatch):
  """Windows editors start UTF-8 files with a BOM; every line is still read
  (the export of the tiny run evaluates all 6 test images of the folder)."""
  task = write_folder(tmp_path / 'data')
  split = task / 'test.txt'
  split.write_bytes(b'\xef\xbb\xbf' + split.read_bytes())
  code, out, err = run_main(capsys, monkeypatch, *folder_args(tmp_path / 'data'),
                            '--mode=eval', f'--export_dir={exported}')
  reset_flags()
  assert code == 0, err
  assert 'test accuracy' in out and '/6)' in out, out


def test_a_split_file_that_is_not_utf8_names_its_line(tmp_path, capsys, monkeypatch):
  task = write_folder(tmp_path / 'data')
  lines = (task / 'train.txt').read_bytes().splitlines()
  lines[2] = b'images/train/caf\xe9.png 2'  # Latin-1, as an old tool writes it.
  (task / 'train.txt').write_bytes(b'\n'.join(lines) + b'\n')
  code, out, err = run_main(capsys, monkeypatch, *folder_args(tmp_path / 'data'),
                            f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert one_sentence(code, err), err
  assert f'{task / "train.txt"}:3: byte 0xe9 at column 17 is not UTF-8' in err
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_split_lines_naming_a_directory_or_a_fifo_say_what_they_name(
    tmp_path, capsys, monkeypatch):
  task = write_folder(tmp_path / 'data')
  (task / 'images' / 'test' / 'a_dir.png').mkdir()
  os.mkfifo(task / 'images' / 'test' / 'a_fifo.png')  # Opening it would block.
  with open(task / 'test.txt', 'a') as f:
    f.write('images/test/a_dir.png 0\nimages/test/a_fifo.png 1\n')
  code, out, err = run_main(capsys, monkeypatch, *folder_args(tmp_path / 'data'),
                            f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert one_sentence(code, err), err
  assert (f'test.txt:7: image {task}/images/test/a_dir.png is a directory, not an '
          'image file') in err
  assert (f'test.txt:8: image {task}/images/test/a_fifo.png is a named pipe (FIFO), '
          'not an image file') in err
  assert 'does not exist' not in err


# ---------------------------------------------------------------------------
# Files this user may not read.
# ---------------------------------------------------------------------------

# Runs pyra_jax.main's flag parsing and main, in one process, once per command
# line given (JSON in argv[1]); prints each exit code and stderr as JSON.
_DRIVER = r'''
import contextlib, io, json, sys, traceback
from pyra_jax import main as main_lib
from tests.helpers.cli import reset_flags
results = []
for args in json.loads(sys.argv[1]):
  reset_flags()
  sys.argv = ['main', *args]
  err, code = io.StringIO(), 0
  with contextlib.redirect_stderr(err):
    try:
      main_lib.parse_flags(['main', *args])
      main_lib.main(['main'])
    except SystemExit as e:
      code = e.code
    except BaseException:  # What a user would see: a traceback.
      code = 'traceback'
      traceback.print_exc()
  results.append([code, err.getvalue()])
print('RESULTS ' + json.dumps(results))
'''


def unprivileged(cmd: list[str]) -> list[str]:
  """`cmd` run so that a file with mode 000 cannot be read.

  A user other than root: as it is. Root reads any file whatever its mode
  (capabilities CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so as root the
  command runs under `setpriv` with those two dropped from its bounding set:
  still uid 0 (the interpreter under /root stays reachable), but permission
  bits now apply to it as to any user. Skipped where setpriv cannot do that.
  """
  if os.geteuid() != 0:
    return cmd
  drop = [shutil.which('setpriv') or 'setpriv',
          '--bounding-set=-dac_override,-dac_read_search']
  try:
    probe = subprocess.run([*drop, 'true'], capture_output=True, timeout=30)
  except OSError:
    probe = None
  if probe is None or probe.returncode != 0:
    pytest.skip('running as root without setpriv able to drop CAP_DAC_OVERRIDE: '
                'a chmod 000 file stays readable')
  return [*drop, *cmd]


def test_unreadable_image_split_file_and_weights_are_one_sentence(tmp_path):
  """chmod 000 on an image, on a split file, on the weights file (model_init).

  Real permission errors, not simulated: the three command lines run in one
  subprocess (`_DRIVER`) as an unprivileged user; as root that is root
  without the capabilities that bypass file modes (`unprivileged`).
  """
  image_task = write_folder(tmp_path / 'img')
  (image_task / 'images' / 'test' / '000004.png').chmod(0)
  split_task = write_folder(tmp_path / 'split')
  (split_task / 'test.txt').chmod(0)
  weights = tmp_path / 'vit.npz'
  np.savez(weights, **reference_vit.random_vit_npz(np.random.default_rng(0)))
  weights.chmod(0)
  commands = [
      [*folder_args(tmp_path / 'img'), f'--workdir={tmp_path / "run_img"}'],
      [*folder_args(tmp_path / 'split'), f'--workdir={tmp_path / "run_split"}'],
      [*TINY, f'--config.model_init={weights}', f'--workdir={tmp_path / "run_w"}']]
  proc = subprocess.run(
      unprivileged([sys.executable, '-c', _DRIVER, json.dumps(commands)]),
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert 'RESULTS ' in proc.stdout, proc.stderr[-3000:]
  results = json.loads(proc.stdout.split('RESULTS ', 1)[1])
  for (code, err), want in zip(results, [
      f'{image_task}/test.txt:5: image {image_task}/images/test/000004.png cannot '
      'be read: permission denied',
      f'Split file {split_task}/test.txt is not readable by this user',
      f'{weights} is not readable by this user']):
    assert one_sentence(code, err) and want in err, err
    assert 'chmod' in err


# ---------------------------------------------------------------------------
# Weights: an export is not model_init; Hub names; convert.
# ---------------------------------------------------------------------------

def test_an_export_given_as_model_init_says_how_an_export_is_used(
    exported, tmp_path, capsys, monkeypatch):
  code, out, err = main(capsys, monkeypatch, tmp_path / 'run',
                        f'--config.model_init={exported}')
  assert one_sentence(code, err), err
  assert f'{exported} is a pyra_jax export' in err
  assert f'--mode=eval --export_dir={exported}' in err
  assert f'config.distill.teacher_export={exported}' in err
  assert 'the checkpoint file inside it' not in err


def test_a_hub_name_that_leaves_its_repository_is_refused_up_front(
    tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # Nothing may be fetched anyway.
  spec = 'hf-hub:timm/x/../../etc/passwd'
  code, out, err = main(capsys, monkeypatch, tmp_path / 'run',
                        f'--config.model_init={spec}')
  assert one_sentence(code, err), err
  assert f"'{spec}' is not a Hub name" in err and 'leave the repository' in err
  assert 'Trainable parameters' not in out  # Refused before the model is built.
  assert convert_lib.main(['--src', spec, '--out', str(tmp_path / 'w.npz')]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"Error: '{spec}' is not a Hub name") and len(err.splitlines()) == 1


# Converts with the writer wrapped: once the temporary file is written (and
# before its rename), the process sends itself the signal named in argv[1].
_INTERRUPTED_CONVERT = r'''
import os, signal, sys, time
# As a process started from a terminal: xdist's workers ignore SIGINT, and
# their children inherit that, so Python would not raise KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
from pyra_jax import convert
from pyra_jax.checkpoints import npz
save = npz.save_pyra_jax
def save_then_signal(path, params, meta):
  save(path, params, meta)
  os.kill(os.getpid(), getattr(signal, sys.argv[1]))
  time.sleep(60)
npz.save_pyra_jax = save_then_signal
sys.exit(convert.main(sys.argv[2:]))
'''


@pytest.mark.parametrize('sig,code,word', [('SIGTERM', 143, 'terminated'),
                                           ('SIGINT', 130, 'interrupted')])
def test_an_interrupted_convert_leaves_nothing_behind(tmp_path, sig, code, word):
  src = tmp_path / 'vit.npz'
  np.savez(src, **reference_vit.random_vit_npz(np.random.default_rng(0)))
  out = tmp_path / 'out' / 'converted.npz'
  proc = subprocess.run(
      [sys.executable, '-c', _INTERRUPTED_CONVERT, sig, '--src', str(src),
       '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  err = proc.stderr.strip()
  assert proc.returncode == code, err
  assert err.startswith(f'Error: {word}') and len(err.splitlines()) == 1, err
  assert list((tmp_path / 'out').iterdir()) == []


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path, capsys,
                                                           monkeypatch):
  weights = reference_vit.random_vit_npz(np.random.default_rng(0))
  weights['cls'] = weights['cls'].copy()
  weights['cls'][..., 3] = np.nan
  src = tmp_path / 'vit.npz'
  np.savez(src, **weights)
  out = tmp_path / 'converted.npz'
  assert convert_lib.main(['--src', str(src), '--out', str(out)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith(f'Error: {src} (npz): tensor cls holds 1 NaN and 0 infinite')
  assert len(err.splitlines()) == 1 and not out.exists()
  # Training from them is refused the same way, not blamed on the lr later.
  code, _, err = main(capsys, monkeypatch, tmp_path / 'run', f'--config.model_init={src}')
  assert one_sentence(code, err) and 'tensor cls holds 1 NaN' in err, err


# ---------------------------------------------------------------------------
# Exports.
# ---------------------------------------------------------------------------

def test_export_targets_under_a_file_or_through_a_link_into_the_workdir_are_refused(
    tiny_workdir, tmp_path, capsys, monkeypatch):
  (tmp_path / 'notes.txt').write_text('mine')
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=export',
                        f'--export_dir={tmp_path / "notes.txt" / "export"}')
  assert one_sentence(code, err), err
  assert f'{tmp_path / "notes.txt"} is a file' in err
  assert (tmp_path / 'notes.txt').read_text() == 'mine'
  # The workdir reached through a link is the workdir: its checkpoint folder
  # is refused as a target, however it is spelt.
  (tmp_path / 'link').symlink_to(tiny_workdir)
  code, out, err = main(capsys, monkeypatch, tmp_path / 'link', '--mode=export',
                        f'--export_dir={tiny_workdir / "checkpoints" / "99"}')
  assert one_sentence(code, err) and 'inside the checkpoint folder' in err, err
  assert sorted(p.name for p in (tiny_workdir / 'checkpoints').iterdir()) == ['25', '50']


def test_a_training_checkpoint_given_as_an_export_says_how_to_evaluate_it(
    tiny_workdir, capsys, monkeypatch):
  step = tiny_workdir / 'checkpoints' / '25'
  code, out, err = run_main(capsys, monkeypatch, *TINY, '--mode=eval',
                            f'--export_dir={step}')
  assert one_sentence(code, err), err
  assert (f'{step} is a training checkpoint (step 25 of the workdir {tiny_workdir}), '
          f'not an export: evaluate it with --mode=eval --workdir={tiny_workdir} '
          '--checkpoint_step=25') in err
  code, out, err = run_main(capsys, monkeypatch, *TINY, '--mode=eval',
                            f'--export_dir={tiny_workdir}')
  assert one_sentence(code, err), err
  assert (f'{tiny_workdir} is a training workdir, not an export: evaluate its latest '
          f'checkpoint with --mode=eval --workdir={tiny_workdir}') in err


def _damage_export(path: Path, how: str) -> None:
  if how == 'truncated_array':  # The largest array file, cut in half.
    files = [p for p in (path / 'params').rglob('*')
             if p.is_file() and p.parent.name == 'd']
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])
  else:
    (path / 'config' / 'metadata').write_text('')


def test_a_damaged_export_is_named_and_exporting_again_replaces_it(
    tiny_workdir, exported, tmp_path, capsys, monkeypatch):
  for how in ('truncated_array', 'empty_metadata'):
    damaged = tmp_path / how
    shutil.copytree(exported, damaged)
    _damage_export(damaged, how)
    code, out, err = run_main(capsys, monkeypatch, *TINY, '--mode=eval',
                              f'--export_dir={damaged}')
    assert one_sentence(code, err), (how, err)
    assert f'The export {damaged} is damaged' in err and 'Event loop' not in err
    assert f'--mode=export --export_dir={damaged}' in err
  assert f'--workdir={tiny_workdir} --checkpoint_step=50' in run_main(
      capsys, monkeypatch, *TINY, '--mode=eval',
      f'--export_dir={tmp_path / "truncated_array"}')[2]
  # What the sentence says to do works, even where the metadata is gone.
  target = tmp_path / 'empty_metadata'
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=export',
                        f'--export_dir={target}', '--checkpoint_step=25')
  assert code == 0, err
  assert export_step(target) == 25 and export_lib.is_export(str(target))
  export_lib.load_export(str(target))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['empty_metadata',
                                                        'truncated_array']


def test_an_export_onto_a_link_to_an_earlier_export_replaces_it_where_it_lies(
    tiny_workdir, exported, tmp_path, capsys, monkeypatch):
  earlier = tmp_path / 'exports' / 'run1'
  shutil.copytree(exported, earlier)
  link = tmp_path / 'deploy'
  link.symlink_to(earlier)
  code, out, err = main(capsys, monkeypatch, tiny_workdir, '--mode=export',
                        f'--export_dir={link}', '--checkpoint_step=25')
  assert code == 0, err
  assert f'exported (LoRA folded): {earlier} (the folder the link {link}' in out
  assert link.is_symlink() and os.readlink(link) == str(earlier)
  assert export_step(earlier) == 25 and export_lib.is_export(str(earlier))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['deploy', 'exports']
  assert sorted(p.name for p in (tmp_path / 'exports').iterdir()) == ['run1']


def test_two_exports_into_one_folder_take_turns(tiny_workdir, tmp_path, monkeypatch):
  """Export A (in this process) is held just before it swaps its export in;
  export B (the command line, another process) starts meanwhile into the
  same folder. B must wait for A, not clear A's staging folder under it;
  both finish, and the folder holds B's export, the last one, complete."""
  target = tmp_path / 'deploy'
  ready, go, failure = threading.Event(), threading.Event(), []
  swap = export_lib._replace_dir  # pylint: disable=protected-access

  def held_swap(*args):
    ready.set()
    go.wait(300)
    return swap(*args)

  monkeypatch.setattr(export_lib, '_replace_dir', held_swap)
  config = tiny_run_config()

  def export_a():
    try:
      export_lib.export(config, str(tiny_workdir), str(target), step=25)
    except BaseException as e:  # pylint: disable=broad-except
      failure.append(e)
      ready.set()

  a = threading.Thread(target=export_a)
  a.start()
  b = None
  try:
    assert ready.wait(300) and not failure, failure
    log = tmp_path / 'b.log'
    with open(log, 'w') as f:
      b = subprocess.Popen(
          [sys.executable, '-m', 'pyra_jax.main', *TINY, f'--workdir={tiny_workdir}',
           '--mode=export', f'--export_dir={target}', '--checkpoint_step=50'],
          cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while 'waiting for it to finish' not in log.read_text() and b.poll() is None:
      assert time.time() < deadline, log.read_text()[-2000:]
      time.sleep(0.2)
  finally:
    go.set()
    a.join()
    if b is not None:
      b.wait(300)
  text = log.read_text()
  assert not failure, failure
  assert b.returncode == 0, text[-3000:]
  assert f'Another export into {tmp_path} is being written: waiting' in text
  assert export_step(target) == 50 and export_lib.is_export(str(target))
  assert sorted(p.name for p in tmp_path.iterdir()) == ['b.log', 'deploy']
