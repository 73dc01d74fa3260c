"""Two-stage evaluation (train without merging, deploy with merging: the paper's
Table 16) and the refusal of a run without pretrained weights.

One tiny PEFT run is trained once (test_train_cli covers training through the
command line); the tests evaluate or export it through the command line or
`setup.restore_run`.
"""

import json

import jax
import numpy as np
import pytest

from pyra_jax import checkpointing
from pyra_jax import errors
from pyra_jax import optim
from pyra_jax.training import export as export_lib
from pyra_jax.training import loop
from pyra_jax.training import setup
from tests.helpers.cli import reset_flags, run_main
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_config


# As test_train_cli: the 200 val200 images in batches of 64 (compiled once).
EVAL_FLAGS = ('--config.data.eval_split=val200', '--config.eval_batch_size=64',
              '--config.log_every_steps=25')


@pytest.fixture(scope='module')
def peft_workdir(tmp_path_factory):
  """A finished tiny PEFT run (trained without merging), for every test here."""
  require_offline_mnist()
  workdir = tmp_path_factory.mktemp('peft')
  config = tiny_config('method=peft', data=dict(eval_split='val200'), eval_batch_size=64,
                       log_every_steps=25)
  loop.train_and_evaluate(config, str(workdir))
  return workdir


def eval_cli(capsys, monkeypatch, workdir, setting, *extra):
  code, out, err = run_main(capsys, monkeypatch, f'--config={setting}',
                            f'--workdir={workdir}', '--mode=eval', *EVAL_FLAGS,
                            *extra)
  reset_flags()
  return code, out, err


def test_two_stage_eval_records_trained_and_evaluated_model(
    peft_workdir, capsys, monkeypatch):
  results_path = peft_workdir / 'results.json'
  before = json.loads(results_path.read_text())
  assert 'two_stage' not in before

  code, out, err = eval_cli(capsys, monkeypatch, peft_workdir,
                            'configs/tiny.py:method=tome', '--two_stage')
  assert code == 0, err
  assert ("checkpoint step 50 (two-stage: trained peft none, evaluated tome 4,2): "
          'val200 accuracy') in out
  after = json.loads(results_path.read_text())
  # The training run's own record is untouched; the evaluation is added next to it.
  assert {k: v for k, v in after.items() if k != 'two_stage'} == before
  [entry] = after['two_stage']
  assert entry['trained'] == {'method': 'peft', 'schedule': 'none'}
  assert entry['evaluated'] == {'method': 'tome', 'schedule': '4,2',
                                'r_per_layer': [4, 2]}
  assert (entry['step'], entry['split'], entry['count']) == (50, 'val200', 200)
  assert f'{100 * entry["accuracy"]:.2f}% ({entry["correct"]}/200)' in out
  # Merging 6 of 17 tokens changes the model: not the PEFT accuracy by accident.
  assert entry['correct'] != round(before['final_accuracy'] * 200)

  # PYRA with fresh generators (W_D = 0) is ToMe: same accuracy, exactly.
  code, out, err = eval_cli(capsys, monkeypatch, peft_workdir,
                            'configs/tiny.py:method=pyra', '--two_stage')
  assert code == 0, err
  # Evaluating ToMe again replaces its entry instead of adding a duplicate.
  code, _, err = eval_cli(capsys, monkeypatch, peft_workdir,
                          'configs/tiny.py:method=tome', '--two_stage')
  assert code == 0, err
  entries = json.loads(results_path.read_text())['two_stage']
  by_method = {e['evaluated']['method']: e for e in entries}
  assert len(entries) == 2 and set(by_method) == {'tome', 'pyra'}
  assert by_method['pyra']['correct'] == by_method['tome']['correct']


def test_pyra_at_init_gives_the_tome_logits_on_peft_weights(peft_workdir):
  """The restored LoRA and head are the trained ones in both models, and the
  PYRA generators the checkpoint lacks take their initialisation (W_D = 0)."""
  config = tiny_config('method=peft')
  _, peft_params, _ = setup.restore_run(config, str(peft_workdir))
  images = np.random.default_rng(0).uniform(
      -2, 2, (8, 32, 32, 3)).astype(np.float32)
  logits = {}
  for method in ('tome', 'pyra'):
    config = tiny_config(f'method={method}')
    run, trainable, _ = setup.restore_run(config, str(peft_workdir), two_stage=True)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(trainable))[0]
    pyra = {jax.tree_util.keystr(k): v for k, v in flat if 'pyra' in jax.tree_util.keystr(k)}
    if method == 'pyra':
      assert any("'w_d'" in k for k in pyra)
      assert all(not np.any(v) for k, v in pyra.items() if "'w_d'" in k)
    else:
      assert not pyra
    # Every parameter the checkpoint holds is restored as trained.
    np.testing.assert_array_equal(
        jax.device_get(trainable['head']['kernel']),
        jax.device_get(peft_params['head']['kernel']))
    params = optim.merge_params(trainable, run.frozen)
    logits[method] = np.asarray(jax.jit(
        lambda p, x, m=run.model: m.apply({'params': p}, x, train=False))(params, images))
  np.testing.assert_array_equal(logits['pyra'], logits['tome'])


def test_two_stage_export_merges_and_names_the_trained_method(peft_workdir, tmp_path):
  config = tiny_config('method=tome')
  out = export_lib.export(config, str(peft_workdir), str(tmp_path / 'exp'),
                          two_stage=True)
  _, cfg = export_lib.load_export(out)
  assert (cfg.model.method, cfg.model.lora_rank) == ('tome', 0)
  assert setup.build_model(cfg.model).schedule == (4, 2)
  # export_info is dropped by load_export; read it from the stored config.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      tmp_path / 'exp' / 'config')
  assert meta['export_info']['trained'] == {'method': 'peft', 'schedule': 'none'}


