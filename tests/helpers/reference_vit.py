"""An independent numpy ViT forward written from the PyTorch (timm) source layout.

It reads a timm-style state dict directly: fused `attn.qkv.weight` (3D, D) in
(out, in) layout, conv `patch_embed.proj.weight` (D, 3, P, P), `nn.Linear`
weights (out, in). Nothing is shared with pyra_jax: the patch embedding is an
explicit loop over grid cells, attention follows timm's
`qkv.reshape(B, N, 3, H, D/H)`, GELU is the exact erf form, LayerNorm uses the
biased variance with `eps` added inside the square root (PyTorch's). Computed
in float64 so that it serves as the ground truth for our float32 model.

Options, read from the state dict: `dist_token` (DeiT distilled: a second
prefix token and `head_dist`), `blocks.i.ls1.gamma`/`ls2.gamma` (LayerScale),
`blocks.i.attn.qkv.bias` (qkv_bias), `blocks.i.attn.LoRA_a.weight` /
`LoRA_b.weight` (the authors' LoRA: x -> A -> B added to qkv, no scaling).
No token merging (the model runs with method='peft').
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

_erf = np.vectorize(math.erf)


def gelu_exact(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x: np.ndarray, sd: Mapping[str, np.ndarray], name: str) -> np.ndarray:
  y = x @ np.asarray(sd[name + '.weight'], np.float64).T
  if name + '.bias' in sd:
    y = y + np.asarray(sd[name + '.bias'], np.float64)
  return y


def patch_embed(images: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Strided conv as a loop over grid cells, row-major (timm's flatten(2))."""
  bsz, h, wd, _ = images.shape
  p = w.shape[-1]
  tokens = []
  for i in range(h // p):
    for j in range(wd // p):
      cell = images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # (B, P, P, 3)
      tokens.append(np.einsum('buvc,dcuv->bd', cell, w) + b)
  return np.stack(tokens, axis=1)


def vit_forward(sd: Mapping[str, np.ndarray], images: np.ndarray, *,
                num_heads: int, ln_eps: float = 1e-6) -> dict[str, np.ndarray]:
  """Returns {'tokens': after the final norm, 'logits', 'logits_dist' (DeiT)}."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  x = patch_embed(np.asarray(images, np.float64), sd['patch_embed.proj.weight'],
                  sd['patch_embed.proj.bias'])
  bsz, _, dim = x.shape
  prefix = [sd['cls_token']] + ([sd['dist_token']] if 'dist_token' in sd else [])
  prefix = [np.broadcast_to(t, (bsz, 1, dim)) for t in prefix]
  x = np.concatenate(prefix + [x], axis=1) + sd['pos_embed']
  n = x.shape[1]
  hd = dim // num_heads
  depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
  for i in range(depth):
    s = f'blocks.{i}.'
    h = layer_norm(x, sd[s + 'norm1.weight'], sd[s + 'norm1.bias'], ln_eps)
    qkv = linear(h, sd, s + 'attn.qkv')
    if s + 'attn.LoRA_a.weight' in sd:
      qkv = qkv + (h @ sd[s + 'attn.LoRA_a.weight'].T) @ sd[s + 'attn.LoRA_b.weight'].T
    qkv = qkv.reshape(bsz, n, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = attn / attn.sum(-1, keepdims=True)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(bsz, n, dim)
    o = linear(o, sd, s + 'attn.proj')
    if s + 'ls1.gamma' in sd:
      o = o * sd[s + 'ls1.gamma']
    x = x + o
    h = layer_norm(x, sd[s + 'norm2.weight'], sd[s + 'norm2.bias'], ln_eps)
    h = linear(gelu_exact(linear(h, sd, s + 'mlp.fc1')), sd, s + 'mlp.fc2')
    if s + 'ls2.gamma' in sd:
      h = h * sd[s + 'ls2.gamma']
    x = x + h
  x = layer_norm(x, sd['norm.weight'], sd['norm.bias'], ln_eps)
  out = {'tokens': x}
  if 'head.weight' in sd:
    out['logits'] = linear(x[:, 0], sd, 'head')
  if 'head_dist.weight' in sd:
    out['logits_dist'] = linear(x[:, 1], sd, 'head_dist')
  return out


def hf_dinov2_to_timm(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an HF Dinov2 state dict to timm names (q, k, v rows concatenated)."""
  out = {
      'cls_token': sd['embeddings.cls_token'],
      'pos_embed': sd['embeddings.position_embeddings'],
      'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
      'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
      'norm.weight': sd['layernorm.weight'],
      'norm.bias': sd['layernorm.bias'],
  }
  depth = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.layer.'))
  for i in range(depth):
    s, t = f'encoder.layer.{i}.', f'blocks.{i}.'
    att = s + 'attention.attention.'
    for wb in ('weight', 'bias'):
      out[t + 'attn.qkv.' + wb] = np.concatenate(
          [sd[att + n + '.' + wb] for n in ('query', 'key', 'value')], axis=0)
      out[t + 'attn.proj.' + wb] = sd[s + 'attention.output.dense.' + wb]
      for n in ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2'):
        out[t + n + '.' + wb] = sd[s + n + '.' + wb]
    out[t + 'ls1.gamma'] = sd[s + 'layer_scale1.lambda1']
    out[t + 'ls2.gamma'] = sd[s + 'layer_scale2.lambda1']
  return out


# --- Fixture writers: random checkpoints in each format's own names/layouts ---

def _rand(rng: np.random.Generator, shape, scale: float = 0.1, mean: float = 0.0):
  """Random float32; continuous values, so every element is distinct and any
  misplaced or transposed tensor fails an exact comparison."""
  return (mean + scale * rng.standard_normal(shape)).astype(np.float32)


def random_timm_state(rng: np.random.Generator, *, width=32, depth=2, mlp=64,
                      patch=8, grid=4, qkv_bias=True, layerscale=False,
                      distilled=False, num_classes=0, lora_rank=0,
                      pyra_r=(), mae_decoder=False) -> dict[str, np.ndarray]:
  """timm ViT/DeiT/MAE names; with lora_rank / pyra_r, the authors' PYRA names."""
  d = width
  sd = {
      'patch_embed.proj.weight': _rand(rng, (d, 3, patch, patch)),
      'patch_embed.proj.bias': _rand(rng, (d,)),
      'cls_token': _rand(rng, (1, 1, d), 0.5),
      'pos_embed': _rand(rng, (1, 1 + distilled + grid * grid, d), 0.5),
      'norm.weight': _rand(rng, (d,), 0.1, 1.0),
      'norm.bias': _rand(rng, (d,)),
  }
  if distilled:
    sd['dist_token'] = _rand(rng, (1, 1, d), 0.5)
  for i in range(depth):
    s = f'blocks.{i}.'
    sd.update({
        s + 'norm1.weight': _rand(rng, (d,), 0.1, 1.0), s + 'norm1.bias': _rand(rng, (d,)),
        s + 'attn.qkv.weight': _rand(rng, (3 * d, d), 0.3),
        s + 'attn.proj.weight': _rand(rng, (d, d), 0.2), s + 'attn.proj.bias': _rand(rng, (d,)),
        s + 'norm2.weight': _rand(rng, (d,), 0.1, 1.0), s + 'norm2.bias': _rand(rng, (d,)),
        s + 'mlp.fc1.weight': _rand(rng, (mlp, d), 0.2), s + 'mlp.fc1.bias': _rand(rng, (mlp,)),
        s + 'mlp.fc2.weight': _rand(rng, (d, mlp), 0.2), s + 'mlp.fc2.bias': _rand(rng, (d,)),
    })
    if qkv_bias:
      sd[s + 'attn.qkv.bias'] = _rand(rng, (3 * d,))
    if layerscale:
      sd[s + 'ls1.gamma'] = _rand(rng, (d,), 0.3, 1.0)
      sd[s + 'ls2.gamma'] = _rand(rng, (d,), 0.3, 1.0)
    if lora_rank:
      sd[s + 'attn.LoRA_a.weight'] = _rand(rng, (lora_rank, d), 0.3)
      sd[s + 'attn.LoRA_b.weight'] = _rand(rng, (3 * d, lora_rank), 0.3)
    if pyra_r:
      sd[s + 'pyra_a'] = _rand(rng, (pyra_r[i], 1), 1.0)
      sd[s + 'pyra_b'] = _rand(rng, (1, d), 0.1)
      sd[s + 'pyra_norm.weight'] = _rand(rng, (d,), 0.1, 1.0)
      sd[s + 'pyra_norm.bias'] = _rand(rng, (d,))
  if num_classes:
    sd['head.weight'] = _rand(rng, (num_classes, d), 0.2)
    sd['head.bias'] = _rand(rng, (num_classes,))
    if distilled:
      sd['head_dist.weight'] = _rand(rng, (num_classes, d), 0.2)
      sd['head_dist.bias'] = _rand(rng, (num_classes,))
  if mae_decoder:
    sd['mask_token'] = _rand(rng, (1, 1, 16))
    sd['decoder_embed.weight'] = _rand(rng, (16, d))
    sd['decoder_pos_embed'] = _rand(rng, (1, 1 + grid * grid, 16))
    sd['decoder_blocks.0.norm1.weight'] = _rand(rng, (16,))
    sd['decoder_norm.weight'] = _rand(rng, (16,))
    sd['decoder_pred.weight'] = _rand(rng, (patch * patch * 3, 16))
  return sd


def random_hf_dinov2_state(rng: np.random.Generator, *, width=32, depth=2, mlp=64,
                           patch=8, grid=4) -> dict[str, np.ndarray]:
  """HF Dinov2Model names (always qkv bias and LayerScale)."""
  d = width
  sd = {
      'embeddings.cls_token': _rand(rng, (1, 1, d), 0.5),
      'embeddings.mask_token': _rand(rng, (1, d)),
      'embeddings.position_embeddings': _rand(rng, (1, 1 + grid * grid, d), 0.5),
      'embeddings.patch_embeddings.projection.weight': _rand(rng, (d, 3, patch, patch)),
      'embeddings.patch_embeddings.projection.bias': _rand(rng, (d,)),
      'layernorm.weight': _rand(rng, (d,), 0.1, 1.0),
      'layernorm.bias': _rand(rng, (d,)),
  }
  for i in range(depth):
    s = f'encoder.layer.{i}.'
    for n in ('query', 'key', 'value'):
      sd[f'{s}attention.attention.{n}.weight'] = _rand(rng, (d, d), 0.3)
      sd[f'{s}attention.attention.{n}.bias'] = _rand(rng, (d,))
    sd.update({
        s + 'norm1.weight': _rand(rng, (d,), 0.1, 1.0), s + 'norm1.bias': _rand(rng, (d,)),
        s + 'attention.output.dense.weight': _rand(rng, (d, d), 0.2),
        s + 'attention.output.dense.bias': _rand(rng, (d,)),
        s + 'layer_scale1.lambda1': _rand(rng, (d,), 0.3, 1.0),
        s + 'norm2.weight': _rand(rng, (d,), 0.1, 1.0), s + 'norm2.bias': _rand(rng, (d,)),
        s + 'mlp.fc1.weight': _rand(rng, (mlp, d), 0.2), s + 'mlp.fc1.bias': _rand(rng, (mlp,)),
        s + 'mlp.fc2.weight': _rand(rng, (d, mlp), 0.2), s + 'mlp.fc2.bias': _rand(rng, (d,)),
        s + 'layer_scale2.lambda1': _rand(rng, (d,), 0.3, 1.0),
    })
  return sd


def random_vit_npz(rng: np.random.Generator, *, width=32, depth=2, heads=2, mlp=64,
                   patch=8, grid=4, pre_linen=True,
                   pretrain_classes=7) -> dict[str, np.ndarray]:
  """google-research/vision_transformer .npz contents ('/'-joined flax paths).

  pre_linen=True spells blocks like the original ImageNet-21K files
  (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3);
  False like linen (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0). Includes the 21K files' `pre_logits` and pre-training `head`.
  """
  d, hd = width, width // heads
  names = (('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3')
           if pre_linen else
           ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0'))
  ln0, mha, ln1, mlpb = names
  w = {
      'embedding/kernel': _rand(rng, (patch, patch, 3, d)),
      'embedding/bias': _rand(rng, (d,)),
      'cls': _rand(rng, (1, 1, d), 0.5),
      'Transformer/posembed_input/pos_embedding': _rand(rng, (1, 1 + grid * grid, d), 0.5),
      'Transformer/encoder_norm/scale': _rand(rng, (d,), 0.1, 1.0),
      'Transformer/encoder_norm/bias': _rand(rng, (d,)),
      'pre_logits/kernel': _rand(rng, (d, d)),
      'pre_logits/bias': _rand(rng, (d,)),
      'head/kernel': _rand(rng, (d, pretrain_classes)),
      'head/bias': _rand(rng, (pretrain_classes,)),
  }
  for i in range(depth):
    t = f'Transformer/encoderblock_{i}/'
    for ln in (ln0, ln1):
      w[f'{t}{ln}/scale'] = _rand(rng, (d,), 0.1, 1.0)
      w[f'{t}{ln}/bias'] = _rand(rng, (d,))
    for n in ('query', 'key', 'value'):
      w[f'{t}{mha}/{n}/kernel'] = _rand(rng, (d, heads, hd), 0.3)
      w[f'{t}{mha}/{n}/bias'] = _rand(rng, (heads, hd))
    w[f'{t}{mha}/out/kernel'] = _rand(rng, (heads, hd, d), 0.2)
    w[f'{t}{mha}/out/bias'] = _rand(rng, (d,))
    w[f'{t}{mlpb}/Dense_0/kernel'] = _rand(rng, (d, mlp), 0.2)
    w[f'{t}{mlpb}/Dense_0/bias'] = _rand(rng, (mlp,))
    w[f'{t}{mlpb}/Dense_1/kernel'] = _rand(rng, (mlp, d), 0.2)
    w[f'{t}{mlpb}/Dense_1/bias'] = _rand(rng, (d,))
  return w


def vit_npz_to_timm(w: Mapping[str, np.ndarray], *, pre_linen=True) -> dict[str, np.ndarray]:
  """The inverse direction (npz -> timm), for feeding the reference forward.

  Written element by element from the DenseGeneral definitions: query kernel
  [d_in, h, j] is torch weight row h*hd + j, column d_in.
  """
  ln0, mha, ln1, mlpb = (('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
                          'MlpBlock_3') if pre_linen else
                         ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
                          'MlpBlock_0'))
  k = w['embedding/kernel']
  sd = {
      'patch_embed.proj.weight': np.einsum('uvcd->dcuv', k),
      'patch_embed.proj.bias': w['embedding/bias'],
      'cls_token': w['cls'],
      'pos_embed': w['Transformer/posembed_input/pos_embedding'],
      'norm.weight': w['Transformer/encoder_norm/scale'],
      'norm.bias': w['Transformer/encoder_norm/bias'],
  }
  depth = 1 + max(int(n.split('/')[1].split('_')[1]) for n in w
                  if n.startswith('Transformer/encoderblock_'))
  for i in range(depth):
    t, s = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    rows_w, rows_b = [], []
    for n in ('query', 'key', 'value'):
      kern = w[f'{t}{mha}/{n}/kernel']
      d_in, heads, hd = kern.shape
      wt = np.zeros((heads * hd, d_in), np.float32)
      for h in range(heads):
        for j in range(hd):
          wt[h * hd + j, :] = kern[:, h, j]
      rows_w.append(wt)
      rows_b.append(w[f'{t}{mha}/{n}/bias'].reshape(-1))
    sd[s + 'attn.qkv.weight'] = np.concatenate(rows_w, 0)
    sd[s + 'attn.qkv.bias'] = np.concatenate(rows_b, 0)
    out = w[f'{t}{mha}/out/kernel']
    heads, hd, d_out = out.shape
    proj = np.zeros((d_out, heads * hd), np.float32)
    for h in range(heads):
      for j in range(hd):
        proj[:, h * hd + j] = out[h, j, :]
    sd[s + 'attn.proj.weight'] = proj
    sd[s + 'attn.proj.bias'] = w[f'{t}{mha}/out/bias']
    for ln, n in ((ln0, 'norm1'), (ln1, 'norm2')):
      sd[f'{s}{n}.weight'] = w[f'{t}{ln}/scale']
      sd[f'{s}{n}.bias'] = w[f'{t}{ln}/bias']
    for dn, n in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      sd[f'{s}mlp.{n}.weight'] = w[f'{t}{mlpb}/{dn}/kernel'].T
      sd[f'{s}mlp.{n}.bias'] = w[f'{t}{mlpb}/{dn}/bias']
  return sd
