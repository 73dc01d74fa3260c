"""LTMP and DiffRate (Table 14; docs/algorithm.md §17) against numpy transcriptions.

The references (tests/helpers/reference_methods.py) are loops written from the methods'
original code (LTMP's [A, B] token order, DiffRate's unclamped sizes at fixed
rates). Also: the class token is never dropped or merged, one compilation
per method, the FLOPs regulariser, bad settings through the command line, and a
killed DiffRate search that a rerun continues.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax import schedules
from pyra_jax.configs import common
from pyra_jax.methods import diffrate
from pyra_jax.methods import ltmp
from pyra_jax.methods.base import AttentionRequest
from pyra_jax.models import vit
from pyra_jax.models.peft import PeftSettings
from tests.helpers import reference_methods as ref
from tests.helpers.cli import ROOT, cli, one_sentence, reset_flags, run_main
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import jit_features, random_params, tiny_config

def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# LTMP
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('num_protected', [1, 2])
def test_ltmp_block_matches_the_numpy_transcription(num_protected):
  rng = _rng(num_protected)
  b, n, d, c = 3, 15, 8, 6
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
  mask = (rng.random((b, n)) > 0.25).astype(np.float32)
  mask[:, :num_protected] = 1.0
  # Metrics that make some pairs very similar, so both outcomes occur.
  metric = rng.normal(size=(b, n, c)).astype(np.float32)
  metric[:, 2::2] += 2.0 * metric[:, 1:-1:2]
  importance = rng.random((b, n)).astype(np.float32) / n
  merge_t, prune_t = 0.8, 0.5 / n
  want = ref.ltmp_block(x, size, mask, metric, importance, merge_t, prune_t, num_protected)
  got = ltmp.merge_then_prune(
      jnp.asarray(x), jnp.asarray(size), jnp.asarray(mask), jnp.asarray(metric),
      jnp.asarray(importance), jnp.float32(merge_t), jnp.float32(prune_t), tau=0.1,
      num_protected=num_protected)
  np.testing.assert_array_equal(np.asarray(got.mask), want[2])
  np.testing.assert_allclose(np.asarray(got.size), want[1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got.x), want[0], rtol=1e-5, atol=1e-6)
  # Both decisions happened, and the protected tokens stayed.
  assert 0 < want[2].sum() < want[2].size
  assert (np.asarray(got.mask)[:, :num_protected] == 1).all()
  assert (mask - want[2] > 0).any()


def test_ltmp_masks_are_hard_forward_with_the_sigmoid_gradient():
  scores = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
  tau = 0.1
  np.testing.assert_array_equal(np.asarray(ltmp.threshold_mask(scores, 0.4, tau)), [0, 1, 1])
  grad = jax.grad(lambda t: ltmp.threshold_mask(scores, t, tau).sum())(jnp.float32(0.4))
  sig = 1 / (1 + np.exp(-(np.array([0.1, 0.5, 0.9]) - 0.4) / tau))
  np.testing.assert_allclose(float(grad), float((-sig * (1 - sig) / tau).sum()), rtol=1e-5)


@pytest.mark.parametrize('eps', [0.0, 1e-5])
def test_masked_softmax_matches_the_numpy_transcription(eps):
  rng = _rng(3)
  logits = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
  mask = (rng.random((2, 7)) > 0.4).astype(np.float32)
  mask[:, 0] = 1
  got = ltmp.masked_softmax(jnp.asarray(logits), jnp.asarray(mask), eps)
  np.testing.assert_allclose(np.asarray(got), ref.masked_softmax(logits, mask, eps),
                             rtol=1e-5, atol=1e-7)


def test_ltmp_flops_fraction_equals_the_token_count_flops_counter():
  # Kept fractions that are whole token counts: the fraction must be the
  # FLOPs of those counts (counted by the schedule counter) over full.
  n, d, depth = 20, 16, 4
  counts = [20, 15, 11, 6]
  kept = [c / n for c in counts]
  sched = [n - counts[0]] + [counts[i - 1] - counts[i] for i in range(1, depth)]
  full = schedules.vit_flops([0] * depth, num_tokens=n, width=d)
  want = schedules.vit_flops(sched, num_tokens=n, width=d) / full
  got = float(ltmp.flops_ratio(kept, num_tokens=n, width=d))
  assert got == pytest.approx(want, rel=1e-12)
  # And by the per-block definition.
  per_block = [ref.block_flops(([n] + counts)[i], counts[i], d) for i in range(depth)]
  assert got == pytest.approx(sum(per_block) / (depth * ref.block_flops(n, n, d)))


def _tiny_model(method, **overrides):
  c = tiny_config(f'method={method}', model=overrides)
  return c, vit.build_model(c.model, num_classes=10)


def test_ltmp_with_thresholds_that_never_fire_is_the_uncompressed_model():
  """Merge threshold 1 (cosine <= 1) and prune threshold 0 (attention > 0):
  every mask stays 1 and LTMP computes exactly the model without reduction."""
  _, model = _tiny_model('ltmp', ltmp_merge_init=1.0, ltmp_prune_init=0.0)
  _, peft = _tiny_model('peft')
  x = jnp.asarray(_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)({'params': jax.random.key(0)}, x)['params']
  out, state = jax.jit(lambda p: model.apply({'params': p}, x, mutable=['intermediates']))(
      params)
  for i in range(2):
    assert (np.asarray(state['intermediates']['Transformer'][f'mask_{i}'][0]) == 1).all()
  strip = lambda t: {k: strip(v) for k, v in t.items() if k != 'ltmp'} if isinstance(t, dict) else t
  want = jax.jit(lambda p: peft.apply({'params': p}, x))(strip(params))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_ltmp_class_token_stays_and_the_regulariser_reaches_the_thresholds():
  c, model = _tiny_model('ltmp', ltmp_merge_init=0.3, ltmp_prune_init=0.05)
  x = jnp.asarray(_rng(5).normal(size=(4, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)({'params': jax.random.key(0)}, x)['params']
  _, state = jax.jit(lambda p: model.apply({'params': p}, x,
                                           mutable=['intermediates', 'losses']))(params)
  inter = state['intermediates']['Transformer']
  masks = [np.asarray(inter[f'mask_{i}'][0]) for i in range(2)]
  assert all((m[:, 0] == 1).all() for m in masks)
  assert masks[-1].sum() < masks[-1].size  # something was reduced
  frac = float(inter['flops_fraction'][0])
  want = float(ltmp.flops_ratio([m.mean() for m in masks], num_tokens=17, width=32,
                                mlp_ratio=2.0))
  assert frac == pytest.approx(want, rel=1e-6)
  penalty = float(state['losses']['Transformer']['flops_penalty'])
  assert penalty == pytest.approx(
      c.model.ltmp_flops_weight * (frac - c.model.ltmp_flops_target) ** 2, rel=1e-5)

  def loss(p):
    _, st = model.apply({'params': p}, x, mutable=['losses'])
    return st['losses']['Transformer']['flops_penalty']
  g = jax.jit(jax.grad(loss))(params)
  gt = [float(g['Transformer'][f'encoderblock_{i}']['ltmp'][k][0])
        for i in range(2) for k in ('merge_threshold', 'prune_threshold')]
  assert any(v != 0.0 for v in gt) and all(np.isfinite(gt))


def test_ltmp_model_follows_the_original_token_order():
  """Three blocks, thresholds that merge and prune: the class feature equals
  the numpy model in which every block returns its A tokens, then its B
  tokens (so the next split is drawn on that order), as LTMP's code."""
  c, model = _tiny_model('ltmp', depth=3)
  x = jnp.asarray(_rng(11).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = random_params(model, x, 1, merge_threshold=0.2, prune_threshold=0.05)
  got, state = jit_features(model, params, x)
  masks = [np.asarray(state['intermediates']['Transformer'][f'mask_{i}'][0]) for i in range(3)]
  assert 0 < masks[-1].sum() < masks[-1].size / 2  # merging and pruning happened
  want = ref.vit_forward(params, np.asarray(x, np.float64), method='ltmp',
                         num_heads=c.model.num_heads, depth=3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_threshold_projection_clamps_only_ltmp_thresholds():
  tree = {'Transformer': {'encoderblock_0': {
      'ltmp': {'merge_threshold': jnp.asarray([1.3]), 'prune_threshold': jnp.asarray([-0.2])},
      'lora': {'a': jnp.asarray([5.0])}}}}
  out = ltmp.project_thresholds(tree)['Transformer']['encoderblock_0']
  assert float(out['ltmp']['merge_threshold'][0]) == 1.0
  assert float(out['ltmp']['prune_threshold'][0]) == 0.0
  assert float(out['lora']['a'][0]) == 5.0


# ---------------------------------------------------------------------------
# Class-token attention (shared Attention field)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('implementation', ['einsum', 'dot_product_attention'])
def test_class_attention_is_the_softmax_of_the_class_query(implementation):
  rng = _rng(6)
  b, n, d, h = 2, 9, 16, 4
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  size = jnp.asarray(rng.integers(1, 4, size=(b, n, 1)), jnp.float32)
  no_peft = common.get_base_config().model
  no_peft.lora_rank = 0
  attn = vit.Attention(num_heads=h, qkv_bias=True, dtype=jnp.float32,
                       peft=PeftSettings.from_config(no_peft, width=d, mlp=4 * d),
                       implementation=implementation,
                       request=AttentionRequest(cls_attn=True))
  params = attn.init(jax.random.key(1), x, size, train=False)['params']
  _, attended = attn.apply({'params': params}, x, size, train=False)
  cls = attended.cls_attn
  p = jax.device_get(params)
  xn, sn = np.asarray(x, np.float64), np.asarray(size, np.float64)
  q = np.einsum('bnd,dhk->bnhk', xn, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('bnd,dhk->bnhk', xn, p['key']['kernel']) + p['key']['bias']
  want = np.zeros((b, h, n))
  for bi in range(b):
    for hi in range(h):
      logits = [np.dot(q[bi, 0, hi], k[bi, j, hi]) / np.sqrt(d // h) + np.log(sn[bi, j, 0])
                for j in range(n)]
      e = np.exp(np.array(logits) - max(logits))
      want[bi, hi] = e / e.sum()
  np.testing.assert_allclose(np.asarray(cls), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# DiffRate
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('prune_kept,merge_kept,num_protected', [
    (13, 8, 1), (17, 17, 1), (17, 6, 1), (11, 7, 2)])
def test_diffrate_block_matches_the_numpy_transcription(prune_kept, merge_kept, num_protected):
  rng = _rng(prune_kept + merge_kept)
  b, n, d, h = 3, 17, 8, 2
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
  cls_attn = rng.random((b, h, n)).astype(np.float32)
  want_x, want_s = ref.diffrate_block(x, size, cls_attn, prune_kept, merge_kept, num_protected)
  got_x, got_s, _ = diffrate.compress(
      jnp.asarray(x), jnp.asarray(size), None, jnp.asarray(cls_attn),
      prune_kept=prune_kept, merge_kept=merge_kept, num_protected=num_protected)
  assert got_x.shape == (b, merge_kept, d)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5)
  # The protected prefix is never moved, merged or dropped.
  np.testing.assert_array_equal(np.asarray(got_x)[:, :num_protected], x[:, :num_protected])


def test_diffrate_model_at_fixed_rates_scales_sizes_unclamped():
  """Fixed rates (the deployed forward): sources add size * similarity to their
  destination, with no clamp at 1, as DiffRate's eval path; the class feature
  equals the numpy model of that path after three compressing blocks."""
  c, model = _tiny_model('diffrate', depth=3, diffrate_rates='15,12,8;13,9,5')
  x = jnp.asarray(_rng(12).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = random_params(model, x, 2)
  got, state = jit_features(model, params, x)
  sizes = np.asarray(state['intermediates']['Transformer']['size_0'][0])
  # Clamped, every merged source would add 1 (similarity < 1): whole sizes.
  assert (sizes != np.round(sizes)).any()
  want = ref.vit_forward(params, np.asarray(x, np.float64), method='diffrate',
                         num_heads=c.model.num_heads, depth=3,
                         diffrate_kept=model.reducer.kept)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_diffrate_sizes_that_would_be_non_positive_are_floored():
  """A source pointing away from its only possible destination (cosine -1)
  takes its size from it: 1 + 1 * (-1) = 0, whose log the method's code leaves
  undefined; ours floors it at the smallest normal float (a key of no weight)."""
  x = jnp.asarray([[[1.0, 0.0], [2.0, 0.0], [-3.0, 0.0]]], jnp.float32)
  size = jnp.ones((1, 3, 1), jnp.float32)
  cls_attn = jnp.asarray([[[0.2, 0.5, 0.3]]], jnp.float32)
  _, s, _ = diffrate.compress(x, size, None, cls_attn, prune_kept=3, merge_kept=2,
                              num_protected=1)
  assert float(s[0, 1, 0]) == np.finfo(np.float32).tiny
  assert np.isfinite(np.log(np.asarray(s))).all()


def test_diffrate_flops_loss_in_the_authors_form():
  """`diffrate_flops_loss='authors'`: 5 * (GMACs - target GMACs)^2, GMACs as
  DiffRate's code counts them (blocks 4NC^2 + 2N^2C + 8N'C^2, patch embedding,
  classifier), at zero rate logits (every layer at the mean candidate) and
  the target at the configured ratio."""
  c, model = _tiny_model('diffrate', diffrate_search=True, diffrate_flops_ratio=1.2,
                         diffrate_flops_loss='authors', mlp_dim=128)
  x = jnp.asarray(_rng(13).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = random_params(model, x, 3, prune_logits=0.0, merge_logits=0.0)
  penalty = lambda m, p: jax.jit(lambda p: m.apply({'params': p}, x, mutable=['losses'])[1])(
      p)['losses']['Transformer']['flops_penalty']
  got = float(penalty(model, params))
  n0, dim, classes = 17, 32, 10
  cands = [16, 12, 8, 4]  # granularity 4 of 16 patches; uniform p: mean 10
  kept = math.ceil(sum(cands) / len(cands)) + 1

  def macs(counts):  # their calculate_flop_training, blocks then embedding, head
    n, total = n0, 0.0
    for k in counts:
      total += 4 * n * dim ** 2 + 2 * n * n * dim
      n = min(n, k)
      total += 8 * n * dim ** 2
    return total + n0 * dim * (8 * 8 * 3) + dim * classes

  full_blocks = macs([n0, n0]) - macs([])
  target = (macs([]) + full_blocks / 1.2) / 1e9
  want = 5.0 * (macs([n0, kept]) / 1e9 - target) ** 2
  assert got == pytest.approx(want, rel=1e-4)
  # The same gap in the 'ratio' form is weighted 100 on the fraction instead.
  _, ratio_model = _tiny_model('diffrate', diffrate_search=True, diffrate_flops_ratio=1.2,
                               mlp_dim=128)
  frac = (macs([n0, kept]) - macs([])) / full_blocks
  assert float(penalty(ratio_model, params)) == pytest.approx(
      100.0 * (frac - 1 / 1.2) ** 2, rel=1e-4)


def test_diffrate_search_mask_is_hard_forward_with_the_keep_probability_gradient():
  cands = diffrate.candidates(8, 2)          # 8, 6, 4, 2 patches
  np.testing.assert_array_equal(cands, [8, 6, 4, 2])
  logits = jnp.asarray([0.3, -0.2, 0.5, 0.1], jnp.float32)
  p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum()
  kept = diffrate.expected_kept(logits, cands, 1)
  assert float(kept) == np.ceil(np.dot(cands, p)) + 1
  m = diffrate.ddp_mask(logits, cands, kept, jnp.float32(9), 9, 1)
  np.testing.assert_array_equal(np.asarray(m), [1.0] * int(kept) + [0.0] * (9 - int(kept)))
  # d mask_j / d logits = d P(kept > j) / d logits, P from the definition.
  def prob(a):
    q = np.exp(a) / np.exp(a).sum()
    return np.array([sum(q[k] for k in range(4) if j < cands[k] + 1) for j in range(9)])
  jac = jax.jacobian(lambda a: diffrate.ddp_mask(a, cands, kept, jnp.float32(9), 9, 1))(logits)
  num = np.zeros((9, 4))
  a0 = np.asarray(logits, np.float64)
  for k in range(4):
    e = np.zeros(4)
    e[k] = 1e-5
    num[:, k] = (prob(a0 + e) - prob(a0 - e)) / 2e-5
  np.testing.assert_allclose(np.asarray(jac), num, atol=1e-4)


def test_diffrate_search_step_hard_forward_equals_fixed_rate_compression():
  """With masks of the counts the logits stand for, the search's forward keeps
  (as active tokens) exactly what the fixed-rate block keeps."""
  rng = _rng(7)
  b, n, d, h = 2, 17, 8, 2
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  size = jnp.ones((b, n, 1), jnp.float32)
  cls_attn = jnp.asarray(rng.random((b, h, n)), jnp.float32)
  cands = diffrate.candidates(16, 1)
  prune_logits = jnp.zeros(16).at[4].set(30.0)   # ~ 12 patches kept
  merge_logits = jnp.zeros(16).at[8].set(30.0)   # ~ 8 patches kept
  xs, ss, mask, pk, mk = diffrate.search_step(
      x, size, jnp.ones((b, n)), cls_attn, prune_logits, merge_logits, cands, num_protected=1)
  pk, mk = int(pk), int(mk)
  assert (pk, mk) == (13, 9)
  np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(
      np.arange(n) < mk, (b, n)).astype(np.float32))
  # The search is the original's training path: sizes clamped at >= 1.
  want_x, want_s = ref.diffrate_block(np.asarray(x), np.asarray(size), np.asarray(cls_attn),
                                      pk, mk, 1, clamp=True)
  np.testing.assert_allclose(np.asarray(xs)[:, :mk], want_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ss)[:, :mk], want_s, rtol=1e-5)


def test_diffrate_rates_fix_the_token_counts_and_the_flops():
  c, model = _tiny_model('diffrate', diffrate_rates='17,13;15,9')
  assert model.reducer.kept == ((17, 15), (13, 9))
  assert vit.num_tokens(model, 32) == [17, 15, 9]
  x = jnp.asarray(_rng(8).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)({'params': jax.random.key(0)}, x)['params']
  _, state = jax.jit(lambda p: model.apply({'params': p}, x, mutable=['intermediates']))(
      params)
  sizes = state['intermediates']['Transformer']
  assert sizes['size_0'][0].shape == (2, 15, 1) and sizes['size_1'][0].shape == (2, 9, 1)
  # Uncompressed rates: exactly the model without reduction.
  _, full = _tiny_model('diffrate', diffrate_rates='17,17;17,17')
  _, peft = _tiny_model('peft')
  logits = lambda m: np.asarray(jax.jit(lambda p: m.apply({'params': p}, x))(params))
  np.testing.assert_allclose(logits(full), logits(peft), rtol=1e-6)


@pytest.mark.parametrize('method,overrides', [
    ('ltmp', {}), ('diffrate', {'diffrate_rates': '17,13;15,9'}),
    ('diffrate', {'diffrate_search': True, 'diffrate_flops_ratio': 1.1})])
def test_one_compilation_per_method(method, overrides):
  _, model = _tiny_model(method, **overrides)
  x = jnp.asarray(_rng(9).normal(size=(4, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)({'params': jax.random.key(0)}, x)['params']
  traces = []

  @jax.jit
  def step(p, images):
    traces.append(1)
    def loss(p):
      out, st = model.apply({'params': p}, images, train=True, mutable=['losses'],
                            rngs={'dropout': jax.random.key(0)})
      return out.sum() + sum(jax.tree.leaves(st))
    return jax.grad(loss)(p)
  for seed in range(3):
    g = step(params, x + seed)
  assert len(traces) == 1
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))


def test_searched_rates_are_the_expected_counts_and_round_trip_through_the_file(tmp_path):
  a = [np.zeros(16, np.float32), np.zeros(16, np.float32)]
  a[0][0] = 40.0  # all mass on keeping 16 patches
  a[1][15] = 40.0  # all mass on keeping 1 patch
  rates = diffrate.final_rates([tuple(a)], num_patches=16, num_protected=1, granularity=1)
  assert rates == [(17, 17), (17, 2)]
  path = str(tmp_path / 'r.json')
  diffrate.write_rates(path, rates, num_tokens=17)
  assert diffrate.read_rates(path, depth=2, num_tokens=17, num_protected=1) == rates


# ---------------------------------------------------------------------------
# Through the command line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('args,message', [
    (['--config=configs/tiny.py:method=ltmp', '--config.model.ltmp_flops_target=0.01'],
     'model.ltmp_flops_target = 0.01: the FLOPs fraction to keep must lie between'),
    (['--config=configs/tiny.py:method=ltmp', '--config.model.ltmp_tau=0'],
     'model.ltmp_tau = 0'),
    (['--config=configs/tiny.py:method=diffrate', '--mode=search',
      '--config.model.diffrate_flops_loss=gflops'],
     "model.diffrate_flops_loss = 'gflops': use 'ratio'"),
    (['--config=configs/tiny.py:method=diffrate', '--mode=search',
      '--config.model.diffrate_flops_ratio=50'],
     'model.diffrate_flops_ratio = 50.0: the search can reach FLOPs ratios from 1 to'),
    (['--config=configs/tiny.py:method=diffrate'],
     'model.diffrate_rates is empty: run the search first'),
    (['--config=configs/tiny.py:method=diffrate', '--config.model.diffrate_rates=17,13;15'],
     'gives 2 prune and 1 merge counts but the model has 2 layers'),
    (['--config=configs/tiny.py:method=diffrate', '--config.model.diffrate_rates=17,1;15,9'],
     'kept count 1 (layer 1) is outside 2..17'),
    (['--config=configs/tiny.py:method=tome', '--mode=search'],
     "--mode=search finds DiffRate's rates, but model.method is 'tome'"),
])
def test_bad_settings_end_in_one_sentence(tmp_path, args, message):
  code, out, err = cli(*args, f'--workdir={tmp_path / "w"}', timeout=900)
  assert one_sentence(code, err), err
  assert message in err, err


def test_a_killed_search_is_continued_by_a_rerun_and_its_rates_train(tmp_path):
  require_offline_mnist()
  wd = tmp_path / 'search'
  args = ['--config=configs/tiny.py:method=diffrate', '--mode=search', f'--workdir={wd}',
          '--config.model.diffrate_flops_ratio=1.15', '--config.model.diffrate_search_epochs=4',
          '--config.checkpoint_every_steps=5', '--config.eval_every_epochs=0']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = subprocess.Popen([sys.executable, '-m', 'pyra_jax.main', *args], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 1200  # a loaded machine prepares the data slowly
    ckpts = wd / 'checkpoints'
    while not (ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 10
                                      for p in ckpts.iterdir())):
      assert time.time() < deadline and first.poll() is None, 'no checkpoint written'
      time.sleep(0.5)
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  assert not (wd / diffrate.RATES_FILE).exists()
  done = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  code, out, err = cli(*args, timeout=900)
  assert code == 0, err
  lines = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  steps = [l['step'] for l in lines if 'loss' in l]
  # The rate logits' own lr group is logged beside the base lr, and is its own.
  logged = [l for l in lines if 'loss' in l]
  assert all('diffrate_lr' in l for l in logged)
  assert max(l['diffrate_lr'] for l in logged) == pytest.approx(0.1, rel=0.05)
  assert max(l['lr'] for l in logged) == pytest.approx(3e-2, rel=0.05)
  assert min(steps) <= done + 1 and max(steps) == 100  # 4 epochs of 25 steps
  assert f'Resuming from {ckpts} at step' in err or 'Resuming' in err
  rates = json.loads((wd / diffrate.RATES_FILE).read_text())
  assert rates['search_step'] == 100 and len(rates['prune_kept']) == 2
  # The rate logits' own lr (config.diffrate_lr) carries the search to its
  # target: zero logits (the start) give 1.08 here, the candidates allow 1.18.
  assert rates['flops_ratio'] >= 0.97 * 1.15, rates
  assert rates['shortfall'] == '' and 'WARNING' not in out
  code, out, err = cli('--config=configs/tiny.py:method=diffrate', f'--workdir={tmp_path / "t"}',
                       f'--config.model.diffrate_rates={wd / diffrate.RATES_FILE}',
                       '--config.num_epochs=1', timeout=900)
  assert code == 0, err
  assert 'final accuracy' in out


def test_a_search_short_of_its_target_says_what_to_change():
  from pyra_jax.training import search  # pylint: disable=g-import-not-at-top
  c = tiny_config(diffrate_lr=0.02)
  assert search.shortfall_message(3.10, 3.17, c) == ''  # within 3 %
  msg = search.shortfall_message(1.79, 3.17, c)
  assert '1.79' in msg and '3.17' in msg
  assert '--config.diffrate_lr (now 0.02)' in msg
  assert '--config.model.diffrate_search_epochs' in msg
  # A renamed group: the message says diffrate_lr does not reach the logits.
  c.trainable = {'lora_head': c.trainable.lora_head, 'rates': r'.*/diffrate/.*'}
  msg = search.shortfall_message(1.79, 3.17, c)
  assert "no 'diffrate' group" in msg and '(now' not in msg


def test_ltmp_training_reports_both_flops_figures(tmp_path, capsys, monkeypatch):
  require_offline_mnist()
  wd = tmp_path / 'ltmp'
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=ltmp',
                            f'--workdir={wd}', '--config.num_epochs=1',
                            '--config.model.ltmp_flops_target=0.6',
                            '--config.model.ltmp_merge_init=0.5')
  reset_flags()
  assert code == 0, err
  assert 'static shapes run all tokens: 1.0' in out
  r = json.loads((wd / 'results.json').read_text())['ltmp']
  assert r['flops_fraction_run'] == 1.0
  tokens = r['mean_active_tokens']
  assert len(tokens) == 2 and 1 <= tokens[1] <= tokens[0] <= 17
  # Bounds from the definition: all layers at the final count (lowest) or at
  # the first layer's count (highest).
  lo = ltmp.flops_ratio([1.0 / 17] * 2, num_tokens=17, width=32, mlp_ratio=2.0)
  assert float(lo) <= r['effective_flops_fraction'] <= 1.0


@pytest.mark.parametrize('args,message', [
    ([], 'Error: give at least one of --ltmp=PATH'),
    (['--evit=/nonexistent/evit'], 'Error: --evit=/nonexistent/evit is not a directory'),
])
def test_the_originals_comparison_tool_refuses_bad_paths_in_one_sentence(args, message):
  """tools/originals_methods.py (run with torch beside the originals) checks its
  paths before importing anything heavy."""
  proc = subprocess.run([sys.executable, 'tools/originals_methods.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