@pytest.mark.parametrize('setting,extra,message', [
    # Without the option a merging change is refused as before, naming the option.
    ('configs/tiny.py:method=tome', (), "different config (model.method: 'peft' -> "
     "'tome'; model.schedule: 'none' -> '4,2')"),
    ('configs/tiny.py:method=tome', (), 'with this merging (two-stage), add --two_stage.'),
    # Other changes are refused without the hint.
    ('configs/tiny.py:method=peft', ('--config.model.lora_rank=8',),
     'different config (model.lora_rank: 4 -> 8). Use a new --workdir, or rerun '
     'with the same config to resume.\n'),
    # The option allows the merging only: a different LoRA rank is another tree.
    ('configs/tiny.py:method=tome', ('--two_stage', '--config.model.lora_rank=8'),
     'different config (model.lora_rank: 4 -> 8)'),
    ('configs/tiny.py:method=tome', ('--two_stage', '--export_dir=/tmp/x'),
     '--two_stage applies to --mode=eval or --mode=export'),
    # A DiffRate search trains; it has no trained checkpoint to evaluate yet.
    ('configs/tiny.py:method=diffrate', ('--two_stage', '--mode=search'),
     '--two_stage applies to --mode=eval or --mode=export'),
])
def test_changes_beyond_the_merging_are_refused_in_one_sentence(
    peft_workdir, capsys, monkeypatch, setting, extra, message):
  code, out, err = eval_cli(capsys, monkeypatch, peft_workdir, setting, *extra)
  assert code != 0 and message in err, err
  assert err.startswith('Error: ') and len(err.strip().splitlines()) == 1, err
  assert 'Traceback' not in err


def test_trained_generators_cannot_be_dropped_or_reshaped(peft_workdir):
  """A checkpoint whose trained parameters do not fit the evaluated model (here
  a PYRA checkpoint evaluated as ToMe: its generators would be lost) is refused.
  The PYRA checkpoint is simulated by the PEFT one's meta claiming PYRA."""
  config = tiny_config('method=pyra')
  stored = setup._stored_trainable_shapes(  # pylint: disable=protected-access
      {'model_config': setup.resolve_model_config(config, 10).to_dict()}, config)
  fresh = setup.setup(tiny_config('method=tome'), 10).trainable
  meta = {'step': 50, 'config': checkpointing.config_to_dict(config)}
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"trained with method 'pyra', schedule '4,2', whose trained "
                           r"parameters \(Transformer/encoderblock_0/pyra/norm/bias"):
    setup._two_stage_tree(stored, fresh, meta, tiny_config('method=tome'),  # pylint: disable=protected-access
                          '/wd')
  # Another schedule reshapes W_r (r_l, 1): refused too.
  fresh = setup.setup(tiny_config('method=pyra'), 10).trainable
  config_other = tiny_config('method=pyra', model=dict(schedule='2,2'))
  fresh_other = setup.setup(config_other, 10).trainable
  with pytest.raises(checkpointing.CheckpointMismatchError, match='w_r'):
    setup._two_stage_tree(stored, fresh_other, meta, config_other, '/wd')  # pylint: disable=protected-access
  kept, added = setup._two_stage_tree(stored, fresh, meta, config, '/wd')  # pylint: disable=protected-access
  assert added == [] and jax.tree.structure(kept) == jax.tree.structure(stored)


def test_a_paper_setting_without_weights_is_refused_naming_what_to_fetch(
    tmp_path, capsys, monkeypatch):
  rc, out, err = run_main(capsys, monkeypatch, '--config=configs/vitb_high.py:task=dtd',
                          f'--workdir={tmp_path}')
  reset_flags()
  assert rc == 1 and err.startswith('Error: ') and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert 'config.model_init is empty, so the frozen B/16 backbone would be random' in err
  assert ('`python -m pyra_jax.convert --src hf-hub:timm/vit_base_patch16_224.orig_in21k '
          '--out weights.npz`') in err
  assert '`gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .`, then --src ViT-B_16.npz' in err
  assert '--config.model_init=random' in err
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('setting,fetched', [
    ('vitl_high', 'ViT-L_16.npz'), ('vitl_mae_low', 'timm/vit_large_patch16_224.mae'),
    ('deitb_high', 'timm/deit_base_distilled_patch16_224'),
    ('deits_peft', 'timm/deit_small_distilled_patch16_224'),
    ('vits_peft', 'timm/vit_small_patch16_224.augreg_in21k')])
def test_every_paper_setting_needs_weights_or_an_explicit_random_init(setting, fetched):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'pyra_jax.configs.{setting}').get_config()
  with pytest.raises(errors.ConfigError, match='pyra_jax.convert') as e:
    setup.check_model_init(config)
  assert fetched in str(e.value)
  config.model_init = 'random'
  setup.check_model_init(config)  # Asked for explicitly: allowed.


def test_two_stage_eval_of_an_unfinished_run_is_refused(peft_workdir, tmp_path,
                                                         capsys, monkeypatch):
  """The evaluation is recorded next to the training run's results, so a run
  that has not written them yet (checkpoints only) is refused, not given a
  results.json that would mark it finished."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(peft_workdir / 'checkpoints', tmp_path / 'checkpoints')
  code, out, err = eval_cli(capsys, monkeypatch, tmp_path,
                            'configs/tiny.py:method=tome', '--two_stage')
  assert code == 1 and 'results.json does not exist' in err
  assert 'finish training first' in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / 'results.json').exists()
