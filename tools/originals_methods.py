r"""Ours against the original code of LTMP, DiffRate, EViT and ATS, logits on logits.

  python tools/originals_methods.py --ltmp=PATH/TO/ltmp --diffrate=PATH/TO/DiffRate \
      --evit=PATH/TO/evit --ats=PATH/TO/ATS [--batch_size=4] [--out=res.json]

Each path is a checkout of the method's repository (github.com/Mxbonn/ltmp,
OpenGVLab/DiffRate, youweiliang/evit, adaptivetokensampling/ATS); its modules
are imported from there at run time, nothing of them is copied here. Leave a
flag out to skip that method. This repository's `pyra_jax` (beside this
script) is the other side.

For each method the original model is built with its own code (a small ViT:
64 px images, 8 px patches, 65 tokens, width 96, 3 heads, 4 blocks, 10
classes), its random weights are perturbed (so LayerNorms, biases and the
methods' thresholds are not at their inits), the same weights are loaded into
our model, and both run on the same random images in eval mode. Printed and
returned: max |ours - theirs| over the logits, per method:

  ltmp               thresholds that merge and prune (the original's
                     `LTMPVisionTransformer`, `LTMPBlock`);
  diffrate_deployed  fixed prune/merge counts (the original's eval forward);
  diffrate_search    the search forward (train mode) at random rate logits;
  diffrate_search_flops  |ours - theirs| / theirs of that forward's FLOPs count
                     (the MACs its loss reads);
  evit               keep rate 0.7 at blocks 1-3 (with token fusion);
  evit_keep_m_minus_1    keep rate 0.98 at blocks 1-2: keeps 63 of 64 tokens,
                     which the original still reorders and fuses;
  ats                ATS at blocks 1-3 sampling all tokens (the original's
                     setting, drop_tokens off: slots stay, repeats masked;
                     ours: `model.ats_layers`).

The environment: the originals need different timm versions than the PYRA
authors' 0.5.4: LTMP pins timm 0.9.5 (`timm.layers`), which the others run
under too, and EViT imports torchprofile. One venv with both frameworks:

  python3 -m venv VENV
  VENV/bin/pip install torch==2.13.0 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 \
      optax==0.2.8 orbax-checkpoint==0.12.8 ml-collections==1.1.0 absl-py==2.5.1 \
      numpy==2.4.6 tqdm==4.70.1 tensorboardX==2.6.5 pyyaml huggingface_hub safetensors pillow
  VENV/bin/pip install --no-deps timm==0.9.5 torchprofile==0.0.4

torchvision is replaced by an inert stand-in when it cannot be imported
(tools/against_authors.py). Three more stand-ins, none touching a method's
computation: DiffRate's block (written for timm 0.4.5) calls `self.drop_path`,
which timm 0.9.5's block names drop_path1/drop_path2; the tool sets it to the
identity, which all three are here (no stochastic depth). ATS's model module
imports its training framework's registry (fvcore) only to register the class:
a stand-in registry takes its place; LTMP's imports wandb (its training logs),
an empty module when wandb is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
from typing import Callable

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))
sys.path.insert(0, TOOLS)

IMAGE, PATCH, WIDTH, HEADS, DEPTH, CLASSES = 64, 8, 96, 3, 4, 10
NUM_PATCHES = (IMAGE // PATCH) ** 2
METHODS = ('ltmp', 'diffrate', 'evit', 'ats')
# LTMP's thresholds here (its inits, 0.9 / 0, merge and prune nothing on random
# weights): a cosine most best matches exceed, and a fraction of the mean
# attention 1 / N that some tokens fall below.
LTMP_MERGE, LTMP_PRUNE = 0.5, 0.8 / (NUM_PATCHES + 1)
# DiffRate's fixed counts per block (class token included): block 0 keeps all.
DIFFRATE_PRUNE = (65, 57, 45, 33)
DIFFRATE_MERGE = (65, 49, 37, 25)
DIFFRATE_GRANULARITY = 4
EVIT_CASES = {'evit': (0.7, (1, 2, 3)), 'evit_keep_m_minus_1': (0.98, (1, 2))}
ATS_LAYERS = (1, 2, 3)


# --------------------------------------------------------------------------- #
# Importing the originals.
# --------------------------------------------------------------------------- #

def _package_only(name: str, path: str) -> None:
  """Registers package `name` at `path` without running its __init__.py (the
  originals' package __init__s import their training, data and plotting
  code, which a forward does not need); its submodules import as usual."""
  if name not in sys.modules:
    module = types.ModuleType(name)
    module.__path__ = [path]
    sys.modules[name] = module


def _add_path(path: str) -> None:
  if path not in sys.path:
    sys.path.insert(0, path)


class _Registry:
  """Stands for ATS's fvcore model registry: `register()` returns the class."""

  def register(self, *args, **kwargs):
    if args and callable(args[0]):
      return args[0]
    return lambda obj: obj


