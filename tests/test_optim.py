"""Parameter groups, weight-decay masks and schedules of pyra_jax.optim.

Expected values come from hand-written path lists and the closed forms of
AdamW's first step and of warm-up + cosine, not from the code under test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pyra_jax.configs import common
from pyra_jax import optim

# Paths in the architecture's layout (docs/architecture.md), with the group
# each must land in under the default config.trainable.
BLOCK = 'Transformer/encoderblock_0'
EXPECTED = {
    'embedding/kernel': ('frozen', (8, 8, 3, 16)),
    'embedding/bias': ('frozen', (16,)),
    'cls': ('frozen', (1, 1, 16)),
    'Transformer/posembed_input/pos_embedding': ('frozen', (1, 17, 16)),
    f'{BLOCK}/LayerNorm_0/scale': ('frozen', (16,)),
    f'{BLOCK}/MultiHeadDotProductAttention_0/query/kernel': ('frozen', (16, 2, 8)),
    f'{BLOCK}/MultiHeadDotProductAttention_0/query/bias': ('frozen', (2, 8)),
    f'{BLOCK}/MultiHeadDotProductAttention_0/lora/down': ('lora_head', (16, 4)),
    f'{BLOCK}/MultiHeadDotProductAttention_0/lora/up': ('lora_head', (4, 48)),
    f'{BLOCK}/MlpBlock_0/Dense_0/kernel': ('frozen', (16, 64)),
    f'{BLOCK}/pyra/w_r': ('pyra', (4, 1)),
    f'{BLOCK}/pyra/w_d': ('pyra', (1, 16)),
    f'{BLOCK}/pyra/norm/scale': ('pyra', (16,)),
    f'{BLOCK}/pyra/norm/bias': ('pyra', (16,)),
    f'{BLOCK}/diffrate/prune_logits': ('diffrate', (16,)),
    'Transformer/encoder_norm/scale': ('frozen', (16,)),
    'head/kernel': ('lora_head', (16, 10)),
    'head/bias': ('lora_head', (10,)),
    'head_dist/kernel': ('lora_head', (16, 10)),
}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  flat = {k: jnp.asarray(rng.normal(size=shape).astype(np.float32))
          for k, (_, shape) in EXPECTED.items()}
  return traverse_util.unflatten_dict(flat, sep='/')


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _config(**kw):
  c = common.get_base_config()
  c.num_epochs, c.warmup_epochs = 10, 2
  for k, v in kw.items():
    c[k] = v
  return c


def test_labels_follow_regexes_and_everything_else_is_frozen():
  labels = _flat(optim.param_labels(_params(), common.get_base_config().trainable))
  assert labels == {k: g for k, (g, _) in EXPECTED.items()}


def test_first_matching_group_wins_in_written_order():
  c = common.get_base_config()
  c.trainable = {'everything': '.*', 'heads': '^head.*'}
  labels = _flat(optim.param_labels(_params(), c.trainable))
  assert set(labels.values()) == {'everything'}
  c.trainable = {'heads': '^head.*', 'everything': '.*'}
  labels = _flat(optim.param_labels(_params(), c.trainable))
  assert labels['head/kernel'] == 'heads' and labels['cls'] == 'everything'


def test_split_and_merge_round_trip():
  p = _params()
  train, frozen = optim.split_params(p, common.get_base_config().trainable)
  assert set(_flat(train)) == {k for k, (g, _) in EXPECTED.items() if g != 'frozen'}
  assert set(_flat(frozen)) == {k for k, (g, _) in EXPECTED.items() if g == 'frozen'}
  merged = _flat(optim.merge_params(train, frozen))
  assert merged.keys() == _flat(p).keys()
  assert all(merged[k] is v for k, v in _flat(p).items())


def test_frozen_params_have_no_state_and_do_not_move():
  c = _config()
  tx, _ = optim.make_optimizer(c, steps_per_epoch=5)
  p = _params()
  state = tx.init(p)
  n_float_state = sum(x.size for x in jax.tree.leaves(state)
                      if jnp.issubdtype(x.dtype, jnp.floating))
  n_trainable = sum(int(np.prod(s)) for g, s in EXPECTED.values() if g != 'frozen')
  assert n_float_state == 2 * n_trainable  # Adam's mu and nu, nothing else.
  grads = _params(seed=1)
  updates, _ = tx.update(grads, state, p)
  new = _flat(optax.apply_updates(p, updates))
  for k, (group, _) in EXPECTED.items():
    moved = not np.array_equal(new[k], _flat(p)[k])
    assert moved == (group != 'frozen'), k


def test_groups_use_their_own_learning_rate():
  # First AdamW step with warmup 0: update = -lr * g / (|g| + eps) (bias
  # corrections cancel), plus -lr * wd * p on matrices; use 1-D leaves.
  c = _config(lr=1e-3, pyra_lr=1e-2, diffrate_lr=0.3, warmup_epochs=0, weight_decay=0.0)
  tx, _ = optim.make_optimizer(c, steps_per_epoch=5)
  p, g = _params(), _params(seed=1)
  new = _flat(optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
  for key, lr in (('head/bias', 1e-3), (f'{BLOCK}/pyra/norm/bias', 1e-2),
                  (f'{BLOCK}/diffrate/prune_logits', 0.3)):
    gk = np.asarray(_flat(g)[key])
    expected = np.asarray(_flat(p)[key]) - lr * gk / (np.abs(gk) + 1e-8)
    np.testing.assert_allclose(new[key], expected, rtol=1e-6, atol=lr * 1e-5)  # float32 round-off of p - lr


def test_group_lr_minus_one_means_the_base_lr():
  c = _config(lr=2e-3, pyra_lr=-1.0, diffrate_lr=-1.0)
  assert optim.group_lrs(c) == {'pyra': 2e-3, 'lora_head': 2e-3, 'ltmp': 2e-3,
                                'diffrate': 2e-3, 'spvit': 2e-3}
  c.diffrate_lr = 0.05
  assert optim.group_lrs(c)['diffrate'] == 0.05 and optim.group_lrs(c)['pyra'] == 2e-3


def test_pyra_lr_zero_freezes_pyra_but_not_lora():
  c = _config(lr=1e-3, pyra_lr=0.0)
  tx, _ = optim.make_optimizer(c, steps_per_epoch=5)
  p, g = _params(), _params(seed=1)
  state = tx.init(p)
  for _ in range(3):
    updates, state = tx.update(g, state, p)
    p_new = optax.apply_updates(p, updates)
  old, new = _flat(p), _flat(p_new)
  for k, (group, _) in EXPECTED.items():
    if group == 'pyra':
      np.testing.assert_array_equal(new[k], old[k])
    elif group == 'lora_head':
      assert not np.array_equal(new[k], old[k]), k


def test_weight_decay_only_on_matrices():
  # Zero gradients: Adam's step is 0, so only decoupled decay moves a leaf:
  # p <- p - lr * wd * p on kernels (ndim >= 2), nothing on biases and norms.
  lr, wd = 1e-2, 0.5
  c = _config(lr=lr, pyra_lr=-1.0, warmup_epochs=0, weight_decay=wd)
  tx, _ = optim.make_optimizer(c, steps_per_epoch=5)
  p = _params()
  zeros = jax.tree.map(jnp.zeros_like, p)
  new = _flat(optax.apply_updates(p, tx.update(zeros, tx.init(p), p)[0]))
  for k, (group, shape) in EXPECTED.items():
    old = np.asarray(_flat(p)[k])
    if group != 'frozen' and len(shape) >= 2:
      np.testing.assert_allclose(new[k], old * (1 - lr * wd), rtol=1e-6)
    else:
      np.testing.assert_array_equal(new[k], old)


def _reference_lr(step, *, peak, init, end, warmup, total):
  if step < warmup:
    return init + (peak - init) * step / warmup
  t = min(step - warmup, total - warmup) / (total - warmup)
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize('warmup_epochs', [0, 2])
def test_schedule_is_linear_warmup_then_cosine(warmup_epochs):
  c = _config(lr=1e-3, pyra_lr=3e-4, warmup_epochs=warmup_epochs,
              warmup_init_lr=1e-6, min_lr=1e-5)
  spe, total = 7, 70
  _, sched = optim.make_optimizer(c, steps_per_epoch=spe)
  warmup = warmup_epochs * spe
  for step in sorted({0, 1, warmup // 2, warmup, warmup + 1, 40, total - 1, total}):
    ref = _reference_lr(step, peak=1e-3, init=1e-6, end=1e-5, warmup=warmup,
                        total=total)
    assert float(sched['lr'](step)) == pytest.approx(ref, rel=1e-5), step
    # The PYRA group follows the same curve scaled to its own peak.
    assert float(sched['pyra_lr'](step)) == pytest.approx(ref * 0.3, rel=1e-5)


def test_bad_settings_are_reported():
  with pytest.raises(optim.ConfigError, match='warmup_epochs'):
    optim.make_optimizer(_config(warmup_epochs=20), steps_per_epoch=5)
  c = _config()
  c.trainable = {'x': '(unclosed'}
  with pytest.raises(optim.ConfigError, match='not a valid regex'):
    optim.param_labels(_params(), c.trainable)


# --- The authors' schedule (config.lr_schedule = 'authors') -------------------
#
# The reference below is written from timm 0.5.4's scheduler/scheduler.py and
# scheduler/cosine_lr.py and the PYRA authors' train.py, not from our code: it
# runs their loop literally, per parameter group, in numpy (float64).

def _timm_cosine_lrs(base_lrs, *, epochs, warmup, warmup_lr, min_lr,
                     steps_per_epoch):
  """(steps, groups) learning rates of every training step of the authors' loop.

  timm's `create_scheduler(args, optimizer)` with sched='cosine' builds
  `CosineLRScheduler(t_initial=args.epochs, lr_min=args.min_lr,
  warmup_lr_init=args.warmup_lr, warmup_t=args.warmup_epochs, k_decay=1,
  cycle_mul=1, cycle_decay=0.1, cycle_limit=1, noise off)`; t_in_epochs and
  warmup_prefix keep their defaults (True, False).
  """
  base = np.asarray(base_lrs, np.float64)  # each group's initial lr: its base value
  # Scheduler.__init__ sets every group to its base value; with warm-up,
  # CosineLRScheduler.__init__ then sets every group to warmup_lr_init.
  if warmup:
    warmup_steps = (base - warmup_lr) / warmup
    group_lr = np.full_like(base, warmup_lr)
  else:
    warmup_steps = np.ones_like(base)
    group_lr = base.copy()

  def get_lr(t):  # CosineLRScheduler._get_lr
    if t < warmup:
      return warmup_lr + t * warmup_steps
    i = t // epochs                      # cycle_mul == 1
    t_i, t_curr = epochs, t - epochs * i
    lr_max = base * 0.1 ** i             # cycle_decay ** i
    if i < 1:                            # cycle_limit
      return min_lr + 0.5 * (lr_max - min_lr) * (1 + np.cos(np.pi * t_curr ** 1.0 / t_i ** 1.0))
    return np.full_like(base, min_lr)

  out = []
  for epoch in range(epochs):            # train.py: for epoch in range(start_epoch, epochs)
    out += [group_lr.copy()] * steps_per_epoch  # train_one_epoch: every step at the current lr
    group_lr = get_lr(epoch)             # train.py:484 lr_scheduler.step(epoch), after the epoch
  return np.stack(out)


def _authors_config(**kw):
  c = _config(lr=1e-3, pyra_lr=3e-4, diffrate_lr=2e-2, warmup_init_lr=1e-6,
              min_lr=1e-5, lr_schedule='authors', **kw)
  c.model.diffrate_search = True  # so make_optimizer also returns the diffrate group's
  return c


@pytest.mark.parametrize('epochs,warmup,spe', [(10, 2, 3), (6, 0, 2), (12, 5, 1), (100, 10, 1)])
def test_authors_schedule_is_timm_cosine_stepped_per_epoch_one_epoch_late(epochs, warmup, spe):
  c = _authors_config(num_epochs=epochs, warmup_epochs=warmup)
  _, sched = optim.make_optimizer(c, steps_per_epoch=spe)
  want = _timm_cosine_lrs([1e-3, 3e-4, 2e-2], epochs=epochs, warmup=warmup,
                          warmup_lr=1e-6, min_lr=1e-5, steps_per_epoch=spe)
  steps = np.arange(epochs * spe)
  for g, name in enumerate(('lr', 'pyra_lr', 'diffrate_lr')):
    got = np.array([float(sched[name](s)) for s in steps])
    np.testing.assert_allclose(got, want[:, g], rtol=1e-5, err_msg=name)  # float32 cosine
    # Constant within an epoch; epochs 0 and 1 at the same value (the late step).
    per_epoch = got.reshape(epochs, spe)
    assert (per_epoch == per_epoch[:, :1]).all()
    assert per_epoch[0, 0] == per_epoch[1, 0]
  if warmup:  # warmup_init_lr is absolute: every group starts there (min_lr too,
    # which the reference's last epochs check: the groups' ends differ by far less
    # than their peaks' ratios).
    assert float(sched['pyra_lr'](0)) == pytest.approx(1e-6) == float(sched['diffrate_lr'](0))


def test_authors_schedule_at_the_papers_recipe():
  """100 epochs, 10 of warm-up: the lr never reaches 1e-3 (the warm-up lies
  inside the cosine's span): 9.758e-4 at its top, in epoch 11 (from 0)."""
  c = _authors_config(num_epochs=100, warmup_epochs=10)
  _, sched = optim.make_optimizer(c, steps_per_epoch=1)
  lrs = np.array([float(sched['lr'](e)) for e in range(100)])
  top = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 10 / 100))  # t = 10
  assert lrs.argmax() == 11 and lrs.max() == pytest.approx(top, rel=1e-6) and top < 9.76e-4
  assert lrs[0] == lrs[1] == pytest.approx(1e-6)
  assert lrs[2] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 10, rel=1e-6)
  last = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 98 / 100))  # t = 98
  assert lrs[-1] == pytest.approx(last, rel=1e-5) and 1.09e-5 < last < 1.10e-5


