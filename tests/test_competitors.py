"""EViT, ToFu and ATS (docs/algorithm.md §16) against slow numpy transcriptions
of their definitions, plus the model-level properties every method must have:
the class (and distillation) token survives, one compilation, clear errors.

The references below loop over samples and tokens and are written from the
methods' definitions (the papers), not from pyra_jax/methods/.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax import schedules
from pyra_jax.configs import paper
from pyra_jax.configs import common
from pyra_jax.methods import ats as ats_lib
from pyra_jax.methods import evit as evit_lib
from pyra_jax.methods import tofu as tofu_lib
from pyra_jax.methods.base import AttentionRequest
from pyra_jax.models import vit
from pyra_jax.models.peft import PeftSettings
from tests.helpers import reference_merge as ref
from tests.helpers import reference_methods as ref_methods
from tests.helpers.cli import reset_flags, run_main
from tests.helpers.models import jit_features, random_params, tiny_config


def softmax(z, axis=-1):
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def random_cls_attn(rng, b, h, n):
  return softmax(rng.normal(size=(b, h, n)) * 2.0).astype(np.float32)


# --------------------------------------------------------------------------- #
# EViT
# --------------------------------------------------------------------------- #

def evit_reference(x, cls_attn, keep, num_protected):
  """EViT for each sample: top-`keep` by head-mean class attention (highest
  first, ties to the lower index), the rest fused as sum_i a_i x_i, appended."""
  outs = []
  for xb, ab in zip(x, cls_attn):
    n = xb.shape[0]
    a = [float(np.mean(ab[:, j])) for j in range(n)]
    others = list(range(num_protected, n))
    order = sorted(others, key=lambda j: (-a[j], j))
    kept, rest = order[:keep], order[keep:]
    fused = np.zeros(xb.shape[1])
    for j in rest:
      fused += a[j] * xb[j]
    rows = [xb[j] for j in range(num_protected)] + [xb[j] for j in kept] + [fused]
    outs.append(np.stack(rows))
  return np.stack(outs)


@pytest.mark.parametrize('num_protected,keep', [(1, 5), (2, 3), (1, 1)])
def test_evit_matches_its_definition(num_protected, keep):
  rng = np.random.default_rng(num_protected + keep)
  x = rng.normal(size=(3, 11, 6)).astype(np.float32)
  attn = random_cls_attn(rng, 3, 4, 11)
  got = np.asarray(evit_lib.evit_reorganize(jnp.asarray(x), jnp.asarray(attn), keep,
                                            num_protected=num_protected))
  want = evit_reference(x, attn, keep, num_protected)
  assert got.shape == (3, num_protected + keep + 1, 6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[:, :num_protected], x[:, :num_protected])


def test_evit_token_counts_follow_its_keep_rate():
  # ViT-B/16 at 224: 196 patches + class token; keep ceil(0.7 M) of the M
  # unprotected tokens (the fused token counts among them later) + 1 fused.
  m1 = 196
  k1 = math.ceil(0.7 * m1)               # 138 kept + fused -> 140 tokens
  m2 = k1 + 1
  k2 = math.ceil(0.7 * m2)               # 98 -> 100
  m3 = k2 + 1
  k3 = math.ceil(0.7 * m3)               # 70 -> 72
  want = [197] * 4 + [k1 + 2] * 3 + [k2 + 2] * 3 + [k3 + 2] * 3
  kw = vit.model_kwargs(paper.evit_own_config('vitb').model, num_classes=10)
  assert schedules.token_counts(kw['reducer'].schedule, 197) == want
  assert want[4:] == [140] * 3 + [100] * 3 + [72] * 3
  kw = vit.model_kwargs(paper.evit_own_config('vitl').model, num_classes=10)
  assert [l for l, r in enumerate(kw['reducer'].schedule) if r] == [6, 12, 18]


def test_evit_at_keep_one_less_than_all_still_reorganises():
  """Keep rate 0.87 on 16 image tokens: layer 0 keeps 14 (+ the fused token:
  one fewer token), layers 1 and 2 keep 14 of 15, i.e. all but one: EViT's
  code still sorts them and fuses the least attended one (weighted by its
  attention) there. The class feature equals the numpy model of that code."""
  m = tiny_config('method=evit', model=dict(depth=3, evit_layers='0,1,2', evit_keep_rate=0.87,
                                            evit_match_flops=False)).model
  model = vit.build_model(m, num_classes=10)
  assert model.schedule == (1, 0, 0)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = random_params(model, x, 3)
  got, _ = jit_features(model, params, x)
  want = ref_methods.vit_forward(params, np.asarray(x, np.float64),
                                 method='evit', num_heads=m.num_heads, depth=3,
                                 evit_keep_rate=0.87, evit_layers=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # Layers 1-2 matter: with them left alone (keep = all) the feature differs.
  alone = ref_methods.vit_forward(params, np.asarray(x, np.float64),
                                  method='evit', num_heads=m.num_heads, depth=3,
                                  evit_keep_rate=0.87, evit_layers=(0,))
  assert np.abs(alone - want).max() > 1e-3


@pytest.mark.parametrize('level', ['low', 'high'])
def test_evit_keep_rate_matches_the_levels_flops(level):
  cfg = paper.paper_config('vitb', level, 'method=evit')
  assert cfg.model.evit_match_flops
  kw = vit.model_kwargs(cfg.model, num_classes=10)
  flops = lambda s: schedules.vit_flops(s, num_tokens=197, width=768)
  target = flops(schedules.NAMED_SCHEDULES[f'vitb_{level}'])
  assert abs(flops(kw['reducer'].schedule) - target) <= 0.05 * target
  assert {l for l, r in enumerate(kw['reducer'].schedule) if r} <= {3, 6, 9}


# --------------------------------------------------------------------------- #
# ToFu
# --------------------------------------------------------------------------- #

def tofu_reference(x, size, plans, prune_layer, distill_token):
  """ToFu for each sample, from its definition: each B token's group is itself
  plus the A sources matched to it. Pruning keeps the B token as it is; MLERP
  takes the size-weighted mean of the group and rescales it to the group's
  largest norm. Output order as ToMe's: kept A tokens, then the B tokens."""
  xs, ss = [], []
  for xb, sb, (src, dst, unm) in zip(x, size, plans):
    a, b = xb[0::2], xb[1::2]
    sa, sbb = sb[0::2], sb[1::2]
    new_b, new_s = [], []
    for j in range(len(b)):
      members = [(b[j], sbb[j])] + [(a[i], sa[i]) for i, d in zip(src, dst) if d == j]
      if prune_layer or len(members) == 1:
        new_b.append(b[j]); new_s.append(sbb[j])
        continue
      total = sum(float(s[0]) for _, s in members)
      mean = sum(t * float(s[0]) for t, s in members) / total
      biggest = max(float(np.linalg.norm(t)) for t, _ in members)
      new_b.append(mean * biggest / float(np.linalg.norm(mean)))
      new_s.append(np.array([total]))
    kept_a = [(a[i], sa[i]) for i in unm]
    if distill_token:
      rows = [kept_a[0], (new_b[0], new_s[0])] + kept_a[1:] + list(zip(new_b[1:], new_s[1:]))
    else:
      rows = kept_a + list(zip(new_b, new_s))
    xs.append(np.stack([t for t, _ in rows]))
    ss.append(np.stack([s for _, s in rows]))
  return np.stack(xs), np.stack(ss)


