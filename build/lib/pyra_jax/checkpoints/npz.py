"""`.npz` checkpoints: google-research/vision_transformer files and our own format.

vision_transformer (`gs://vit_models/imagenet21k/ViT-B_16.npz`, AugReg files):
'/'-joined flax paths whose layouts already are ours. Older files were written
by pre-linen flax, which numbered submodules across classes
(`LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`); linen
numbers each class separately (`LayerNorm_0, MultiHeadDotProductAttention_0,
LayerNorm_1, MlpBlock_0`). We renumber like flax's `convert_pre_linen`, which is
the identity on linen files, so both spellings load. Wrapper prefixes
(`opt/target/` of old training checkpoints, `params/`) are stripped.
`pre_logits` (21K's representation layer) and the pre-training `head` are
dropped: the task head is re-initialised.

pyra_jax (written by `python -m pyra_jax.convert`): our exact flat layout plus a
JSON entry `__pyra_jax__` (source format, dims, resampling method), stored
uncompressed so that loading is a plain read.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from pyra_jax.checkpoints import common
from pyra_jax.checkpoints import filecheck

META_KEY = '__pyra_jax__'
_MODULE_NUM = re.compile(r'^(.*)_(\d+)$')


def convert_pre_linen(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Renumbers `Name_N` path parts per class, in numeric order, at each level."""
  tree = common.unflatten(flat)

  def rename(node: Any) -> Any:
    if not isinstance(node, dict):
      return node
    numbered = sorted(
        (k for k in node if _MODULE_NUM.match(k)),
        key=lambda k: (_MODULE_NUM.match(k).group(1),
                       int(_MODULE_NUM.match(k).group(2))))
    counts: dict[str, int] = {}
    out = {}
    for k in numbered:
      cls = _MODULE_NUM.match(k).group(1)
      out[f'{cls}_{counts.get(cls, 0)}'] = rename(node[k])
      counts[cls] = counts.get(cls, 0) + 1
    for k in node:
      if not _MODULE_NUM.match(k):
        out[k] = rename(node[k])
    return out

  return common.flatten(rename(tree))


# Our backbone paths inside an encoder block, as linen names them.
_BLOCK_LEAVES = re.compile(
    r'^Transformer/encoderblock_\d+/('
    r'LayerNorm_[01]/(scale|bias)'
    r'|MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)'
    r'|MlpBlock_0/Dense_[01]/(kernel|bias)'
    r'|LayerScale_[01]/scale)$')
_TOP_LEAVES = {'cls', 'dist', 'embedding/kernel', 'embedding/bias',
               'Transformer/posembed_input/pos_embedding',
               'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias'}
_DROPPED = re.compile(r'^(pre_logits|head)(/|$)')
_ANCHOR = 'embedding/kernel'  # Every ViT has it; what precedes it is a wrapper.


def convert_vit_npz(arrays: Mapping[str, np.ndarray]) -> common.Converted:
  """google-research/vision_transformer npz contents -> our layout."""
  prefix, inside, outside = common.split_wrapper_prefix(arrays, _ANCHOR, '/')
  flat = convert_pre_linen({k: arrays[prefix + k] for k in inside})
  res = common.Converted(params={}, fmt='npz', heads_fixed=True)
  for k, v in flat.items():
    if k in _TOP_LEAVES or _BLOCK_LEAVES.match(k):
      res.params[k] = common.as_f32(v)
    elif _DROPPED.match(k):
      res.ignored.append(prefix + k)
    else:
      res.unexpected.append(prefix + k)
  res.unexpected += outside
  return res


def read_vit_npz(path: str) -> common.Converted:
  with filecheck.reading(path, 'an .npz checkpoint'):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  if not any(k == _ANCHOR or k.endswith('/' + _ANCHOR) for k in arrays):
    raise common.CheckpointError(
        f'{path} is not a google-research/vision_transformer ViT checkpoint: '
        f'it has no {_ANCHOR!r} tensor and holds '
        f'{filecheck.what_names_suggest(arrays)}; point model_init (or '
        f'`--src`) at the ViT weights, or set the format '
        f'({filecheck.FORMAT_SETTING}) '
        'to what the file is.')
  return convert_vit_npz(arrays)


def save_pyra_jax(path: str, params: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any]) -> None:
  """Writes our flat layout + a JSON metadata entry (uncompressed npz)."""
  arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
  arrays[META_KEY] = np.array(json.dumps(dict(meta), sort_keys=True))
  with open(path, 'wb') as f:  # np.savez would append '.npz' to a str path.
    np.savez(f, **arrays)


def read_pyra_jax(path: str) -> common.Converted:
  with filecheck.reading(path, 'an .npz checkpoint'), np.load(
      path, allow_pickle=False) as f:
    if META_KEY not in f.files:
      raise common.CheckpointError(
          f'{path} has no {META_KEY!r} entry, so it was not written by '
          '`python -m pyra_jax.convert`; load it with model_init_format=\'npz\' '
          '(google-research/vision_transformer files) or re-convert it.')
    meta = json.loads(str(f[META_KEY]))
    params = {k: f[k] for k in f.files if k != META_KEY}
  return common.Converted(
      params=params, fmt='pyra_jax',
      posemb_method=meta.get('posemb_method', 'bilinear'), meta=meta,
      heads_fixed=meta.get('source_format') == 'npz')


def is_pyra_jax(path: str) -> bool:
  with filecheck.reading(path, 'an .npz checkpoint'), np.load(
      path, allow_pickle=False) as f:
    return META_KEY in f.files