def test_authors_schedule_is_what_adamw_applies_per_group():
  """With a constant gradient Adam's step is lr * g / (|g| + eps) at every step
  (the bias corrections cancel), so each step's update on a 1-D leaf reveals
  the lr the optimiser used, per group."""
  epochs, warmup, spe = 6, 2, 2
  c = _authors_config(num_epochs=epochs, warmup_epochs=warmup, weight_decay=0.0)
  tx, _ = optim.make_optimizer(c, steps_per_epoch=spe)
  want = _timm_cosine_lrs([1e-3, 3e-4, 2e-2], epochs=epochs, warmup=warmup,
                          warmup_lr=1e-6, min_lr=1e-5, steps_per_epoch=spe)
  p, g = _params(), _params(seed=1)
  state = tx.init(p)
  update = jax.jit(tx.update)
  leaves = ('head/bias', f'{BLOCK}/pyra/norm/bias', f'{BLOCK}/diffrate/prune_logits')
  for step in range(epochs * spe):
    updates, state = update(g, state, p)
    for col, key in enumerate(leaves):
      gk = np.asarray(_flat(g)[key], np.float64)
      lr = -np.asarray(_flat(updates)[key], np.float64) / (gk / (np.abs(gk) + 1e-8))
      np.testing.assert_allclose(lr, want[step, col], rtol=1e-4, err_msg=f'{key} step {step}')


def test_unknown_lr_schedule_is_refused():
  with pytest.raises(optim.ConfigError, match="lr_schedule = 'per_epoch'"):
    optim.make_optimizer(_config(lr_schedule='per_epoch'), steps_per_epoch=5)
