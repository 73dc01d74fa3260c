"""The PEFT modules other than LoRA (model.peft): Adapter and Convpass.

Ground truth: tests/helpers/reference_merge.py, a numpy forward of our tree with merging,
extended with the Adapter (the authors' y + up(QuickGELU(down(y))) after the MLP)
and Convpass (3x3 conv loops on the patch grid, positions filled from the source
matrix) written from their definitions; tests/helpers/reference_vit.py reading the
authors' PyTorch names for the Adapter checkpoint; and tests/helpers/reference_peft.py's
transcription of how the authors' model initialises its Adapter.
"""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from pyra_jax import optim
from pyra_jax import param_counts
from pyra_jax.checkpoints import CheckpointWarning, load_pretrained
from pyra_jax.configs import vitb_high, vitb_low, vitl_high, vits_peft
from pyra_jax.configs.common import get_base_config
from pyra_jax.models import build_model
from pyra_jax.models.convpass import conv_tokens
from pyra_jax.models.vit import deployed_config
from tests.helpers import reference_merge as ref
from tests.helpers import reference_peft as ref_peft
from tests.helpers import reference_vit as ref_vit
from tests.helpers.checkpoints import checkpoint_model
from tests.helpers.cli import cli, reset_flags, run_main
from tests.helpers.models import (images, init, init_params, randomize, tiny_config,
                                  tiny_model, to_np)

MODULES = ('adapter', 'convpass')
# Every parameter of the modules gets random values (their zero-initialised
# `up` included), so the whole module is exercised.
MODULE_PARAMS = r'/(adapter|convpass)/'


@pytest.mark.parametrize('method', ['peft', 'pyra'])  # no merging; merging + PYRA
@pytest.mark.parametrize('peft', MODULES)
def test_forward_equals_numpy_reference(peft, method):
  cfg = tiny_model(method, peft=peft, peft_dim=3, convpass_scale=0.7)
  model, params = init(cfg)
  assert 'lora' not in str(jax.tree_util.tree_structure(params))  # LoRA is off
  params = randomize(params, MODULE_PARAMS + r'|pyra/w_d|pyra/norm')
  x = images(2)
  got = jax.jit(lambda p: model.apply({'params': p}, x, train=False))(params)
  want = ref.vit_forward(to_np(params), np.asarray(x, np.float64), model.schedule,
                         num_heads=2, pyra=(method == 'pyra'), peft=peft,
                         convpass_scale=0.7)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_conv_on_merged_tokens_against_loops():
  """`conv_tokens` with a random partition of the positions, 2 prefix tokens."""
  rng = np.random.default_rng(0)
  b, g, k, prefix = 2, 5, 3, 2
  n0 = prefix + g * g
  source = np.zeros((b, 11, n0))
  for bi in range(b):
    # Prefix tokens own their positions; the 9 others cover >= 1 patch each.
    patches = np.concatenate([np.arange(prefix, 11), rng.integers(prefix, 11, g * g - 9)])
    rng.shuffle(patches)
    for m, t in enumerate(list(range(prefix)) + list(patches)):
      source[bi, t, m] = 1
  assert (source.sum(-1) > 0).all() and (source.sum(1) == 1).all()
  z = rng.standard_normal((b, 11, k))
  kernel, bias = rng.standard_normal((3, 3, k, k)), rng.standard_normal(k)
  got = conv_tokens(jnp.asarray(z, jnp.float32), jnp.asarray(kernel, jnp.float32),
                    jnp.asarray(bias, jnp.float32), prefix, jnp.asarray(source, jnp.float32))
  want = ref.conv3x3_tokens(z, kernel, bias, source, num_prefix=prefix)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Unmerged (identity source) equals the plain grid convolution.
  z0 = rng.standard_normal((b, n0, k))
  eye = np.broadcast_to(np.eye(n0), (b, n0, n0))
  plain = conv_tokens(jnp.asarray(z0, jnp.float32), jnp.asarray(kernel, jnp.float32),
                      jnp.asarray(bias, jnp.float32), prefix, None)
  np.testing.assert_allclose(plain, ref.conv3x3_tokens(z0, kernel, bias, eye, prefix),
                             rtol=1e-5, atol=1e-5)


