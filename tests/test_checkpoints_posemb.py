"""Position-embedding resampling against scipy and ONNX's own Resize operator."""

import numpy as np
import pytest
import scipy.ndimage

from pyra_jax.checkpoints.posemb import resample_posemb

SIZES = [((7, 7), (4, 4)), ((4, 4), (9, 9)), ((37, 37), (16, 16)),
         ((5, 6), (3, 8)), ((14, 14), (8, 8))]


def _posemb(rng, prefix, hw, d=5):
  return rng.standard_normal((1, prefix + hw[0] * hw[1], d)).astype(np.float32)


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
@pytest.mark.parametrize('prefix', [1, 2])
def test_identity_when_grids_match(method, prefix):
  pe = _posemb(np.random.default_rng(0), prefix, (6, 6))
  out = resample_posemb(pe, 6, prefix, method=method)
  np.testing.assert_array_equal(out, pe)


@pytest.mark.parametrize('old,new', SIZES)
@pytest.mark.parametrize('prefix', [1, 2])
def test_bilinear_matches_scipy_half_pixel_zoom(old, new, prefix):
  """scipy's zoom with grid_mode=True uses pixel edges (half-pixel centres) and
  mode='nearest' clamps at the border: the convention of F.interpolate(
  align_corners=False) that we follow."""
  rng = np.random.default_rng(1)
  pe = _posemb(rng, prefix, old).astype(np.float64)
  out = resample_posemb(pe, new, prefix, old_grid=old)
  grid = pe[0, prefix:].reshape(*old, -1)
  want = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1,
                            grid_mode=True, mode='nearest')
  assert out.shape == (1, prefix + new[0] * new[1], pe.shape[-1])
  np.testing.assert_array_equal(out[:, :prefix], pe[:, :prefix])
  np.testing.assert_allclose(out[0, prefix:].reshape(want.shape), want, atol=1e-12)


@pytest.mark.parametrize('old,new', SIZES)
@pytest.mark.parametrize('method,mode', [('bicubic', 'cubic'), ('bilinear', 'linear')])
def test_matches_onnx_resize(old, new, method, mode):
  """The DINOv2 graph resizes its grid with ONNX Resize (cubic, a=-0.75,
  half_pixel); its reference implementation is our ground truth."""
  from onnx import TensorProto, helper
  from onnx.reference import ReferenceEvaluator
  rng = np.random.default_rng(2)
  pe = _posemb(rng, 1, old)
  node = helper.make_node('Resize', ['x', '', '', 'sizes'], ['y'], mode=mode,
                          coordinate_transformation_mode='half_pixel',
                          cubic_coeff_a=-0.75)
  graph = helper.make_graph(
      [node], 'resize',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT, None),
       helper.make_tensor_value_info('sizes', TensorProto.INT64, None)],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 14)])
  grid = pe[0, 1:].reshape(*old, -1).transpose(2, 0, 1)[None]  # NCHW
  want = ReferenceEvaluator(model).run(
      None, {'x': grid, 'sizes': np.array([1, grid.shape[1], *new], np.int64)})[0]
  out = resample_posemb(pe, new, 1, method=method, old_grid=old)
  np.testing.assert_allclose(out[0, 1:].reshape(*new, -1),
                             want[0].transpose(1, 2, 0), atol=1e-5)


def test_rejects_non_square_grid_without_old_grid():
  pe = np.zeros((1, 1 + 12, 3), np.float32)
  with pytest.raises(ValueError, match='not a square grid'):
    resample_posemb(pe, 4, 1)