@pytest.mark.parametrize('prune_layer', [True, False])
@pytest.mark.parametrize('distill_token', [False, True])
def test_tofu_matches_its_definition(prune_layer, distill_token):
  rng = np.random.default_rng(int(prune_layer) + 2 * int(distill_token))
  b, n, c, r = 2, 13, 5, 4
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
  metric = rng.normal(size=(b, n, 3)).astype(np.float32)
  # Make several sources share a destination, so groups of 3+ occur.
  metric[:, 1::2][:, 2] = metric[:, 0::2][:, 2:5].mean(axis=1)
  got_x, got_s, plan = tofu_lib.tofu(jnp.asarray(x), jnp.asarray(size), jnp.asarray(metric),
                                     r, prune_layer=prune_layer, distill_token=distill_token)
  plans = ref.match(metric, r, class_token=True, distill_token=distill_token)
  want_x, want_s = tofu_reference(x, size, plans, prune_layer, distill_token)
  assert got_x.shape == (b, n - r, c)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-6)
  # The class token (and the distillation token) pass through untouched (up
  # to the round-off of ToMe's x * size / size in merging layers).
  np.testing.assert_allclose(np.asarray(got_x[:, 0]), x[:, 0], rtol=1e-6, atol=1e-7)
  if distill_token:
    np.testing.assert_allclose(np.asarray(got_x[:, 1]), x[:, 1], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- #
# ATS
# --------------------------------------------------------------------------- #

def ats_reference(x, mask, cls_attn, value_norm, k, num_protected):
  """ATS for each sample, from its definition; returns the list of the original
  token indices it keeps (distinct, in sampling order)."""
  kept_all = []
  for xb, mb, ab, vb in zip(x, mask, cls_attn, value_norm):
    n = xb.shape[0]
    cand = list(range(num_protected, n))
    raw = {j: float(ab[:, j].sum()) * float(vb[j]) * float(mb[j, 0]) for j in cand}
    total = sum(raw.values())
    score = {j: raw[j] / total for j in cand}
    order = sorted(cand, key=lambda j: (score[j], j))  # ascending, stable
    cdf, run = [], 0.0
    for j in order:
      run += score[j]
      cdf.append(run)
    lo, hi = cdf[0], cdf[-1]
    cdf = [(v - lo) / (hi - lo) for v in cdf]
    start = min(v for v in cdf if v > 0)
    ys = [start + i * (1 - start) / (k - 1) for i in range(k)] if k > 1 else [1.0]
    kept = []
    for y in ys:
      best = min(range(len(cdf)), key=lambda i: (abs(y - cdf[i]), i))
      j = order[best]
      if j not in kept and mb[j, 0] > 0:
        kept.append(j)
    kept_all.append(kept)
  return kept_all


@pytest.mark.parametrize('num_protected,k', [(1, 8), (2, 5), (1, 12)])
def test_ats_matches_its_definition(num_protected, k):
  rng = np.random.default_rng(k)
  b, n, c, h = 3, 14, 4, 2
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  mask = np.ones((b, n, 1), np.float32)
  mask[0, [4, 9]] = 0.0  # slots masked by an earlier ATS layer
  # Peaked scores, so that several points pick the same token.
  attn = softmax(rng.normal(size=(b, h, n)) * 4.0 + np.log(np.maximum(mask[:, None, :, 0], 1e-30)))
  vnorm = rng.uniform(0.5, 2.0, size=(b, n)).astype(np.float32)
  got_x, got_mask = ats_lib.ats_sample(jnp.asarray(x), jnp.asarray(mask),
                                       jnp.asarray(attn, jnp.float32), jnp.asarray(vnorm), k,
                                       num_protected=num_protected)
  got_x, got_mask = np.asarray(got_x), np.asarray(got_mask)
  assert got_x.shape == (b, num_protected + k, c) and got_mask.shape == (b, num_protected + k, 1)
  want = ats_reference(x, mask, attn, vnorm, k, num_protected)
  assert any(len(w) < k for w in want)  # duplicates did collapse somewhere
  for i in range(b):
    np.testing.assert_array_equal(got_x[i, :num_protected], x[i, :num_protected])
    assert np.all(got_mask[i, :num_protected] == 1)
    live = [s for s in range(num_protected, num_protected + k) if got_mask[i, s, 0] > 0]
    assert len(live) == len(want[i])
    np.testing.assert_array_equal(got_x[i, live], x[i, want[i]])


def test_ats_layers_sample_all_tokens_where_the_schedule_removes_none():
  """`model.ats_layers` (ATS's own setting): a layer that removes nothing by
  the schedule still samples, with K = all its image tokens; the live slots
  are the distinct picks of the definition, from that layer's class attention
  and value norms."""
  m = tiny_config('method=ats', model=dict(schedule='none', ats_layers='1')).model
  model = vit.build_model(m, num_classes=10)
  assert model.schedule == (0, 0)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 32, 32, 3)), jnp.float32)
  params = random_params(model, x, 4)
  state = jax.jit(lambda p, x: model.apply(
      {'params': p}, x, mutable=['intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'MultiHeadDotProductAttention_0')[1])(
          params, x)
  inter = state['intermediates']['Transformer']
  assert 'size_0' not in inter  # layer 0 does not sample
  live = np.asarray(inter['size_1'][0])[..., 0]
  assert live.shape == (3, 17)
  _, attended = inter['encoderblock_1']['MultiHeadDotProductAttention_0']['__call__'][0]
  cls_attn, vnorm = attended.cls_attn, attended.value_norm
  want = ats_reference(np.zeros((3, 17, 1)), np.ones((3, 17, 1)), np.asarray(cls_attn),
                       np.asarray(vnorm), 16, 1)
  assert [int(v) for v in live[:, 1:].sum(axis=1)] == [len(w) for w in want]
  assert any(len(w) < 16 for w in want)  # repeated picks were masked


def test_class_attention_is_the_first_row_of_attention():
  """Attention's cls_attn = softmax over keys of q_0 k_j / sqrt(hd) + log size_j,
  from the parameters by hand, for both attention implementations."""
  rng = np.random.default_rng(0)
  b, n, d, h = 2, 7, 8, 2
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  size = jnp.asarray(rng.integers(1, 4, size=(b, n, 1)), jnp.float32)
  for impl in vit.ATTENTION_IMPLEMENTATIONS:
    no_peft = common.get_base_config().model
    no_peft.lora_rank = 0
    mod = vit.Attention(num_heads=h, qkv_bias=True, dtype=jnp.float32,
                        peft=PeftSettings.from_config(no_peft, width=d, mlp=4 * d),
                        implementation=impl,
                        request=AttentionRequest(cls_attn=True, value_norm=True))
    params = mod.init(jax.random.PRNGKey(1), x, size, train=False)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                          params)
    _, attended = mod.apply(params, x, size, train=False)
    cls_attn, vnorm = attended.cls_attn, attended.value_norm
    p = params['params']
    proj = lambda name: (np.asarray(x) @ np.asarray(p[name]['kernel']).reshape(d, d)
                         + np.asarray(p[name]['bias']).reshape(d))
    q, k, v = proj('query'), proj('key'), proj('value')
    hd = d // h
    for bi in range(b):
      for hi in range(h):
        sl = slice(hi * hd, (hi + 1) * hd)
        logits = [float(q[bi, 0, sl] @ k[bi, j, sl]) / math.sqrt(hd)
                  + math.log(float(size[bi, j, 0])) for j in range(n)]
        np.testing.assert_allclose(np.asarray(cls_attn[bi, hi]), softmax(np.array(logits)),
                                   rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vnorm), np.linalg.norm(v, axis=-1), rtol=1e-5)


