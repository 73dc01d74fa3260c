"""Hugging Face `Dinov2Model` checkpoints (`model.safetensors`).

Names (after any wrapper prefix such as `dinov2.` of Dinov2ForImageClassification,
found from the anchor `embeddings.patch_embeddings.projection.weight`):
  embeddings.cls_token (1, 1, D)                 -> cls
  embeddings.position_embeddings (1, 1 + T, D)   -> Transformer/posembed_input/pos_embedding
  embeddings.patch_embeddings.projection.{weight (D, 3, P, P), bias}
                                                 -> embedding/{kernel (P, P, 3, D), bias}
  encoder.layer.i.norm1 / norm2                  -> LayerNorm_0 / LayerNorm_1
  encoder.layer.i.attention.attention.{query,key,value}.{weight (D, D), bias}
                                                 -> MultiHeadDotProductAttention_0/{query,key,value}
  encoder.layer.i.attention.output.dense         -> .../out
  encoder.layer.i.layer_scale1.lambda1 / layer_scale2.lambda1
                                                 -> LayerScale_0/scale / LayerScale_1/scale
  encoder.layer.i.mlp.fc1 / fc2                  -> MlpBlock_0/Dense_0 / Dense_1
  layernorm                                      -> Transformer/encoder_norm
Dropped on purpose: `embeddings.mask_token` (masked pre-training only) and a
`classifier` head. SwiGLU MLPs (ViT-g) and register tokens are not supported and
show up as unexpected keys.

HF Dinov2 interpolates its position embeddings bicubically (a = -0.75,
half-pixel, no antialiasing) when the input grid differs from the stored one, so
this format resamples with 'bicubic': our model then computes exactly what the
HF (or exported ONNX) model computes at the same resolution.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from pyra_jax.checkpoints import common

ANCHOR = 'embeddings.patch_embeddings.projection.weight'
_IGNORED = re.compile(r'^(embeddings\.mask_token$|classifier\.)')


def convert_dinov2_hf(state: Mapping[str, Any], num_heads: int | None = None,
                      *, fmt: str = 'dinov2_hf') -> common.Converted:
  """HF Dinov2 state dict (torch layouts, numpy arrays) -> our layout."""
  prefix, inside, outside = common.split_wrapper_prefix(state, ANCHOR, '.')
  sd = common.Consumer({k: state[prefix + k] for k in inside}, fmt)
  width = sd.state[ANCHOR].shape[0]
  num_heads = num_heads or common.default_num_heads(width)
  depth = common.num_blocks(sd.state, r'^encoder\.layer\.(\d+)\.')
  sd.require(
      ['embeddings.cls_token', 'embeddings.position_embeddings',
       'embeddings.patch_embeddings.projection.bias', 'layernorm.weight',
       'layernorm.bias'] +
      [f'encoder.layer.{i}.{n}.{wb}' for i in range(depth) for wb in (
          'weight', 'bias') for n in (
              'norm1', 'norm2', 'attention.attention.query',
              'attention.attention.key', 'attention.attention.value',
              'attention.output.dense', 'mlp.fc1', 'mlp.fc2')])
  res = common.Converted(params={}, fmt=fmt, posemb_method='bicubic',
                         meta={'num_heads': num_heads})
  p = res.params
  p['embedding/kernel'] = common.patch_embedding_from_torch(sd.take(ANCHOR))
  p['embedding/bias'] = sd.take('embeddings.patch_embeddings.projection.bias')
  p['cls'] = sd.take('embeddings.cls_token')
  p['Transformer/posembed_input/pos_embedding'] = sd.take(
      'embeddings.position_embeddings')
  for i in range(depth):
    s, t = f'encoder.layer.{i}.', f'Transformer/encoderblock_{i}/'
    for src, dst in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
      p[t + dst + '/scale'] = sd.take(s + src + '.weight')
      p[t + dst + '/bias'] = sd.take(s + src + '.bias')
    qkv = [(sd.take(f'{s}attention.attention.{n}.weight'),
            sd.take(f'{s}attention.attention.{n}.bias'))
           for n in ('query', 'key', 'value')]
    p.update(common.attention_from_torch(
        t + 'MultiHeadDotProductAttention_0', *qkv,
        (sd.take(s + 'attention.output.dense.weight'),
         sd.take(s + 'attention.output.dense.bias')), num_heads))
    for src, dst in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      p[t + f'MlpBlock_0/{dst}/kernel'] = sd.take(s + f'mlp.{src}.weight').T
      p[t + f'MlpBlock_0/{dst}/bias'] = sd.take(s + f'mlp.{src}.bias')
    for src, dst in (('layer_scale1', 'LayerScale_0'),
                     ('layer_scale2', 'LayerScale_1')):
      if sd.has(s + src + '.lambda1'):
        p[t + dst + '/scale'] = sd.take(s + src + '.lambda1')
  p['Transformer/encoder_norm/scale'] = sd.take('layernorm.weight')
  p['Transformer/encoder_norm/bias'] = sd.take('layernorm.bias')
  for k in sd.leftover():
    (res.ignored if _IGNORED.match(k) else res.unexpected).append(prefix + k)
  for k in outside:  # e.g. Dinov2ForImageClassification's `classifier.*`
    (res.ignored if _IGNORED.match(k) else res.unexpected).append(k)
  return res
