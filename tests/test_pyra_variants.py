"""The modulation variants of the ablations (Tables 6-8, Fig. 6), module vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax.models.pyra import MODULATIONS, PyraGenerator
from tests import reference_merge as ref

R, D = 5, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  src = (rng.normal(size=(2, R, D)) * rng.integers(1, 4, (2, R, 1))).astype(np.float32)
  dst = rng.normal(size=(2, R, D)).astype(np.float32)
  return src, dst


def _init(kind, rank=1):
  gen = PyraGenerator(R, kind, rank)
  src, dst = _inputs()
  return gen, gen.init(jax.random.PRNGKey(0), src, dst)['params']


def _randomized(params, seed=1):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + 0.5 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _numpy(kind, p, src, dst):
  """Per-sample numpy transcription of the formulas in pyra_jax/models/pyra.py."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  out = []
  for s, d in zip(src.astype(np.float64), dst.astype(np.float64)):
    m = ref.layer_norm(s + d, p['norm']['scale'], p['norm']['bias'], 1e-5)
    sig = ref.sigmoid
    if kind in ('pyra', 'low_rank'):
      terms = []
      for k in range(p['w_r'].shape[1]):
        c = 2 * sig(np.einsum('r,rd->d', p['w_r'][:, k], m))[None, :]
        t = 2 * sig(m @ p['w_d'][k])[:, None] - 1
        terms.append(c * t)
      out.append(s + s * np.mean(terms, axis=0))
      continue
    zc = (np.einsum('r,rd->d', p['w_r'][:, 0], m)[None, :] if 'w_r' in p else None)
    zt = (m @ p['w_d'][0])[:, None] if 'w_d' in p else None
    if kind == 'no_sigmoid':
      out.append(s + s * (1 + zc) * zt)
    elif kind == 'wr_only':
      out.append(s + s * zc)
    elif kind == 'sigmoid_wr_only':
      out.append(s * 2 * sig(zc))
    elif kind == 'wd_only':
      out.append(s + s * zt)
    elif kind == 'sigmoid_wd_only':
      out.append(s + s * (2 * sig(zt) - 1))
    elif kind == 'full_matrix':
      out.append(s + s * (2 * sig(m * p['w_full']) - 1))
    elif kind == 'mlp':
      gelu = ref.gelu
      hc = gelu(np.einsum('rd,rh->hd', m, p['channel_fc1'])) * sig(np.einsum('rd,rh->hd', m, p['channel_gate']))
      zc = np.einsum('hd,hs->sd', hc, p['channel_fc2'])
      ht = gelu(m @ p['token_fc1']) * sig(m @ p['token_gate'])
      zt = ht @ p['token_fc2']
      out.append(s + s * 2 * sig(zc) * (2 * sig(zt) - 1))
  return np.stack(out)


@pytest.mark.parametrize('kind', MODULATIONS)
def test_variant_equals_its_numpy_formula(kind):
  rank = 3 if kind == 'low_rank' else 1
  gen, params = _init(kind, rank)
  params = _randomized(params)
  src, dst = _inputs(2)
  got = gen.apply({'params': params}, src, dst)
  np.testing.assert_allclose(got, _numpy(kind, params, src, dst), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got) - src).max() > 1e-3  # it modulates


@pytest.mark.parametrize('kind', [k for k in MODULATIONS if 'wr_only' not in k])
def test_variants_start_as_tome(kind):
  gen, params = _init(kind, 2 if kind == 'low_rank' else 1)
  src, dst = _inputs(3)
  np.testing.assert_array_equal(gen.apply({'params': params}, src, dst), src)


def test_low_rank_one_is_pyra():
  gen, params = _init('pyra')
  params = _randomized(params)
  src, dst = _inputs(4)
  low = PyraGenerator(R, 'low_rank', 1)
  np.testing.assert_array_equal(gen.apply({'params': params}, src, dst),
                                low.apply({'params': params}, src, dst))


def test_parameter_names_and_shapes():
  shapes = lambda k, s=1: jax.tree_util.tree_map(jnp.shape, _init(k, s)[1])
  assert shapes('pyra') == {'w_r': (R, 1), 'w_d': (1, D), 'norm': {'scale': (D,), 'bias': (D,)}}
  assert shapes('low_rank', 4)['w_r'] == (R, 4) and shapes('low_rank', 4)['w_d'] == (4, D)
  assert shapes('full_matrix')['w_full'] == (R, D)
  assert shapes('mlp')['token_fc1'] == (D, 4) and shapes('mlp')['channel_fc1'] == (R, 4)
