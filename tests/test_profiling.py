"""The step profile: each HLO op attributed to a phase and a part of the model.

The attribution rules are checked on op names in the form JAX writes them
(copied from a real compiled step's HLO, categories written by hand); the
profile of a real (tiny) training step is checked for what must hold of any
such step: matmuls forward and backward, dropout bits exactly when dropout is
on, and parts that add up to the ops' total.
"""

import pytest

from pyra_jax import benchmark
from pyra_jax import profiling
from tests.helpers.models import tiny_config

STEP = 'jit(train_step)'
BLOCK = 'Transformer/encoderblock_0'
ATTN = f'{BLOCK}/MultiHeadDotProductAttention_0'


@pytest.mark.parametrize('opcode, op_name, phase, part', [
    ('dot', f'{STEP}/transpose(jvp(VisionTransformer))/{ATTN}/bhqd,bhkd->bhqk/dot_general',
     'backward', 'attention matmul'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{ATTN}/bhqk,bhkd->bhqd/dot_general',
     'forward', 'attention matmul'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{BLOCK}/MlpBlock_0/Dense_0/dot_general',
     'forward', 'dense matmul'),
    ('dot', f'{STEP}/transpose(jvp(VisionTransformer))/{ATTN}/lora/transpose',
     'backward', 'dense matmul'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{ATTN}/lora/Dropout_0/jit(_bernoulli)/'
     'jit(_uniform)/while/body/closed_call/add', 'forward', 'rng'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{ATTN}/reduce_max', 'forward', 'softmax'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{BLOCK}/MlpBlock_0/gelu/erf', 'forward', 'gelu'),
    ('fusion', f'{STEP}/transpose(jvp(VisionTransformer))/{BLOCK}/MlpBlock_0/gelu/mul',
     'backward', 'gelu'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{ATTN}/reduce_sum', 'forward', 'other'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{ATTN}/dot_product_attention/exp', 'forward',
     'attention matmul'),
    ('fusion', f'{STEP}/transpose(jvp(VisionTransformer))/{BLOCK}/LayerNorm_0/mul',
     'backward', 'layernorm'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{BLOCK}/pyra/dot_general', 'forward',
     'merge'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/{BLOCK}/merge/scatter-add', 'forward',
     'merge'),
    ('fusion', f'{STEP}/jvp(VisionTransformer)/transpose', 'forward', 'other'),
    ('fusion', f'{STEP}/add', 'optimizer', 'other'),
])
def test_ops_are_attributed_by_the_code_they_came_from(opcode, op_name, phase, part):
  assert profiling.phase_of(op_name) == phase
  assert profiling.part_of(opcode, op_name) == part


def test_a_program_without_a_vjp_is_all_forward():
  assert profiling.phase_of(f'jit(apply)/{ATTN}/reduce_max', differentiated=False) == 'forward'


def test_hlo_instructions_are_read_with_their_metadata():
  hlo = '\n'.join([
      'ENTRY %main.3 (p: f32[2]) -> f32[2] {',
      '  %p = f32[2]{0} parameter(0), metadata={op_name="x"}',
      '  %dot.4 = f32[2,2]{1,0} dot(f32[2]{0} %p, f32[2]{0} %p), '
      'metadata={op_name="jit(f)/jvp(M)/Dense_0/dot_general" source_file="a.py"}',
      '  ROOT %ynn_fusion.1 = f32[2]{0} fusion(f32[2]{0} %p), kind=kCustom, calls=%c',
      '}'])
  md = profiling.instruction_metadata(hlo)
  assert md['dot.4'] == ('dot', 'jit(f)/jvp(M)/Dense_0/dot_general')
  assert md['ynn_fusion.1'] == ('fusion', '')
  assert md['p'] == ('parameter', 'x')
  # Container ops are skipped (their children's events carry the time).
  events = [('dot.4', 2000.0), ('ynn_fusion.1', 1000.0), ('while.2', 5000.0),
            ('ThunkExecutor::Execute', 9000.0)]
  md['while.2'] = ('while', 'jit(f)/jvp(M)/while')
  s = profiling.summarise(events, md, num_calls=2)
  assert s['ms']['forward'] == {'dense matmul': 1.0}
  assert s['ms']['optimizer'] == {'other': 0.5}
  assert s['ops_ms'] == pytest.approx(1.5)
  # An instruction-like event the HLO text lacks is reported, not silently lost.
  s = profiling.summarise(events + [('fusion.77', 4000.0)], md, num_calls=2)
  assert s['unmatched_ms'] == pytest.approx(2.0) and s['ops_ms'] == pytest.approx(1.5)


