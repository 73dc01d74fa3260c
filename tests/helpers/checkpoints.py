"""The tiny model the checkpoint-format tests load into, and element-wise checks.

The model is two blocks of width 32 (S/8, no LoRA, no merging): small enough
that every tensor of a converted checkpoint is compared element by element
against its place in the source layout (`check_torch_block`, `check_torch_stem`).
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_collections
import numpy as np

from pyra_jax.checkpoints import CheckpointWarning, common, load_pretrained
from tests.helpers.models import IMAGE, tiny_config

D, DEPTH, HEADS, MLP, PATCH = 32, 2, 2, 64, 8
HD = D // HEADS
MHA = 'MultiHeadDotProductAttention_0'


def checkpoint_model(**fields: Any) -> ml_collections.ConfigDict:
  """The tiny model config (S/8, 2 blocks of width 32, 5 classes, PEFT without
  LoRA), with `fields` changed."""
  return tiny_config(model={
      'variant': f'S/{PATCH}', 'width': D, 'depth': DEPTH, 'num_heads': HEADS,
      'mlp_dim': MLP, 'image_size': IMAGE, 'num_classes': 5, 'method': 'peft',
      'lora_rank': 0, 'drop_path': 0.0, **fields}).model


def flat(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in common.flatten(params).items()}


def load_quiet(path, fmt, init, cfg):
  """load_pretrained with its CheckpointWarnings (dropped heads, ...) silenced."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', CheckpointWarning)
    return load_pretrained(str(path), fmt, init, cfg)


def check_torch_block(p, sd, i, s_prefix=''):
  """Our block i against the timm block i, element by element."""
  t, s = f'Transformer/encoderblock_{i}/', f'{s_prefix}blocks.{i}.'
  qkv_w = sd[s + 'attn.qkv.weight']
  for part, name in enumerate(('query', 'key', 'value')):
    kern = p[f'{t}{MHA}/{name}/kernel']
    assert kern.shape == (D, HEADS, HD)
    for h in range(HEADS):
      for j in range(HD):
        np.testing.assert_array_equal(kern[:, h, j], qkv_w[part * D + h * HD + j, :])
    if s + 'attn.qkv.bias' in sd:
      bias = sd[s + 'attn.qkv.bias']
      for h in range(HEADS):
        np.testing.assert_array_equal(p[f'{t}{MHA}/{name}/bias'][h],
                                      bias[part * D + h * HD:part * D + (h + 1) * HD])
  out = p[f'{t}{MHA}/out/kernel']
  for h in range(HEADS):
    for j in range(HD):
      np.testing.assert_array_equal(out[h, j, :], sd[s + 'attn.proj.weight'][:, h * HD + j])
  np.testing.assert_array_equal(p[f'{t}{MHA}/out/bias'], sd[s + 'attn.proj.bias'])
  for ln, n in (('LayerNorm_0', 'norm1'), ('LayerNorm_1', 'norm2')):
    np.testing.assert_array_equal(p[f'{t}{ln}/scale'], sd[f'{s}{n}.weight'])
    np.testing.assert_array_equal(p[f'{t}{ln}/bias'], sd[f'{s}{n}.bias'])
  for dn, n in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
    w = sd[f'{s}mlp.{n}.weight']
    kern = p[f'{t}MlpBlock_0/{dn}/kernel']
    for o in range(w.shape[0]):
      np.testing.assert_array_equal(kern[:, o], w[o, :])
    np.testing.assert_array_equal(p[f'{t}MlpBlock_0/{dn}/bias'], sd[f'{s}mlp.{n}.bias'])


def check_torch_stem(p, sd, norm='norm', s_prefix=''):
  w = sd[s_prefix + 'patch_embed.proj.weight']
  for u in range(PATCH):
    for v in range(PATCH):
      for c in range(3):
        np.testing.assert_array_equal(p['embedding/kernel'][u, v, c], w[:, c, u, v])
  np.testing.assert_array_equal(p['embedding/bias'], sd[s_prefix + 'patch_embed.proj.bias'])
  np.testing.assert_array_equal(p['cls'], sd[s_prefix + 'cls_token'])
  np.testing.assert_array_equal(p['Transformer/posembed_input/pos_embedding'],
                                sd[s_prefix + 'pos_embed'])
  np.testing.assert_array_equal(p['Transformer/encoder_norm/scale'],
                                sd[f'{s_prefix}{norm}.weight'])
  np.testing.assert_array_equal(p['Transformer/encoder_norm/bias'],
                                sd[f'{s_prefix}{norm}.bias'])
