"""RaP (docs/algorithm.md §18.2): the pruned model is a real smaller ViT whose
logits equal the unpruned model's with the pruned heads and units removed; the
channel selection and the FLOPs against loop transcriptions
(tests/reference_spvit_rap.py); the budget; bad settings in one sentence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pyra_jax.configs import tiny
from pyra_jax.methods import rap as rap_lib
from pyra_jax.methods.base import Geometry
from pyra_jax.models import vit
from pyra_jax.training import stages
from tests.helpers import reference_spvit_rap as ref
from tests.helpers.models import random_params
from tests.helpers.cli import reset_flags, run_main

GEO = Geometry(depth=3, num_patches=16, num_protected=1, width=32, mlp_dim=64, num_heads=4)


def _config(widths=''):
  c = tiny.get_config('method=rap')
  c.model.depth, c.model.num_heads, c.model.schedule = 3, 4, 'flops:1.6'
  c.model.rap_widths = widths
  return c


def test_flops_and_selection_match_the_loops():
  rng = np.random.default_rng(0)
  for _ in range(5):
    heads = rng.integers(1, 5, 3).tolist()
    mlps = rng.integers(1, 65, 3).tolist()
    want = sum(ref.rap_block_flops(h, m, 17, 32, 8) for h, m in zip(heads, mlps))
    full = 3 * ref.rap_block_flops(4, 64, 17, 32, 8)
    assert rap_lib.flops_fraction(heads, mlps, GEO) == pytest.approx(want / full, rel=1e-12)
  c = _config()
  model = vit.build_model(c.model, num_classes=10)
  x = jnp.zeros((1, 32, 32, 3))
  flat = traverse_util.flatten_dict(random_params(model, x, 3), sep='/')
  flat = {k: np.asarray(v) for k, v in flat.items()}
  heads, units = rap_lib.select_channels(flat, [2, 1, 3], [10, 40, 5])
  for layer, (h, m) in enumerate(zip([2, 1, 3], [10, 40, 5])):
    p = f'Transformer/encoderblock_{layer}/'
    block = {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}
    want_h, want_m = ref.rap_l1_keep(block, h, m)
    assert heads[layer] == want_h and units[layer] == want_m


def test_samples_are_within_the_budget():
  rng = np.random.default_rng(1)
  for target in (0.4, 0.6, 0.8):
    got = [rap_lib.sample_candidate(rng, GEO, target) for _ in range(20)]
    got = [g for g in got if g is not None]
    assert len(got) >= 5  # a draw landing > 0.03 below is drawn again
    for heads, mlps in got:
      f = sum(ref.rap_block_flops(h, m, 17, 32, 8) for h, m in zip(heads, mlps)) / (
          3 * ref.rap_block_flops(4, 64, 17, 32, 8))
      assert target - rap_lib.BUDGET_TOLERANCE <= f <= target
      assert all(1 <= h <= 4 for h in heads) and all(1 <= m <= 64 for m in mlps)
    # Random: the candidates differ.
    assert len({tuple(h + m) for h, m in got}) > 1


def test_pruned_model_is_smaller_and_equals_the_masked_model():
  c = _config()
  full = vit.build_model(c.model, num_classes=10)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(random_params(full, x, 4), sep='/').items()}
  heads, mlps = [2, 4, 1], [7, 64, 30]
  hi, ui = rap_lib.select_channels(flat, heads, mlps)
  pruned_flat = rap_lib.prune_params(flat, hi, ui)
  pruned = vit.build_model(_config('2,4,1;7,64,30').model, num_classes=10)
  shapes = jax.eval_shape(lambda: pruned.init({'params': jax.random.key(0)}, x))['params']
  shapes = traverse_util.flatten_dict(shapes, sep='/')
  assert {k: v.shape for k, v in shapes.items()} == {k: v.shape for k, v in pruned_flat.items()}
  b0 = 'Transformer/encoderblock_0/'
  assert pruned_flat[b0 + 'MultiHeadDotProductAttention_0/query/kernel'].shape == (32, 2, 8)
  assert pruned_flat[b0 + 'MultiHeadDotProductAttention_0/lora/up'].shape == (4, 48)
  assert pruned_flat[b0 + 'MlpBlock_0/Dense_1/kernel'].shape == (7, 32)
  traces = []

  def fwd(p, images):
    traces.append(1)
    return pruned.apply({'params': p}, images)
  f = jax.jit(fwd)
  got = f(traverse_util.unflatten_dict(pruned_flat, sep='/'), x)
  f(traverse_util.unflatten_dict(pruned_flat, sep='/'), x[::-1])
  assert len(traces) == 1
  masked = stages.mask_params(flat, hi, ui)
  want = full.apply({'params': traverse_util.unflatten_dict(masked, sep='/')}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # Folding the pruned LoRA gives the same logits with LoRA off.
  dep = vit.build_model(vit.deployed_config(_config('2,4,1;7,64,30').model), num_classes=10)
  folded = vit.fold_peft(traverse_util.unflatten_dict(pruned_flat, sep="/"),
                         _config().model)
  np.testing.assert_allclose(np.asarray(dep.apply({'params': folded}, x)), np.asarray(got),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('override,message', [
    # One head per block: RaP can only shrink the MLPs, ToMe's strongest merging
    # on this model (8 then 4 tokens) costs less than that.
    ('--config.model.num_heads=1 --config.model.schedule=8,4',
     'RaP cannot reach a FLOPs fraction'),
    ('--config.model.peft=adapter', "model.method='rap' prunes heads and MLP units"),
    ('--config.model.rap_widths=1,1,1;4,4', 'model.rap_widths'),
])
def test_bad_settings_fail_with_one_sentence(tmp_path, capsys, monkeypatch, override, message):
  code, out, err = run_main(capsys, monkeypatch, '--config=configs/tiny.py:method=rap',
                            f'--workdir={tmp_path}', *override.split())
  reset_flags()
  assert code == 1 and message in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'stage1_peft').exists()
