"""Parameter counts (Tables 1 and 6-8) against hand-written formulas."""

import re

import pytest

from pyra_jax.configs import vitb_high
from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax import schedules
from tests.helpers.cli import cli
from tests.helpers.models import tiny_config


# configs/tiny.py: width D = 32, 2 blocks, MLP 64, patch 8 on 32 px (16 patches),
# LoRA rank h = 4, schedule (4, 2), MNIST's 10 classes.
D, L, MLP, H, SCHEDULE, CLASSES = 32, 2, 64, 4, (4, 2), 10


def _tiny_counts(modulation, rank=1):
  config = tiny_config(model=dict(modulation_rank=rank))
  return param_counts.variant_counts(config.model, CLASSES, [modulation])[modulation]


@pytest.mark.parametrize('modulation,generators,norms', [
    ('pyra', L * D + sum(SCHEDULE), 2 * D * L),            # W_D (1, D) + W_r (r, 1) per layer
    ('no_sigmoid', L * D + sum(SCHEDULE), 2 * D * L),
    ('sigmoid_wr_only', sum(SCHEDULE), 2 * D * L),
    ('wr_only', sum(SCHEDULE), 2 * D * L),
    ('sigmoid_wd_only', L * D, 2 * D * L),
    ('wd_only', L * D, 2 * D * L),
    ('full_matrix', D * sum(SCHEDULE), 0),                 # W (r, D), no LayerNorm
    ('mlp', L * 2 * D * 4, 2 * D * L),                     # D -> 4 -> D, no biases
])
def test_generator_counts(modulation, generators, norms):
  counts = _tiny_counts(modulation)
  assert (counts['generators'], counts['generator_norms']) == (generators, norms)


def test_low_rank_counts_scale_with_s():
  assert _tiny_counts('low_rank', 3)['generators'] == 3 * (sum(SCHEDULE) + L * D)


def test_categories_of_the_tiny_model():
  counts = _tiny_counts('pyra')
  per_block = 2 * 2 * D + 3 * (D * D + D) + (D * D + D) + (D * MLP + MLP) + (MLP * D + D)
  embed = 8 * 8 * 3 * D + D + D + (16 + 1) * D  # patches, cls, position
  assert counts['backbone'] == embed + L * per_block + 2 * D  # + the final norm
  assert counts['lora'] == L * (D * H + H * 3 * D)            # shared down, q|k|v up
  assert counts['head'] == D * CLASSES + CLASSES


def test_vitb_high_pyra_trains_035_percent_of_the_backbone():
  """Table 1: PYRA at ViT-B/16 high trains 0.35 % (LoRA + generators, no head)."""
  config = vitb_high.get_config()
  params = param_counts.abstract_params(config.model, 100)
  trainable, frozen = optim.split_params(params, config.trainable)
  report = param_counts.trainable_report(trainable, frozen)
  lora = 12 * (768 * 8 + 8 * 3 * 768)
  generators = 12 * 768 + sum((40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3))
  assert report['backbone'] == 86_567_656 - (768 * 1000 + 1000)  # timm's ViT-B/16 minus its head
  assert (report['lora'], report['generators'], report['generator_norms']) == (
      lora, generators, 12 * 2 * 768)
  assert report['head'] == 768 * 100 + 100
  assert round(report['lora_generators_percent_of_backbone'], 2) == 0.35
  assert report['trainable'] == lora + generators + 12 * 2 * 768 + 768 * 100 + 100


def test_rap_before_its_search_counts_the_pruned_model_at_the_levels_flops():
  """RaP at ViT-B/16 high: every block pruned alike to the level's FLOPs, LoRA on the
  remaining heads' q/k/v, the head; the widths' FLOPs counted here by hand."""
  config = vitb_high.get_config('method=rap')
  text = param_counts.report_text(config)
  line = next(l for l in text.splitlines() if l.startswith('This config (rap'))
  heads, units = map(int, re.search(r'every block at (\d+) heads and (\d+) MLP units',
                                    line).groups())
  n, d, hd = 197, 768, 64

  def block(h, m):
    e = h * hd
    return 2 * (4 * n * d * e + 2 * n * n * e) + 2 * (2 * n * d * m)
  fraction = block(heads, units) / block(12, 3072)
  uniform = schedules.vit_flops((0,) * 12, num_tokens=n, width=d)
  high = (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3)  # the paper's ViT-B/16 high r_l
  target = schedules.vit_flops(high, num_tokens=n, width=d) / uniform
  assert target - 0.03 <= fraction <= target
  lora = 12 * (d * 8 + 8 * 3 * heads * hd)
  want = lora + d * 100 + 100
  assert f'Trainable parameters: {want:,} ' in line and f'LoRA {lora:,}' in line


@pytest.mark.parametrize('args,message', [
    ([], 'Error: Give --config=configs/<setting>.py, e.g. configs/vitb_high.py.'),
    (['--config=configs/tiny.py', '--config.model.modulation=xyz'],
     "Error: model.modulation must be one of ('pyra', "),
])
def test_bad_command_lines_fail_with_one_sentence(args, message):
  code, _, err = cli(*args, module='pyra_jax.param_counts')
  assert code != 0 and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith(message)