# --------------------------------------------------------------------------- #
# Weights: theirs -> ours.
# --------------------------------------------------------------------------- #

def _perturb(model, seed: int, scale: float = 0.05) -> None:
  """Moves every floating parameter of a torch model by N(0, scale^2)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.is_floating_point() and p.requires_grad:
        p.add_(scale * torch.randn(p.shape, generator=g))


def _state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().astype(np.float32)
          for k, v in model.state_dict().items()}


def _our_model(**fields):
  """Our model for the small ViT above, plus its random init as a template."""
  import jax  # pylint: disable=g-import-not-at-top
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = common.get_base_config()
  m = c.model
  m.variant, m.image_size, m.patch_size = f'Ti/{PATCH}', IMAGE, PATCH
  m.width, m.depth, m.num_heads, m.mlp_dim = WIDTH, DEPTH, HEADS, 4 * WIDTH
  m.lora_rank, m.lora_dropout, m.drop_path, m.schedule = 0, 0.0, 0.0, 'none'
  for k, v in fields.items():
    m[k] = v
  model = vit.build_model(m, num_classes=CLASSES)
  x = np.zeros((1, IMAGE, IMAGE, 3), np.float32)
  template = jax.jit(model.init)({'params': jax.random.key(0)}, x)['params']
  return model, jax.device_get(template)


def _load_into(template: dict, state: dict[str, np.ndarray],
               extra: dict[str, np.ndarray]) -> dict:
  """Their timm-layout weights (and `extra`, our '/'-paths) in our tree.

  Every leaf of our template must be given, with its shape: nothing of ours
  stays at our own init.
  """
  from pyra_jax.checkpoints import common  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import torch_formats  # pylint: disable=g-import-not-at-top
  conv = torch_formats.convert_torch_vit(state, HEADS, fmt='pyra_torch')
  given = dict(conv.params, **extra)
  want = common.flatten(template)
  missing = sorted(set(want) - set(given))
  if missing:
    raise RuntimeError(f'their model gives no value for our {missing}')
  out = {}
  for k, v in want.items():
    g = np.asarray(given[k], np.float32)
    if g.shape != np.shape(v):
      raise RuntimeError(f'{k}: their shape {g.shape}, ours {np.shape(v)}')
    out[k] = g
  return common.unflatten(out)


def _images(batch_size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(batch_size, 3, IMAGE, IMAGE)).astype(
      np.float32)


def _ours(model, params, images_nchw: np.ndarray, *, train: bool = False):
  import jax  # pylint: disable=g-import-not-at-top
  x = np.transpose(images_nchw, (0, 2, 3, 1))
  out, state = model.apply({'params': params}, x, train=train, mutable=['intermediates'],
                           rngs={'dropout': jax.random.key(0)})
  return np.asarray(out, np.float64), state


# max |their logits| per comparison, for scale (printed beside the differences).
SCALES: dict[str, float] = {}


def _max_diff(name: str, ours: np.ndarray, theirs) -> float:
  theirs = np.asarray(theirs.detach().numpy(), np.float64)
  SCALES[name] = float(np.abs(theirs).max())
  return float(np.abs(ours - theirs).max())


# --------------------------------------------------------------------------- #
# The methods.
# --------------------------------------------------------------------------- #

def compare_ltmp(repo: str, batch_size: int) -> dict[str, float]:
  """LTMP's `LTMPVisionTransformer` (eval: hard masks, softmax over active keys)."""
  import torch  # pylint: disable=g-import-not-at-top
  _add_path(repo)
  try:  # LTMP's model module imports its training helpers, which log to wandb
    import wandb  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.modules['wandb'] = types.ModuleType('wandb')
  _package_only('ltmp', os.path.join(repo, 'ltmp'))
  _package_only('ltmp.timm', os.path.join(repo, 'ltmp', 'timm'))
  lt = importlib.import_module('ltmp.timm.lt_mergeprune')
  torch.manual_seed(0)
  theirs = lt.LTMPVisionTransformer(
      tau=0.5, img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
      num_heads=HEADS, num_classes=CLASSES, qkv_bias=True, block_fn=lt.LTMPBlock)
  _perturb(theirs, 1)
  with torch.no_grad():
    for blk in theirs.blocks:
      blk.merge_masker.threshold.fill_(LTMP_MERGE)
      blk.prune_masker.threshold.fill_(LTMP_PRUNE)
  theirs.eval()
  model, template = _our_model(method='ltmp', ltmp_tau=0.5)
  extra = {}
  for i in range(DEPTH):
    extra[f'Transformer/encoderblock_{i}/ltmp/merge_threshold'] = np.full((1,), LTMP_MERGE)
    extra[f'Transformer/encoderblock_{i}/ltmp/prune_threshold'] = np.full((1,), LTMP_PRUNE)
  params = _load_into(template, _state(theirs), extra)
  x = _images(batch_size)
  with torch.no_grad():
    want = theirs(torch.from_numpy(x))
  got, state = _ours(model, params, x)
  kept = [float(np.asarray(state['intermediates']['Transformer'][f'mask_{i}'][0]).mean())
          for i in range(DEPTH)]
  theirs_kept = [float(m.mean()) for m in theirs.masks]
  print(f'ltmp: active fraction after each block, ours {np.round(kept, 3).tolist()}, '
        f'theirs {np.round(theirs_kept, 3).tolist()}', file=sys.stderr)
  return {'ltmp': _max_diff('ltmp', got, want)}


