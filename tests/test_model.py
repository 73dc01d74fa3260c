"""The ViT with LoRA + merging + PYRA: end-to-end checks on tiny models."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax.configs.common import get_base_config
from pyra_jax import schedules
from pyra_jax.models import build_model
from pyra_jax.models.lora import fold_lora
from pyra_jax.models.vit import deployed_config, num_tokens
from tests.helpers import reference_merge as ref
from tests.helpers.models import IMAGE, images, init, randomize, tiny_model, to_np


@pytest.mark.parametrize('attention', ['einsum', 'dot_product_attention'])
@pytest.mark.parametrize('method', ['peft', 'tome', 'pyra'])
def test_forward_equals_numpy_reference(method, attention):
  cfg = tiny_model(method, attention=attention)
  model, params = init(cfg)
  params = randomize(params, r'lora/up|pyra/w_d|pyra/norm')
  x = images(2)
  got = jax.jit(lambda p: model.apply({'params': p}, x, train=False))(params)
  want = ref.vit_forward(to_np(params), np.asarray(x, np.float64), model.schedule,
                         num_heads=2, pyra=(method == 'pyra'))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_pyra_at_initialisation_is_exactly_tome():
  model, params = init(tiny_model('pyra'))
  tome_model = build_model(tiny_model('tome'))
  strip = lambda t: {k: strip(v) for k, v in t.items() if k != 'pyra'} if isinstance(t, dict) else t
  tome_params = strip(jax.tree_util.tree_map(lambda a: a, params))
  x = images(3)
  a = jax.jit(lambda p: model.apply({'params': p}, x))(params)
  b = jax.jit(lambda p: tome_model.apply({'params': p}, x))(tome_params)
  np.testing.assert_array_equal(a, b)
  moved = randomize(params, r'pyra/w_d')
  c = jax.jit(lambda p: model.apply({'params': p}, x))(moved)
  assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-4


@pytest.mark.parametrize('method', ['pyra', 'peft'])
def test_folded_lora_gives_the_same_logits(method):
  cfg = tiny_model(method)
  model, params = init(cfg)
  params = randomize(params, r'lora/|pyra/w_d')
  deployed = build_model(deployed_config(cfg))
  folded = fold_lora(params)
  assert 'lora' not in str(jax.tree_util.tree_structure(folded))
  x = images(2)
  a = np.asarray(jax.jit(lambda p: model.apply({'params': p}, x))(params), np.float64)
  b = np.asarray(jax.jit(lambda p: deployed.apply({'params': p}, x))(folded), np.float64)
  assert np.abs(a - b).max() / np.abs(a).max() <= 1e-5


def test_one_compilation_and_token_counts_follow_the_schedule():
  cfg = tiny_model('pyra', schedule='3,2,2')
  model, params = init(cfg)
  traces = []

  @jax.jit
  def forward(p, x):
    traces.append(1)
    return model.apply({'params': p}, x, mutable=['intermediates'])

  for seed in range(3):
    logits, state = forward(params, images(2, seed))
  assert len(traces) == 1
  counts = num_tokens(model, IMAGE)
  assert counts == [17, 14, 12, 10]
  inter = state['intermediates']['Transformer']
  for i in range(3):
    size = np.asarray(inter[f'size_{i}'][0])
    assert size.shape == (2, counts[i + 1], 1)
    np.testing.assert_array_equal(size.sum(1), np.full((2, 1), 17.0))


def test_source_tracing_from_the_model():
  cfg = tiny_model('tome', schedule='4,3,2')
  model = build_model(cfg, trace_source=True)
  params = jax.jit(lambda k: model.init(k, images(1)))(jax.random.PRNGKey(0))['params']
  _, state = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
      params, images(2))
  src = np.asarray(state['intermediates']['Transformer']['source_2'][0])
  assert src.shape == (2, 8, 17)
  np.testing.assert_array_equal(src.sum(1), np.ones((2, 17)))


def test_gradients_reach_exactly_the_trainable_parameters():
  cfg = tiny_model('pyra')
  model, params = init(cfg)
  params = randomize(params, r'lora/up|pyra/w_d')
  trainable = get_base_config().trainable
  patterns = [trainable.pyra, trainable.lora_head]
  x, y = images(4), jnp.array([0, 1, 2, 3])

  def loss(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

  grads = jax.jit(jax.grad(loss))(params)
  flat = {'/'.join(str(k.key) for k in path): g
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  chosen = {n for n in flat if any(re.fullmatch(p, n) for p in patterns)}
  expected = {n for n in flat if '/lora/' in n or '/pyra/' in n or n.startswith('head/')}
  assert chosen == expected
  assert any('pyra/w_r' in n for n in chosen) and any('pyra/norm' in n for n in chosen)
  last = f'encoderblock_{len(model.schedule) - 1}/pyra/'
  for name in expected:
    norm = float(jnp.abs(flat[name]).sum())
    if last in name:
      # The last block merges after attention; its MLP is per-token, so the class
      # token (all the head sees) cannot depend on that merge: no gradient.
      assert norm == 0.0, name
    else:
      assert norm > 0, f'no gradient reaches {name}'


def test_vit_b16_high_adds_9408_generator_parameters():
  cfg = get_base_config().model
  cfg.num_classes = 100
  model = build_model(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3))))['params']
  count = lambda pat: sum(int(np.prod(l.shape)) for path, l in
                          jax.tree_util.tree_flatten_with_path(shapes)[0]
                          if re.search(pat, '/'.join(str(k.key) for k in path)))
  assert model.schedule == schedules.NAMED_SCHEDULES['vitb_high']
  assert count(r'pyra/w_[rd]') == 12 * 768 + 192 == 9408
  assert count(r'pyra/norm') == 12 * 2 * 768
  assert count(r'/lora/') == 12 * (768 * 8 + 8 * 3 * 768)


@pytest.mark.parametrize('schedule,match', [
    ('1,1', r'2 entries but the model has 3 layers'),
    ('2,-1,0', r'layer 1 has r = -1'),
    ('9,4,1', r'layer 0 merges r = 9 tokens, but it receives 17 tokens'),
    ('4,4,5', r'layer 2 merges r = 5 tokens, but it receives 9 tokens .* at most 4'),
])
def test_bad_schedules_fail_at_construction_naming_the_layer(schedule, match):
  with pytest.raises(schedules.ScheduleError, match=match):
    build_model(tiny_model('pyra', schedule=schedule))


def test_bad_model_fields_fail_clearly():
  with pytest.raises(ValueError, match='model.method must be one of'):
    build_model(tiny_model(method='fast'))
  with pytest.raises(ValueError, match='model.modulation must be one of'):
    build_model(tiny_model(modulation='magic'))
  with pytest.raises(ValueError, match='not a multiple of the patch size'):
    build_model(tiny_model(image_size=36))
  with pytest.raises(ValueError, match='model.attention must be one of'):
    build_model(tiny_model(attention='flash'))


@pytest.mark.parametrize('method,prop_attn,distilled', [
    ('pyra', True, True), ('pyra', False, False)])
def test_dot_product_attention_equals_einsum_logits_and_lora_grads(method, prop_attn,
                                                                   distilled):
  """jax.nn.dot_product_attention is a drop-in for our einsum attention.

  Same parameter tree (a checkpoint of one loads in the other), same logits and
  the same gradient for every LoRA/PYRA/head parameter, in float32.
  """
  kw = dict(prop_attn=prop_attn, distilled=distilled, lora_dropout=0.0, drop_path=0.0)
  einsum_model, params = init(tiny_model(method, schedule='3,3,3', **kw))
  params = randomize(params, r'lora/|pyra/w_d|pyra/norm')
  jax_model, jax_params = init(tiny_model(method, schedule='3,3,3',
                                          attention='dot_product_attention', **kw))
  assert (jax.tree_util.tree_structure(jax_params) == jax.tree_util.tree_structure(params))
  assert jax.tree.map(jnp.shape, jax_params) == jax.tree.map(jnp.shape, params)
  x, y = images(3), jnp.array([0, 3, 4])

  def loss(model, p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean(), logits

  (_, a), ga = jax.jit(jax.value_and_grad(lambda p: loss(einsum_model, p), has_aux=True))(params)
  (_, b), gb = jax.jit(jax.value_and_grad(lambda p: loss(jax_model, p), has_aux=True))(params)
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  flat_a = jax.tree_util.tree_flatten_with_path(ga)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(gb)[0])
  checked = 0
  for path, g in flat_a:
    name = '/'.join(str(k.key) for k in path)
    if '/lora/' in name or '/pyra/' in name or name.startswith('head'):
      np.testing.assert_allclose(flat_b[path], g, rtol=1e-5, atol=1e-5, err_msg=name)
      checked += float(jnp.abs(g).sum()) > 0
  assert checked >= 6  # LoRA up/down of 3 blocks at least: a real comparison.


def test_dot_product_attention_in_bfloat16_matches_float32():
  """The jax.nn path accepts bfloat16 q/k/v with the log-size bias, close to float32."""
  cfg = tiny_model('pyra', schedule='3,3,3', attention='dot_product_attention')
  model, params = init(cfg)
  params = randomize(params, r'lora/|pyra/w_d')
  x = images(2)
  want = np.asarray(jax.jit(lambda p: model.apply({'params': p}, x))(params))
  bf16 = build_model(cfg, dtype='bfloat16')
  got = np.asarray(jax.jit(lambda p: bf16.apply({'params': p}, x))(params), np.float32)
  assert np.abs(got - want).max() <= 0.05 * np.abs(want).max() + 0.02


def test_distilled_model_protects_both_tokens_and_has_two_heads():
  cfg = tiny_model('pyra', schedule='3,3,3', distilled=True)
  model, params = init(cfg)
  assert params['dist'].shape == (1, 1, 32) and 'head_dist' in params
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 18, 32)
  forward = jax.jit(lambda p: model.apply({'params': p}, images(2)))
  logits = forward(params)
  np.testing.assert_allclose(logits, forward(params))
  avg = build_model(tiny_model('pyra', schedule='3,3,3', distilled=True, distilled_eval='avg'))
  assert not np.allclose(jax.jit(lambda p: avg.apply({'params': p}, images(2)))(params), logits)


@pytest.mark.parametrize('distilled', [False, True])
def test_features_are_what_the_head_reads(distilled):
  # Merging on (PYRA, 3 + 2 + 2 tokens), random LoRA and generators.
  cfg = tiny_model('pyra', schedule='3,2,2', distilled=distilled)
  model, params = init(cfg)
  params = randomize(params, r'lora/up|pyra/w_d|pyra/norm')
  x = images(3)
  feats = jax.jit(lambda p: model.apply({'params': p}, x, features=True))(params)
  logits = jax.jit(lambda p: model.apply({'params': p}, x))(params)
  assert feats.shape == (3, 32) and feats.dtype == jnp.float32
  head = params['head']
  np.testing.assert_array_equal(feats @ head['kernel'] + head['bias'], logits)
  if not distilled:
    # An independent numpy forward with an identity head outputs the feature.
    ref_params = dict(to_np(params), head={'kernel': np.eye(32), 'bias': np.zeros(32)})
    want = ref.vit_forward(ref_params, np.asarray(x, np.float64), model.schedule,
                           num_heads=2, pyra=True)
    np.testing.assert_allclose(feats, want, rtol=2e-4, atol=2e-5)
    assert not np.allclose(want[0], want[1])  # Images differ: not a constant feature.
