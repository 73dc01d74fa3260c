"""Data parallelism: 4 CPU devices give the losses and parameters of 1 device.

The 4-device side runs this file as a module in a subprocess, because
XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX is
imported. Both sides run the real train step of the tiny config (mesh, batch
sharding, replicated params, dropout keys) on the same synthetic batches; no
data pipeline, so no TensorFlow in the subprocess.
"""

import json
import os
import subprocess
import sys


import jax
import numpy as np
from flax import traverse_util

from pyra_jax.training import setup
from pyra_jax.training import steps
from tests.helpers.cli import ROOT
from tests.helpers.models import tiny_config

NUM_STEPS = 8


def run_steps(num_steps: int = NUM_STEPS) -> dict:
  """Trains the tiny model for a few steps on every visible device."""
  config = tiny_config()
  run = setup.setup(config, num_classes=10)
  _, _, tx_init = steps.make_optimizer(run, steps_per_epoch=25)
  step_fn = steps.make_train_step(run, steps_per_epoch=25)
  trainable = run.replicate(run.trainable)
  opt_state = run.replicate(jax.device_get(tx_init(run.trainable)))
  key = run.replicate(setup.dropout_key(config))
  rng = np.random.default_rng(0)
  losses, placed_on = [], set()
  for step in range(num_steps):
    b = config.batch_size
    batch = {'image': rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
             'label': rng.integers(0, 10, b).astype(np.int32),
             'mask': np.ones(b, bool)}
    batch = setup.shard(batch, run.batch_sharding)  # pylint: disable=protected-access
    placed_on.add(len(batch['image'].sharding.device_set))
    trainable, opt_state, m = step_fn(trainable, opt_state, run.frozen, batch,
                                      np.int32(step), key)
    losses.append(float(m['loss']))
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep='/')
  return {'devices': jax.device_count(), 'placed_on': sorted(placed_on),
          'losses': losses,
          'params': {k: np.asarray(v).ravel().tolist() for k, v in flat.items()}}


def test_four_devices_match_one_device():
  # Keep the parent's XLA_FLAGS; fast (less optimised) compilation is plenty
  # for 8 steps of a tiny model and halves this test's time.
  xla_flags = ' '.join([os.environ.get('XLA_FLAGS', ''),
                        '--xla_force_host_platform_device_count=4',
                        '--xla_backend_optimization_level=0']).strip()
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-m', 'tests.test_train_multidevice'], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  one = run_steps()  # Meanwhile, in this (single-device) process.
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  four = json.loads(out.strip().splitlines()[-1])
  assert (one['devices'], four['devices']) == (1, 4)
  assert four['placed_on'] == [4]  # The batch really was split over 4 devices.
  np.testing.assert_allclose(four['losses'][0], one['losses'][0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=0, atol=1e-5)
  for k, v in one['params'].items():
    np.testing.assert_allclose(four['params'][k], v, rtol=0, atol=1e-5, err_msg=k)


if __name__ == '__main__':
  print(json.dumps(run_steps()))