def compare_diffrate(repo: str, batch_size: int) -> dict[str, float]:
  """DiffRate's patched timm ViT: the eval forward at fixed counts, and the
  search (train-mode) forward at random rate logits, with its FLOPs count."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as timm_vit  # pylint: disable=g-import-not-at-top
  _add_path(repo)
  _package_only('DiffRate', os.path.join(repo, 'DiffRate'))
  _package_only('DiffRate.patch', os.path.join(repo, 'DiffRate', 'patch'))
  patch = importlib.import_module('DiffRate.patch.deit')
  torch.manual_seed(0)
  theirs = timm_vit.VisionTransformer(
      img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
      num_classes=CLASSES, qkv_bias=True)
  patch.apply_patch(theirs, prune_granularity=DIFFRATE_GRANULARITY,
                    merge_granularity=DIFFRATE_GRANULARITY)
  for blk in theirs.blocks:  # timm 0.9.5 names it drop_path1/2 (identities here)
    if not hasattr(blk, 'drop_path'):
      blk.drop_path = nn.Identity()
  _perturb(theirs, 2)
  x = _images(batch_size, 1)
  out = {}

  # Deployed: fixed counts, eval.
  theirs.eval()
  theirs.set_kept_num(list(DIFFRATE_PRUNE), list(DIFFRATE_MERGE))
  with torch.no_grad():
    want, _ = theirs(torch.from_numpy(x))
  rates = ','.join(map(str, DIFFRATE_PRUNE)) + ';' + ','.join(map(str, DIFFRATE_MERGE))
  model, template = _our_model(method='diffrate', diffrate_rates=rates)
  params = _load_into(template, _state(theirs), {})
  got, _ = _ours(model, params, x)
  out['diffrate_deployed'] = _max_diff('diffrate_deployed', got, want)

  # The search: train mode, rate logits of their own (random) values.
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for blk in theirs.blocks[1:]:
      for ddp in (blk.prune_ddp, blk.merge_ddp):
        ddp.selected_probability.copy_(2.0 * torch.randn(
            ddp.selected_probability.shape, generator=g))
  theirs.train()
  with torch.no_grad():
    want, their_flops = theirs(torch.from_numpy(x))
  model, template = _our_model(method='diffrate', diffrate_search=True,
                               diffrate_flops_ratio=1.5,
                               diffrate_granularity=DIFFRATE_GRANULARITY)
  state = _state(theirs)
  extra = {}
  for i in range(1, DEPTH):
    for kind in ('prune', 'merge'):
      extra[f'Transformer/encoderblock_{i}/diffrate/{kind}_logits'] = state[
          f'blocks.{i}.{kind}_ddp.selected_probability']
  params = _load_into(template, state, extra)
  xs = np.transpose(x, (0, 2, 3, 1))
  got, st = model.apply({'params': params}, xs, train=True,
                        mutable=['intermediates', 'losses'],
                        rngs={'dropout': jax.random.key(0)})
  out['diffrate_search'] = _max_diff('diffrate_search', np.asarray(got, np.float64), want)
  # Their count: MACs of the blocks at the searched counts, the patch embedding
  # (on N = patches + 1) and the classifier; ours: the blocks' 2 x MACs.
  from pyra_jax import schedules  # pylint: disable=g-import-not-at-top
  n0 = NUM_PATCHES + 1
  full = schedules.vit_flops([0] * DEPTH, num_tokens=n0, width=WIDTH)
  frac = float(st['intermediates']['Transformer']['flops_fraction'][0])
  ours_macs = frac * full / 2 + n0 * WIDTH * PATCH * PATCH * 3 + WIDTH * CLASSES
  out['diffrate_search_flops'] = abs(ours_macs - float(their_flops)) / float(their_flops)
  return out


def compare_evit(repo: str, batch_size: int) -> dict[str, float]:
  """EViT's own `EViT` model (fuse_token=True), eval, at two keep settings."""
  import torch  # pylint: disable=g-import-not-at-top
  _add_path(repo)
  evit = importlib.import_module('evit')
  out = {}
  for name, (rate, layers) in EVIT_CASES.items():
    torch.manual_seed(0)
    keep = tuple(rate if i in layers else 1.0 for i in range(DEPTH))
    theirs = evit.EViT(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                       num_heads=HEADS, num_classes=CLASSES, qkv_bias=True,
                       keep_rate=keep, fuse_token=True)
    _perturb(theirs, 4)
    theirs.eval()
    x = _images(batch_size, 2)
    with torch.no_grad():
      want = theirs(torch.from_numpy(x))
    model, template = _our_model(method='evit', evit_keep_rate=rate,
                                 evit_layers=','.join(map(str, layers)),
                                 evit_match_flops=False)
    params = _load_into(template, _state(theirs), {})
    got, _ = _ours(model, params, x)
    out[name] = _max_diff(name, got, want)
  return out


