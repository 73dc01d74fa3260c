"""PE-Dist (Table 15): distillation loss, frozen teacher, resume, bad input.

The loss is checked against a numpy loop written from its definition
(CE + w·T²·KL(softmax(t/T) || softmax(s/T)), docs/algorithm.md §10), and the
authors' hard-label form against a numpy transcription of the PYRA authors'
engine.py, on random logits and on the tiny models' real logits, where the
teacher's logits come from
the teacher's own evaluation path (`setup.restore_run` + eval-mode apply), not
from `pyra_jax.training.teacher`. The teacher is a tiny PEFT run trained here through the
command line; the students are one-block tiny PEFT models.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from pyra_jax import checkpointing
from pyra_jax import metrics
from pyra_jax import optim
from pyra_jax.training import distill as distill_lib
from pyra_jax.training import evaluation
from pyra_jax.training import export as export_lib
from pyra_jax.training import loop
from pyra_jax.training import setup
from pyra_jax.training import steps
from pyra_jax.training import teacher as teacher_lib
from tests.helpers.cli import NoCapture, one_sentence, reset_flags, run_main
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_run_config
from tests.helpers.runs import Killed, kill_after

# The tiny setting, 1 epoch (25 steps of 40 digits), evaluated on val200.
TINY = ['--config.data.eval_split=val200', '--config.eval_batch_size=64',
        '--config.log_every_steps=1', '--config.num_epochs=1']
STEPS = 25


# ---------------------------------------------------------------------------
# The loss, from its definition.
# ---------------------------------------------------------------------------

def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max()
  return z - m - math.log(sum(math.exp(v - m) for v in z))


def np_pedist_loss(student, teacher, labels, mask, temperature, weight):
  """Mean over the unmasked rows of CE(y, s) + w·T²·Σ_c p_t,c·log(p_t,c / p_s,c)."""
  total, rows = 0.0, 0
  for s, t, y, m in zip(student, teacher, labels, mask):
    if not m:
      continue
    ce = -np_log_softmax(s)[y]
    log_ps = np_log_softmax(np.asarray(s) / temperature)
    log_pt = np_log_softmax(np.asarray(t) / temperature)
    kl = 0.0
    for c in range(len(s)):
      p = math.exp(log_pt[c])
      kl += p * (log_pt[c] - log_ps[c])
    total += ce + weight * temperature ** 2 * kl
    rows += 1
  return total / max(rows, 1)


@pytest.mark.parametrize('temperature,weight', [(1.0, 1.0), (3.5, 0.4), (0.5, 2.0)])
def test_distillation_term_matches_the_definition(temperature, weight):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(6, 7)) * 3
  t = rng.normal(size=(6, 7)) * 3
  got = np.asarray(distill_lib.distillation_term(jnp.asarray(s, jnp.float32),
                                                 jnp.asarray(t, jnp.float32),
                                                 temperature, weight))
  zero = np.zeros(6, int)
  for i in range(6):
    # The CE part of np_pedist_loss at label 0, subtracted out, leaves w·T²·KL.
    want = (np_pedist_loss(s[i:i + 1], t[i:i + 1], zero[:1], [1], temperature, weight)
            + np_log_softmax(s[i])[0])
    np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=1e-6)
  # Equal distributions: no KL; a student that matches the teacher pays nothing.
  same = distill_lib.distillation_term(jnp.asarray(t), jnp.asarray(t), temperature, weight)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


def np_cross_entropy_mean(logits, labels):
  """torch's CrossEntropyLoss (mean reduction), one row at a time."""
  return sum(-np_log_softmax(z)[y] for z, y in zip(logits, labels)) / len(labels)


def np_authors_engine_loss(outputs, targets, teach_output):
  """The PYRA authors' engine.py, train_one_epoch with a teacher model:

    teach_output = teacher_model(samples)            (under no_grad)
    _, teacher_label = teach_output.topk(1, 1, True, True)
    loss = 1/2 * criterion(outputs, targets) + 1/2 * teach_loss(outputs, teacher_label.squeeze())

  criterion and teach_loss are cross-entropies averaged over the batch (their
  VTAB runs pass --smoothing=0, so LabelSmoothingCrossEntropy is plain CE).
  topk(1) is the largest logit (ties: the first, as for these random logits
  none occur).
  """
  teacher_label = [int(max(range(len(t)), key=lambda c: t[c])) for t in teach_output]
  return (0.5 * np_cross_entropy_mean(outputs, targets)
          + 0.5 * np_cross_entropy_mean(outputs, teacher_label))


