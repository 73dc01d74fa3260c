"""Weights by Hugging Face Hub name (`hf-hub:<owner>/<repo>`), without a network.

The tests fill a Hub cache the way huggingface_hub itself lays it out
(`models--<owner>--<repo>/{refs/main, blobs/<sha256>, snapshots/<commit>/<file>
-> ../../blobs/<sha256>}`) with a tiny ViT in timm's names, set HF_HUB_CACHE
and HF_HUB_OFFLINE=1, and load it through both entry points: `python -m
pyra_jax.main` (test_train_cli's `run_main`) and `python -m pyra_jax.convert`.
Failures (offline with an empty cache, a misspelt name, the package missing,
the Hub's own errors) must end in one sentence that says what to do.
"""

import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

from pyra_jax import convert as convert_lib
from pyra_jax.checkpoints import CheckpointError, CheckpointWarning, hub, load_pretrained
from tests.helpers import reference_vit as ref
from tests.helpers.checkpoints import check_torch_block, check_torch_stem, checkpoint_model, flat
from tests.helpers.models import init_params
from tests.helpers.cli import ROOT, reset_flags, run_main
from tests.helpers.data import require_offline_mnist

REPO = 'timm/vit_tiny_test_patch8_32.in1k'
SPEC = f'hf-hub:{REPO}'
COMMIT = 'a1b2c3d4e5f60718293a4b5c6d7e8f9012345678'


def fill_hub_cache(cache, repo_id, files, commit=COMMIT):
  """Writes `files` ({name: bytes}) as huggingface_hub caches a download of main."""
  repo = cache / ('models--' + repo_id.replace('/', '--'))
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  snapshot = repo / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  (repo / 'blobs').mkdir()
  for name, data in files.items():
    blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
  return snapshot


