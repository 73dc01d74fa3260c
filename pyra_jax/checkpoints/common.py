"""Shared pieces of the checkpoint converters: the error type, flat trees, prefixes.

Every converter turns a third-party state dict into a *flat* dict keyed by our
'/'-joined parameter paths (docs/architecture.md), in our layouts and float32.
Working flat keeps each mapping a one-line rule that a test can check, and lets
`load_pretrained` list missing / unexpected tensors by their full names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import numpy as np
from pyra_jax.errors import CheckpointError  # pylint: disable=unused-import

# The formats `load_pretrained` reads (config field `model_init_format`).
FORMATS = ('npz', 'timm', 'pyra_torch', 'dinov2_hf', 'onnx_dinov2', 'pyra_jax')

# Scopes that are task-specific and re-initialised for each task, unless a
# checkpoint of ours or of the authors' code carries trained values: the heads
# (and the pooled feature's norm of model.pool='gap'),
# the PYRA generators, every PEFT module (config model.peft) and the learned
# parts of LTMP and DiffRate.
TASK_SCOPES = re.compile(
    r'^(head|head_dist|fc_norm)/|/(lora|adapter|convpass|fact|snf|pyra|ltmp|diffrate|spvit)/')



class CheckpointWarning(UserWarning):
  """A checkpoint holds tensors we knowingly drop (e.g. a pre-training head)."""


@dataclasses.dataclass
class Converted:
  """A checkpoint converted to our layout, not yet fitted to a model.

  Attributes:
    params: our '/'-joined path -> float32 array, in our shapes.
    fmt: the source format (one of FORMATS).
    ignored: source names we drop on purpose (pre-training heads, decoders);
      `load_pretrained` warns about them.
    unexpected: source names no rule maps; `load_pretrained` refuses them.
    posemb_method: how to resample this checkpoint's position embeddings to
      another grid: 'bilinear' (google-research/vision_transformer, timm) or
      'bicubic' (HF Dinov2 interpolates bicubically inside the model, so we do
      the same to reproduce it at other resolutions).
    notes: human-readable remarks surfaced as warnings (e.g. MAE's fc_norm).
    meta: extra facts (source format of a converted file, model dims).
    heads_fixed: whether the checkpoint itself fixes the number of attention
      heads. Only vision_transformer .npz files store q/k/v per head; PyTorch
      layouts store (D, D) matrices that we split with a guessed H, so their
      q/k/v/out tensors may be re-split to the model's H (an exact reshape).
  """
  params: dict[str, np.ndarray]
  fmt: str
  ignored: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  posemb_method: str = 'bilinear'
  notes: list[str] = dataclasses.field(default_factory=list)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  heads_fixed: bool = False


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}."""
  out = {}
  for name, sub in tree.items():
    path = f'{prefix}{name}'
    if isinstance(sub, Mapping):
      out.update(flatten(sub, path + '/'))
    else:
      out[path] = sub
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts (the inverse of `flatten`)."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


def as_f32(x: Any) -> np.ndarray:
  """Any array-like (numpy, jax, bf16/fp16) -> a float32 numpy array."""
  return np.asarray(x).astype(np.float32)


def split_wrapper_prefix(keys: Iterable[str], anchor: str,
                         sep: str) -> tuple[str, list[str], list[str]]:
  """Finds the wrapper prefix of a state dict from one key every model has.

  Checkpoints wrap the same names in different prefixes (`module.` from
  DataParallel, `model.`, `backbone.`, `dinov2.`, `opt/target/`, `params/`...).
  Instead of guessing a list of prefixes, we take whatever precedes the anchor
  (e.g. 'patch_embed.proj.weight') as the prefix. Keys that do not start with it
  are returned separately (e.g. an ONNX file's `decoder.*`).

  Returns:
    (prefix, keys with the prefix (prefix stripped), keys without it).
  """
  keys = list(keys)
  cands = [k[:-len(anchor)] for k in keys
           if k == anchor or k.endswith(sep + anchor)]
  if not cands:
    raise CheckpointError(
        f'No tensor name ends with {anchor!r}, so the checkpoint is not in the '
        f"format asked for; set model_init_format to 'auto' or the file's "
        f'format (one of {FORMATS}). First names: {sorted(keys)[:8]}')
  prefix = min(cands, key=len)
  inside = [k[len(prefix):] for k in keys if k.startswith(prefix)]
  outside = [k for k in keys if not k.startswith(prefix)]
  return prefix, inside, outside


def num_blocks(keys: Iterable[str], pattern: str) -> int:
  """Depth from names like 'blocks.11.norm1.weight' (pattern with one group)."""
  rx = re.compile(pattern)
  ids = [int(m.group(1)) for k in keys if (m := rx.match(k))]
  return max(ids) + 1 if ids else 0


def default_num_heads(width: int) -> int:
  """timm / HF / MAE / DINOv2 ViTs all use 64-wide heads (Ti/S/B/L, DINOv2 S/B/L)."""
  return max(1, width // 64)


def attention_from_torch(prefix: str, q: tuple[np.ndarray, np.ndarray | None],
                         k: tuple[np.ndarray, np.ndarray | None],
                         v: tuple[np.ndarray, np.ndarray | None],
                         out: tuple[np.ndarray, np.ndarray],
                         num_heads: int) -> dict[str, np.ndarray]:
  """PyTorch (out, in) attention weights -> our DenseGeneral layouts.

  q/k/v: weight (D, D) -> kernel (D_in, H, D/H); bias (D,) -> (H, D/H).
  out:   weight (D, D) -> kernel (H, D/H, D_out); bias (D,).
  The head axis is the *output* channel split into H contiguous chunks, which is
  how timm, HF and the ViT paper's DenseGeneral reshape heads.
  """
  width = q[0].shape[1]
  if width % num_heads:
    raise CheckpointError(
        f'{prefix}: width {width} is not divisible by num_heads {num_heads}.')
  hd = width // num_heads
  res = {}
  for name, (w, b) in (('query', q), ('key', k), ('value', v)):
    res[f'{prefix}/{name}/kernel'] = as_f32(w).T.reshape(width, num_heads, hd)
    if b is not None:
      res[f'{prefix}/{name}/bias'] = as_f32(b).reshape(num_heads, hd)
  w, b = out
  res[f'{prefix}/out/kernel'] = as_f32(w).T.reshape(num_heads, hd, -1)
  res[f'{prefix}/out/bias'] = as_f32(b)
  return res


def patch_embedding_from_torch(w: np.ndarray) -> np.ndarray:
  """Conv weight (D, 3, P, P) -> flax Conv kernel (P, P, 3, D)."""
  return as_f32(w).transpose(2, 3, 1, 0)


class Consumer:
  """A state dict we take tensors from; what is left at the end is unmapped.

  Converters first `require` every name their rules need, so a checkpoint that
  lacks tensors fails with the list of absent names in its own spelling.
  """

  def __init__(self, state: Mapping[str, Any], fmt: str):
    self.state = dict(state)
    self.fmt = fmt

  def has(self, key: str) -> bool:
    return key in self.state

  def require(self, keys: Iterable[str]) -> None:
    missing = [k for k in keys if k not in self.state]
    if missing:
      raise CheckpointError(
          f'{self.fmt} checkpoint lacks {len(missing)} tensor(s) that a '
          f'{self.fmt} ViT has: {short_list(missing)}. Is this the right '
          f'format (model_init_format) and a complete checkpoint, not only the '
          f'fine-tuned tensors?')

  def take(self, key: str) -> np.ndarray:
    if key not in self.state:
      self.require([key])
    return as_f32(self.state.pop(key))

  def take_opt(self, key: str) -> np.ndarray | None:
    return as_f32(self.state.pop(key)) if key in self.state else None

  def leftover(self) -> list[str]:
    return sorted(self.state)


def short_list(names: Iterable[str], limit: int = 30) -> str:
  """Sorted, comma-separated names, cut after `limit`."""
  names = sorted(names)
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more
