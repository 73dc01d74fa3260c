"""Schedules and the FLOPs counter against the paper's figures and hand cases."""

import math

import pytest

from pyra_jax import schedules as S


def gflops(sched, tokens=197, width=768):
  return S.vit_flops(sched, num_tokens=tokens, width=width) / 1e9


def test_vit_b16_flops_match_the_paper():
  assert round(gflops([0] * 12), 1) == 34.9
  assert round(gflops(S.NAMED_SCHEDULES['vitb_low']), 1) == 17.3
  assert round(gflops(S.NAMED_SCHEDULES['vitb_high']), 1) == 9.9
  # A hand count of one unmerged block: 2(4ND^2 + 2N^2D) + 2(8ND^2).
  n, d = 197, 768
  assert S.vit_flops([0], num_tokens=n, width=d) == 2 * (4 * n * d * d + 2 * n * n * d) + 16 * n * d * d


def test_named_schedules_fit_their_backbones():
  for name, depth, tokens in [('vitb_low', 12, 196), ('vitb_high', 12, 196),
                              ('vitl_low', 24, 196), ('vitl_high', 24, 196)]:
    assert S.resolve_schedule(name, depth=depth, num_patches=tokens) == S.NAMED_SCHEDULES[name]
  for name in ('deitb_low', 'deitb_high'):
    assert S.resolve_schedule(name, depth=12, num_patches=196, num_protected=2) == \
        S.NAMED_SCHEDULES[name]
  # The paper's text for ViT-B low ("16 in each layer") hits the cap in layer 11.
  with pytest.raises(S.ScheduleError, match='layer 11 merges r = 16'):
    S.resolve_schedule([16] * 12, depth=12, num_patches=196)


def test_tome_forms_are_capped_like_tome():
  # 16 per layer on 197 tokens: 11 layers of 16 leave 21 tokens, cap (21-1)//2 = 10.
  assert S.resolve_schedule(16, depth=12, num_patches=196) == (16,) * 11 + (10,)
  # ToMe's parse_r with inflection -0.5: min = int(8 * 1.5) = 12, max = 4, linear.
  ramp = S.tome_inflection(8, -0.5, 12)
  assert ramp[0] == 12 and ramp[-1] == 4 and ramp == sorted(ramp, reverse=True)
  assert S.resolve_schedule('8,-0.5', depth=12, num_patches=196) == tuple(ramp)


def test_eq8_by_hand():
  # g(x) = (1 - x/12)^(e - 1); r_1 = floor((1 - g(1)) * (196 - 4)).
  e = 3.685
  r1 = math.floor((1 - (11 / 12) ** (e - 1)) * 192)
  sched = S.eq8_schedule(12, 196, e)
  assert sched[0] == r1 == 40
  assert sum(sched) <= 192


def test_flops_ratio_solver_hits_the_target():
  for target in (2.0, 3.5):
    sched = S.resolve_schedule(f'flops:{target}', depth=12, num_patches=196)
    ratio = gflops([0] * 12) / gflops(sched)
    assert abs(ratio - target) / target < 0.03, (sched, ratio)


@pytest.mark.parametrize('spec,match', [
    ([1] * 11, 'has 11 entries but the model has 12 layers'),
    ('abc,def', 'Cannot read config.model.schedule'),
    ('flops:abc', "config.model.schedule = 'flops:abc'"),
    ('flops:0.5', 'below 1'),
])
def test_bad_specs(spec, match):
  with pytest.raises(S.ScheduleError, match=match):
    S.resolve_schedule(spec, depth=12, num_patches=196)
