"""Behaviour pinned by golden outputs written before a refactor (tests/golden/README.md).

Every method x PEFT module case gives the logits it gave then (eval and train mode,
the FLOPs penalty), and a checkpoint and an export written by that code restore
with the same logits: parameter names, initialisation, the merging and the stored
config's migration all stay as they were.
"""

import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pyra_jax import optim
from pyra_jax.models import vit
from pyra_jax.training import export as export_lib
from pyra_jax.training import setup
from tests.helpers.models import tiny_config

GOLDEN = Path(__file__).resolve().parent / 'golden'
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402  pylint: disable=wrong-import-position

EXPECTED = np.load(GOLDEN / 'logits.npz')
CASES = sorted(make_golden.cases())


def close(got, want, what):
  """Within 1e-6 of the golden value, relative to the output's scale."""
  tol = 1e-6 * max(1.0, float(np.abs(want).max()))
  err = float(np.abs(np.asarray(got, np.float32) - want).max())
  assert err <= tol, f'{what}: max |new - golden| = {err:.3g} > {tol:.3g}'


def test_every_case_has_its_golden_outputs():
  names = {k.split('/')[0] for k in EXPECTED.files}
  assert names == set(CASES)


@pytest.mark.parametrize('name', CASES)
def test_logits_equal_the_golden_ones(name):
  got = make_golden.run_case(make_golden.cases()[name])
  want = {k.split('/')[1]: EXPECTED[k] for k in EXPECTED.files if k.split('/')[0] == name}
  assert set(got) == set(want)
  for k in want:
    close(got[k], want[k], f'{name} {k}')


def test_a_checkpoint_and_an_export_of_the_earlier_code_restore_with_its_logits(tmp_path):
  run_dir = GOLDEN / 'tiny_run'
  want = np.load(run_dir / 'logits.npz')
  c = tiny_config(num_epochs=1, data=dict(eval_split='val200'), eval_batch_size=100,
                  model_init=str(run_dir / 'backbone.npz'))
  shutil.copytree(run_dir / 'checkpoints', tmp_path / 'checkpoints')
  run, trainable, step = setup.restore_run(c, str(tmp_path))
  assert step == 25
  logits = run.model.apply({'params': optim.merge_params(trainable, run.frozen)},
                           want['images'], train=False)
  close(logits, want['checkpoint'], 'checkpoint')
  params, cfg = export_lib.load_export(str(run_dir / 'export'))
  logits = vit.build_model(cfg.model).apply({'params': params}, want['images'], train=False)
  close(logits, want['export'], 'export')
