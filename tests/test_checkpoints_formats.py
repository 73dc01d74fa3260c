"""Every format's real names and layouts land in the right place of our tree.

Fixtures are random checkpoints written in each format's own key names and
shapes (tests/helpers/reference_vit.py). Every value is distinct, so each check below
(an exact equality against an element-by-element reading of the source
layout) fails if a tensor is misplaced, mis-split or mis-transposed.
"""

import numpy as np
import pytest
from safetensors.numpy import save_file

from pyra_jax import convert as convert_lib
from pyra_jax.checkpoints import CheckpointError, CheckpointWarning, load_pretrained
from pyra_jax.checkpoints import detect_format
from tests.helpers import reference_vit as ref
from tests.helpers.checkpoints import (D, DEPTH, HD, HEADS, MHA, PATCH, check_torch_block,
                                       check_torch_stem, checkpoint_model, flat, load_quiet)
from tests.helpers.models import init_params


# --- timm ----------------------------------------------------------------------

def test_timm_placement_prefix_and_reinitialised_head(tmp_path):
  cfg = checkpoint_model()
  init = init_params(cfg)
  sd = ref.random_timm_state(np.random.default_rng(0), num_classes=1000)
  sd['pre_logits.fc.weight'] = np.ones((D, D), np.float32)
  path = tmp_path / 'vit.safetensors'
  save_file({'module.' + k: v for k, v in sd.items()}, str(path))
  assert detect_format(str(path)) == 'timm'
  with pytest.warns(CheckpointWarning, match=r'module\.head\.bias.*module\.pre_logits'):
    p = flat(load_pretrained(str(path), 'timm', init, cfg))
  check_torch_stem(p, sd)
  for i in range(DEPTH):
    check_torch_block(p, sd, i)
  i0 = flat(init)
  for k in ('head/kernel', 'head/bias'):  # the task's head: kept from init
    np.testing.assert_array_equal(p[k], i0[k])
  assert set(p) == set(i0)


def test_timm_deit_distilled_layerscale_no_qkv_bias(tmp_path):
  cfg = checkpoint_model(distilled=True, layerscale=True, qkv_bias=False)
  init = init_params(cfg)
  sd = ref.random_timm_state(np.random.default_rng(1), distilled=True, layerscale=True,
                             qkv_bias=False, num_classes=1000)
  path = tmp_path / 'deit.safetensors'
  save_file(sd, str(path))
  p = flat(load_quiet(path, 'auto', init, cfg))
  check_torch_stem(p, sd)
  np.testing.assert_array_equal(p['dist'], sd['dist_token'])
  for i in range(DEPTH):
    check_torch_block(p, sd, i)
    t = f'Transformer/encoderblock_{i}/'
    np.testing.assert_array_equal(p[t + 'LayerScale_0/scale'], sd[f'blocks.{i}.ls1.gamma'])
    np.testing.assert_array_equal(p[t + 'LayerScale_1/scale'], sd[f'blocks.{i}.ls2.gamma'])
  i0 = flat(init)
  np.testing.assert_array_equal(p['head_dist/kernel'], i0['head_dist/kernel'])


def test_mae_decoder_dropped_and_fc_norm_explained(tmp_path):
  cfg = checkpoint_model()
  init = init_params(cfg)
  sd = ref.random_timm_state(np.random.default_rng(2), mae_decoder=True)
  path = tmp_path / 'mae.safetensors'
  save_file(sd, str(path))
  with pytest.warns(CheckpointWarning, match='decoder_blocks.0.norm1.weight'):
    p = flat(load_pretrained(str(path), 'timm', init, cfg))
  check_torch_stem(p, sd)
  # A global-pool fine-tuned MAE checkpoint: fc_norm instead of norm.
  sd2 = {k: v for k, v in sd.items() if 'decoder' not in k and k != 'mask_token'}
  sd2['fc_norm.weight'], sd2['fc_norm.bias'] = sd2.pop('norm.weight'), sd2.pop('norm.bias')
  save_file(sd2, str(path))
  with pytest.warns(CheckpointWarning, match='global average pooling'):
    p = flat(load_pretrained(str(path), 'timm', init, cfg))
  check_torch_stem(p, sd2, norm='fc_norm')


# --- the authors' PYRA checkpoints ---------------------------------------------

