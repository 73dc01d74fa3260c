"""`recipe=authors_code` and the settings it switches: DeiT's heads, the
evaluation epochs, the headline, the command line.

The schedule it selects is tested against timm's formula in test_optim.py.
Expected values come from the authors' code's behaviour written out by hand
(their train.py's evaluation condition, their DeiT forward), not from ours.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pyra_jax import main as main_lib
from pyra_jax import optim
from pyra_jax import recipe
from pyra_jax import vtab
from pyra_jax.configs import common, tiny as tiny_setting
from pyra_jax.models import build_model
from pyra_jax.training import loop
from pyra_jax.training import steps
from tests.helpers.cli import cli, reset_flags, run_main
from tests.helpers.models import tiny_config

IMAGE = 32


# --- DeiT: train on the class-token head, evaluate the mean of both heads -----

def _deit_config(**model):
  """The base config's training fields, the tiny model as a one-block DeiT."""
  c = common.get_base_config()
  c.model = tiny_config(model={
      'depth': 1, 'image_size': IMAGE, 'num_classes': 5, 'method': 'peft',
      'schedule': 'none', 'distilled': True, 'lora_dropout': 0.0, 'drop_path': 0.0,
      **model}).model
  c.num_epochs, c.warmup_epochs, c.lr = 2, 0, 1e-2
  return c


def _deit(**model):
  """A tiny distilled model whose head_dist is (kernel 0, bias b): its logits are
  exactly b, so the heads' mean is (cls logits + b) / 2 with no second forward."""
  c = _deit_config(**model)
  net = build_model(c.model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, IMAGE, IMAGE, 3)), jnp.float32)
  params = jax.jit(lambda k: net.init(k, x[:1]))(jax.random.PRNGKey(0))['params']
  rng = np.random.default_rng(1)
  params['head']['bias'] = jnp.asarray(rng.normal(size=5), jnp.float32)
  params['head_dist'] = {'kernel': jnp.zeros((32, 5), jnp.float32),
                         'bias': jnp.asarray(rng.normal(size=5), jnp.float32)}
  return c, net, params, x


def _cls_logits(net, params, x):
  """The class-token head on the class token's final feature, in numpy."""
  feats = np.asarray(jax.jit(lambda p: net.apply({'params': p}, x, features=True))(params),
                     np.float64)
  return feats @ np.asarray(params['head']['kernel'], np.float64) + np.asarray(
      params['head']['bias'], np.float64)


def _logits(net, params, x):
  """(training-mode logits, evaluation logits); dropout and drop-path are off."""
  return jax.jit(lambda p: (
      net.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)}),
      net.apply({'params': p}, x, train=False)))(params)


def test_deit_trains_the_class_head_and_evaluates_the_mean_of_both():
  c, net, params, x = _deit(distilled_train='cls', distilled_eval='avg')
  cls = _cls_logits(net, params, x)
  b_dist = np.asarray(params['head_dist']['bias'], np.float64)
  train_logits, eval_logits = _logits(net, params, x)
  np.testing.assert_allclose(train_logits, cls, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(eval_logits, 0.5 * (cls + b_dist), rtol=1e-5, atol=1e-5)

  # The training loss is the cross-entropy of the class head alone ...
  labels = np.array([0, 1, 2, 3])
  batch = {'image': x, 'label': jnp.asarray(labels), 'mask': jnp.ones(4, bool)}
  trainable, frozen = optim.split_params(params, c.trainable)
  (loss, _), grads = jax.jit(jax.value_and_grad(
      lambda t: steps.training_loss(net, t, frozen, batch, jax.random.PRNGKey(2)),
      has_aux=True))(trainable)
  logp = cls - np.log(np.exp(cls).sum(-1, keepdims=True))
  assert float(loss) == pytest.approx(-logp[np.arange(4), labels].mean(), rel=1e-5)
  # ... so head_dist gets no gradient, and the optimiser leaves it exactly as it
  # was (no weight decay either), as PyTorch's AdamW skips a parameter without one.
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads['head_dist']))
  tx, _ = optim.make_optimizer(c, steps_per_epoch=3)
  updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, updates)
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(new['head_dist'][k], trainable['head_dist'][k])
  assert not np.array_equal(new['head']['kernel'], trainable['head']['kernel'])


