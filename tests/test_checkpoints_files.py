"""Broken and foreign weight files, as users meet them: through the command line.

Each file is damaged in one way a download or a wrong path produces (empty,
random bytes, cut short, a web page, arrays of something else, a ViT without
one of its tensors). Both entry points that read weights must end in one
sentence that names the file and what is wrong: `python -m pyra_jax.convert`
(its `main(argv)`, in process) and `python -m pyra_jax.main` with
`--config.model_init=FILE` (the `run_main` helper of test_train_cli.py).
"""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from pyra_jax import convert as convert_lib
from tests.helpers import reference_vit as ref
from tests.helpers.cli import reset_flags, run_main


def write_bad_files(folder):
  """{case: (path, phrase the error must contain)}; files written into folder."""
  rng = np.random.default_rng(0)
  vit = ref.random_vit_npz(rng)  # A complete tiny ViT, as configs/tiny.py builds.
  timm = ref.random_timm_state(rng)
  cases = {}

  def put(name, data, phrase):
    path = folder / name
    path.write_bytes(data)
    cases[name] = (path, phrase)

  put('empty.npz', b'', 'is empty (0 bytes)')
  put('empty.safetensors', b'', 'is empty (0 bytes)')
  put('random.npz', rng.bytes(3000), 'is not an .npz archive')
  # Random bytes behind a plausible header length: refused for lack of JSON.
  put('random.safetensors', struct.pack('<Q', 100) + rng.bytes(3000),
      'is not a safetensors file')
  # Not a zip or a pickle / not a protobuf starting with its version field.
  put('random.pth', b'\x00' + rng.bytes(3000), 'is not a PyTorch checkpoint')
  put('random.onnx', b'\x00' + rng.bytes(3000), 'is not an ONNX model')
  put('page.npz', b'<!DOCTYPE html><html><body>Sign in</body></html>',
      'looks like a web page')
  put('lfs.safetensors', b'version https://git-lfs.github.com/spec/v1\n'
      b'oid sha256:0123\nsize 345678\n', 'looks like a Git LFS pointer')
  np.savez(folder / 'full.npz', **vit)
  put('cut.npz', (folder / 'full.npz').read_bytes()[:1000],
      'is truncated')
  damaged = bytearray((folder / 'full.npz').read_bytes())
  damaged[200:260] = b'x' * 60  # Inside the first array: its CRC no longer matches.
  put('damaged.npz', bytes(damaged), 'could not be read as an .npz checkpoint')
  save_file(timm, str(folder / 'full.safetensors'))
  put('cut.safetensors',
      (folder / 'full.safetensors').read_bytes()[:-100], 'is truncated')
  np.savez(folder / 'unrelated.npz', weights=np.zeros(3), bias=np.ones((2, 2)))
  cases['unrelated.npz'] = (folder / 'unrelated.npz',
                            "has no 'embedding/kernel' tensor")
  save_file({'conv1.weight': np.zeros((4, 3, 3, 3), np.float32)},
            str(folder / 'unrelated.safetensors'))
  cases['unrelated.safetensors'] = (folder / 'unrelated.safetensors',
                                    'is not a ViT checkpoint we read')
  np.savez(folder / 'no_cls.npz', **{k: v for k, v in vit.items() if k != 'cls'})
  cases['no_cls.npz'] = (folder / 'no_cls.npz', 'lacks 1 tensor(s) every ViT '
                                                'has (cls)')
  return cases


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
  return write_bad_files(tmp_path_factory.mktemp('weights'))


CASES = ['empty.npz', 'empty.safetensors', 'random.npz', 'random.safetensors',
         'random.pth', 'random.onnx', 'page.npz', 'lfs.safetensors', 'cut.npz',
         'damaged.npz',
         'cut.safetensors', 'unrelated.npz', 'unrelated.safetensors',
         'no_cls.npz']


@pytest.mark.parametrize('case', CASES)
def test_convert_refuses_bad_file_in_one_sentence(case, bad_files, tmp_path,
                                                  capsys):
  path, phrase = bad_files[case]
  out = tmp_path / 'out.npz'
  assert convert_lib.main(['--src', str(path), '--out', str(out)]) == 1
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert err.startswith(f'Error: {path}') and phrase in err, err
  assert len(err.splitlines()) == 1 and 'Traceback' not in err
  assert not out.exists() and not list(tmp_path.iterdir())  # Nothing left behind.


@pytest.mark.parametrize('case', ['empty.npz', 'random.safetensors', 'cut.npz',
                                  'unrelated.npz', 'unrelated.safetensors',
                                  'no_cls.npz'])
def test_main_refuses_bad_model_init_in_one_sentence(case, bad_files, tmp_path,
                                                     capsys, monkeypatch):
  pytest.importorskip('tensorflow')
  path, phrase = bad_files[case]
  code, out, err = run_main(
      capsys, monkeypatch, '--config=configs/tiny.py',
      f'--config.model_init={path}', '--config.data.eval_split=val200',
      f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert code == 1, (out, err)
  assert err.startswith(f'Error: {path}') and phrase in err, err
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_convert_creates_missing_out_folders(bad_files, tmp_path, capsys):
  src = bad_files['cut.npz'][0].parent / 'full.npz'
  out = tmp_path / 'new' / 'deeper' / 'vit.npz'
  assert convert_lib.main(['--src', str(src), '--out', str(out)]) == 0
  assert f'wrote {out}' in capsys.readouterr().out
  with np.load(out) as f:  # The converted file holds the source's tensors.
    meta = json.loads(str(f['__pyra_jax__']))
    assert meta['source_format'] == 'npz'
    np.testing.assert_array_equal(f['cls'], np.load(src)['cls'])
  assert sorted(p.name for p in out.parent.iterdir()) == ['vit.npz']


def test_convert_refuses_unwritable_out_before_reading(bad_files, tmp_path,
                                                       capsys):
  src = bad_files['cut.npz'][0].parent / 'full.npz'
  (tmp_path / 'a_file').write_text('x')
  for out, phrase in ((tmp_path / 'a_file' / 'vit.npz', 'is a file'),
                      (tmp_path, 'is a directory')):
    assert convert_lib.main(['--src', str(src), '--out', str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'Error: --out {out}') and phrase in err, err
    assert len(err.splitlines()) == 1
