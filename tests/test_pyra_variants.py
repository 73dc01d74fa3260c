"""The modulation variants of the ablations (Tables 6-8, Fig. 6), module vs numpy.

The numpy side is transcribed from the paper's definitions, element by element
with loops (not from pyra_jax/models/pyra.py). Notation: M_s the r sources,
M_t their destinations, M = LN(M_s + M_t), δ_D[c] = Σ_i W_r[i] M[i, c] (one
weight per channel), δ_r[i] = Σ_c M[i, c] W_D[c] (one weight per source token),
g(z) = 2σ(z) − 1. Every variant is M_s[i, c] + (weight)[i, c] · M_s[i, c].
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax.configs.common import get_base_config
from pyra_jax.models.pyra import MODULATIONS, PyraGenerator
from tests.helpers import reference_merge as ref

R, D = 5, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  src = (rng.normal(size=(2, R, D)) * rng.integers(1, 4, (2, R, 1))).astype(np.float32)
  dst = rng.normal(size=(2, R, D)).astype(np.float32)
  return src, dst


def _generator(r, kind, rank=1):
  """The module with the base config's init and LayerNorm eps (it has no defaults)."""
  model = get_base_config().model
  return PyraGenerator(r, kind, rank, wr_init=model.wr_init, ln_eps=model.pyra_ln_eps)


def _init(kind, rank=1, r=R):
  gen = _generator(r, kind, rank)
  src = np.zeros((2, r, D), np.float32)
  return gen, gen.init(jax.random.PRNGKey(0), src, src)['params']


def _randomized(params, seed=1):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [l + 0.5 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _g(z):
  return 2.0 / (1.0 + math.exp(-z)) - 1.0


def _weight(kind, p, s, d):
  """The (r, D) weight w of M_s ← M_s + w ⊙ M_s, for one sample, from the definitions."""
  r, dim = s.shape
  if kind == 'full_matrix':  # Table 7: a learned W, no tokens, no LayerNorm.
    return np.array([[_g(p['w_full'][i, c]) for c in range(dim)] for i in range(r)])
  m = ref.layer_norm(s + d, p['norm']['scale'], p['norm']['bias'], 1e-5)
  if kind == 'mlp':  # Table 8: δ = fc2(GELU(fc1(M_i))) per token, D → 4 → D.
    w = np.empty((r, dim))
    for i in range(r):
      hidden = [ref.gelu(np.array(sum(m[i, c] * p['fc1'][c, k] for c in range(dim))))
                for k in range(p['fc1'].shape[1])]
      for c in range(dim):
        w[i, c] = _g(sum(hidden[k] * p['fc2'][k, c] for k in range(len(hidden))))
    return w
  if kind == 'low_rank':  # Fig. 6: W[c, i] = Σ_k δ_D[c, k] δ_r[k, i].
    s_rank = p['w_r'].shape[1]
    delta_d = [[sum(p['w_r'][j, k] * m[j, c] for j in range(r)) for k in range(s_rank)]
               for c in range(dim)]
    delta_r = [[sum(m[i, c] * p['w_d'][k, c] for c in range(dim)) for i in range(r)]
               for k in range(s_rank)]
    return np.array([[_g(sum(delta_d[c][k] * delta_r[k][i] for k in range(s_rank)))
                      for c in range(dim)] for i in range(r)])
  delta_d = ([sum(p['w_r'][j, 0] * m[j, c] for j in range(r)) for c in range(dim)]
             if 'w_r' in p else None)
  delta_r = ([sum(m[i, c] * p['w_d'][0, c] for c in range(dim)) for i in range(r)]
             if 'w_d' in p else None)
  w = np.empty((r, dim))
  for i in range(r):
    for c in range(dim):
      if kind == 'pyra':  # Eqs. 6-7: M̂ = 2σ(δ_D) ⊙ M_s, then g(δ_r) ⊙ M̂.
        w[i, c] = (_g(delta_d[c]) + 1.0) * _g(delta_r[i])
      elif kind == 'sigmoid_wr_only':  # Table 6, σ & W_r: Eq. 6 omitted.
        w[i, c] = _g(delta_d[c])
      elif kind == 'sigmoid_wd_only':  # Table 6, σ & W_D.
        w[i, c] = _g(delta_r[i])
      # Without σ (our reading): 2σ(z) → 1 + z, 2σ(z) − 1 → z.
      elif kind == 'wr_only':
        w[i, c] = delta_d[c]
      elif kind == 'wd_only':
        w[i, c] = delta_r[i]
      elif kind == 'no_sigmoid':
        w[i, c] = (1.0 + delta_d[c]) * delta_r[i]
      else:
        raise ValueError(kind)
  return w


def _numpy(kind, params, src, dst):
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  out = []
  for s, d in zip(src.astype(np.float64), dst.astype(np.float64)):
    out.append(s + _weight(kind, p, s, d) * s)
  return np.stack(out)


@pytest.mark.parametrize('kind', MODULATIONS)
def test_variant_equals_its_definition(kind):
  rank = 3 if kind == 'low_rank' else 1
  gen, params = _init(kind, rank)
  params = _randomized(params)
  src, dst = _inputs(2)
  got = gen.apply({'params': params}, src, dst)
  np.testing.assert_allclose(got, _numpy(kind, params, src, dst), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got) - src).max() > 1e-3  # it modulates