def test_deit_default_trains_what_it_evaluates():
  """distilled_train='as_eval' (the default) keeps the behaviour from before the
  field: training reads the heads that evaluation reads."""
  _, net, params, x = _deit(distilled_eval='avg')
  cls = _cls_logits(net, params, x)
  b_dist = np.asarray(params['head_dist']['bias'], np.float64)
  train_logits, _ = _logits(net, params, x)
  np.testing.assert_allclose(train_logits, 0.5 * (cls + b_dist), rtol=1e-5, atol=1e-5)
  with pytest.raises(optim.ConfigError, match="distilled_train must be one of"):
    build_model(_deit_config(distilled_train='dist').model)


# --- Evaluation epochs and the headline -----------------------------------------

@pytest.mark.parametrize('epochs,every', [(100, 10), (7, 3), (5, 0)])
def test_eval_epochs_follow_the_authors_loop(epochs, every):
  c = common.get_base_config()
  c.num_epochs, c.eval_every_epochs, c.eval_epochs = epochs, every, 'authors'
  # train.py: `if epoch % args.val_interval == 0 or epoch == args.epochs - 1` after
  # 0-based epoch `epoch`; ours count epochs from 1 (after the k-th epoch).
  want = [e + 1 for e in range(epochs)
          if (every > 0 and e % every == 0) or e == epochs - 1]
  got = [k for k in range(1, epochs + 1) if loop._is_eval_epoch(k, c)]  # pylint: disable=protected-access
  assert got == want
  if (epochs, every) == (100, 10):
    assert got == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]


def _fake_run(path, final, best, headline, pyra_lr=3e-4):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'results.json').write_text(json.dumps({
      'final_accuracy': final, 'max_accuracy_paper_protocol': best,
      'num_test_images': 100, 'wall_time_s': 1.0, 'eval_split': 'test',
      'config': {'pyra_lr': pyra_lr, 'lr': 1e-3, 'headline': headline,
                 'model': {'method': 'pyra', 'schedule': 'vitb_high'},
                 'vtab': {'backbone': 'vitb'}}}))


def test_vtab_means_and_selection_use_the_headline(tmp_path):
  """With headline 'max' (recipe=authors_code) the tables average the best
  evaluation of each run, and the pyra_lr choice compares those."""
  tasks = list(vtab.VTAB_TASKS)
  rng = np.random.default_rng(0)
  final = {t: float(rng.uniform(0.2, 0.8)) for t in tasks}
  for t in tasks:
    _fake_run(tmp_path / t / 'final', final[t], final[t] + 0.05, 'max')
  s = vtab.summarize(str(tmp_path))
  assert s['headline'] == 'max'
  assert s['vtab_mean']['mean'] == pytest.approx(np.mean([final[t] + 0.05 for t in tasks]))
  assert s['tasks'][0]['test_accuracy'] == final[tasks[0]]  # The final one stays listed.
  assert 'Means of: the best of the periodic test evaluations' in vtab.to_markdown(s)
  # Selection: the run with the better final but worse best loses under 'max'.
  runs = []
  for lr, fin, best in ((1e-4, 0.70, 0.71), (1e-3, 0.60, 0.75)):
    d = tmp_path / 'sel' / f'pyra_lr={lr}'
    _fake_run(d, fin, best, 'max', pyra_lr=lr)
    runs.append(vtab.RunSpec(task='dtd', stage='select', pyra_lr=lr, workdir=str(d)))
  assert vtab.selection(runs)['chosen_pyra_lr'] == 1e-3


# --- The switch --------------------------------------------------------------