def test_hard_label_term_matches_the_authors_engine():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(5, 9)) * 2, rng.normal(size=(5, 9)) * 2
  y = rng.integers(0, 9, 5)
  hard = np.asarray(distill_lib.hard_label_term(jnp.asarray(s, jnp.float32),
                                                jnp.asarray(t, jnp.float32)))
  ce = np.array([-np_log_softmax(z)[c] for z, c in zip(s, y)])
  np.testing.assert_allclose(0.5 * ce.mean() + 0.5 * hard.mean(),
                             np_authors_engine_loss(s, y, t), rtol=1e-5)


# ---------------------------------------------------------------------------
# A real teacher: a tiny PEFT run, trained through the command line.
# ---------------------------------------------------------------------------

def student_config(**distill) -> ml_collections.ConfigDict:
  """The student: tiny, one block, PEFT, as the TINY command line sets it."""
  c = tiny_run_config('method=peft', num_epochs=1, model=dict(depth=1), distill=distill)
  if distill:
    c.distill.enabled = True
  return c


def teacher_config() -> ml_collections.ConfigDict:
  return tiny_run_config('method=peft', num_epochs=1)


@pytest.fixture(scope='module')
def teacher_wd(tmp_path_factory):
  require_offline_mnist()
  wd = tmp_path_factory.mktemp('pedist') / 'teacher'
  mp = pytest.MonkeyPatch()
  code, _, err = run_main(NoCapture(), mp, '--config=configs/tiny.py:method=peft',
                          *TINY, f'--workdir={wd}')
  mp.undo()
  reset_flags()
  assert code == 0, err
  return wd


@pytest.fixture(scope='module')
def teacher_export(teacher_wd):
  return export_lib.export(teacher_config(), str(teacher_wd),
                           str(teacher_wd.parent / 'teacher_export'))


_OWN_EVAL = {}


def own_eval_logits(teacher_wd, images):
  """The teacher's logits the way its own --mode=eval computes them."""
  if teacher_wd not in _OWN_EVAL:
    run, trainable, _ = setup.restore_run(teacher_config(), str(teacher_wd))
    params = optim.merge_params(trainable, run.frozen)
    apply = jax.jit(lambda p, x: run.model.apply({'params': p}, x, train=False))
    _OWN_EVAL[teacher_wd] = lambda x: apply(params, x)
  return np.asarray(_OWN_EVAL[teacher_wd](images))


def eval_batches(config):
  data = setup.get_data(config.data, config.data.eval_split, config.eval_batch_size,
                        image_size=config.model.image_size, train=False, seed=config.seed)
  return list(iter(data))


def student_with_teacher(**distill):
  config = student_config(**distill)
  run = setup.setup(config, 10)
  run.teacher = teacher_lib.load_teacher(config, run.model_config, run.replicate)
  return config, run


def test_the_teachers_logits_are_its_own_evals(teacher_wd, teacher_export):
  """From the workdir: the logits of its --mode=eval, hence its recorded accuracy;
  from the export: the accuracy of --mode=eval --export_dir."""
  config, run = student_with_teacher(teacher_workdir=str(teacher_wd))
  t = run.teacher
  assert (t.source, t.step, t.model_config.depth) == ('workdir', STEPS, 2)
  apply = jax.jit(lambda p, x: t.model.apply({'params': p}, x, train=False))
  correct = count = 0
  for batch in eval_batches(config):
    logits = np.asarray(apply(t.params, batch['image']))
    np.testing.assert_array_equal(logits, own_eval_logits(teacher_wd, batch['image']))
    correct += int(((logits.argmax(-1) == batch['label']) & batch['mask']).sum())
    count += int(batch['mask'].sum())
  recorded = json.loads((teacher_wd / 'results.json').read_text())['final_accuracy']
  assert count == 200 and correct / count == recorded == t.recorded_accuracy
  assert evaluation.evaluate_checkpoint(teacher_config(), str(teacher_wd))['accuracy'] == recorded

  _, run_e = student_with_teacher(teacher_export=teacher_export)
  te = run_e.teacher
  assert te.source == 'export' and te.model_config.lora_rank == 0 and te.step == STEPS
  apply_e = jax.jit(lambda p, x: te.model.apply({'params': p}, x, train=False))
  correct = 0
  for batch in eval_batches(config):
    logits = np.asarray(apply_e(te.params, batch['image']))
    correct += int(((logits.argmax(-1) == batch['label']) & batch['mask']).sum())
  assert correct / 200 == export_lib.evaluate_export(teacher_export, config)['accuracy']


