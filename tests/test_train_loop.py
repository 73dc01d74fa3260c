"""The training loop end to end on the tiny config (real offline MNIST digits).

One uninterrupted run is the reference; the other runs must reproduce it bit
for bit (killed and resumed, same seed) or differ from it (other seed). The
4-device check is in test_train_multidevice.py, the command line in
test_train_cli.py.
"""

import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from pyra_jax import checkpointing
from pyra_jax import errors
from pyra_jax import metrics
from pyra_jax.training import evaluation
from pyra_jax.training import export as export_lib
from pyra_jax.training import loop
from pyra_jax.training import setup
from pyra_jax.training import steps
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_run_config
from tests.helpers.runs import Killed, kill_after, losses, trained_params

require_offline_mnist(module_level=True)

STEPS = 50  # 2 epochs of 1,000 digits at batch 40; checkpoints at 25 and 50.


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def reference(tiny_workdir):
  """The uninterrupted run: this module's copy of the session's tiny run (the
  TINY command line: the config of `tiny_run_config()`), and its results."""
  return tiny_workdir, json.loads((tiny_workdir / 'results.json').read_text())


def test_trains_end_to_end_and_loss_falls(reference):
  wd, results = reference
  ls = losses(wd)
  assert sorted(ls) == list(range(1, STEPS + 1))
  first, last = np.mean([ls[s] for s in range(1, 6)]), np.mean([ls[s] for s in range(46, 51)])
  assert last < first - 0.2, (first, last)
  saved = json.loads((wd / 'results.json').read_text())
  assert [e['epoch'] for e in saved['evals']] == [1, 2]
  assert saved['final_accuracy'] == saved['evals'][-1]['accuracy']
  assert saved['max_accuracy_paper_protocol'] == max(e['accuracy'] for e in saved['evals'])
  assert saved['num_test_images'] == 200 and saved['config']['seed'] == 0
  assert saved['final_accuracy'] > 0.2  # 10 classes: chance is 0.1.
  record = metrics.read_metrics(str(wd))[0]
  assert {'lr', 'pyra_lr', 'train_accuracy', 'images_per_sec', 'loss'} <= set(record)
  assert list((wd / 'tensorboard').iterdir())
  assert checkpointing.Checkpointer(str(wd / 'checkpoints')).all_steps() == [25, 50]


def test_eval_restores_the_exact_accuracy_and_counts_each_image_once(reference):
  wd, results = reference
  again = evaluation.evaluate_checkpoint(tiny_run_config(), str(wd))
  assert again['accuracy'] == results['final_accuracy']  # Bit for bit.
  # 4 batches of 64 = 256 rows, 56 of them padding: only the 200 images count.
  assert again['count'] == 200 and again['accuracy'] == again['correct'] / 200
  mid = evaluation.evaluate_checkpoint(tiny_run_config(), str(wd), step=25)
  assert mid['accuracy'] == results['evals'][0]['accuracy']


def test_kill_and_resume_equals_uninterrupted_run(reference, workdirs, monkeypatch):
  ref_wd, ref_results = reference
  wd = workdirs / 'resumed'
  monkeypatch.setattr(loop, 'train_batches', kill_after(37))
  with pytest.raises(Killed):
    loop.train_and_evaluate(tiny_run_config(), str(wd))
  assert checkpointing.Checkpointer(str(wd / 'checkpoints')).latest_step() == 25
  # A save killed half-way leaves only Orbax's tmp directory: it must be ignored.
  junk = wd / 'checkpoints' / '50.orbax-checkpoint-tmp-123' / 'params'
  junk.mkdir(parents=True)
  (junk / 'garbage').write_text('half a checkpoint')
  monkeypatch.undo()
  results = loop.train_and_evaluate(tiny_run_config(), str(wd))
  step, resumed = trained_params(wd)
  _, uninterrupted = trained_params(ref_wd)
  assert step == STEPS and resumed.keys() == uninterrupted.keys()
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)
  # Same seed, same results: the steps before the kill (computed by another
  # run) and after it match the reference exactly, and so do the evals.
  assert losses(wd) == losses(ref_wd)
  assert results['evals'] == ref_results['evals']


def test_a_different_seed_gives_different_results(reference, workdirs):
  wd = workdirs / 'seed1'
  loop.train_and_evaluate(tiny_run_config(seed=1), str(wd))
  _, p1 = trained_params(wd, config=tiny_run_config(seed=1))
  _, p0 = trained_params(reference[0])
  assert not np.array_equal(p1['head/kernel'], p0['head/kernel'])
  assert losses(wd)[1] != losses(reference[0])[1]


def test_workdir_of_another_config_is_refused(reference):
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'lr: 0\.03 -> 0\.01'):
    loop.train_and_evaluate(tiny_run_config(lr=0.01), str(reference[0]))


