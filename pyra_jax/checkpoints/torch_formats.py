"""PyTorch-layout checkpoints: timm ViT / DeiT / MAE and the authors' PYRA code.

Files: `.safetensors` are read with `safetensors.numpy` (no torch needed);
`.pth` / `.pt` / `.bin` need torch (we never make it a dependency): without it
the error says how to convert the file to safetensors.

Names (timm 0.5.4, which the PYRA/ToMe code builds on, and current timm):
  patch_embed.proj.{weight (D, 3, P, P), bias}   -> embedding/{kernel (P, P, 3, D), bias}
  cls_token (1, 1, D), dist_token (DeiT distilled) -> cls, dist
  pos_embed (1, prefix + T, D)                   -> Transformer/posembed_input/pos_embedding
  blocks.i.norm1, norm2                          -> LayerNorm_0, LayerNorm_1
  blocks.i.attn.qkv.{weight (3D, D), bias (3D,)} -> query/key/value (rows q | k | v)
  blocks.i.attn.proj                             -> out
  blocks.i.mlp.fc1, fc2                          -> MlpBlock_0/Dense_0, Dense_1
  blocks.i.ls1.gamma, ls2.gamma (LayerScale)     -> LayerScale_0/1/scale
  norm                                           -> Transformer/encoder_norm
  head, head_dist                                -> head, head_dist

MAE: pre-training checkpoints (`mae_pretrain_vit_large.pth`, what PYRA uses)
hold the encoder's `norm`; their decoder (`decoder_*`, `mask_token`) is dropped
with a warning. Fine-tuned MAE checkpoints trained with global average pooling
have `fc_norm` instead of `norm`: we use the class token (docs/algorithm.md §1),
so we load `fc_norm` as the final norm and warn that the checkpoint's own head
read the average of the patch tokens, not the class token.

'timm' drops the checkpoint's classification heads (`head`, `head_dist`,
`pre_logits`): they belong to the pre-training task. 'pyra_torch' (the authors'
PyTorch PYRA/ToMe checkpoints) keeps them and adds:
  blocks.i.attn.LoRA_a.weight (h, D)  nn.Linear D->h   -> lora/down (D, h) = A.T
  blocks.i.attn.LoRA_b.weight (3D, h) nn.Linear h->3D  -> lora/up (h, 3D) = B.T
                                            (output rows q | k | v, like ours)
  blocks.i.pyra_a (r_i, 1)                             -> pyra/w_r
  blocks.i.pyra_b (1, D)                               -> pyra/w_d
  blocks.i.pyra_norm.{weight, bias}                    -> pyra/norm/{scale, bias}
  blocks.i.adapter.ln1.{weight (k, D), bias}  Linear D->k -> adapter/down/{kernel (D, k), bias}
  blocks.i.adapter.ln2.{weight (D, k), bias}  Linear k->D -> adapter/up/{kernel (k, D), bias}
                                            (their Adapter variant, model.peft='adapter')
A `pyra_a` with zero rows (a layer that merges nothing) is dropped silently.
Wrapper prefixes (`module.`, `model.`, ...) are found from the anchor
`patch_embed.proj.weight`, whatever they are.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from pyra_jax.checkpoints import common
from pyra_jax.checkpoints import filecheck

TORCH_EXTS = filecheck.TORCH_EXTS
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'model_ema', 'net', 'params')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as numpy (bf16 via ml_dtypes)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with filecheck.reading(path, 'a safetensors file'), safe_open(
      path, framework='numpy') as f:
    return {k: f.get_tensor(k) for k in f.keys()}


def state_dict_keys(path: str) -> list[str]:
  """Tensor names only (cheap for .safetensors: the header alone is read)."""
  if path.lower().endswith('.safetensors'):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with filecheck.reading(path, 'a safetensors file'), safe_open(
        path, framework='numpy') as f:
      return list(f.keys())
  return list(read_state_dict(path))


_TO_SAFETENSORS = (
    '  python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('{path}', map_location='cpu', weights_only={wo}); "
    "sd = sd.get('model', sd.get('state_dict', sd)); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() "
    "if hasattr(v, 'contiguous')}}, 'model.safetensors')\"")


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  """A torch.save'd state dict (possibly wrapped) -> numpy, if torch is present."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise common.CheckpointError(
        f'{path} is a PyTorch pickle and torch is not installed. Either '
        'convert it once to safetensors where torch is available:\n'
        + _TO_SAFETENSORS.format(path=path, wo=True) +
        '\nor `pip install torch` (CPU wheel) here.') from None
  try:  # weights_only: never run code from a downloaded pickle.
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise common.CheckpointError(
        f'{path} holds Python objects besides tensors (e.g. training args), '
        f'which torch.load(weights_only=True) refuses ({type(e).__name__}). If '
        'you trust the file, convert it to safetensors:\n'
        + _TO_SAFETENSORS.format(path=path, wo=False)) from None
  for _ in range(3):  # {'model': {...}}, {'state_dict': {...}}, ...
    inner = [obj[k] for k in _WRAPPER_KEYS
             if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
    if not inner:
      break
    obj = inner[0]
  return {k: v.detach().float().numpy() for k, v in obj.items()
          if hasattr(v, 'detach')}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    return read_safetensors(path)
  if ext in TORCH_EXTS:
    return read_torch_pickle(path)
  raise common.CheckpointError(
      f'{path}: unknown PyTorch checkpoint extension {ext!r}; expected '
      f'.safetensors or one of {TORCH_EXTS}.')


# Source names dropped on purpose, per format (after the wrapper prefix).
_MAE_DECODER = r'(decoder_\w+|decoder_blocks\.\d+)\.|mask_token$|decoder_pos_embed$'
_TIMM_IGNORED = re.compile(rf'^(head\.|head_dist\.|pre_logits\.|{_MAE_DECODER})')
_PYRA_IGNORED = re.compile(rf'^(pre_logits\.|{_MAE_DECODER})')


def convert_torch_vit(state: Mapping[str, Any], num_heads: int | None = None,
                      *, fmt: str = 'timm') -> common.Converted:
  """timm-style state dict -> our layout ('timm' or 'pyra_torch', see above)."""
  if fmt not in ('timm', 'pyra_torch'):
    raise ValueError(fmt)
  prefix, inside, outside = common.split_wrapper_prefix(
      state, 'patch_embed.proj.weight', '.')
  sd = common.Consumer({k: state[prefix + k] for k in inside}, fmt)
  width = sd.state['patch_embed.proj.weight'].shape[0]
  num_heads = num_heads or common.default_num_heads(width)
  depth = common.num_blocks(sd.state, r'^blocks\.(\d+)\.')
  sd.require(['patch_embed.proj.bias', 'cls_token', 'pos_embed'] + [
      f'blocks.{i}.{n}' for i in range(depth) for n in (
          'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight',
          'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
          'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')])
  if not sd.has('fc_norm.weight'):
    sd.require(['norm.weight', 'norm.bias'])
  res = common.Converted(params={}, fmt=fmt, meta={'num_heads': num_heads})
  p = res.params

  p['embedding/kernel'] = common.patch_embedding_from_torch(
      sd.take('patch_embed.proj.weight'))
  p['embedding/bias'] = sd.take('patch_embed.proj.bias')
  p['cls'] = sd.take('cls_token')
  if sd.has('dist_token'):
    p['dist'] = sd.take('dist_token')
  p['Transformer/posembed_input/pos_embedding'] = sd.take('pos_embed')

  for i in range(depth):
    s, t = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    for src, dst in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
      p[t + dst + '/scale'] = sd.take(s + src + '.weight')
      p[t + dst + '/bias'] = sd.take(s + src + '.bias')
    qw = np.split(sd.take(s + 'attn.qkv.weight'), 3, axis=0)
    qkv_b = sd.take_opt(s + 'attn.qkv.bias')
    qb = np.split(qkv_b, 3) if qkv_b is not None else [None] * 3
    p.update(common.attention_from_torch(
        t + 'MultiHeadDotProductAttention_0', (qw[0], qb[0]), (qw[1], qb[1]),
        (qw[2], qb[2]),
        (sd.take(s + 'attn.proj.weight'), sd.take(s + 'attn.proj.bias')),
        num_heads))
    for src, dst in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
      p[t + f'MlpBlock_0/{dst}/kernel'] = sd.take(s + f'mlp.{src}.weight').T
      p[t + f'MlpBlock_0/{dst}/bias'] = sd.take(s + f'mlp.{src}.bias')
    for src, dst in (('ls1', 'LayerScale_0'), ('ls2', 'LayerScale_1')):
      if sd.has(s + src + '.gamma'):
        p[t + dst + '/scale'] = sd.take(s + src + '.gamma')
    if fmt == 'pyra_torch':
      _take_pyra_block(sd, s, t, p)

  norm = 'norm' if sd.has('norm.weight') else 'fc_norm'
  p['Transformer/encoder_norm/scale'] = sd.take(norm + '.weight')
  p['Transformer/encoder_norm/bias'] = sd.take(norm + '.bias')
  if norm == 'fc_norm':
    res.notes.append(
        'the checkpoint has `fc_norm` and no `norm`: it was fine-tuned with '
        'global average pooling (MAE style). We classify from the class token, '
        'so `fc_norm` serves as the final norm of the class token; these '
        'features differ from what the checkpoint was trained to output. Prefer '
        'the MAE pre-training checkpoint (it has `norm`).')
  if fmt == 'pyra_torch':
    for name in ('head', 'head_dist'):
      if sd.has(name + '.weight'):
        p[name + '/kernel'] = sd.take(name + '.weight').T
        p[name + '/bias'] = sd.take(name + '.bias')

  ignored_rx = _TIMM_IGNORED if fmt == 'timm' else _PYRA_IGNORED
  for k in sd.leftover():
    (res.ignored if ignored_rx.match(k) else res.unexpected).append(prefix + k)
  for k in outside:  # beside the wrapped model, e.g. a separate `head.*`
    (res.ignored if ignored_rx.match(k) else res.unexpected).append(k)
  return res


def _take_pyra_block(sd: common.Consumer, s: str, t: str,
                     p: dict[str, np.ndarray]) -> None:
  """LoRA, Adapter and PYRA generator tensors of one block of the authors' model."""
  a = t + 'MultiHeadDotProductAttention_0/lora/'
  if sd.has(s + 'attn.LoRA_a.weight') or sd.has(s + 'attn.LoRA_b.weight'):
    p[a + 'down'] = sd.take(s + 'attn.LoRA_a.weight').T
    p[a + 'up'] = sd.take(s + 'attn.LoRA_b.weight').T
  for src, dst in (('ln1', 'down'), ('ln2', 'up')):
    if sd.has(s + f'adapter.{src}.weight'):
      p[t + f'adapter/{dst}/kernel'] = sd.take(s + f'adapter.{src}.weight').T
      p[t + f'adapter/{dst}/bias'] = sd.take(s + f'adapter.{src}.bias')
  if sd.has(s + 'pyra_a'):
    w_r = sd.take(s + 'pyra_a')
    if w_r.shape[0] == 0:  # a layer that merges nothing: nothing to modulate.
      for n in ('pyra_b', 'pyra_norm.weight', 'pyra_norm.bias'):
        sd.take_opt(s + n)
      return
    p[t + 'pyra/w_r'] = w_r
    p[t + 'pyra/w_d'] = sd.take(s + 'pyra_b')
    p[t + 'pyra/norm/scale'] = sd.take(s + 'pyra_norm.weight')
    p[t + 'pyra/norm/bias'] = sd.take(s + 'pyra_norm.bias')