def test_a_fusion_holding_a_matmul_counts_as_that_matmul():
  # The form XLA CPU writes: q·kᵀ fused with the softmax's max and exp.
  hlo = '\n'.join([
      '%fused_computation.3 (p0: f32[2,2,4,8], p1: f32[2,2,4,8]) -> f32[2,2,4,4] {',
      '  %p0 = f32[2,2,4,8]{3,2,1,0} parameter(0)',
      '  %dot_general.6 = f32[2,2,4,4]{3,2,1,0} dot(%p0, %p0), lhs_batch_dims={0,1}, '
      f'metadata={{op_name="jit(s)/jvp(V)/{ATTN}/bhqd,bhkd->bhqk/dot_general"}}',
      f'  ROOT %exp.1 = f32[2,2,4,4]{{3,2,1,0}} exponential(%dot_general.6), '
      f'metadata={{op_name="jit(s)/jvp(V)/{ATTN}/exp"}}',
      '}',
      '',
      'ENTRY %main.9 (a: f32[2,2,4,8]) -> f32[2,2,4,4] {',
      '  %a = f32[2,2,4,8]{3,2,1,0} parameter(0)',
      '  ROOT %ynn_fusion.3 = f32[2,2,4,4]{3,2,1,0} fusion(%a, %a), kind=kCustom, '
      f'calls=%fused_computation.3, metadata={{op_name="jit(s)/jvp(V)/{ATTN}/reduce_max"}}',
      '}'])
  md = profiling.instruction_metadata(hlo)
  opcode, op_name = md['ynn_fusion.3']
  assert opcode == 'dot' and op_name.endswith('bhqd,bhkd->bhqk/dot_general')
  assert profiling.part_of(opcode, op_name) == 'attention matmul'
  assert md['exp.1'] == ('exponential', f'jit(s)/jvp(V)/{ATTN}/exp')


def _profile(method, **model_overrides):
  config = tiny_config(model=model_overrides)
  run = benchmark.train_run(config, method, image_size=32, num_classes=10, dtype='float32')
  calls = benchmark.TrainStepCalls(run, benchmark.synthetic_batch(run, 8))
  calls.call_step()
  return profiling.profile_compiled(calls.call_step, calls.compiled_step().as_text(), 2)


def test_profile_of_a_real_training_step():
  prof = _profile('pyra', lora_dropout=0.1, drop_path=0.1)
  ms = prof['ms']
  for phase in ('forward', 'backward'):
    assert ms[phase].get('dense matmul', 0) > 0, (phase, ms)
    assert ms[phase].get('attention matmul', 0) > 0, (phase, ms)
  assert ms['forward'].get('rng', 0) > 0, ms
  assert ms['forward'].get('gelu', 0) > 0 and ms['backward'].get('gelu', 0) > 0, ms
  assert prof['unmatched_ms'] == 0, prof
  assert ms['optimizer'], ms  # AdamW's update runs outside the VJP
  total = sum(v for phase in ms.values() for v in phase.values())
  assert total == pytest.approx(prof['ops_ms'])
  assert prof['wall_ms'] > 0 and prof['num_calls'] == 2
  assert ms['forward'].get('merge', 0) > 0, ms  # PYRA's reduction, under its scope
  # Uncompressed, dropout and stochastic depth off: no merge part, and no random
  # bits drawn in the model.
  quiet = _profile('peft', lora_dropout=0.0, drop_path=0.0)
  for phase in ('forward', 'backward'):
    assert 'rng' not in quiet['ms'][phase] and 'merge' not in quiet['ms'][phase], quiet['ms']
  assert quiet['ms']['forward'].get('dense matmul', 0) > 0
