"""The functional merge against the slow numpy reference (docs/algorithm.md §1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax import merge as merge_lib
from tests.helpers import reference_merge as ref


def _plans(plan):
  return [(list(s), list(d), list(u)) for s, d, u in
          zip(np.asarray(plan.src_idx), np.asarray(plan.dst_idx), np.asarray(plan.unm_idx))]


@pytest.mark.parametrize('num_tokens,r,distill', [(17, 5, False), (16, 7, False),
                                                   (18, 8, True), (11, 3, True)])
def test_matching_equals_reference(num_tokens, r, distill):
  rng = np.random.default_rng(num_tokens + r)
  metric = rng.normal(size=(3, num_tokens, 8)).astype(np.float32)
  plan = merge_lib.bipartite_soft_matching(jnp.asarray(metric), r, class_token=True,
                                           distill_token=distill)
  assert _plans(plan) == ref.match(metric, r, True, distill)


def test_protected_tokens_are_never_sources_or_destinations():
  rng = np.random.default_rng(0)
  metric = rng.normal(size=(4, 20, 8)).astype(np.float32)
  metric[:, 0] = metric[:, 1]  # class token identical to the distillation token
  plan = merge_lib.bipartite_soft_matching(jnp.asarray(metric), 9, distill_token=True)
  assert not np.any(np.asarray(plan.src_idx) == 0)  # class token = A[0]
  assert not np.any(np.asarray(plan.dst_idx) == 0)  # distillation token = B[0]
  assert np.all(np.asarray(plan.unm_idx)[:, 0] == 0)


def test_r_is_capped_at_half_the_unprotected_tokens():
  metric = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 4)), jnp.float32)
  plan = merge_lib.bipartite_soft_matching(metric, 100)
  assert plan.src_idx.shape == (2, 4)  # (9 - 1) // 2
  assert merge_lib.bipartite_soft_matching(metric, 0) is None


def _duplicate_heavy_metric(rng, b, n, c):
  """Most A tokens point at one B token, so several sources share a destination."""
  metric = rng.normal(size=(b, n, c)) * 0.1
  metric[:, 0::2] += rng.normal(size=(b, 1, c))
  metric[:, 3] = metric[:, 0::2].mean(1)  # B[1] is close to every A token
  return metric.astype(np.float32)


@pytest.mark.parametrize('distill', [False, True])
def test_size_weighted_merge_equals_reference_with_duplicate_destinations(distill):
  rng = np.random.default_rng(2)
  b, n, c, r = 3, 21, 6, 8
  metric = _duplicate_heavy_metric(rng, b, n, c)
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  size = rng.integers(1, 5, size=(b, n, 1)).astype(np.float32)
  plan = merge_lib.bipartite_soft_matching(jnp.asarray(metric), r, distill_token=distill)
  plans = _plans(plan)
  assert plans == ref.match(metric, r, True, distill)
  assert any(len(set(d)) < len(d) for _, d, _ in plans), 'test needs shared destinations'
  got_x, got_s = merge_lib.merge_wavg(jnp.asarray(x), jnp.asarray(size), plan,
                                      distill_token=distill)
  want_x, want_s = ref.merge_wavg(x, size, plans, distill)
  assert got_x.shape == (b, n - r, c)
  np.testing.assert_array_equal(got_s, want_s)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_s).sum(1), size.sum(1))  # mass kept


def test_pyra_modulation_equals_numpy_equations_on_size_weighted_tokens():
  rng = np.random.default_rng(3)
  b, n, c, r = 2, 15, 8, 6
  metric = rng.normal(size=(b, n, c)).astype(np.float32)
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
  w_r = rng.uniform(-1, 1, size=(r, 1)).astype(np.float32)
  w_d = rng.normal(size=(1, c)).astype(np.float32)
  scale = rng.normal(1, 0.2, size=(c,)).astype(np.float32)
  bias = rng.normal(0, 0.2, size=(c,)).astype(np.float32)
  plan = merge_lib.bipartite_soft_matching(jnp.asarray(metric), r)
  modulate = lambda s, d: merge_lib.pyra_modulation(s, d, w_r, w_d, scale, bias, 1e-5)
  got_x, got_s = merge_lib.merge_wavg(jnp.asarray(x), jnp.asarray(size), plan,
                                      modulate=modulate)
  np_mod = lambda s, d: ref.pyra_modulate(s, d, w_r, w_d, scale, bias, 1e-5)
  want_x, want_s = ref.merge_wavg(x.astype(np.float64), size, _plans(plan), modulate=np_mod)
  tome_x, _ = ref.merge_wavg(x.astype(np.float64), size, _plans(plan))
  assert np.abs(want_x - tome_x).max() > 1e-2  # the modulation really changes tokens
  np.testing.assert_array_equal(got_s, want_s)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)


def test_pyra_with_zero_w_d_is_exactly_tome():
  rng = np.random.default_rng(4)
  src = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  dst = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  out = merge_lib.pyra_modulation(src, dst, jnp.asarray(rng.uniform(-1, 1, (5, 1)), jnp.float32),
                                  jnp.zeros((1, 8)), jnp.ones(8), jnp.zeros(8))
  np.testing.assert_array_equal(out, src)


def test_source_tracing_partitions_the_input_patches():
  rng = np.random.default_rng(5)
  b, n = 2, 13
  x = jnp.asarray(rng.normal(size=(b, n, 4)), jnp.float32)
  source = jnp.broadcast_to(jnp.eye(n), (b, n, n))
  for r in (4, 3):
    plan = merge_lib.bipartite_soft_matching(x, r)
    want = ref.merge(np.asarray(source), _plans(plan), reduce='max')
    x, _ = merge_lib.merge_wavg(x, jnp.ones(x.shape[:2] + (1,)), plan)
    source = merge_lib.merge_source(source, plan)
    np.testing.assert_array_equal(source, want)
  # Every input patch is held by exactly one output token; the class token alone.
  np.testing.assert_array_equal(np.asarray(source).sum(1), np.ones((b, n)))
  np.testing.assert_array_equal(np.asarray(source)[:, 0, 0], np.ones(b))


def test_merge_jits_vmaps_and_differentiates():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 11, 4)), jnp.float32)
  w_d = jnp.asarray(rng.normal(size=(1, 4)), jnp.float32)
  w_r = jnp.asarray(rng.normal(size=(3, 1)), jnp.float32)

  def f(x, w_r, w_d):
    plan = merge_lib.bipartite_soft_matching(x, 3)
    mod = lambda s, d: merge_lib.pyra_modulation(s, d, w_r, w_d, jnp.ones(4), jnp.zeros(4))
    y, _ = merge_lib.merge_wavg(x, jnp.ones(x.shape[:2] + (1,)), plan, modulate=mod)
    return (y ** 2).sum()

  g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, w_r, w_d)
  assert all(float(jnp.abs(t).sum()) > 0 for t in g)
  per_sample = jax.vmap(lambda xi: f(xi[None], w_r, w_d))(x)
  np.testing.assert_allclose(per_sample.sum(), f(x, w_r, w_d), rtol=1e-5)