def compare_ats(repo: str, batch_size: int) -> dict[str, float]:
  """ATS's `ViT` with ATS blocks sampling all tokens, drop_tokens off, eval."""
  import torch  # pylint: disable=g-import-not-at-top
  for name, sub in (('libs', 'libs'), ('libs.models', 'libs/models')):
    _package_only(name, os.path.join(repo, sub))
  if 'libs.models.build' not in sys.modules:
    build = types.ModuleType('libs.models.build')
    build.MODEL_REGISTRY = _Registry()
    sys.modules['libs.models.build'] = build
  ats_vit = importlib.import_module('libs.models.transformers.vit')
  v = types.SimpleNamespace(
      IMG_SIZE=IMAGE, PATCH_SIZE=PATCH, IN_CHANNELS=3, NUM_CLASSES=CLASSES,
      EMBED_DIM=WIDTH, DEPTH=DEPTH, NUM_HEADS=HEADS, MLP_RATIO=4.0, QKV_BIAS=True,
      QK_SCALE=None, REPRESENTATION_SIZE=None, DROP_RATE=0.0, ATTN_DROP_RATE=0.0,
      DROP_PATH_RATE=0.0, HYBRID_BACKBONE=None, NORM_LAYER=None,
      ATS_BLOCKS=list(ATS_LAYERS), NUM_TOKENS=[NUM_PATCHES + 1] * DEPTH, DROP_TOKENS=False)
  torch.manual_seed(0)
  theirs = ats_vit.ViT(types.SimpleNamespace(VIT=v))
  _perturb(theirs, 5)
  theirs.eval()
  x = _images(batch_size, 3)
  with torch.no_grad():
    want, _ = theirs(torch.from_numpy(x))
  model, template = _our_model(method='ats', ats_layers=','.join(map(str, ATS_LAYERS)))
  state = {k: v for k, v in _state(theirs).items() if not k.endswith('out_zero_mask')}
  params = _load_into(template, state, {})
  got, st = _ours(model, params, x)
  live = [float(np.asarray(st['intermediates']['Transformer'][f'size_{i}'][0]).sum(axis=1).mean())
          for i in ATS_LAYERS]
  print(f'ats: mean live tokens after blocks {list(ATS_LAYERS)}: {np.round(live, 1).tolist()}',
        file=sys.stderr)
  return {'ats': _max_diff('ats', got, want)}


