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
