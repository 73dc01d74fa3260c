"""colabs/own_vit.ipynb's code, run at small shapes: ToMe/PYRA added to a Flax ViT of one's own.

The notebook is the documented way to use `pyra_jax.merge` and `PyraGenerator`
in a model that is not ours. Executing it through a kernel costs a minute, so
this runs its code cells in-process (its Colab setup cell aside) with the
parameters cell's shapes made small, then checks its claims against the
numpy transcription of ToMe/PYRA (tests/helpers/reference_merge.py), which knows
nothing of pyra_jax: the example's ViT is written in the parameter layout that
reference reads. tests/test_notebooks.py checks that the notebook is what
colabs/make_notebooks.py writes.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest

from pyra_jax import merge as merge_lib
from tests.helpers import reference_merge as ref

NOTEBOOK = Path(__file__).resolve().parents[1] / 'colabs' / 'own_vit.ipynb'
# 16 px in patches of 4: 16 patches + the class token = 17 tokens.
# One merging block (each costs about a second of compilation in each of the
# notebook's five programs); the second block's attention sees merged sizes.
SMALL = dict(IMAGE_SIZE=16, PATCH_SIZE=4, WIDTH=32, DEPTH=2, NUM_HEADS=2, MLP_DIM=64,
             SCHEDULE=(4, 0), BATCH=4, TRAIN_STEPS=2, TIME_ROUNDS=1)


@pytest.fixture(scope='module')
def example() -> Iterator[dict]:
  """The notebook's namespace after its code ran at SMALL shapes (and its output)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cells = [c for c in nb.cells if c.cell_type == 'code']
  params = [c for c in cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1 and cells[0] is params[0]
  setup = [c for c in cells if 'def requirements_to_install' in c.source]
  assert len(setup) == 1  # Installs pyra_jax on Colab; here it is importable already.
  # A module of its own, as a notebook's __main__ (dataclasses look classes' modules up).
  module = types.ModuleType('own_vit_notebook')
  sys.modules[module.__name__] = module
  scope = module.__dict__
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      exec(params[0].source, scope)  # pylint: disable=exec-used
      assert set(SMALL) <= set(scope), set(SMALL) - set(scope)
      scope.update(SMALL)
      for cell in cells[1:]:
        if cell is not setup[0]:
          exec(cell.source, scope)  # pylint: disable=exec-used
    scope['printed'] = out.getvalue()
    yield scope
  finally:
    del sys.modules[module.__name__]


def _np_params(params) -> dict:
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params['params'])


def _reference_logits(example: dict, params, schedule, *, pyra: bool) -> np.ndarray:
  return ref.vit_forward(_np_params(params), np.asarray(example['images'], np.float64),
                         schedule, num_heads=SMALL['NUM_HEADS'], prop_attn=True, pyra=pyra)


def test_unmerged_is_the_users_vit_and_the_reference(example):
  """r = 0 everywhere: the user's weights give the user's logits (flax's own
  attention), and the reference's."""
  want = _reference_logits(example, example['params'], (0,) * SMALL['DEPTH'], pyra=False)
  np.testing.assert_allclose(np.asarray(example['logits']), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(example['unmerged_logits']), want, rtol=1e-4, atol=1e-5)