def timm_bytes(tmp_path, seed=0, **kw):
  """A tiny timm ViT as configs/tiny.py builds it (width 32, 2 blocks, 8 px
  patches, 4x4 grid), serialised; returns (state dict, file bytes)."""
  sd = ref.random_timm_state(np.random.default_rng(seed), **kw)
  path = tmp_path / f'timm_{seed}.safetensors'
  save_file(sd, str(path))
  return sd, path.read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty Hub cache, offline. huggingface_hub reads both variables when it
  is first imported, which may have happened earlier in this process."""
  pytest.importorskip('huggingface_hub')
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'hf_cache'
  cache.mkdir()
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  return cache


@pytest.mark.parametrize('spec,want', [
    ('hf-hub:timm/vit_base_patch16_224.orig_in21k',
     hub.HubSpec('timm/vit_base_patch16_224.orig_in21k', 'model.safetensors', None)),
    ('hf-hub:timm/vit_large_patch16_224.mae/pytorch_model.bin',
     hub.HubSpec('timm/vit_large_patch16_224.mae', 'pytorch_model.bin', None)),
    ('hf-hub:org/repo/sub/dir/w.safetensors@v1.0',
     hub.HubSpec('org/repo', 'sub/dir/w.safetensors', 'v1.0')),
    ('hf-hub:org/repo@' + COMMIT, hub.HubSpec('org/repo', 'model.safetensors', COMMIT)),
])
def test_parse_hub_spec(spec, want):
  assert hub.parse(spec) == want


@pytest.mark.parametrize('spec', ['hf-hub:vit_base_patch16_224', 'hf-hub:timm/',
                                  'hf-hub:timm//x.safetensors', 'hf-hub:timm/vit@'])
def test_malformed_hub_spec_says_the_form(spec):
  with pytest.raises(CheckpointError, match=r'is not a Hub name: write '
                                            r'hf-hub:<owner>/<repo>'):
    hub.parse(spec)


def test_hub_name_loads_like_the_file_from_an_offline_cache(hub_cache, tmp_path):
  sd, data = timm_bytes(tmp_path)
  snapshot = fill_hub_cache(hub_cache, REPO, {'model.safetensors': data})
  assert hub.resolve(SPEC) == str(snapshot / 'model.safetensors')
  cfg = checkpoint_model()
  init = init_params(cfg)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', CheckpointWarning)
    p = flat(load_pretrained(SPEC, 'auto', init, cfg))
    local = flat(load_pretrained(str(tmp_path / 'timm_0.safetensors'), 'auto', init, cfg))
  check_torch_stem(p, sd)  # Each tensor against the timm state dict, by definition.
  for i in range(cfg.depth):
    check_torch_block(p, sd, i)
  assert sorted(p) == sorted(local)
  for k in p:
    np.testing.assert_array_equal(p[k], local[k], err_msg=k)


def test_main_trains_from_a_hub_name_and_resumes_from_the_file(
    hub_cache, tmp_path, capsys, monkeypatch):
  """A Hub name is a model_init like a path: the run trains offline from the
  cache, and the same workdir resumes with the cached file's path instead (the
  frozen-weights fingerprint would refuse any other weights)."""
  require_offline_mnist()
  _, data = timm_bytes(tmp_path)
  snapshot = fill_hub_cache(hub_cache, REPO, {'model.safetensors': data})
  common = [f'--workdir={tmp_path / "run"}', '--config.num_epochs=1',
            '--config.warmup_epochs=0', '--config.data.eval_split=val200']
  # As the README writes it: the name in the config argument (after its own ':').
  code, out, err = run_main(capsys, monkeypatch, f'--config=configs/tiny.py:init={SPEC}',
                            *common)
  assert code == 0, (out, err)
  assert (tmp_path / 'run' / 'results.json').exists()
  common.insert(0, '--config=configs/tiny.py')
  code, out, err = run_main(capsys, monkeypatch, *common,
                            f'--config.model_init={snapshot / "model.safetensors"}')
  reset_flags()
  assert code == 0, (out, err)

  # Different weights under the same name are refused (the negative control).
  _, other = timm_bytes(tmp_path, seed=1)
  (hub_cache / ('models--' + REPO.replace('/', '--'))).rename(tmp_path / 'old')
  fill_hub_cache(hub_cache, REPO, {'model.safetensors': other})
  code, out, err = run_main(capsys, monkeypatch, *common, f'--config.model_init={SPEC}')
  reset_flags()
  assert code == 1 and 'fingerprints differ' in err, (out, err)


def test_main_reads_the_hub_file(hub_cache, tmp_path, capsys, monkeypatch):
  """The cached file really is what main loads: a wider ViT under the name
  fails as that file would, naming the Hub name."""
  _, data = timm_bytes(tmp_path, width=48, mlp=96)
  fill_hub_cache(hub_cache, REPO, {'model.safetensors': data})
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py',
                            f'--config.model_init={SPEC}',
                            f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert code == 1, (out, err)
  assert err.startswith(f'Error: {SPEC} (timm): wrong variant: checkpoint width 48'), err
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_convert_from_a_hub_name(hub_cache, tmp_path, capsys):
  _, data = timm_bytes(tmp_path)
  fill_hub_cache(hub_cache, REPO, {'model.safetensors': data})
  out, local_out = tmp_path / 'hub.npz', tmp_path / 'local.npz'
  assert convert_lib.main(['--src', SPEC, '--out', str(out)]) == 0
  assert convert_lib.main(['--src', str(tmp_path / 'timm_0.safetensors'),
                           '--out', str(local_out)]) == 0
  assert f'source={SPEC}' in capsys.readouterr().out
  with np.load(out) as a, np.load(local_out) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      if k != '__pyra_jax__':
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _one_sentence(err, *phrases):
  err = err.strip()
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  for phrase in phrases:
    assert phrase in err, (phrase, err)


def test_offline_with_an_empty_cache_says_what_to_do(hub_cache, tmp_path, capsys,
                                                     monkeypatch):
  out = tmp_path / 'out.npz'
  assert convert_lib.main(['--src', SPEC, '--out', str(out)]) == 1
  _one_sentence(capsys.readouterr().err,
                f'Error: {SPEC}: model.safetensors of {REPO} is not in the Hugging '
                f'Face cache {hub_cache}', 'HF_HUB_OFFLINE is set',
                'run once with network access', 'point HF_HUB_CACHE at a cache',
                f'download https://huggingface.co/{REPO}/resolve/main/model.safetensors')
  assert not out.exists()
  code, _, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py',
                          f'--config.model_init={SPEC}', f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert code == 1
  _one_sentence(err, f'Error: {SPEC}: model.safetensors of {REPO} is not in the')


def test_misspelt_name_offline_suggests_the_cached_one(hub_cache, tmp_path, capsys):
  _, data = timm_bytes(tmp_path)
  fill_hub_cache(hub_cache, REPO, {'model.safetensors': data})
  typo = 'hf-hub:timm/vit_tiny_tset_patch8_32.in1k'
  assert convert_lib.main(['--src', typo, '--out', str(tmp_path / 'o.npz')]) == 1
  _one_sentence(capsys.readouterr().err, 'is not in the Hugging Face cache',
                f'did you mean {SPEC}?')
  # The right repository, a file it does not hold.
  assert convert_lib.main(['--src', f'{SPEC}/pytorch_model.bin',
                           '--out', str(tmp_path / 'o.npz')]) == 1
  _one_sentence(capsys.readouterr().err,
                f'the cache holds other files or revisions of {REPO}')


def _http_error(cls, url):
  httpx = pytest.importorskip('httpx2')
  request = httpx.Request('GET', url)
  return cls('404 Client Error.', response=httpx.Response(404, request=request))


@pytest.mark.parametrize('error,phrase', [
    ('RepositoryNotFoundError', 'the Hub has no repository timm/vit_tiny_test_patch8_32.in1k'),
    ('RevisionNotFoundError', "has no revision"),
    ('RemoteEntryNotFoundError', 'has no file model.safetensors: name one of its files'),
    ('GatedRepoError', 'is gated: accept its terms'),
])
def test_hub_errors_online_say_what_to_do(error, phrase, hub_cache, tmp_path, capsys,
                                          monkeypatch):
  """What the Hub answers for a wrong name, as huggingface_hub raises it."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  exc = _http_error(getattr(errors, error), f'https://huggingface.co/{REPO}')

  def fail(*args, **kwargs):
    raise exc
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fail)
  assert convert_lib.main(['--src', SPEC, '--out', str(tmp_path / 'o.npz')]) == 1
  _one_sentence(capsys.readouterr().err, f'Error: {SPEC}: ', phrase)


def test_without_huggingface_hub_installed(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)  # import fails.
  assert convert_lib.main(['--src', SPEC, '--out', str(tmp_path / 'o.npz')]) == 1
  _one_sentence(capsys.readouterr().err,
                f'{SPEC} needs the huggingface_hub package, which is not installed',
                'pip install huggingface-hub', 'huggingface.co/')


def test_real_environment_variables_offline_empty_cache_cli(tmp_path):
  """As a user runs it: a fresh process reads HF_HUB_CACHE / HF_HUB_OFFLINE."""
  pytest.importorskip('huggingface_hub')
  env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / 'empty'), HF_HUB_OFFLINE='1')
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.convert', '--src', SPEC, '--out',
       str(tmp_path / 'o.npz')], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 1
  _one_sentence(proc.stderr, f'is not in the Hugging Face cache {tmp_path / "empty"}',
                'HF_HUB_OFFLINE is set')


def test_huggingface_hub_is_imported_only_for_hub_names():
  code = ('import sys; import pyra_jax.convert, pyra_jax.checkpoints; '
          "print('huggingface_hub' in sys.modules)")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == 'False', proc.stderr
