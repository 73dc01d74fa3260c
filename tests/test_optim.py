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
                                'diffrate': 2e-3}
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