def test_tome_equals_the_reference(example):
  """ToMe's matching on head-mean keys, size-weighted merge, proportional attention."""
  want = _reference_logits(example, example['params'], SMALL['SCHEDULE'], pyra=False)
  got = np.asarray(example['tome_logits'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Merging changed the logits: the equalities here are not those of a no-op.
  assert np.abs(got - np.asarray(example['unmerged_logits'])).max() > 1e-3


def test_pyra_at_init_is_tome_bit_for_bit_and_trained_pyra_equals_the_reference(example):
  assert np.array_equal(np.asarray(example['pyra_logits']), np.asarray(example['tome_logits']))
  trained = example['trained']
  got = np.asarray(example['forward']['pyra'](trained, example['images']))
  want = _reference_logits(example, trained, SMALL['SCHEDULE'], pyra=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.abs(got - np.asarray(example['tome_logits'])).max() > 1e-4  # Trained: not ToMe.


def test_only_the_generators_are_added_sized_by_each_blocks_r(example):
  added = {'/'.join(k): v.shape for k, v in example['added'].items()}
  d = SMALL['WIDTH']
  want = {}
  for i, r in enumerate(SMALL['SCHEDULE']):
    if r:
      p = f'Transformer/encoderblock_{i}/pyra'
      want.update({f'{p}/w_r': (r, 1), f'{p}/w_d': (1, d), f'{p}/norm/scale': (d,),
                   f'{p}/norm/bias': (d,)})
  assert added == want
  assert all(not np.any(np.asarray(v)) for k, v in example['added'].items() if k[-1] == 'w_d')


def test_token_counts_follow_the_schedule(example):
  n = (SMALL['IMAGE_SIZE'] // SMALL['PATCH_SIZE']) ** 2 + 1
  want = []
  for r in SMALL['SCHEDULE']:
    n -= min(r, (n - 1) // 2)  # At most half of the tokens but the class token.
    want.append(n)
  assert example['tokens'] == want == [13, 13]
  assert f'tokens per block: {want}' in example['printed']


def test_the_training_step_compiles_once_and_trains_the_generators(example):
  assert len(example['traces']) == 1 and len(example['losses']) == SMALL['TRAIN_STEPS'] > 1
  assert all(np.isfinite(example['losses']))
  assert {k[0] for k in example['trainable']} == {'head', 'Transformer'}
  assert all(k[0] == 'head' or 'pyra' in k for k in example['trainable'])
  blocks = example['trained']['params']['Transformer']
  for i, r in enumerate(SMALL['SCHEDULE']):
    assert ('pyra' in blocks[f'encoderblock_{i}']) == (r > 0)
    if r:  # W_D left zero: the generators got gradients through the class token.
      assert float(jnp.abs(blocks[f'encoderblock_{i}']['pyra']['w_d']).max()) > 0
  frozen = example['frozen']
  flat = {k: v for k, v in jax.tree_util.tree_flatten_with_path(example['params'])[0]}
  assert len(frozen) == len(flat) - 2  # Everything but the head's kernel and bias.


def test_the_speed_cell_times_all_three_models(example):
  flops = example['flops']
  assert set(example['seconds']) == {'unmerged', 'tome', 'pyra'}
  assert flops['tome'] < flops['unmerged'] and flops['pyra'] > flops['tome']
  assert 'speed-up' in example['printed']


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """softmax(q k^T / sqrt(hd)) v for one sample: q (T, H, hd), k and v (S, H, hd)."""
  logits = np.einsum('thd,shd->hts', q, k) / np.sqrt(q.shape[-1])
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('hts,shd->thd', e / e.sum(-1, keepdims=True), v)


def test_log_size_bias_is_proportional_attention():
  """A key of size s weighs as s copies of itself: attention with the bias over
  merged keys equals plain attention over the keys repeated `size` times."""
  rng = np.random.default_rng(0)
  b, n, h, hd = 2, 5, 3, 4
  q = rng.normal(size=(b, 7, h, hd)).astype(np.float32)
  k = rng.normal(size=(b, n, h, hd)).astype(np.float32)
  v = rng.normal(size=(b, n, h, hd)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
  bias = merge_lib.log_size_bias(jnp.asarray(size))
  assert bias.shape == (b, 1, 1, n)
  got = np.asarray(jax.nn.dot_product_attention(q, k, v, bias=bias))
  for i in range(b):
    reps = size[i, :, 0].astype(int)
    want = _softmax_attention(q[i].astype(np.float64), np.repeat(k[i], reps, axis=0),
                              np.repeat(v[i], reps, axis=0))
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)
  assert merge_lib.log_size_bias(None) is None
  ones = merge_lib.log_size_bias(jnp.ones((b, n, 1)))
  assert not np.any(np.asarray(ones))  # Unmerged tokens: exactly no bias.