@pytest.mark.parametrize('kind', MODULATIONS)
def test_every_variant_starts_as_tome(kind):
  gen, params = _init(kind, 2 if kind == 'low_rank' else 1)
  src, dst = _inputs(3)
  np.testing.assert_array_equal(gen.apply({'params': params}, src, dst), src)


@pytest.mark.parametrize('kind', MODULATIONS)
def test_every_variant_can_leave_tome(kind):
  """The gradient at initialisation (or one step later) is not zero: it trains."""
  gen, params = _init(kind, 2 if kind == 'low_rank' else 1)
  src, dst = _inputs(5)
  target = jnp.asarray(np.random.default_rng(6).normal(size=src.shape), jnp.float32)
  loss = lambda p: jnp.sum(gen.apply({'params': p}, src, dst) * target)
  params = jax.tree_util.tree_map(lambda a, g: a - 0.1 * g, params, jax.grad(loss)(params))
  assert np.abs(np.asarray(gen.apply({'params': params}, src, dst)) - src).max() > 1e-4
  grads = jax.tree_util.tree_leaves(jax.grad(loss)(params))
  assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)  # every parameter learns


def test_full_matrix_does_not_depend_on_the_tokens():
  gen, params = _init('full_matrix')
  params = _randomized(params)
  src, dst = _inputs(7)
  _, other_dst = _inputs(8)
  a = gen.apply({'params': params}, src, dst)
  b = gen.apply({'params': params}, src, other_dst)
  np.testing.assert_array_equal(a, b)
  ratio = np.asarray(a) / src  # the same weight for every image of the batch
  np.testing.assert_allclose(ratio[1], ratio[0], rtol=1e-5)


def test_low_rank_is_not_pyra_without_the_channel_factor():
  """At s = 1 low_rank is g(δ_r δ_D), not PYRA's 2σ(δ_D) g(δ_r)."""
  params = _randomized(_init('pyra')[1])
  src, dst = _inputs(4)
  low = _generator(R, 'low_rank', 1).apply({'params': params}, src, dst)
  pyra = _generator(R, 'pyra', 1).apply({'params': params}, src, dst)
  assert np.abs(np.asarray(low) - np.asarray(pyra)).max() > 1e-3
  np.testing.assert_allclose(low, _numpy('low_rank', params, src, dst), rtol=1e-5, atol=1e-5)


def test_parameter_names_and_shapes():
  shapes = lambda k, s=1, r=R: jax.tree_util.tree_map(jnp.shape, _init(k, s, r)[1])
  norm = {'scale': (D,), 'bias': (D,)}
  assert shapes('pyra') == {'w_r': (R, 1), 'w_d': (1, D), 'norm': norm}
  assert shapes('low_rank', 4) == {'w_r': (R, 4), 'w_d': (4, D), 'norm': norm}
  assert shapes('full_matrix') == {'w_full': (R, D)}  # never sees tokens: no LayerNorm
  assert shapes('mlp') == {'fc1': (D, 4), 'fc2': (4, D), 'norm': norm}
  assert shapes('mlp', r=2) == shapes('mlp', r=7)  # Table 8's size does not depend on r
  assert shapes('sigmoid_wr_only') == shapes('wr_only') == {'w_r': (R, 1), 'norm': norm}
  assert shapes('sigmoid_wd_only') == shapes('wd_only') == {'w_d': (1, D), 'norm': norm}
  assert shapes('no_sigmoid') == shapes('pyra')


def test_no_sigmoid_at_init_is_the_plain_token_generator():
  """W_r starts at zero without σ: (1 + δ_D) is 1, not a random factor of either sign."""
  _, params = _init('no_sigmoid')
  w_d = jax.random.normal(jax.random.PRNGKey(2), (1, D))
  params = {**params, 'w_d': w_d}
  src, dst = _inputs(9)
  both = _generator(R, 'no_sigmoid').apply({'params': params}, src, dst)
  plain_wd = _generator(R, 'wd_only').apply(
      {'params': {'w_d': w_d, 'norm': params['norm']}}, src, dst)
  np.testing.assert_array_equal(both, plain_wd)