def test_pyra_torch_loads_lora_pyra_and_head(tmp_path):
  cfg = checkpoint_model(method='pyra', schedule='3,1', lora_rank=4, num_classes=5)
  init = init_params(cfg)
  sd = ref.random_timm_state(np.random.default_rng(3), num_classes=5, lora_rank=4,
                             pyra_r=(3, 1))
  path = tmp_path / 'pyra.safetensors'
  save_file({'model.' + k: v for k, v in sd.items()}, str(path))
  assert detect_format(str(path)) == 'pyra_torch'
  p = flat(load_quiet(path, 'auto', init, cfg))
  check_torch_stem(p, sd)
  for i in range(DEPTH):
    check_torch_block(p, sd, i)
    t, s = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    a, b = sd[s + 'attn.LoRA_a.weight'], sd[s + 'attn.LoRA_b.weight']  # (h, D), (3D, h)
    down, up = p[f'{t}{MHA}/lora/down'], p[f'{t}{MHA}/lora/up']
    assert down.shape == (D, 4) and up.shape == (4, 3 * D)
    for r in range(4):
      np.testing.assert_array_equal(down[:, r], a[r, :])
      np.testing.assert_array_equal(up[r, :], b[:, r])
    np.testing.assert_array_equal(p[t + 'pyra/w_r'], sd[s + 'pyra_a'])
    np.testing.assert_array_equal(p[t + 'pyra/w_d'], sd[s + 'pyra_b'])
    np.testing.assert_array_equal(p[t + 'pyra/norm/scale'], sd[s + 'pyra_norm.weight'])
    np.testing.assert_array_equal(p[t + 'pyra/norm/bias'], sd[s + 'pyra_norm.bias'])
  for c in range(5):
    np.testing.assert_array_equal(p['head/kernel'][:, c], sd['head.weight'][c])
  np.testing.assert_array_equal(p['head/bias'], sd['head.bias'])

  # Another task (3 classes): the trained head does not fit and is re-initialised.
  cfg3 = checkpoint_model(method='pyra', schedule='3,1', lora_rank=4, num_classes=3)
  init3 = init_params(cfg3)
  with pytest.warns(CheckpointWarning, match='re-initialised'):
    p3 = flat(load_pretrained(str(path), 'pyra_torch', init3, cfg3))
  np.testing.assert_array_equal(p3['head/kernel'], flat(init3)['head/kernel'])
  np.testing.assert_array_equal(p3[f'Transformer/encoderblock_0/{MHA}/lora/down'],
                                sd['blocks.0.attn.LoRA_a.weight'].T)


# --- google-research/vision_transformer npz --------------------------------------