# --------------------------------------------------------------------------- #
# Whole models
# --------------------------------------------------------------------------- #

def whole_model(method, distilled=False):
  m = tiny_config(f'method={method}', model=dict(
      depth=3, schedule='3,2,2', distilled=distilled, evit_layers='0,2', evit_keep_rate=0.6,
      evit_match_flops=False, tofu_prune_layers=1)).model
  return vit.build_model(m, num_classes=10)


@pytest.mark.parametrize('method', ['evit', 'tofu', 'ats'])
def test_one_compilation_and_static_token_counts(method):
  """Two batches of different images through the jitted gradient (the training
  computation): one trace, and the class feature reflects every layer."""
  model = whole_model(method)
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32) for _ in range(3)]
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batches[0])['params']
  traces = []

  def loss(p, images):
    traces.append(1)
    return model.apply({'params': p}, images, train=True,
                       rngs={'dropout': jax.random.PRNGKey(0)}).sum()

  step = jax.jit(jax.value_and_grad(loss))
  for images in batches:
    value, grads = step(params, images)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  assert len(traces) == 1
  lora = grads['Transformer']['encoderblock_2']['MultiHeadDotProductAttention_0']['lora']
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(lora))


@pytest.mark.parametrize('method', ['evit', 'tofu', 'ats'])
def test_prefix_tokens_are_never_dropped_or_merged(method, distilled=True):
  """After the first block (which reduces in every method here) the prefix rows
  are exactly those of the same block without reduction: not dropped, merged,
  fused or moved."""
  model = whole_model(method, distilled)
  nored = model.clone(reducer=dataclasses.replace(
      model.reducer, schedule=(0,) * len(model.schedule)))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)['params']
  # Layer 0 reduces in every method here; the prefix rows after block 0 are
  # computed before any reduction could touch them, so they must be equal.
  p = 1 + int(distilled)
  feats = {}
  for name, m in (('reduced', model), ('full', nored)):
    first_block = jax.jit(lambda p, x, m=m: m.apply(
        {'params': p}, x, mutable=['intermediates'],
        capture_intermediates=lambda mdl, _: mdl.name == 'encoderblock_0')[1])
    state = first_block(params, images)
    feats[name] = state['intermediates']['Transformer']['encoderblock_0']['__call__'][0][0].x
  np.testing.assert_allclose(np.asarray(feats['reduced'][:, :p]),
                             np.asarray(feats['full'][:, :p]), rtol=1e-5, atol=1e-5)
  assert feats['reduced'].shape[1] == feats['full'].shape[1] - model.schedule[0]


