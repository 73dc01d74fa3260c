"""Full fine-tuning with merging (MAE's recipe): every parameter trains, layer-wise
lr decay, the pooled head, mixup/cutmix with label smoothing, the CLI preset.

References are independent: MAE's `get_layer_id_for_vit` and `param_groups_lrd`
(util/lr_decay.py) and timm's `Mixup._mix_batch` / `mixup_target`
(timm/data/mixup.py), transcribed in numpy here; ToMe's size-weighted global
pool (tome/patch/mae.py) in tests/reference_merge.py.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from pyra_jax import optim
from pyra_jax.models import build_model
from pyra_jax.training import mixup
from pyra_jax.training import steps
from tests.helpers import reference_merge as ref
from tests.helpers.models import load_setting, tiny_config

IMAGE = 32


def _config(method='pyra', pool='gap', **kw):
  return tiny_config(f'finetune=full,method={method}',
                     model=dict(num_classes=5, pool=pool, drop_path=0.0),
                     num_epochs=2, warmup_epochs=0, **kw)


def _images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)),
                     jnp.float32)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module')
def model_and_params():
  c = _config()
  model = build_model(c.model)
  params = jax.jit(lambda k: model.init(k, _images(1)))(jax.random.PRNGKey(0))['params']
  return c, model, params


def test_full_finetune_trains_every_parameter(model_and_params):
  c, model, params = model_and_params
  trainable, frozen = optim.split_params(params, c.trainable)
  assert frozen == {} and c.model.lora_rank == 0
  assert not any('/lora/' in k for k in _flat(params))
  labels = _flat(optim.param_labels(params, c.trainable))
  assert {k for k, g in labels.items() if g == 'pyra'} == {
      k for k in labels if '/pyra/' in k}
  assert 'fc_norm/scale' in labels and 'Transformer/encoder_norm/scale' not in labels
  # Random generators (at init W_D = 0 makes PYRA's W_r receive no gradient).
  flat = _flat(params)
  rng = np.random.default_rng(1)
  flat = {k: (v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
              if '/pyra/' in k else v) for k, v in flat.items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  batch = {'image': _images(4), 'label': jnp.array([0, 1, 2, 3]),
           'mask': jnp.ones(4, bool)}
  grads = jax.jit(jax.grad(lambda t: steps.training_loss(
      model, t, {}, batch, jax.random.PRNGKey(2))[0]))(params)
  for k, g in _flat(grads).items():
    assert float(jnp.abs(g).max()) > 0, f'{k} receives no gradient'
  tx, _ = optim.make_optimizer(c, steps_per_epoch=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = _flat(optax.apply_updates(params, updates))
  for k, v in _flat(params).items():
    assert not np.array_equal(np.asarray(new[k]), np.asarray(v)), f'{k} did not change'


# --- Layer-wise lr decay: MAE's util/lr_decay.py in numpy. --------------------

def _timm_name(path):
  """Our parameter path as the timm/MAE name whose layer id MAE computes."""
  if path.startswith('embedding/'):
    return 'patch_embed.proj.' + path.split('/')[-1]
  if path == 'cls':
    return 'cls_token'
  if path == 'dist':
    return 'dist_token'
  if path == 'Transformer/posembed_input/pos_embedding':
    return 'pos_embed'
  if path.startswith('Transformer/encoderblock_'):
    i = path.split('/')[1].rsplit('_', 1)[1]
    return f'blocks.{i}.' + '.'.join(path.split('/')[2:])
  return path.replace('/', '.')


def _mae_layer_id(name, num_layers):  # MAE's get_layer_id_for_vit
  if name in ['cls_token', 'pos_embed']:
    return 0
  elif name.startswith('patch_embed'):
    return 0
  elif name.startswith('blocks'):
    return int(name.split('.')[1]) + 1
  else:
    return num_layers


def _mae_lr_scale(name, depth, decay):  # MAE's param_groups_lrd
  num_layers = depth + 1
  layer_scales = [decay ** (num_layers - i) for i in range(num_layers + 1)]
  return layer_scales[_mae_layer_id(name, num_layers)]


@pytest.mark.parametrize('decay', [0.65, 0.75])
def test_layer_decay_scales_each_layer_as_mae(model_and_params, decay):
  c, _, params = model_and_params
  depth = c.model.depth
  grads = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(p.size).normal(size=p.shape), jnp.float32), params)
  c_off = _config(weight_decay=0.05, layer_decay=1.0)
  c_on = _config(weight_decay=0.05, layer_decay=decay)

  def update(cfg):
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10)
    state = tx.init(params)
    for _ in range(2):  # The second step has Adam moments and decay in play.
      u, state = tx.update(grads, state, params)
    return _flat(u)

  off, on = update(c_off), update(c_on)
  seen = set()
  for k in off:
    want = _mae_lr_scale(_timm_name(k), depth, decay)
    seen.add(round(want, 12))
    np.testing.assert_allclose(on[k], want * off[k], rtol=2e-6, err_msg=k)
  assert len(seen) == depth + 2  # embeddings, every block, the head side


def test_no_weight_decay_on_tokens_position_embeddings_biases_and_norms(model_and_params):
  c, _, params = model_and_params
  lr, wd = 1e-2, 0.5
  cfg = _config(lr=lr, weight_decay=wd, pyra_lr=-1.0)
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = _flat(optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0]))
  for k, v in _flat(params).items():
    v = np.asarray(v)
    no_decay = v.ndim < 2 or k in ('cls', 'Transformer/posembed_input/pos_embedding')
    want = v if no_decay else v * (1 - lr * wd)
    np.testing.assert_allclose(new[k], want, rtol=1e-6, err_msg=k)


# --- The pooled head: ToMe's size-weighted global pool, then fc_norm. --------

@pytest.mark.parametrize('method', ['tome', 'pyra'])
def test_gap_head_is_the_size_weighted_mean_of_the_patches(method):
  c = _config(method)
  model = build_model(c.model)
  params = jax.jit(lambda k: model.init(k, _images(1)))(jax.random.PRNGKey(3))['params']
  rng = np.random.default_rng(4)
  flat = {k: (v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
              if k.startswith('fc_norm') or '/pyra/' in k else v)
          for k, v in _flat(params).items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  x = _images(2, seed=5)
  got = jax.jit(lambda p: model.apply({'params': p}, x))(params)
  want = ref.vit_forward(jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                         np.asarray(x, np.float64), model.schedule, num_heads=2,
                         pyra=method == 'pyra', pool='gap')
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


# --- Mixup / CutMix: timm's Mixup in 'batch' mode, in numpy. ------------------

def _timm_mix(x_nchw, target, num_classes, lam, use_cutmix, cy, cx, smoothing):
  """timm's `_mix_batch` (given its draws) and `mixup_target`."""
  x = x_nchw.copy()
  if lam != 1.0:
    if use_cutmix:
      ratio = np.sqrt(1 - lam)
      img_h, img_w = x.shape[-2:]
      cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
      yl = np.clip(cy - cut_h // 2, 0, img_h)
      yh = np.clip(cy + cut_h // 2, 0, img_h)
      xl = np.clip(cx - cut_w // 2, 0, img_w)
      xh = np.clip(cx + cut_w // 2, 0, img_w)
      x[:, :, yl:yh, xl:xh] = x[::-1][:, :, yl:yh, xl:xh]
      lam = 1. - (yh - yl) * (xh - xl) / float(img_h * img_w)
    else:
      x = x * lam + x[::-1] * (1. - lam)
  off = smoothing / num_classes
  on = 1. - smoothing + off
  y1 = np.full((len(target), num_classes), off)
  y1[np.arange(len(target)), target] = on
  y2 = y1[::-1]
  return x, y1 * lam + y2 * (1. - lam)


@pytest.mark.parametrize('seed', range(6))
def test_mixup_and_cutmix_match_timm(seed):
  images = np.random.default_rng(seed).normal(size=(6, 16, 12, 3)).astype(np.float32)
  labels = np.array([0, 3, 1, 4, 2, 3])
  key = jax.random.PRNGKey(seed)
  p = mixup.draw(key, 16, 12, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
  got_x, got_y = mixup.apply(jnp.asarray(images), jnp.asarray(labels), 5, p, 0.1)
  lam = float(p.lam) if bool(p.mix) else 1.0
  want_x, want_y = _timm_mix(images.transpose(0, 3, 1, 2), labels, 5, lam,
                             bool(p.use_cutmix), int(p.cy), int(p.cx), 0.1)
  np.testing.assert_allclose(np.asarray(got_x), want_x.transpose(0, 2, 3, 1),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got_y).sum(1), 1.0, rtol=1e-6)


def test_mixup_draws_follow_the_probabilities():
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  p = jax.vmap(lambda k: mixup.draw(k, 32, 32, mixup_alpha=0.8, cutmix_alpha=1.0,
                                    prob=0.75, switch_prob=0.5))(keys)
  assert abs(float(p.mix.mean()) - 0.75) < 0.03
  assert abs(float(p.use_cutmix.mean()) - 0.5) < 0.03
  lam_mix = np.asarray(p.lam)[~np.asarray(p.use_cutmix)]
  assert abs(lam_mix.mean() - 0.5) < 0.03  # Beta(0.8, 0.8): mean 1/2, var 1/(4 * 2.6)
  assert abs(lam_mix.var() - 1 / (4 * 2.6)) < 0.01
  off = jax.vmap(lambda k: mixup.draw(k, 8, 8, mixup_alpha=0.0, cutmix_alpha=0.0,
                                      prob=1.0, switch_prob=0.5))(keys[:10])
  assert not bool(off.mix.any())


# --- The preset through the command line. -------------------------------------

def test_full_finetune_preset_through_the_cli(tmp_path, capsys, monkeypatch):
  from tests.helpers.data import require_offline_mnist
  from tests.helpers.cli import cli, reset_flags, run_main
  require_offline_mnist()
  common = ['--config=configs/tiny.py:finetune=full', f'--workdir={tmp_path}',
            '--config.data.eval_split=val200', '--config.eval_batch_size=64',
            '--config.num_epochs=1', '--config.model.pool=gap',
            '--config.layer_decay=0.75', '--config.label_smoothing=0.1',
            '--config.mixup.mixup_alpha=0.8', '--config.mixup.cutmix_alpha=1.0',
            '--config.data.flip=True', '--config.data.randaugment=rand-m9-mstd0.5-inc1',
            '--config.data.random_erasing=0.25']
  code, out, err = run_main(capsys, monkeypatch, *common)
  assert code == 0, err
  results = json.loads((tmp_path / 'results.json').read_text())
  trained = results['trainable_params']
  assert trained['lora'] == 0 and trained['other_trained'] == trained['backbone'] > 0
  assert trained['trainable_percent_of_backbone'] > 100
  export_dir = tmp_path / 'deploy'
  code, out, err = run_main(capsys, monkeypatch, *common, '--mode=export',
                            f'--export_dir={export_dir}')
  assert code == 0, err
  code, out, err = run_main(capsys, monkeypatch, *common, '--mode=eval',
                            f'--export_dir={export_dir}')
  final = f'{100 * results["final_accuracy"]:.2f}%'
  assert code == 0 and f'val200 accuracy {final}' in out, out + err
  reset_flags()
  # A bad argument fails while the flags are parsed: in a subprocess, as the
  # command-line tests do.
  code, out, err = cli('--config=configs/tiny.py:finetune=all', f'--workdir={tmp_path / "bad"}')
  assert code == 2 and "finetune='all': use one of peft, full." in err, err
  assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err


# --- The settings: MAE's values (FINETUNE.md, main_finetune.py), Table 21. ------

def test_mae_settings_carry_maes_recipe():
  for name, (variant, epochs, lr, decay, drop, depth) in {
      'vitb_mae_fullft.py': ('B/16', 100, 5e-4 * 1024 / 256, 0.65, 0.1, 12),
      'vitl_mae_fullft.py': ('L/16', 50, 1e-3 * 1024 / 256, 0.75, 0.2, 24)}.items():
    c = load_setting(name)
    m = c.model
    assert (m.variant, m.method, m.pool, m.drop_path, m.head_init_std, m.lora_rank,
            m.prop_attn) == (variant, 'pyra', 'gap', drop, 2e-5, 0, False)
    assert m.schedule == ('vitb_high' if depth == 12 else 'vitl_high')
    assert (c.num_epochs, c.warmup_epochs, c.batch_size, c.layer_decay) == (
        epochs, 5, 1024, decay)
    assert c.lr == pytest.approx(lr) and (c.min_lr, c.warmup_init_lr) == (1e-6, 0.0)
    assert (c.weight_decay, c.label_smoothing) == (0.05, 0.1)
    assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.mixup.prob,
            c.mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    d = c.data
    assert (d.task, d.train_split, d.eval_split) == ('tfds:imagenet2012', 'train', 'validation')
    assert (d.random_resized_crop, d.flip, d.randaugment, d.random_erasing) == (
        True, True, 'rand-m9-mstd0.5-inc1', 0.25)
    assert c.trainable.backbone == '.*'
    assert load_setting(name, 'method=tome').model.method == 'tome'