def test_authors_adapter_init_is_their_model_as_built():
  """adapter_init='trunc_normal' draws what the PYRA authors' ViT holds once
  built (reference_peft.authors_adapter_as_built: their class's Xavier init,
  overwritten by the model's timm trunc_normal_(std=.02) with its cut-off at ±2
  in the weights' units, biases zero): same distribution (two-sample KS test
  against their procedure), std 0.02, 4.55 % beyond ±2 std (a cut at ±2 std,
  flax's truncated_normal, has none there), biases exactly 0."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d, k = 128, 64
  _, params = init(tiny_model('peft', peft='adapter', peft_dim=k, adapter_init='trunc_normal',
                              width=d, mlp_dim=2 * d))
  ours, biases = [], []
  for i in range(3):
    a = params['Transformer'][f'encoderblock_{i}']['adapter']
    ours += [np.asarray(a['down']['kernel']).ravel(), np.asarray(a['up']['kernel']).ravel()]
    biases += [np.asarray(a['down']['bias']), np.asarray(a['up']['bias'])]
  ours = np.concatenate(ours)
  rng = np.random.default_rng(0)
  theirs = np.concatenate([np.concatenate([w.ravel() for w in ref_peft.authors_adapter_as_built(
      rng, d, k)[0::2]]) for _ in range(3)])
  assert ours.size == theirs.size == 3 * 2 * d * k
  assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
  assert abs(ours.std() / 0.02 - 1) < 0.02 and abs(ours.mean()) < 5e-4
  beyond = (np.abs(ours) > 0.04).mean()
  assert abs(beyond - (1 - math.erf(2 / math.sqrt(2)))) < 0.006
  for b in biases:
    np.testing.assert_array_equal(b, 0.0)


def test_lora_trunc_normal_is_the_authors_as_built():
  """lora_init='trunc_normal' (the code's LoRA): their ViT's init pass gives both
  LoRA linears (LoRA_a, LoRA_b) timm's trunc_normal_(std=.02), as the Adapter's."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d, h = 128, 32
  _, params = init(tiny_model('peft', lora_rank=h, lora_init='trunc_normal', width=d,
                              mlp_dim=2 * d))
  ours = np.concatenate([np.asarray(params['Transformer'][f'encoderblock_{i}'][
      'MultiHeadDotProductAttention_0']['lora'][n]).ravel()
                         for i in range(3) for n in ('down', 'up')])
  theirs = ref_peft.timm_trunc_normal(np.random.default_rng(1), ours.size, 0.02)
  assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
  assert abs(ours.std() / 0.02 - 1) < 0.02


def test_the_settings_use_the_authors_adapter_init():
  """peft=adapter in a setting (Tables 18-19) is the authors' model as built; the
  base config keeps the Adapter class's own Xavier init (runs stored before the
  field existed used it)."""
  from pyra_jax.configs import vitb_high_adapter, vitl_high_adapter, vits_peft_adapter  # pylint: disable=g-import-not-at-top
  for get in (vitb_high_adapter.get_config, vitl_high_adapter.get_config,
              vits_peft_adapter.get_config):
    assert get().model.adapter_init == 'trunc_normal'
  assert vitb_high.get_config('peft=adapter').model.adapter_init == 'trunc_normal'
  assert get_base_config().model.adapter_init == 'xavier'


def test_initialisation_follows_the_authors():
  # adapter_init='xavier': the authors' Adapter class on its own (their model
  # then overwrites it, see the test above).
  _, params = init(tiny_model('pyra', peft='adapter', peft_dim=3, adapter_init='xavier'))
  a = params['Transformer']['encoderblock_0']['adapter']
  d, k = 32, 3
  bound = np.sqrt(6.0 / (d + k))  # Xavier-uniform
  for name in ('down', 'up'):
    kernel = np.asarray(a[name]['kernel'])
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.5 * bound
    assert 0 < np.abs(np.asarray(a[name]['bias'])).max() < 1e-5  # N(0, 1e-6)

  _, params = init(tiny_model('pyra', peft='convpass', peft_dim=3))
  for branch in ('attn', 'mlp'):
    c = params['Transformer']['encoderblock_1']['convpass'][branch]
    np.testing.assert_array_equal(c['up']['kernel'], 0)
    np.testing.assert_array_equal(c['up']['bias'], 0)
    np.testing.assert_array_equal(c['down']['bias'], 0)
    np.testing.assert_array_equal(c['conv']['bias'], 0)
    want = np.zeros((3, 3, k, k))
    want[1, 1] = np.eye(k)
    np.testing.assert_array_equal(c['conv']['kernel'], want)
  _, params = init(tiny_model('pyra', peft='convpass', peft_dim=3, convpass_init='xavier'))
  conv = np.asarray(params['Transformer']['encoderblock_0']['convpass']['mlp']['conv']['kernel'])
  assert np.abs(conv).max() <= np.sqrt(6.0 / (18 * k)) and np.abs(conv[0, 0]).max() > 0


def test_convpass_starts_as_the_frozen_backbone():
  """Its `up` is zero: at initialisation the logits are those without Convpass."""
  model, params = init(tiny_model('pyra', peft='convpass', peft_dim=3))
  bare = build_model(tiny_model('pyra', lora_rank=0))
  stripped = {k: v for k, v in params.items()}
  stripped['Transformer'] = {n: ({k: v for k, v in b.items() if k != 'convpass'}
                                 if isinstance(b, dict) else b)
                             for n, b in params['Transformer'].items()}
  x = images(2)
  np.testing.assert_array_equal(model.apply({'params': params}, x),
                                bare.apply({'params': stripped}, x))


@pytest.mark.parametrize('peft', MODULES)
def test_gradients_reach_exactly_the_trainable_parameters(peft):
  cfg = tiny_model('pyra', peft=peft, peft_dim=3)
  model, params = init(cfg)
  params = randomize(params, MODULE_PARAMS + r'|pyra/w_d')
  trainable = get_base_config().trainable
  x, y = images(4), jnp.array([0, 1, 2, 3])

  def loss(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

  grads = jax.jit(jax.grad(loss))(params)
  flat = {'/'.join(str(k.key) for k in path): g
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  chosen = {n for n in flat if any(re.fullmatch(p, n) for p in trainable.values())}
  expected = {n for n in flat if f'/{peft}/' in n or '/pyra/' in n or n.startswith('head/')}
  assert chosen == expected
  for name in chosen:
    if f'/{peft}/' in name:
      assert float(jnp.abs(flat[name]).sum()) > 0, f'no gradient reaches {name}'


@pytest.mark.parametrize('peft', MODULES)
def test_deployed_model_keeps_the_module(peft):
  cfg = tiny_model('pyra', peft=peft, peft_dim=3)
  model, params = init(cfg)
  params = randomize(params, MODULE_PARAMS)
  dep = deployed_config(cfg)
  assert dep.peft == peft and dep.peft_dropout == 0.0
  deployed = build_model(dep)
  x = images(2)
  np.testing.assert_array_equal(model.apply({'params': params}, x),
                                deployed.apply({'params': params}, x))
  # Dropout acts in training only.
  a = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  assert np.abs(np.asarray(a) - np.asarray(model.apply({'params': params}, x))).max() > 0


def test_paper_trainable_counts():
  """Tables 18-19: Adapter at ViT-B high trains 0.19 % (Adapter + generators)."""
  config = vitb_high.get_config('peft=adapter')
  params = param_counts.abstract_params(config.model, 100)
  trainable, frozen = optim.split_params(params, config.trainable)
  report = param_counts.trainable_report(trainable, frozen)
  adapter = 12 * ((768 * 8 + 8) + (8 * 768 + 768))  # down and up with biases
  generators = 12 * 768 + sum((40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3))
  assert (report['lora'], report['module'], report['generators']) == (0, adapter, generators)
  assert round(report['lora_generators_percent_of_backbone'], 2) == 0.19
  # ViT-S (PEFT reference of Table 18) and ViT-L: widths 4 and 12.
  for cfg, d, depth, k in ((vits_peft.get_config('peft=adapter'), 384, 12, 4),
                           (vitl_high.get_config('peft=adapter,method=peft'), 1024, 24, 12)):
    counts = param_counts.count_by_category(param_counts.abstract_params(cfg.model, 100))
    assert counts['module'] == depth * (2 * d * k + k + d) and counts['lora'] == 0
  # Convpass at ViT-B (width 8, two bypasses per block): "less than 0.5 %" (its paper).
  config = vitb_low.get_config('peft=convpass')
  counts = param_counts.count_by_category(param_counts.abstract_params(config.model, 100))
  per_bypass = (768 * 8 + 8) + (3 * 3 * 8 * 8 + 8) + (8 * 768 + 768)
  assert counts['module'] == 12 * 2 * per_bypass == 327_552
  assert counts['module'] / counts['backbone'] < 0.005


# --- The authors' Adapter checkpoints (pyra_torch) ----------------------------

def _adapter_state(rng, depth=2, width=32, k=3):
  sd = ref_vit.random_timm_state(rng, width=width, depth=depth, num_classes=5,
                                 pyra_r=(3, 1))
  for i in range(depth):
    s = f'blocks.{i}.adapter.'
    sd[s + 'ln1.weight'] = ref_vit._rand(rng, (k, width), 0.3)  # pylint: disable=protected-access
    sd[s + 'ln1.bias'] = ref_vit._rand(rng, (k,))  # pylint: disable=protected-access
    sd[s + 'ln2.weight'] = ref_vit._rand(rng, (width, k), 0.3)  # pylint: disable=protected-access
    sd[s + 'ln2.bias'] = ref_vit._rand(rng, (width,))  # pylint: disable=protected-access
  return sd


def _checkpoint_config(**kw):
  return checkpoint_model(**{'peft': 'adapter', 'peft_dim': 3, 'num_classes': 5, **kw})


def _load(path, cfg):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', CheckpointWarning)
    return load_pretrained(str(path), 'auto', init_params(cfg), cfg)


def _write(sd, path):
  if str(path).endswith('.safetensors'):
    save_file({'module.' + k: v for k, v in sd.items()}, str(path))
  else:
    torch = pytest.importorskip('torch')
    torch.save({'model': {k: torch.from_numpy(v) for k, v in sd.items()}}, str(path))


@pytest.mark.parametrize('ext', ['safetensors', 'pth'])
def test_authors_adapter_checkpoint_forward(tmp_path, ext):
  """Their names (`blocks.i.adapter.ln1/ln2`, PyTorch (out, in) weights) load, and
  our forward equals a numpy transcription of their block on those names."""
  sd = _adapter_state(np.random.default_rng(0))
  for k in [k for k in sd if 'pyra' in k]:
    del sd[k]
  path = tmp_path / f'adapter.{ext}'
  _write(sd, path)
  from pyra_jax.checkpoints import detect_format  # pylint: disable=g-import-not-at-top
  assert detect_format(str(path)) == 'pyra_torch'  # found by the adapter's names alone
  cfg = _checkpoint_config()
  params = _load(path, cfg)
  x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  got = build_model(cfg).apply({'params': params}, x)
  want = _authors_forward(sd, x)
  scale = np.abs(want).max()
  assert scale > 0.1
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * scale)


def test_authors_adapter_checkpoint_with_pyra_and_wrong_width(tmp_path):
  sd = _adapter_state(np.random.default_rng(2))
  path = tmp_path / 'adapter_pyra.safetensors'
  _write(sd, path)
  cfg = _checkpoint_config(method='pyra', schedule='3,1')
  p = _load(path, cfg)
  blk = p['Transformer']['encoderblock_1']
  np.testing.assert_array_equal(blk['adapter']['down']['kernel'],
                                sd['blocks.1.adapter.ln1.weight'].T)
  np.testing.assert_array_equal(blk['adapter']['up']['bias'], sd['blocks.1.adapter.ln2.bias'])
  np.testing.assert_array_equal(blk['pyra']['w_r'], sd['blocks.1.pyra_a'])
  from pyra_jax.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
  with pytest.raises(CheckpointError, match=r'model\.peft_dim=3'):
    _load(path, _checkpoint_config(method='pyra', schedule='3,1', peft_dim=5))
  with pytest.raises(CheckpointError, match=r"model\.peft='adapter' and model\.peft_dim=3"):
    _load(path, _checkpoint_config(method='pyra', schedule='3,1', peft='lora', lora_rank=0))


def _authors_forward(sd, images):
  """Their Block on their names: x + adapter(mlp(norm2(x))), adapter(y) =
  y + ln2(QuickGELU(ln1(y))); the rest is reference_vit's timm ViT."""
  plain = {k: v for k, v in sd.items() if '.adapter.' not in k}
  adapters = {k: v for k, v in sd.items() if '.adapter.' in k}
  # reference_vit has no Adapter: transcribe the block with it here.
  sd64 = {k: np.asarray(v, np.float64) for k, v in plain.items()}
  x = ref_vit.patch_embed(np.asarray(images, np.float64), sd64['patch_embed.proj.weight'],
                          sd64['patch_embed.proj.bias'])
  bsz, _, dim = x.shape
  x = np.concatenate([np.broadcast_to(sd64['cls_token'], (bsz, 1, dim)), x], 1) + sd64['pos_embed']
  heads = 2
  hd = dim // heads
  n = x.shape[1]
  for i in range(2):
    s = f'blocks.{i}.'
    h = ref_vit.layer_norm(x, sd64[s + 'norm1.weight'], sd64[s + 'norm1.bias'], 1e-6)
    qkv = ref_vit.linear(h, sd64, s + 'attn.qkv').reshape(bsz, n, 3, heads, hd)
    qkv = qkv.transpose(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(hd)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att = att / att.sum(-1, keepdims=True)
    o = (att @ qkv[2]).transpose(0, 2, 1, 3).reshape(bsz, n, dim)
    x = x + ref_vit.linear(o, sd64, s + 'attn.proj')
    h = ref_vit.layer_norm(x, sd64[s + 'norm2.weight'], sd64[s + 'norm2.bias'], 1e-6)
    y = ref_vit.linear(ref_vit.gelu_exact(ref_vit.linear(h, sd64, s + 'mlp.fc1')), sd64,
                       s + 'mlp.fc2')
    a = {k[len(s + 'adapter.'):]: np.asarray(v, np.float64) for k, v in adapters.items()
         if k.startswith(s)}
    z = y @ a['ln1.weight'].T + a['ln1.bias']
    z = z / (1.0 + np.exp(-1.702 * z))  # QuickGELU
    x = x + (y + z @ a['ln2.weight'].T + a['ln2.bias'])
  x = ref_vit.layer_norm(x, sd64['norm.weight'], sd64['norm.bias'], 1e-6)
  return ref_vit.linear(x[:, 0], sd64, 'head')


# --- Configs and user errors ---------------------------------------------------

def test_paper_settings_take_peft():
  c = vitb_high.get_config('peft=convpass,method=tome')
  assert (c.model.peft, c.model.method, c.model.peft_dim) == ('convpass', 'tome', 8)
  assert vitl_high.get_config('peft=adapter').model.peft_dim == 12
  from pyra_jax.configs import vitb_high_adapter, vitb_high_convpass  # pylint: disable=g-import-not-at-top
  assert vitb_high_adapter.get_config().model.peft == 'adapter'
  assert vitb_high_convpass.get_config('method=tome').model.method == 'tome'
  with pytest.raises(ValueError, match="peft='xyz': use one of lora, adapter, convpass"):
    vitb_high.get_config('peft=xyz')


def test_bad_peft_argument_fails_with_one_sentence():
  rc, _, err = cli('--config=configs/tiny.py:peft=prompt', '--workdir=/tmp/unused')
  assert rc != 0 and 'Traceback' not in err, err
  assert "peft='prompt': use one of lora, adapter, convpass, fact, snf." in err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('override,message', [
    ('--config.model.peft=prompt',
     "model.peft must be one of ('lora', 'adapter', 'convpass', 'fact', 'snf'), got 'prompt'."),
    ('--config.model.peft_dim=0',
     "model.peft_dim must be a positive integer for model.peft='adapter', got 0."),
    ('--config.model.convpass_init=ones',
     "model.convpass_init must be one of ('identity', 'xavier'), got 'ones'."),
    ('--config.model.adapter_init=kaiming',
     "model.adapter_init must be one of ('trunc_normal', 'xavier'), got 'kaiming'."),
])
def test_bad_peft_fields_fail_with_one_sentence(tmp_path, capsys, monkeypatch, override,
                                                message):
  peft = 'convpass' if 'convpass' in override else 'adapter'
  code, _, err = run_main(capsys, monkeypatch, f'--config=configs/tiny.py:peft={peft}',
                          f'--workdir={tmp_path}', override)
  reset_flags()
  assert code == 1 and message in err and 'Traceback' not in err, err
  assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize('peft', MODULES)
def test_export_round_trip_keeps_the_module(tmp_path, capsys, monkeypatch, peft):
  """Train briefly (tiny, merging), export, restore: same logits, module kept."""
  from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  from tests.helpers.data import require_offline_mnist  # pylint: disable=g-import-not-at-top
  require_offline_mnist()
  args = [f'--config=configs/tiny.py:peft={peft}', f'--workdir={tmp_path}',
          '--config.num_epochs=1', '--config.warmup_epochs=0',
          '--config.data.eval_split=val200', '--config.eval_batch_size=200',
          '--config.model.peft_dim=3']
  code, _, err = run_main(capsys, monkeypatch, *args)
  assert code == 0, err
  export_dir = tmp_path / 'deploy'
  code, _, err = run_main(capsys, monkeypatch, *args, '--mode=export',
                          f'--export_dir={export_dir}')
  reset_flags()
  assert code == 0, err
  exported, cfg = export_lib.load_export(str(export_dir))
  assert cfg.model.peft == peft and cfg.model.peft_dropout == 0.0
  names = '/'.join(str(jax.tree_util.tree_structure(exported)).split())
  assert f"'{peft}'" in names and "'lora'" not in names

  config = tiny_config(f'peft={peft}', num_epochs=1, warmup_epochs=0, model=dict(peft_dim=3))
  run, trainable, _ = setup.restore_run(config, str(tmp_path))
  trained = optim.merge_params(jax.device_get(trainable), jax.device_get(run.frozen))
  x = images(3)
  want = run.model.apply({'params': trained}, x, train=False)
  got = build_model(cfg.model).apply({'params': exported}, x, train=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The trained module is not at its initialisation (Convpass's `up` starts at 0).
  blk = exported['Transformer']['encoderblock_0'][peft]
  up = blk['up'] if peft == 'adapter' else blk['mlp']['up']
  assert np.abs(np.asarray(up['kernel'])).max() > 1e-4


def test_runs_stored_before_the_modules_keep_their_trainable_group():
  """The old default regex reads as today's: it selects the same LoRA-model leaves."""
  from pyra_jax import checkpointing  # pylint: disable=g-import-not-at-top
  old = r'(.*/lora/.*|^head.*)'
  new = get_base_config().trainable.lora_head
  out = checkpointing.stored_config({'trainable': {'pyra': r'.*/pyra/.*', 'lora_head': old}})
  assert out['trainable']['lora_head'] == new
  mine = checkpointing.stored_config({'trainable': {'lora_head': r'^head.*'}})
  assert mine['trainable']['lora_head'] == r'^head.*'  # a user's own regex stays
  config = tiny_config()
  paths = common_flatten(param_counts.abstract_params(config.model, 10))
  assert {p for p in paths if re.fullmatch(old, p)} == {p for p in paths if re.fullmatch(new, p)}


def common_flatten(tree):
  from pyra_jax.checkpoints import common  # pylint: disable=g-import-not-at-top
  return list(common.flatten(tree))
