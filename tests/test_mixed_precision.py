"""config.dtype='bfloat16': bfloat16 compute, float32 parameters, optimiser state and loss.

Mixed precision as accelerators run it: the matmuls of the forward and backward
pass take bfloat16 operands, while everything that accumulates across steps
(parameters, Adam moments) and the loss itself stay float32, so small updates
are not rounded away. The real training step of the tiny config is checked on a
synthetic batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pyra_jax.training import setup
from pyra_jax.training import steps
from tests.helpers.models import tiny_config


def _step(dtype: str):
  config = tiny_config(dtype=dtype)
  run = setup.setup(config, num_classes=10)
  step = steps.make_train_step(run, steps_per_epoch=25)
  tx_init = steps.make_optimizer(run, steps_per_epoch=25)[2]
  trainable = run.replicate(run.trainable)
  opt_state = run.replicate(jax.device_get(tx_init(run.trainable)))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(40, 32, 32, 3)).astype(np.float32),
           'label': rng.integers(0, 10, 40).astype(np.int32),
           'mask': np.ones(40, bool)}
  batch = setup.shard(batch, run.batch_sharding)  # pylint: disable=protected-access
  key = run.replicate(setup.dropout_key(config))
  new, new_opt, metrics = step(trainable, opt_state, run.frozen, batch, np.int32(0), key)
  return run, batch, key, new, new_opt, metrics


def _dot_dtypes(run, batch, key) -> list:
  """Operand dtypes of every matmul in the training loss's forward + backward."""
  def loss(trainable):
    return steps.training_loss(run.model, trainable, run.frozen, batch, key)[0]
  jaxpr = jax.make_jaxpr(jax.grad(loss))(run.trainable)
  found = []

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append(tuple(v.aval.dtype for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr.jaxpr)
  return found


def test_bfloat16_keeps_params_optimizer_state_and_loss_in_float32():
  run, batch, key, new, new_opt, metrics = _step('bfloat16')
  for tree in (run.trainable, jax.device_get(run.frozen), new, new_opt):
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
  assert metrics['loss'].dtype == jnp.float32 and metrics['grad_norm'].dtype == jnp.float32
  # The compute really is bfloat16: the backbone's matmuls (q/k/v, attention,
  # out, MLP, in both passes) take bfloat16 operands.
  dots = _dot_dtypes(run, batch, key)
  bf16 = [d for d in dots if all(t == jnp.bfloat16 for t in d)]
  assert len(bf16) >= 0.8 * len(dots), dots


def _grads(run, batch, key):
  def loss(trainable):
    return steps.training_loss(run.model, trainable, run.frozen, batch, key)[0]
  value, grads = jax.jit(jax.value_and_grad(loss))(run.trainable)
  return float(value), np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])


def test_bfloat16_loss_and_gradient_stay_close_to_float32():
  run32, batch, key, *_ = _step('float32')
  run16, *_ = _step('bfloat16')
  loss32, g32 = _grads(run32, batch, key)
  loss16, g16 = _grads(run16, batch, key)
  assert g16.dtype == np.float32
  # bfloat16 keeps 8 bits of mantissa: the loss agrees to ~1e-2 relative and
  # the gradient points the same way (same masks: same key, same shapes).
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  cosine = g16 @ g32 / np.linalg.norm(g16) / np.linalg.norm(g32)
  assert cosine > 0.99, cosine
  assert not np.array_equal(g16, g32)  # It did compute in another precision.