@pytest.mark.parametrize('pre_linen', [True, False])
def test_vit_npz_both_spellings(tmp_path, pre_linen):
  cfg = checkpoint_model()
  init = init_params(cfg)
  w = ref.random_vit_npz(np.random.default_rng(4), heads=HEADS, pre_linen=pre_linen)
  path = tmp_path / 'ViT-B_16.npz'
  np.savez(path, **w)
  assert detect_format(str(path)) == 'npz'
  with pytest.warns(CheckpointWarning, match='pre_logits'):
    p = flat(load_pretrained(str(path), 'npz', init, cfg))
  mha, ln1, mlp = (('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
                   if pre_linen else (MHA, 'LayerNorm_1', 'MlpBlock_0'))
  renames = {MHA: mha, 'LayerNorm_1': ln1, 'MlpBlock_0': mlp}
  i0 = flat(init)
  for k in i0:
    if k.startswith('head'):
      np.testing.assert_array_equal(p[k], i0[k])  # 21K head dropped
      continue
    src = k
    for ours, theirs in renames.items():
      src = src.replace(f'/{ours}/', f'/{theirs}/')
    np.testing.assert_array_equal(p[k], w[src], err_msg=k)
  # Same through the reference's own (timm-direction) reading of the layout.
  sd = ref.vit_npz_to_timm(w, pre_linen=pre_linen)
  for i in range(DEPTH):
    check_torch_block(p, sd, i)


def test_vit_npz_wrapper_prefix(tmp_path):
  cfg = checkpoint_model()
  w = ref.random_vit_npz(np.random.default_rng(5), heads=HEADS)
  np.savez(tmp_path / 'c.npz', **{'opt/target/' + k: v for k, v in w.items()})
  p = flat(load_quiet(tmp_path / 'c.npz', 'auto', init_params(cfg), cfg))
  np.testing.assert_array_equal(p['cls'], w['cls'])


# --- Hugging Face Dinov2 ---------------------------------------------------------

def test_dinov2_hf_placement(tmp_path):
  cfg = checkpoint_model(layerscale=True)
  init = init_params(cfg)
  hf = ref.random_hf_dinov2_state(np.random.default_rng(6))
  path = tmp_path / 'model.safetensors'
  stored = {'dinov2.' + k: v for k, v in hf.items()}
  stored['classifier.weight'] = np.zeros((3, 2 * D), np.float32)
  save_file(stored, str(path))
  assert detect_format(str(path)) == 'dinov2_hf'
  with pytest.warns(CheckpointWarning, match=r'classifier\.weight.*mask_token'):
    p = flat(load_pretrained(str(path), 'dinov2_hf', init, cfg))
  for i in range(DEPTH):
    t, s = f'Transformer/encoderblock_{i}/', f'encoder.layer.{i}.'
    for name in ('query', 'key', 'value'):
      w = hf[f'{s}attention.attention.{name}.weight']
      b = hf[f'{s}attention.attention.{name}.bias']
      for h in range(HEADS):
        for j in range(HD):
          np.testing.assert_array_equal(p[f'{t}{MHA}/{name}/kernel'][:, h, j], w[h * HD + j])
          assert p[f'{t}{MHA}/{name}/bias'][h, j] == b[h * HD + j]
    np.testing.assert_array_equal(p[t + 'LayerScale_0/scale'], hf[s + 'layer_scale1.lambda1'])
    np.testing.assert_array_equal(p[t + 'LayerScale_1/scale'], hf[s + 'layer_scale2.lambda1'])
    check_torch_block(p, ref.hf_dinov2_to_timm(hf), i)
  check_torch_stem(p, ref.hf_dinov2_to_timm(hf))


# --- our converted format ----------------------------------------------------------

def test_convert_cli_roundtrip_and_metadata(tmp_path, capsys):
  cfg = checkpoint_model(method='pyra', schedule='3,1', lora_rank=4)
  init = init_params(cfg)
  sd = ref.random_timm_state(np.random.default_rng(7), num_classes=5, lora_rank=4,
                             pyra_r=(3, 1))
  src, out = tmp_path / 'pyra.safetensors', tmp_path / 'pyra_conv.npz'
  save_file(sd, str(src))
  # Default head split (width // 64 = 1 here): loading re-splits to the model's 2.
  assert convert_lib.main(['--src', str(src), '--out', str(out)]) == 0
  assert 'source_format=pyra_torch' in capsys.readouterr().out
  assert detect_format(str(out)) == 'pyra_jax'
  direct = flat(load_quiet(src, 'pyra_torch', init, cfg))
  for args in ([], ['--num_heads', '2']):
    out_i = tmp_path / f'conv{len(args)}.npz'
    assert convert_lib.main(['--src', str(src), '--out', str(out_i)] + args) == 0
    converted = flat(load_quiet(out_i, 'auto', init, cfg))
    assert set(direct) == set(converted)
    for k in direct:
      np.testing.assert_array_equal(converted[k], direct[k], err_msg=k)
  from pyra_jax.checkpoints import npz as npz_lib
  meta = npz_lib.read_pyra_jax(str(tmp_path / 'conv2.npz')).meta
  assert (meta['source_format'], meta['width'], meta['depth'], meta['num_heads'],
          meta['patch_size'], meta['posemb_grid']) == ('pyra_torch', D, DEPTH, HEADS, PATCH, 4)
  assert meta['task_params'] == ['head', 'lora', 'pyra']
  # Converted once: a second run does not silently redo it.
  assert convert_lib.main(['--src', str(src), '--out', str(out)]) == 1
  assert 'already exists' in capsys.readouterr().err


# --- position embeddings on load -----------------------------------------------------

def test_posemb_resampled_on_load_prefix_kept(tmp_path):
  import scipy.ndimage
  cfg = checkpoint_model(distilled=True)  # grid 4x4 + 2 prefix slots
  sd = ref.random_timm_state(np.random.default_rng(8), distilled=True, grid=3)
  save_file(sd, str(tmp_path / 'deit.safetensors'))
  p = flat(load_quiet(tmp_path / 'deit.safetensors', 'timm', init_params(cfg), cfg))
  pe = p['Transformer/posembed_input/pos_embedding']
  assert pe.shape == (1, 2 + 16, D)
  np.testing.assert_array_equal(pe[:, :2], sd['pos_embed'][:, :2])
  want = scipy.ndimage.zoom(sd['pos_embed'][0, 2:].reshape(3, 3, D).astype(np.float64),
                            (4 / 3, 4 / 3, 1), order=1, grid_mode=True, mode='nearest')
  np.testing.assert_allclose(pe[0, 2:].reshape(4, 4, D), want, atol=1e-6)


# --- errors that say what to do ------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_init():
  cfg = checkpoint_model()
  return cfg, init_params(cfg)


def _save_timm(tmp_path, **kw):
  sd = ref.random_timm_state(np.random.default_rng(9), **kw)
  path = tmp_path / 'ckpt.safetensors'
  save_file(sd, str(path))
  return sd, path


def test_error_unknown_format(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path)
  with pytest.raises(CheckpointError, match=r"Unknown checkpoint format 'caffe'.*'npz'.*"
                                            r"'timm'.*'pyra_torch'.*'dinov2_hf'.*'onnx_dinov2'"):
    load_pretrained(str(path), 'caffe', init, cfg)


def test_error_missing_file_names_converter(tmp_path, tiny_init):
  cfg, init = tiny_init
  with pytest.raises(CheckpointError, match=r'(?s)does not exist.*python -m pyra_jax.convert'):
    load_pretrained(str(tmp_path / 'vitb.npz'), 'auto', init, cfg)


def test_error_wrong_variant_width(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path, width=64)
  with pytest.raises(CheckpointError, match='wrong variant: checkpoint width 64, config width 32'):
    load_pretrained(str(path), 'timm', init, cfg)


def test_error_patch_size(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path, patch=16, grid=2)
  with pytest.raises(CheckpointError, match=r'shape mismatch: embedding/kernel: checkpoint '
                                            r'\(16, 16, 3, 32\), model \(8, 8, 3, 32\)'
                                            r'(.|\n)*image_size/patch_size differ'):
    load_pretrained(str(path), 'timm', init, cfg)


def test_error_missing_tensor_named(tmp_path, tiny_init):
  cfg, init = tiny_init
  sd = ref.random_timm_state(np.random.default_rng(9))
  del sd['blocks.1.mlp.fc2.bias']
  save_file(sd, str(tmp_path / 'c.safetensors'))
  with pytest.raises(CheckpointError, match=r'lacks 1 tensor.*blocks\.1\.mlp\.fc2\.bias'):
    load_pretrained(str(tmp_path / 'c.safetensors'), 'timm', init, cfg)


def test_error_depth_and_unexpected_keys(tmp_path, tiny_init):
  cfg, init = tiny_init
  sd = ref.random_timm_state(np.random.default_rng(9), depth=3)
  sd['blocks.0.attn.q_norm.weight'] = np.ones(HD, np.float32)
  save_file(sd, str(tmp_path / 'c.safetensors'))
  with pytest.raises(CheckpointError) as e:
    load_pretrained(str(tmp_path / 'c.safetensors'), 'timm', init, cfg)
  msg = str(e.value)
  assert 'Transformer/encoderblock_2/LayerNorm_0/scale' in msg
  assert 'blocks.0.attn.q_norm.weight' in msg
  assert 'depth differs: the checkpoint has 3 blocks, the config 2' in msg


def test_first_blocks_loads_a_shallower_model(tmp_path):
  """model_init_first_blocks: a depth-1 model gets block 0 of a depth-3 file.

  Without the flag the same load is an error whose message names the flag; a
  checkpoint shallower than the model stays an error either way.
  """
  sd = ref.random_timm_state(np.random.default_rng(9), depth=3)
  path = tmp_path / 'c.safetensors'
  save_file(sd, str(path))
  cfg = checkpoint_model(depth=1)
  init = init_params(cfg)
  with pytest.raises(CheckpointError, match=r'depth differs: the checkpoint has 3 '
                                            r'blocks, the config 1.*'
                                            r'model_init_first_blocks=True'):
    load_pretrained(str(path), 'timm', init, cfg)
  with pytest.warns(CheckpointWarning, match=r'first 1 of 3 blocks; blocks 1-2'):
    p = flat(load_pretrained(str(path), 'timm', init, cfg, first_blocks=True))
  check_torch_stem(p, sd)  # includes the final norm, kept
  check_torch_block(p, sd, 0)
  assert set(p) == set(flat(init))
  deeper = checkpoint_model(depth=4)
  with pytest.raises(CheckpointError, match=r'has 3 blocks, the config 4: set '
                                            r'model\.depth=3 \(or the checkpoint'):
    load_pretrained(str(path), 'timm', init_params(deeper), deeper,
                    first_blocks=True)


def test_error_layerscale_and_qkv_bias_hints(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path, layerscale=True, qkv_bias=False)
  with pytest.raises(CheckpointError, match=r'(?s)encoderblock_0/MultiHeadDotProductAttention_0/'
                                            r'key/bias.*set model\.qkv_bias=False.*'
                                            r'set model\.layerscale=True'):
    load_pretrained(str(path), 'timm', init, cfg)


def test_error_distilled_hint(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path, distilled=True)
  with pytest.raises(CheckpointError, match=r'(?s)not in the model \(1\): dist.*'
                                            r'model\.distilled=True'):
    load_pretrained(str(path), 'timm', init, cfg)


def test_error_lora_rank_and_schedule(tmp_path, tiny_init):
  cfg, init = tiny_init  # method='peft', lora_rank=0
  _, path = _save_timm(tmp_path, lora_rank=4, pyra_r=(3, 1), num_classes=5)
  with pytest.raises(CheckpointError, match=r"(?s)model\.lora_rank=4.*model\.method='pyra'"):
    load_pretrained(str(path), 'pyra_torch', init, cfg)
  cfg2 = checkpoint_model(method='pyra', schedule='2,1', lora_rank=4)
  with pytest.raises(CheckpointError, match=r'(?s)pyra/w_r: checkpoint \(3, 1\), model \(2, 1\)'
                                            r'.*merging schedule differs at layer 0'):
    load_pretrained(str(path), 'pyra_torch', init_params(cfg2), cfg2)


def test_error_num_heads_from_npz(tmp_path, tiny_init):
  cfg, init = tiny_init
  w = ref.random_vit_npz(np.random.default_rng(10), heads=4)
  np.savez(tmp_path / 'v.npz', **w)
  with pytest.raises(CheckpointError, match='num_heads differs: checkpoint 4, config 2'):
    load_quiet(tmp_path / 'v.npz', 'npz', init, cfg)


def test_error_torch_pickle_without_torch(tmp_path, tiny_init):
  try:
    import torch  # noqa: F401
    pytest.skip('torch is installed')
  except ImportError:
    pass
  cfg, init = tiny_init
  (tmp_path / 'vit.pth').write_bytes(b'PK\x03\x04 not read')  # torch.save's zip magic.
  with pytest.raises(CheckpointError, match=r'torch is not installed(.|\n)*safetensors'):
    load_pretrained(str(tmp_path / 'vit.pth'), 'timm', init, cfg)


def test_half_precision_safetensors_load_as_float32(tmp_path, tiny_init):
  """Hub checkpoints often ship in bf16/fp16; values must arrive unchanged."""
  import ml_dtypes
  cfg, init = tiny_init
  sd = ref.random_timm_state(np.random.default_rng(11))
  half = {k: v.astype(ml_dtypes.bfloat16 if i % 2 else np.float16)
          for i, (k, v) in enumerate(sd.items())}
  save_file(half, str(tmp_path / 'half.safetensors'))
  p = flat(load_pretrained(str(tmp_path / 'half.safetensors'), 'timm', init, cfg))
  assert p['cls'].dtype == np.float32
  check_torch_stem(p, {k: v.astype(np.float32) for k, v in half.items()})


def test_error_wrong_format_for_file(tmp_path, tiny_init):
  cfg, init = tiny_init
  _, path = _save_timm(tmp_path)
  with pytest.raises(CheckpointError, match=r"not in the format asked for; set "
                                            r"model_init_format to 'auto'"):
    load_pretrained(str(path), 'dinov2_hf', init, cfg)
