"""Our model on converted weights computes what the source model computes.

The ground truth is tests/helpers/reference_vit.py: a float64 numpy ViT that reads the
*source* (timm) layout directly. Our float32 forward (`build_model(cfg).apply`)
on the converted params must match it to 1e-5 relative.
"""

import jax
import numpy as np
import pytest
import scipy.ndimage
from safetensors.numpy import save_file

from pyra_jax.models import build_model
from tests.helpers import reference_vit as ref
from tests.helpers.checkpoints import D, HEADS, checkpoint_model, load_quiet
from tests.helpers.models import IMAGE, init_params


def assert_close_rel(ours, want, rel=1e-5):
  ours, want = np.asarray(ours, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  assert scale > 0.1, 'degenerate test: reference logits are ~0'
  np.testing.assert_allclose(ours, want, rtol=rel, atol=rel * scale)


def images(seed, n=2):
  return np.random.default_rng(seed).standard_normal((n, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def deit_lora():
  """DeiT-distilled + LayerScale + LoRA (rank 4) + LN eps 1e-3 (large enough that a
  wrong eps fails the 1e-5 check), both heads averaged."""
  cfg = checkpoint_model(distilled=True, distilled_eval='avg', layerscale=True, lora_rank=4,
                         ln_eps=1e-3, num_classes=5)
  model = build_model(cfg)
  return cfg, jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))


def test_pyra_torch_forward_matches_reference(tmp_path, deit_lora):
  cfg, apply = deit_lora
  sd = ref.random_timm_state(np.random.default_rng(0), distilled=True, layerscale=True,
                             lora_rank=4, num_classes=5)
  save_file({'module.' + k: v for k, v in sd.items()}, str(tmp_path / 'pyra.safetensors'))
  params = load_quiet(tmp_path / 'pyra.safetensors', 'pyra_torch', init_params(cfg), cfg)
  x = images(1)
  want = ref.vit_forward(sd, x, num_heads=HEADS, ln_eps=1e-3)
  assert_close_rel(apply(params, x), 0.5 * (want['logits'] + want['logits_dist']))


def test_resampled_posemb_forward_matches_scipy_resampled_reference(tmp_path, deit_lora):
  """A checkpoint for a 3x3 grid run at 4x4: the reference model gets its grid
  resampled by scipy (half-pixel bilinear), prefix slots untouched."""
  cfg, apply = deit_lora
  sd = ref.random_timm_state(np.random.default_rng(2), distilled=True, layerscale=True,
                             lora_rank=4, num_classes=5, grid=3)
  save_file(sd, str(tmp_path / 'small.safetensors'))
  params = load_quiet(tmp_path / 'small.safetensors', 'pyra_torch', init_params(cfg), cfg)
  pe = sd['pos_embed'].astype(np.float64)
  grid = scipy.ndimage.zoom(pe[0, 2:].reshape(3, 3, D), (4 / 3, 4 / 3, 1), order=1,
                            grid_mode=True, mode='nearest')
  sd_big = dict(sd, pos_embed=np.concatenate([pe[:, :2], grid.reshape(1, 16, D)], 1))
  x = images(3)
  want = ref.vit_forward(sd_big, x, num_heads=HEADS, ln_eps=1e-3)
  assert_close_rel(apply(params, x), 0.5 * (want['logits'] + want['logits_dist']))


def test_vit_npz_pre_linen_forward_matches_reference(tmp_path):
  """The original ViT-B_16.npz layout (pre-linen names); the task head is fresh,
  so the reference gets our initialised head."""
  cfg = checkpoint_model(num_classes=5)
  model = build_model(cfg)
  w = ref.random_vit_npz(np.random.default_rng(4), heads=HEADS, pre_linen=True)
  np.savez(tmp_path / 'ViT-B_16.npz', **w)
  init = init_params(cfg)
  params = load_quiet(tmp_path / 'ViT-B_16.npz', 'auto', init, cfg)
  sd = ref.vit_npz_to_timm(w, pre_linen=True)
  sd['head.weight'] = np.asarray(init['head']['kernel']).T
  sd['head.bias'] = np.asarray(init['head']['bias'])
  x = images(5)
  ours = model.apply({'params': params}, x, train=False)
  assert_close_rel(ours, ref.vit_forward(sd, x, num_heads=HEADS)['logits'])
