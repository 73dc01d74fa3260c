"""The speed-up measured after training (`throughput.speedup_after_training`), on a tiny ViT."""

import re

import numpy as np
import pytest

from pyra_jax import throughput
from pyra_jax.configs import common


def _tiny_config(eval_batch_size):
  config = common.get_base_config()
  m = config.model
  m.variant, m.image_size, m.patch_size = 'Ti/8', 32, 8
  m.width, m.depth, m.num_heads, m.mlp_dim = 32, 2, 2, 64
  m.lora_rank, m.schedule, m.num_classes = 4, '4,2', 10
  m.method = 'pyra'
  config.eval_batch_size = eval_batch_size
  return config


def test_after_training_batch_is_small_and_never_above_the_eval_batch():
  assert throughput.after_training_batch(_tiny_config(200)) == 32
  assert throughput.after_training_batch(_tiny_config(8)) == 8


def test_speedup_after_training_is_paired_over_few_rounds_with_its_spread():
  config = _tiny_config(200)
  res = throughput.speedup_after_training(config)
  models = res['models']
  assert list(models) == ['peft', 'pyra']
  assert res['settings']['batch_size'] == 32
  assert res['settings']['rounds'] == throughput.AFTER_TRAINING_ROUNDS == 10
  # One compilation per model, none between rounds.
  assert [m['traces'] for m in models.values()] == [1, 1] and res['recompiled'] is False
  assert 'gemm_bound' not in res and 'merge_ops' not in res  # the tool's extras
  ratios = (np.asarray(models['peft']['round_seconds'])
            / np.asarray(models['pyra']['round_seconds']))
  assert models['pyra']['speedup'] == pytest.approx(np.median(ratios))
  spread = models['pyra']['speedup_spread']
  assert (spread['min'], spread['max']) == pytest.approx((ratios.min(), ratios.max()))
  line = throughput.speedup_line(res, 'pyra')
  want = (f"{np.median(ratios):.2f}x faster (median of 10 paired rounds at batch 32, "
          f"per-round {ratios.min():.2f}-{ratios.max():.2f}x; FLOPs ratio")
  assert want in line, line
  assert re.match(r'throughput: pyra [\d.]+ images/s vs uncompressed [\d.]+ images/s', line)


@pytest.mark.parametrize('method,field,value', [
    ('rap', 'rap_widths', '1,2;16,40'),  # pruned heads; MLP units per block
    ('spvit', 'spvit_layers', '1'),      # a selector of its own in block 1
])
def test_methods_with_parameters_of_their_own_are_timed_with_them(method, field, value):
  """RaP's smaller blocks and SPViT's selectors get their own weights (not the
  full backbone's), and RaP's FLOPs are those of its pruned widths, counted
  here from the deployed parameters' shapes."""
  config = _tiny_config(8)
  config.model.method = method
  config.model[field] = value
  fm = throughput.build_forward(config, batch_size=2, dtype='float32',
                                methods=('peft', method))
  _, params = fm.models[method]
  n, d = 17, 32
  total = 0.0
  for layer in range(2):
    blk = params['Transformer'][f'encoderblock_{layer}']
    heads = blk['MultiHeadDotProductAttention_0']['query']['kernel'].shape[1]
    units = blk['MlpBlock_0']['Dense_0']['kernel'].shape[1]
    e = heads * d // 2
    total += 2 * (4 * n * d * e + 2 * n * n * e) + 2 * (2 * n * d * units)
  if method == 'rap':
    assert fm.infos[method]['gflops'] == pytest.approx(total / 1e9, rel=1e-12)
  res = throughput.speedup_after_training(config)
  assert res['models'][method]['speedup'] > 0 and res['recompiled'] is False
