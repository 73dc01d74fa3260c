"""SPViT (docs/algorithm.md §18) against a numpy transcription of its authors'
selector and package token (tests/reference_spvit_rap.py), and the model-level
properties: static kept counts, the class token kept, one compilation, bad
settings refused in one sentence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pyra_jax import schedules
from pyra_jax.configs import tiny
from pyra_jax.methods import spvit as spvit_lib
from pyra_jax.methods.base import Geometry
from pyra_jax.models import vit
from tests.helpers import reference_spvit_rap as ref
from tests.helpers.cli import reset_flags, run_main
from tests.helpers.models import load_setting


def _selector_params(rng, heads, hd):
  shapes = jax.eval_shape(lambda: spvit_lib.Selector(heads).init(
      jax.random.key(0), jnp.zeros((1, 3, heads * hd)), jnp.ones((1, 3))))['params']
  return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape) + (
      0.0 if len(s.shape) > 1 else 0.1)).astype(np.float32), shapes)


@pytest.mark.parametrize('heads,hd', [(2, 16), (3, 8)])
def test_selector_matches_the_original_predictor(heads, hd):
  rng = np.random.default_rng(heads)
  params = _selector_params(rng, heads, hd)
  x = rng.normal(size=(2, 7, heads * hd)).astype(np.float32)
  policy = (rng.random(size=(2, 7)) > 0.3).astype(np.float32)
  policy[:, 0] = 1
  log_s, soft_s, _ = spvit_lib.Selector(heads).apply({'params': params}, jnp.asarray(x),
                                                     jnp.asarray(policy))
  want_log, want_soft = ref.spvit_predictor(x, policy[..., None], params, heads)
  np.testing.assert_allclose(np.asarray(log_s), want_log, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(soft_s), want_soft, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('p_count', [0, 2])
def test_training_step_matches_the_original(p_count):
  """Hard Gumbel decisions from the same noise, the package token, the policy."""
  rng = np.random.default_rng(p_count)
  b, m, c = 2, 9, 6
  n = 1 + m + p_count
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  prev = (rng.random(size=(b, m, 1)) > 0.3).astype(np.float32)
  log_s = np.log(np.stack([v := rng.random(size=(b, m + p_count)), 1 - v], -1)).astype(np.float32)
  soft = np.exp(log_s)
  key = jax.random.key(3)
  g = np.asarray(jax.random.gumbel(key, log_s.shape, jnp.float32))
  keep = spvit_lib.gumbel_hard_keep(jnp.asarray(log_s), key)
  mask = np.concatenate([np.ones((b, 1)), prev[..., 0], np.ones((b, p_count))], 1)
  got_x, got_mask = spvit_lib.spvit_train_reduce(
      jnp.asarray(x), jnp.asarray(mask, jnp.float32), keep, jnp.asarray(soft[..., 0]),
      num_protected=1, num_packages=p_count)
  want_x, policy, _ = ref.spvit_train_step(x.astype(np.float64), prev, log_s, soft, g, p_count)
  np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_mask), policy[..., 0])


@pytest.mark.parametrize('p_count,keep', [(0, 3), (1, 5)])
def test_inference_keeps_the_best_and_packages_the_rest(p_count, keep):
  rng = np.random.default_rng(7 + keep)
  b, m, c = 3, 8, 5
  x = rng.normal(size=(b, 1 + m + p_count, c)).astype(np.float32)
  log_keep = rng.normal(size=(b, m + p_count)).astype(np.float32)
  soft_keep = rng.random(size=(b, m + p_count)).astype(np.float32)
  got = spvit_lib.spvit_prune(jnp.asarray(x), jnp.asarray(log_keep), jnp.asarray(soft_keep),
                              keep, num_protected=1, num_packages=p_count)
  want = ref.spvit_infer_step(x.astype(np.float64), log_keep, soft_keep, keep, p_count)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_ratio_loss_matches_the_original():
  rng = np.random.default_rng(0)
  geo = Geometry(depth=4, num_patches=16, num_protected=1, width=8, mlp_dim=16, num_heads=2)
  red = spvit_lib.SPViT(schedule=(0, 3, 2, 0), num_protected=1, layers=(1, 2),
                        ratios=(0.75, 0.5), keeps=(12, 9), num_heads=2, num_patches=16,
                        ratio_weight=2.0)
  decisions = [(rng.random(size=(3, 16)) > 0.4).astype(np.float32) for _ in range(2)]
  aux = [None, (jnp.asarray(decisions[0].mean(1)), jnp.full((3,), 14.0)),
         (jnp.asarray(decisions[1].mean(1)), jnp.full((3,), 11.0)), (None, jnp.full((3,), 11.0))]
  _, penalty = red.regulariser(aux, geo)
  want = ref.spvit_ratio_loss(decisions, (0.75, 0.5), 2.0)
  assert float(penalty) == pytest.approx(want, rel=1e-6)


def _model(**over):
  c = tiny.get_config('method=spvit')
  c.model.depth = 3
  for k, v in over.items():
    c.model[k] = v
  return c, vit.build_model(c.model, num_classes=10)


def test_static_counts_class_token_kept_one_compilation():
  c, model = _model(spvit_layers='1,2', spvit_keep_ratios='0.5,0.25')
  assert model.reducer.keeps == (8, 4)
  # 17 tokens; layer 1 keeps 8 patches + 1 package; layer 2 keeps 4 + 2 packages.
  assert vit.num_tokens(model, 32) == [17, 17, 10, 7]
  assert model.reducer.keeps == tuple(ref.spvit_keeps((0.5, 0.25), 16))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  v = jax.jit(lambda k: model.init({'params': k}, x))(jax.random.key(0))
  traces = []

  def feats(p, images):
    traces.append(1)
    return model.apply({'params': p}, images, features=True)
  f = jax.jit(feats)
  a = f(v['params'], x)
  f(v['params'], x[::-1])
  assert len(traces) == 1 and a.shape == (2, 32)
  # The class token is never scored: the selector sees the 16 (+ packages) others.
  sel = v['params']['Transformer']['encoderblock_1']['spvit']
  assert sel['senet_1']['kernel'].shape == (1, 2)
  # Training: masks, one package token per layer, a ratio loss.
  out, state = jax.jit(lambda p: model.apply(
      {'params': p}, x, train=True, rngs={'dropout': jax.random.key(2)},
      mutable=['losses', 'intermediates']))(v['params'])
  masks = state['intermediates']['Transformer']
  assert masks['mask_1'][0].shape == (2, 18) and masks['mask_2'][0].shape == (2, 19)
  assert np.all(np.asarray(masks['mask_2'][0])[:, [0, 17, 18]] == 1)
  assert float(jax.tree.leaves(state['losses'])[0]) > 0


def test_budget_sets_geometric_ratios_matching_the_schedules_flops():
  c = tiny.get_config('method=spvit')
  c.model.image_size = 64  # 64 patches
  c.model.schedule = 'flops:1.5'  # uncompressed / compressed FLOPs
  model = vit.build_model(c.model, num_classes=10)
  red = model.reducer
  base_rate = red.ratios[0]
  assert red.ratios[1] == pytest.approx(base_rate ** 2)
  geo = dict(num_tokens=65, width=32, mlp_ratio=2.0)
  got = schedules.vit_flops(red.schedule, **geo) / schedules.vit_flops((0, 0), **geo)
  assert got == pytest.approx(1 / 1.5, abs=0.05)


def _block_flops_by_tokens(n_in: int, n_out: int, d: int) -> float:
  """One block counted by hand: attention on n_in tokens, the MLP (ratio 4) on n_out."""
  return 2 * (4 * n_in * d * d + 2 * n_in * n_in * d) + 2 * (2 * 4 * n_out * d * d)


@pytest.mark.parametrize('setting,want', [
    ('vitb_low.py', (3, 6, 9)),    # the method's own layers reach the low level
    ('vitb_high.py', (0, 3, 6)),   # they cannot reach the high one: from block 0
    ('vitl_high.py', (0, 6, 12)),  # 24 layers: 6, 12, 18 scaled, from block 0
])
def test_default_layers_reach_the_settings_flops(setting, want):
  c = load_setting(setting, 'method=spvit')
  model = vit.build_model(c.model, num_classes=10)
  red = model.reducer
  assert red.layers == want
  # Tokens through the blocks, by hand: at a pruning layer the kept patches, the
  # class token and one package token per pruning layer so far go on.
  depth, d, n0 = model.depth, model.width, 197
  total, n, packages = 0.0, n0, 0
  for layer in range(depth):
    n_out = n
    if layer in red.layers:
      packages += 1
      n_out = 1 + red.keeps[red.layers.index(layer)] + packages
    total += _block_flops_by_tokens(n, n_out, d)
    n = n_out
  schedule_flops = schedules.vit_flops(
      vit.build_model(load_setting(setting).model, num_classes=10).schedule,
      num_tokens=n0, width=d)
  assert total == pytest.approx(schedule_flops, rel=0.05)
  assert min(red.ratios) > 0.1  # no layer keeps a handful of tokens
  # Named explicitly, the method's layers at the high level are refused.
  if want[0] == 0:
    c.model.spvit_layers = ','.join(str(l + (3 if depth == 12 else 6)) for l in want)
    with pytest.raises(Exception, match='cannot reach the FLOPs'):
      vit.build_model(c.model, num_classes=10)


@pytest.mark.parametrize('override,message', [
    ('--config.model.spvit_keep_ratios=0.5,1.2', 'model.spvit_keep_ratios'),
    ('--config.model.spvit_keep_ratios=0.5,0.49', 'fewer than the layer before'),
    ('--config.model.spvit_ratio_weight=-1', 'model.spvit_ratio_weight'),
])
def test_bad_settings_fail_with_one_sentence(tmp_path, capsys, monkeypatch, override, message):
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=spvit',
                            f'--workdir={tmp_path}', override)
  reset_flags()
  assert code == 1 and message in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err