@pytest.mark.parametrize('override,message', [
    ('--config.model.evit_keep_rate=1.0', 'model.evit_keep_rate must be between 0 and 1'),
    ('--config.model.evit_layers=0,5', 'model.evit_layers has layer 5, but the model has 2'),
    ('--config.model.evit_layers=0,x', "give 0-based layer numbers"),
])
def test_bad_evit_settings_fail_with_one_sentence(tmp_path, capsys, monkeypatch, override,
                                                  message):
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=evit',
                            f'--workdir={tmp_path}', override)
  reset_flags()
  assert code == 1 and message in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_unreachable_evit_flops_target_and_bad_tofu_layers_fail_with_one_sentence(
    tmp_path, capsys, monkeypatch):
  # 16 patches, EViT only at the last layer: the first layer alone costs more
  # than a third of the FLOPs, so 3x is out of reach.
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=evit',
                            f'--workdir={tmp_path}', '--config.model.evit_layers=1',
                            '--config.model.evit_match_flops=True',
                            "--config.model.schedule=8,4")
  reset_flags()
  assert code == 1 and 'cannot reach the FLOPs of model.schedule' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=tofu',
                            f'--workdir={tmp_path}/b', '--config.model.tofu_prune_layers=5')
  reset_flags()
  assert code == 1 and 'model.tofu_prune_layers must be an integer from 0 to' in err, err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
