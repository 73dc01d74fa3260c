"""LoRA on the fused q/k/v projection, in the authors' form, and its folding.

One shared down-projection A (D -> h) and one up-projection B (h -> 3D) whose
output is split into q, k and v deltas; no bias, no alpha/h scaling, dropout on
LoRA's input in training (docs/algorithm.md §2). Because the whole update is the
linear map A @ B, it folds into the frozen q/k/v kernels exactly for deployment.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pyra_jax.models.adapter import timm_trunc_normal

LORA_INITS = ('zeros', 'trunc_normal')


class LoRA(nn.Module):
  """Returns the (B, N, 3D) q|k|v delta for (B, N, D) inputs.

  Attributes:
    rank: h, the bottleneck width.
    dropout: rate of the dropout on LoRA's input during training.
    init_scheme: 'zeros' sets B = 0 so LoRA starts as the identity (the paper),
      A from flax's truncated normal (std 0.02 before its cut at ±2 std);
      'trunc_normal' draws A and B as the authors' code ends up with after its
      later init pass: timm's trunc_normal_(std=0.02), whose cut at ±2 is in the
      weights' units, so in effect N(0, 0.02²) (`adapter.timm_trunc_normal`).
  """
  rank: int
  dropout: float
  init_scheme: str  # not `init`, which would hide nn.Module.init
  dtype: Any
  out_dim: Optional[int] = None  # q/k/v width when heads are pruned (RaP); None: D

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.init_scheme not in LORA_INITS:
      raise ValueError(f'model.lora_init must be one of {LORA_INITS}, got {self.init_scheme!r}.')
    dim = x.shape[-1]
    if self.init_scheme == 'zeros':
      down_init, up_init = nn.initializers.truncated_normal(stddev=0.02), nn.initializers.zeros
    else:
      down_init = up_init = timm_trunc_normal(0.02)
    down = self.param('down', down_init, (dim, self.rank))
    up = self.param('up', up_init, (self.rank, 3 * (self.out_dim or dim)))
    x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    return (x @ down.astype(self.dtype)) @ up.astype(self.dtype)


def fold_lora(params: Mapping[str, Any]) -> dict[str, Any]:
  """Folds every `lora` scope into its q/k/v kernels and removes it.

  The result is the parameter tree of the same model with `lora_rank=0`
  (see `pyra_jax.models.vit.deployed_config`): same logits, no extra FLOPs.
  """
  def fold(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for name, sub in tree.items():
      if isinstance(sub, Mapping):
        out[name] = fold(sub)
    for name, sub in tree.items():
      if not isinstance(sub, Mapping):
        out[name] = sub
    if 'lora' in out and 'query' in out:
      lora = out.pop('lora')
      delta = jnp.asarray(lora['down']) @ jnp.asarray(lora['up'])  # (D, 3D)
      for i, proj in enumerate(('query', 'key', 'value')):
        kernel = out[proj]['kernel']
        w = math.prod(kernel.shape[1:])  # (D, H, hd): H heads (fewer if pruned)
        d = delta[:, i * w:(i + 1) * w]
        out[proj] = dict(out[proj], kernel=kernel + d.reshape(kernel.shape))
    return out
  return fold(params)