def test_training_loss_is_ce_plus_the_kl_to_the_teacher(teacher_wd):
  config, run = student_with_teacher(teacher_workdir=str(teacher_wd),
                                     temperature=2.5, weight=0.6)
  batch = eval_batches(config)[0]
  batch['mask'] = batch['mask'].copy()
  batch['mask'][::5] = False  # Masked rows count in neither term.
  rng = jax.random.PRNGKey(3)
  loss, (correct, count) = steps.training_loss(
      run.model, run.trainable, run.frozen, batch, rng,
      teacher=run.teacher, teacher_params=run.teacher.params)
  student = np.asarray(run.model.apply(
      {'params': optim.merge_params(run.trainable, run.frozen)}, batch['image'],
      train=True, rngs={'dropout': rng}))
  teacher = own_eval_logits(teacher_wd, batch['image'])
  want = np_pedist_loss(student, teacher, batch['label'], batch['mask'], 2.5, 0.6)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(count) == int(batch['mask'].sum())
  # The KL term is there: without the teacher the loss is the CE alone.
  ce, _ = steps.training_loss(run.model, run.trainable, run.frozen, batch, rng)
  np.testing.assert_allclose(
      float(ce), np_pedist_loss(student, teacher, batch['label'], batch['mask'], 2.5, 0.0),
      rtol=1e-5)
  assert float(loss) > float(ce) + 1e-4


def test_training_loss_authors_hard_is_their_engine_loss(teacher_wd):
  """distill.loss='authors_hard': their ½·CE(labels) + ½·CE(teacher's top class)
  on the unmasked rows (their batches have no padding: the masked rows are left
  out of the transcription's batch), the teacher as its own eval runs it."""
  config, run = student_with_teacher(teacher_workdir=str(teacher_wd), loss='authors_hard')
  assert 'authors' in teacher_lib.describe(run.teacher)
  batch = eval_batches(config)[0]
  batch['mask'] = batch['mask'].copy()
  batch['mask'][::4] = False
  rng = jax.random.PRNGKey(5)
  loss, (_, count) = steps.training_loss(
      run.model, run.trainable, run.frozen, batch, rng,
      teacher=run.teacher, teacher_params=run.teacher.params)
  student = np.asarray(run.model.apply(
      {'params': optim.merge_params(run.trainable, run.frozen)}, batch['image'],
      train=True, rngs={'dropout': rng}), np.float64)
  teacher = own_eval_logits(teacher_wd, batch['image'])
  keep = np.asarray(batch['mask'], bool)
  want = np_authors_engine_loss(student[keep], batch['label'][keep], teacher[keep])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert int(count) == int(keep.sum())
  # Not the KL form, and the teacher's labels are not simply the true ones.
  assert (teacher[keep].argmax(-1) != batch['label'][keep]).any()
  kl, _ = steps.training_loss(run.model, run.trainable, run.frozen, batch, rng,
                              teacher=dataclasses.replace(run.teacher, loss='kl'),
                              teacher_params=run.teacher.params)
  assert abs(float(kl) - float(loss)) > 1e-3


def test_the_step_trains_lora_and_head_only_and_compiles_once(teacher_wd, monkeypatch):
  config, run = student_with_teacher(teacher_workdir=str(teacher_wd), weight=0.9)
  teacher_before = jax.tree.map(np.array, jax.device_get(run.teacher.params))
  # Only LoRA and the head are trainable (config.trainable's lora_head group).
  paths = traverse_util.flatten_dict(run.trainable, sep='/')
  assert paths and all('/lora/' in f'/{p}' or p.startswith('head/') for p in paths)
  # The teacher's parameters get no gradient through the loss.
  batch = eval_batches(config)[0]
  g = jax.grad(lambda tp: steps.training_loss(
      run.model, run.trainable, run.frozen, batch, jax.random.PRNGKey(0),
      teacher=run.teacher, teacher_params=tp)[0])(run.teacher.params)
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(g))

  traces = []
  original = steps.training_loss
  monkeypatch.setattr(steps, 'training_loss',
                      lambda *a, **k: traces.append(1) or original(*a, **k))
  step_fn = steps.make_train_step(run, steps_per_epoch=25)
  tx_init = steps.make_optimizer(run, 25)[2]
  trainable = run.replicate(run.trainable)
  start = jax.tree.map(np.array, jax.device_get(run.trainable))
  opt_state = run.replicate(tx_init(run.trainable))
  key = run.replicate(setup.dropout_key(config))
  data = setup.get_data(config.data, config.data.train_split, config.batch_size,
                        image_size=32, train=True, seed=0)
  for step, b in zip(range(3), iter(data)):
    b = setup.shard(b, run.batch_sharding)  # pylint: disable=protected-access
    trainable, opt_state, m = step_fn(trainable, opt_state, run.frozen, b,
                                      np.int32(step), key, run.teacher.params)
    assert np.isfinite(float(m['loss']))
  assert len(traces) == 1  # One trace, one compilation, for 3 batches.
  after = traverse_util.flatten_dict(jax.device_get(trainable), sep='/')
  moved = {p for p, v in traverse_util.flatten_dict(start, sep='/').items()
           if not np.array_equal(v, after[p])}
  assert moved == set(paths)  # Every LoRA and head parameter moved, nothing else exists.
  for a, b in zip(jax.tree.leaves(teacher_before),
                  jax.tree.leaves(jax.device_get(run.teacher.params))):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Resume after a kill; the teacher recorded with the run.
