"""FacT and SNF as the trainable module (model.peft), under every merging method.

Forward passes are checked against tests/helpers/reference_peft.py, a numpy transcription
of the modules' definitions (docs/algorithm.md §14-15) and, for FacT-TK's MLP
slices, of the FacT code's own layout (its fact_tk.py), with random module
parameters; FacT's folding against the unfolded model; parameter counts against
formulas written from the definitions and the papers' printed counts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax.configs import tiny
from pyra_jax.configs import vitb_high_fact, vitb_high_snf, vitb_low_fact
from pyra_jax.models import build_model
from pyra_jax.models.vit import deployed_config, fold_peft
from tests.helpers import reference_peft as ref
from tests.helpers.cli import cli
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import images, init, randomize, tiny_config, tiny_model, to_np


def flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def apply(model, params, x):
  return np.asarray(jax.jit(lambda p: model.apply({'params': p}, x, train=False))(params),
                    np.float64)


@pytest.mark.parametrize('variant,method,layout', [
    ('tt', 'peft', 'paper'), ('tt', 'pyra', 'paper'), ('tk', 'tome', 'paper'),
    ('tk', 'tome', 'authors'), ('tk', 'pyra', 'authors')])
def test_fact_forward_equals_numpy_reference(variant, method, layout):
  # rank 3, scale 0.7, mlp_dim = 2 * width: two slices each for fc1 and fc2.
  cfg = tiny_model(method, peft='fact', fact_variant=variant, fact_rank=3, fact_scale=0.7,
                   fact_tk_layout=layout)
  model, params = init(cfg)
  params = randomize(params, r'/fact/|pyra/w_d|pyra/norm')
  x = images(2)
  want = ref.vit_forward(to_np(params), np.asarray(x, np.float64), model.schedule,
                         num_heads=2, peft='fact', fact_variant=variant, fact_scale=0.7,
                         pyra=(method == 'pyra'), fact_tk_layout=layout)
  np.testing.assert_allclose(apply(model, params, x), want, rtol=2e-4, atol=2e-5)
  if variant == 'tk':  # The two layouts are different models on the same parameters.
    other = 'paper' if layout == 'authors' else 'authors'
    alt = ref.vit_forward(to_np(params), np.asarray(x, np.float64), model.schedule,
                          num_heads=2, peft='fact', fact_variant=variant, fact_scale=0.7,
                          pyra=(method == 'pyra'), fact_tk_layout=other)
    assert np.abs(alt - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.parametrize('flow_length,method,blocks', [
    (0, 'pyra', None), (3, 'peft', None), (3, 'tome', 2)])
def test_snf_forward_equals_numpy_reference(flow_length, method, blocks):
  cfg = tiny_model(method, peft='snf', snf_flow_length=flow_length, snf_blocks=blocks)
  model, params = init(cfg)
  # SNF's original code adapts the first 12 blocks only (model.snf_blocks): the
  # later blocks have no flows at all.
  adapted = {i for i in range(3) if 'snf' in params['Transformer'][f'encoderblock_{i}']}
  assert adapted == set(range(3 if blocks is None else blocks))
  params = randomize(params, r'/snf/|pyra/w_d|pyra/norm')
  x = images(2)
  want = ref.vit_forward(to_np(params), np.asarray(x, np.float64), model.schedule,
                         num_heads=2, peft='snf', pyra=(method == 'pyra'), snf_blocks=blocks)
  np.testing.assert_allclose(apply(model, params, x), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('kw', [dict(peft='fact', fact_variant='tt'),
                                dict(peft='fact', fact_variant='tk'),
                                dict(peft='snf', snf_flow_length=0)])
def test_modules_start_as_the_frozen_backbone(kw):
  """FacT's V = 0 and SNF's μ = log σ = 0 at init: exactly the plain model's logits;
  and LoRA is off whatever lora_rank says."""
  model, params = init(tiny_model('pyra', lora_rank=4, **kw))
  assert not any('/lora/' in k for k in flat(params))
  plain = build_model(tiny_model('pyra', lora_rank=0))
  strip = re.compile(r'(^|/)(fact|snf)(/|$)')
  plain_params = traverse_util.unflatten_dict(
      {k: v for k, v in flat(params).items() if not strip.search(k)}, sep='/')
  x = images(3)
  a, b = apply(model, params, x), apply(plain, plain_params, x)
  if kw['peft'] == 'snf':  # exp(0)·x + 0 is x: the same graph, the same bits
    np.testing.assert_array_equal(a, b)
  else:  # + s·(x U Σ)·0 adds exact zeros, but XLA may fuse the bypass's matmul with
    # the frozen one (a different float32 summation order): equal up to rounding.
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('variant,method,layout', [
    ('tt', 'peft', 'paper'), ('tt', 'pyra', 'paper'), ('tk', 'peft', 'paper'),
    ('tk', 'pyra', 'authors')])
def test_folded_fact_gives_the_same_logits_and_a_plain_tree(variant, method, layout):
  cfg = tiny_model(method, peft='fact', fact_variant=variant, fact_rank=3, fact_scale=2.0,
                   fact_tk_layout=layout)
  model, params = init(cfg)
  params = randomize(params, r'/fact/|pyra/w_d')
  folded = fold_peft(params, cfg)
  deployed = build_model(deployed_config(cfg))
  assert not any('fact' in k for k in flat(folded))
  # Exactly the tree of the model without any module (same names and shapes).
  _, plain = init(tiny_model(method, lora_rank=0))
  assert jax.tree.map(np.shape, folded) == jax.tree.map(np.shape, plain)
  x = images(2)
  a, b = apply(model, params, x), apply(deployed, folded, x)
  assert np.abs(a - b).max() / np.abs(a).max() <= 1e-5
  assert np.abs(a - apply(deployed, jax.tree.map(jnp.asarray, plain), x)).max() > 1e-3


def test_snf_stays_in_the_deployed_model():
  cfg = tiny_model('pyra', peft='snf', snf_flow_length=2)
  model, params = init(cfg)
  params = randomize(params, r'/snf/')
  dep_cfg = deployed_config(cfg)
  assert dep_cfg.peft == 'snf'
  deployed = build_model(dep_cfg)
  x = images(2)
  np.testing.assert_array_equal(apply(model, params, x),
                                apply(deployed, fold_peft(params, cfg), x))


def test_fact_dropout_acts_in_training_only():
  cfg = tiny_model('peft', peft='fact', drop_path=0.0, fact_dropout=0.5)
  model, params = init(cfg)
  params = randomize(params, r'/fact/')
  x = images(2)
  run = jax.jit(lambda p, k: model.apply({'params': p}, x, train=True, rngs={'dropout': k}))
  a, b = run(params, jax.random.PRNGKey(0)), run(params, jax.random.PRNGKey(1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
  cfg.fact_dropout = 0.0
  no_drop = build_model(cfg)
  np.testing.assert_allclose(
      no_drop.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}),
      apply(model, params, x), rtol=1e-6, atol=1e-7)


# ViT-B/16: D = 768, L = 12, 12 slices per layer (q, k, v, out, 4 of fc1, 4 of fc2).
D, L = 768, 12
VITB_BACKBONE = 86_567_656 - (768 * 1000 + 1000)  # timm's ViT-B/16 minus its head


def _report(config):
  params = param_counts.abstract_params(config.model, 100)
  trainable, frozen = optim.split_params(params, config.trainable)
  return param_counts.trainable_report(trainable, frozen)


@pytest.mark.parametrize('variant,rank,want', [
    ('tt', 8, 2 * D * 8 + L * 12 * 8 * 8),         # U, V + a core per slice: 21,504
    ('tt', 16, 2 * D * 16 + L * 12 * 16 * 16),     # 61,440
    ('tk', 32, 2 * D * 32 + 32 ** 3 + 12 * L * 32),  # U, V, C, P: 86,528
])
def test_fact_trainable_counts_at_vitb(variant, rank, want):
  """The FacT paper prints 0.040M (tt, rank <= 16) and 0.069M (tk, rank <= 32) as
  averages over VTAB tasks whose rank varies; per rank the count is the formula."""
  config = vitb_high_fact.get_config()
  config.model.fact_variant, config.model.fact_rank = variant, rank
  report = _report(config)
  assert (report['module'], report['lora'], report['other_trained']) == (want, 0, 0)
  assert report['backbone'] == VITB_BACKBONE
  assert 0.020e6 < want < 0.090e6


@pytest.mark.parametrize('flow_length', [0, 16])
def test_snf_trainable_counts_at_vitb(flow_length):
  config = vitb_high_snf.get_config()
  config.model.snf_flow_length = flow_length
  report = _report(config)
  want = L * 2 * (2 * D + flow_length * (2 * D + 1))  # two flows per block
  assert (report['module'], report['lora'], report['other_trained']) == (want, 0, 0)
  assert report['backbone'] == VITB_BACKBONE
  if flow_length == 0:  # The SNF paper's "0.036M" (36,864, printed truncated).
    assert int(want / 1e3) == 36 and 100 * want / VITB_BACKBONE < 0.05


def test_table20_configs():
  for get, peft, schedule in ((vitb_high_fact.get_config, 'fact', 'vitb_high'),
                              (vitb_low_fact.get_config, 'fact', 'vitb_low'),
                              (vitb_high_snf.get_config, 'snf', 'vitb_high')):
    c = get()
    assert (c.model.peft, c.model.method, c.model.schedule) == (peft, 'pyra', schedule)
    tome = get('method=tome,task=dtd')
    assert (tome.model.peft, tome.model.method, tome.data.task) == (peft, 'tome', 'dtd')
  # FacT-TK in the settings is the FacT code's layout (its published numbers);
  # the base config keeps the paper's formula (what runs stored before used).
  assert vitb_high_fact.get_config().model.fact_tk_layout == 'authors'
  assert tiny.get_config('peft=fact').model.fact_tk_layout == 'authors'
  assert tiny.get_config().model.fact_tk_layout == 'paper'
  # SNF in every block (ViT-B has 12: the same as the original code's first 12).
  assert vitb_high_snf.get_config().model.snf_blocks is None


@pytest.mark.parametrize('peft', ['fact', 'snf'])
def test_export_restore_round_trip(peft, tmp_path):
  """Train a tiny run, export it, load the export: the same logits as the trained
  model (FacT folded away, SNF kept)."""
  require_offline_mnist()
  from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = tiny_config(f'peft={peft}', num_epochs=1, warmup_epochs=0,
                       data=dict(eval_split='val200'), eval_batch_size=64,
                       model=dict(snf_flow_length=2))
  loop.train_and_evaluate(config, str(tmp_path / 'run'))
  run, trainable, _ = setup.restore_run(config, str(tmp_path / 'run'))
  trained = optim.merge_params(trainable, run.frozen)
  assert any(f'/{peft}/' in k for k in flat(trainable))
  out = export_lib.export(config, str(tmp_path / 'run'), str(tmp_path / 'exp'))
  params, cfg = export_lib.load_export(out)
  kept = any(f'/{peft}/' in f'/{k}' for k in flat(params))
  assert kept == (peft == 'snf') and cfg.model.peft == ('snf' if peft == 'snf' else 'lora')
  x = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (4, 32, 32, 3)), jnp.float32)
  a = apply(run.model, trained, x)
  b = apply(build_model(cfg.model), params, x)
  assert np.abs(a - b).max() / np.abs(a).max() <= 1e-5


@pytest.mark.parametrize('arg,message', [
    ('peft=lokr', "peft='lokr': use one of lora, adapter, convpass, fact, snf."),
    ('peft=fact --config.model.fact_variant=cp',
     "model.fact_variant must be one of ('tt', 'tk'), got 'cp'."),
    ('peft=fact --config.model.fact_tk_layout=tucker',
     "model.fact_tk_layout must be one of ('authors', 'paper'), got 'tucker'."),
])
def test_bad_module_settings_fail_with_one_sentence(arg, message, tmp_path):
  setting, *extra = arg.split(' ')
  code, _, err = cli(f'--config=configs/tiny.py:{setting}', *extra, f'--workdir={tmp_path}',
                     timeout=300)
  assert code != 0 and 'Traceback' not in err
  # One sentence besides absl's INFO/WARNING log lines ('I1202 17:58:50 ... main.py:369] ...').
  said = [l for l in err.strip().splitlines() if not re.match(r'[IWE]\d{4} ', l)]
  assert message in err and len(said) == 1, err