def _lookup(config, path):
  """(whether `config` has the dotted field, its value)."""
  node = config
  for part in path.split('.'):
    if part not in node:
      return False, None
    node = node[part]
  return True, node


def test_recipe_fields_and_refusals():
  c = tiny_setting.get_config('recipe=authors_code')
  assert c.recipe == 'authors_code' and c.lr_schedule == 'per_step'  # Built as the paper's ...
  assert recipe.apply(c) == [(p, v) for p, v in recipe.AUTHORS_CODE if _lookup(c, p)[0]]
  assert (c.lr_schedule, c.model.lora_init, c.model.distilled_train, c.model.distilled_eval,
          c.eval_epochs, c.headline) == ('authors', 'trunc_normal', 'cls', 'avg',
                                         'authors', 'max')  # ... resolved when run.
  assert recipe.apply(c) and c.lr_schedule == 'authors'  # Idempotent.
  paper = tiny_setting.get_config()
  assert recipe.apply(paper) == [] and paper.lr_schedule == 'per_step'
  c = tiny_setting.get_config('recipe=authors_code')
  c.model.distilled_train = 'avg'  # Neither the default nor the recipe's: a choice.
  with pytest.raises(recipe.ConfigError, match="model.distilled_train = 'avg', but "
                     "recipe=authors_code sets it to 'cls'"):
    recipe.apply(c)


@pytest.mark.parametrize('args', [
    ['--config=configs/tiny.py:recipe=authors_code', '--config.lr_schedule=per_step'],
    ['--config=configs/tiny.py', '--config.recipe=authors_code',
     '--config.model.lora_init=zeros'],
])
def test_an_override_against_the_recipe_is_refused(args):
  rc, _, err = cli(*args, '--workdir=/tmp/unused')
  assert rc == 2 and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  assert err.startswith('Error: --config.') and 'contradicts recipe=authors_code' in err


@pytest.mark.parametrize('how', ['argument', 'override'])
def test_recipe_through_the_command_line_prints_what_it_set(tmp_path, capsys,
                                                            monkeypatch, how):
  # A bad model field: training stops with one line right after the start line,
  # before any data or compilation.
  setting = 'configs/tiny.py:modulation=bogus'
  args = ([setting + ',recipe=authors_code'] if how == 'argument'
          else [setting, '--config.recipe=authors_code'])
  code, out, err = run_main(capsys, monkeypatch, '--config=' + args[0], *args[1:],
                            f'--workdir={tmp_path}', '--config.lr_schedule=authors')
  config = main_lib._CONFIG.value  # pylint: disable=protected-access
  reset_flags()
  assert code == 1 and err.startswith('Error: model.modulation must be one of'), err
  line = next(l for l in out.splitlines() if l.startswith('recipe=authors_code'))
  for path, value in recipe.AUTHORS_CODE:
    has, got = _lookup(config, path)
    if has or path not in ('model.adapter_init', 'distill.loss'):  # Those two: if present.
      assert f'{path}={value!r}' in line and got == value, path


def test_main_reports_the_headline_first(tmp_path, capsys, monkeypatch):
  """headline='max': the best periodic evaluation is the first accuracy printed."""
  seen = {}

  def fake_train(config, workdir, **kw):  # pylint: disable=unused-argument
    seen['headline'] = config.headline
    return {'eval_split': 'test', 'num_test_images': 10, 'final_accuracy': 0.5,
            'max_accuracy_paper_protocol': 0.7, 'headline': config.headline,
            'steps': 3}
  monkeypatch.setattr(loop, 'train_and_evaluate', fake_train)
  code, out, _ = run_main(capsys, monkeypatch, '--config=configs/tiny.py:recipe=authors_code',
                          f'--workdir={tmp_path}')
  reset_flags()
  assert code == 0 and seen['headline'] == 'max'
  lines = [l for l in out.splitlines() if 'accuracy (test, 10 images)' in l]
  assert lines[0].startswith('max accuracy') and lines[0].endswith('70.00%')
  assert lines[1] == 'final accuracy (test, 10 images): 50.00%'