# ---------------------------------------------------------------------------

def test_a_killed_distillation_run_resumes_to_the_same_weights(
    teacher_wd, teacher_export, tmp_path, monkeypatch):
  config = student_config(teacher_workdir=str(teacher_wd))
  config.checkpoint_every_steps = 10
  ref = loop.train_and_evaluate(config, str(tmp_path / 'ref'))
  assert ref['teacher']['fingerprint'] and ref['teacher']['step'] == STEPS

  monkeypatch.setattr(loop, 'train_batches', kill_after(13))
  wd = tmp_path / 'killed'
  with pytest.raises(Killed):
    loop.train_and_evaluate(config, str(wd))
  monkeypatch.undo()
  assert checkpointing.Checkpointer(str(wd / 'checkpoints')).latest_step() == 10
  # Another teacher (the export's folded weights differ from the workdir's) is refused.
  other = student_config(teacher_export=teacher_export)
  other.checkpoint_every_steps = 10
  with pytest.raises(checkpointing.CheckpointMismatchError, match='other weights'):
    loop.train_and_evaluate(other, str(wd))
  resumed = loop.train_and_evaluate(config, str(wd))
  assert resumed['evals'] == ref['evals']
  losses = lambda d: {m['step']: m['loss'] for m in metrics.read_metrics(str(d)) if 'loss' in m}
  assert losses(wd) == losses(tmp_path / 'ref')
  _, a, _ = setup.restore_run(config, str(wd))
  _, b, _ = setup.restore_run(config, str(tmp_path / 'ref'))
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# Bad input, the way a user meets it: one sentence from the command line.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('make_args,message', [
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(tmp / 'nope')],
     'does not exist: give the --workdir of the teacher'),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(tmp)],
     'holds no checkpoint'),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher_export=' + str(t)],
     'is not a pyra_jax export'),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(t),
                     '--config.model.num_classes=12'],
     "has 10 classes but the student's task (mnist) has 12"),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(t),
                     '--config.model.image_size=48'],
     'was trained at 32 px but the student runs at config.model.image_size = 48'),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(t),
                     '--config.distill.temperature=0.0'],
     'config.distill.temperature = 0.0: use a finite number > 0'),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(t),
                     '--config.distill.loss=soft'],
     "config.distill.loss = 'soft': use one of kl, authors_hard."),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft,teacher=' + str(t),
                     '--config.distill.loss=authors_hard', '--config.distill.weight=0.5'],
     "config.distill.weight = 0.5 has no effect with config.distill.loss='authors_hard'"),
    (lambda t, tmp: ['--config=configs/tiny.py:method=peft',
                     '--config.distill.teacher_workdir=' + str(t)],
     'config.distill.enabled is False'),
    (lambda t, tmp: ['--config=configs/vits_pedist.py:init=random'],
     'no teacher is given'),
])
def test_bad_teachers_are_one_sentence(teacher_wd, tmp_path, capsys, monkeypatch,
                                       make_args, message):
  (tmp_path / 'empty').mkdir()
  args = make_args(teacher_wd, tmp_path / 'empty')
  code, out, err = run_main(capsys, monkeypatch, *args, *TINY,
                            f'--workdir={tmp_path / "student"}')
  reset_flags()
  assert one_sentence(code, err) and message in err, err


def test_the_pedist_settings():
  from pyra_jax.configs import vitb_pedist, vits_pedist  # pylint: disable=g-import-not-at-top
  s = vits_pedist.get_config('task=dtd,teacher=/runs/vitb_peft')
  b = vitb_pedist.get_config('teacher_export=/runs/vitl_peft/export')
  # Table 15: ViT-S/16 (LoRA h=4) for ViT-B, ViT-B/16 (h=8) for ViT-L, no merging.
  assert (s.model.variant, s.model.lora_rank, s.model.method) == ('S/16', 4, 'peft')
  assert (b.model.variant, b.model.lora_rank, b.model.method) == ('B/16', 8, 'peft')
  assert s.distill.enabled and s.distill.teacher_workdir == '/runs/vitb_peft'
  assert b.distill.enabled and b.distill.teacher_export == '/runs/vitl_peft/export'
  assert s.data.task == 'dtd' and not s.distill.teacher_export