def test_a_field_added_since_a_checkpoint_counts_as_its_default():
  """A checkpoint written before `model_init_first_blocks` existed still resumes
  and evaluates; one whose stored value differs from the current is refused."""
  config = tiny_run_config()
  saved = checkpointing.config_to_dict(config)
  del saved['model_init_first_blocks']
  meta = {'config': saved, 'step': 5}
  for for_eval in (False, True):
    checkpointing.check_compatible(meta, config, 'fp', '/wd', for_eval=for_eval)
  config.model_init_first_blocks = True
  for for_eval in (False, True):
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match=r'model_init_first_blocks: False -> True'):
      checkpointing.check_compatible(meta, config, 'fp', '/wd', for_eval=for_eval)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    reference, workdirs, monkeypatch):
  original = loop.train_batches

  def poisoned(data, start_step):
    for i, batch in enumerate(original(data, start_step)):
      if start_step + i == 30:  # Step 31.
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch
  monkeypatch.setattr(loop, 'train_batches', poisoned)
  wd = workdirs / 'nan'
  with pytest.raises(errors.TrainingError, match=r'nan at step 31.*finite loss is step 25 in'):
    loop.train_and_evaluate(tiny_run_config(), str(wd))
  assert checkpointing.Checkpointer(str(wd / 'checkpoints')).all_steps() == [25]
  step, params = trained_params(wd)
  assert step == 25 and all(np.isfinite(v).all() for v in params.values())


def test_failed_save_leaves_no_checkpoint(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  params, opt = {'w': np.ones(3, np.float32)}, {'m': np.zeros(3, np.float32)}
  ckpt.save(1, params, opt, {'step': 1})
  with pytest.raises(TypeError):
    ckpt.save(2, params, opt, {'step': object()})  # Not JSON: dies mid-save.
  ckpt.close()
  again = checkpointing.Checkpointer(str(tmp_path))
  assert again.all_steps() == [1]
  assert not (tmp_path / '2').exists()


def test_export_folds_lora_and_keeps_the_accuracy(reference, workdirs):
  wd, results = reference
  out = export_lib.export(tiny_run_config(), str(wd), str(workdirs / 'export'))
  params, config = export_lib.load_export(out)
  flat = traverse_util.flatten_dict(params, sep='/')
  assert not any('/lora/' in k for k in flat) and config.model.lora_rank == 0
  assert any(k.endswith('pyra/w_d') for k in flat) and 'head/kernel' in flat
  r = export_lib.evaluate_export(out, tiny_run_config())
  assert r['count'] == 200
  assert abs(r['accuracy'] - results['final_accuracy']) <= 1 / 200


def _steps(config, batches):
  """Trains the tiny model on `batches` with the real train step; returns
  (trainable, opt_state, per-step losses)."""
  run = setup.setup(config, num_classes=10)
  step_fn = steps.make_train_step(run, steps_per_epoch=25)
  trainable = run.replicate(run.trainable)
  opt_state = run.replicate(steps.make_optimizer(run, 25)[2](run.trainable))
  key = run.replicate(setup.dropout_key(config))
  step_losses = []
  for s, batch in enumerate(batches):
    trainable, opt_state, m = step_fn(trainable, opt_state, run.frozen,
                                      setup.shard(batch, run.batch_sharding), np.int32(s), key)
    step_losses.append(float(m['loss']))
  return jax.device_get(trainable), jax.device_get(opt_state), step_losses


def test_gradient_accumulation_gives_the_update_of_the_whole_batch():
  """grad_accum_steps=2 sums two half-batches' gradients into one update: the
  parameters after 3 updates equal those of grad_accum_steps=1 on the same
  global batches, and the schedule and Adam counted 3 updates, not 6. The last
  batch is partly masked, so the halves' losses must be weighted by the whole
  batch's count."""
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(40, 32, 32, 3)).astype(np.float32),
              'label': rng.integers(0, 10, size=40).astype(np.int32),
              'mask': np.ones(40, bool)} for _ in range(3)]
  batches[-1]['mask'][:13] = False  # 27 real images: 14 + 13 over the two halves.
  model = dict(lora_dropout=0.0, drop_path=0.0)
  # Adam divides by sqrt(v) + eps: at eps = 1e-8 a round-off difference in a
  # near-zero gradient (summed in another order) becomes an update difference
  # of up to lr. eps = 1e-4 keeps the comparison about the accumulated gradient.
  opt = dict(warmup_epochs=0, lr=3e-2, eps=1e-4)
  one = tiny_run_config(**opt)
  one.model.update(model)
  two = tiny_run_config(grad_accum_steps=2, **opt)
  two.model.update(model)
  p1, s1, l1 = _steps(one, batches)
  p2, s2, l2 = _steps(two, batches)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  flat1, flat2 = (traverse_util.flatten_dict(p, sep='/') for p in (p1, p2))
  assert flat1.keys() == flat2.keys()
  for name in flat1:
    np.testing.assert_allclose(flat2[name], flat1[name], atol=1e-6, err_msg=name)
  moved = traverse_util.flatten_dict(setup.setup(one, 10).trainable, sep='/')
  assert max(np.abs(flat1[n] - moved[n]).max() for n in flat1) > 1e-3  # Really trained.
  counts = [int(x) for path, x in jax.tree_util.tree_flatten_with_path(s2)[0]
            if 'count' in jax.tree_util.keystr(path)]
  assert counts and set(counts) == {3}
  assert jax.tree.structure(s1) == jax.tree.structure(s2)  # Checkpoints interchange.


def test_attention_and_accumulation_may_change_on_resume_and_eval():
  """How a step is computed is not what it computes: a checkpoint trained with
  the einsum attention and no accumulation resumes and evaluates with the
  jax.nn attention and 2 micro-batches."""
  meta = {'config': checkpointing.config_to_dict(tiny_run_config()), 'step': 5}
  config = tiny_run_config(grad_accum_steps=2)
  config.model.attention = 'dot_product_attention'
  for for_eval in (False, True):
    assert checkpointing.check_compatible(meta, config, 'fp', '/wd', for_eval=for_eval) == {}