COMPARE: dict[str, Callable[[str, int], dict[str, float]]] = {
    'ltmp': compare_ltmp, 'diffrate': compare_diffrate, 'evit': compare_evit,
    'ats': compare_ats}


def compare(paths: dict[str, str], *, batch_size: int = 4) -> dict[str, float]:
  """{method: repository checkout} -> {comparison: max |ours - theirs|}.

  Methods not in `paths` are skipped. Logit differences for every entry but
  `diffrate_search_flops` (a relative difference of the FLOPs counts).
  """
  import against_authors  # pylint: disable=g-import-not-at-top
  against_authors.torchvision_or_stand_in()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  out = {}
  for name in METHODS:
    if name in paths:
      out.update(COMPARE[name](paths[name], batch_size))
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  for name in METHODS:
    parser.add_argument(f'--{name}', default=None,
                        help=f'checkout of the original {name} repository')
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--out', default=None, help='also write the results as JSON here')
  args = parser.parse_args(argv)
  paths = {m: getattr(args, m) for m in METHODS if getattr(args, m)}
  if not paths:
    print('Error: give at least one of ' + ', '.join(f'--{m}=PATH' for m in METHODS)
          + ' (a checkout of that method\'s repository).', file=sys.stderr)
    return 2
  for m, p in paths.items():
    if not os.path.isdir(p):
      print(f'Error: --{m}={p} is not a directory: give a checkout of the original '
            f'{m} repository.', file=sys.stderr)
      return 2
  import against_authors  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    against_authors.torchvision_or_stand_in()
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'Error: {e}: run this with a Python that has torch and timm 0.9.5 '
          '(the install line is in this script\'s docstring).', file=sys.stderr)
    return 1
  if 'ltmp' in paths and not timm.__version__.startswith('0.9'):
    print(f'Error: LTMP needs timm 0.9.x (its pin is 0.9.5), this Python has timm '
          f'{timm.__version__}: use the venv of this script\'s docstring.', file=sys.stderr)
    return 1
  try:
    res = compare(paths, batch_size=args.batch_size)
  except ImportError as e:
    print(f'Error: {e}: check that each --METHOD path is a checkout of that method\'s '
          'repository and that this Python has the packages of this script\'s docstring.',
          file=sys.stderr)
    return 1
  width = max(len(k) for k in res)
  for k, v in res.items():
    unit = ('relative difference of the FLOPs counts' if k.endswith('_flops') else
            f'max |ours - theirs| on logits; max |logit| {SCALES[k]:.2f}')
    print(f'{k:<{width}}  {v:.2e}  ({unit})')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'results': res, 'max_abs_logit': SCALES, 'batch_size': args.batch_size,
                 'model': {'image': IMAGE, 'patch': PATCH, 'width': WIDTH, 'heads': HEADS,
                           'depth': DEPTH, 'classes': CLASSES}}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
