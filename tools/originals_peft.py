r"""Our PEFT modules against their authors' original PyTorch code, same weights, same images.

  /work/torchenv/bin/python tools/originals_peft.py --pyra_repo=PATH/TO/PYRA \
      --petl_repo=PATH/TO/PETL-ViT --snf_repo=PATH/TO/SNF [--json=out.json]

Each flag is a checkout of the original repository (any subset may be given;
the modules of the others are skipped):

  --pyra_repo  github.com/THU-MIG/PYRA: the Adapter, inside their ViT as their
               model builds it (`model/vision_transformer_timm.py`)
  --petl_repo  github.com/JieShibo/PETL-ViT: Convpass (`convpass/vtab/
               convpass.py`), FacT-TT and FacT-TK (`FacT/fact_tt.py`,
               `FacT/fact_tk.py`), installed on a timm ViT by their `set_*`
  --snf_repo   github.com/Wang-Yaoming/SNF: SNF (`snf.py`, `flow.py`),
               installed on a timm ViT by their `set_snf`

Their files are imported from those paths at run time; nothing of them is
copied here. For each module both sides get the same random weights (every
parameter, the modules' zero-initialised ones included, so the whole module
acts) and the same random images; both run in evaluation mode, float32, and
the tool prints max |ours − theirs| over the logits, with max |theirs| and
the module's effect (max change of their logits when the module is silenced)
for scale. `fact_tk (paper layout)` is ours with `model.fact_tk_layout='paper'`
against their FacT-TK: the size of the layout difference. It also measures
the Adapter's initialisation as their ViT-B/16 is built (their train.py's
arguments) against ours with `model.adapter_init='trunc_normal'`.

The environment is tools/against_authors.py's (torch CPU, timm 0.5.4, our JAX
stack). What their code needs that is not there is stood in for, and only
names their code imports but the compared paths never run are stubbed:

  * torchvision (timm imports it; the PyPI wheel does not load beside this
    torch) and FacT's `vtab.py` data code: an inert module;
  * avalanche (FacT's accuracy metric) and einops (imported by SNF's snf.py):
    empty stand-ins;
  * SNF's `model.clip` and `eva_clip` (CLIP/EVA block classes its `set_snf`
    compares types with): placeholder classes no block is an instance of.

Two shims adapt their code to the timm in use, each naming the same
submodules, no computation added:

  * FacT was written for timm 0.4.12, whose Mlp calls its dropout `drop`;
    timm 0.5.4 has `drop1`/`drop2` (the same Dropout(p=0)): `drop` is bound
    to `drop1`.
  * SNF's `forward_flow_block` reads a CLIP block's names (`attention`,
    `ln_1`, `ln_2`, `mlp`); a timm block has `attn`, `norm1`, `norm2`, `mlp`:
    the CLIP names are bound to those submodules. As in their code, only the
    first 12 blocks get flows (`count <= 12`); the model here has 14 blocks
    and ours runs with `model.snf_blocks=12`.

Model sizes are small (depth 2-14, 32-224 px) where the original allows;
their Convpass fixes width 768 and a 14 x 14 grid, their FacT width 768.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import re
import sys
import types
import warnings
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_CLASSES = 5
# Scales of the random weights: the backbone's, and the modules' (large enough
# that each module changes the logits by O(1)).
BACKBONE_STD, MODULE_STD = 0.05, 0.1
# What each repository must hold (checked before anything is imported).
REQUIRED = {
    'pyra': ('model/vision_transformer_timm.py', 'github.com/THU-MIG/PYRA'),
    'petl': ('FacT/fact_tk.py', 'github.com/JieShibo/PETL-ViT'),
    'snf': ('snf.py', 'github.com/Wang-Yaoming/SNF'),
}


class UsageError(Exception):
  """A bad command line: printed as one 'Error: ' sentence."""


# --------------------------------------------------------------------------- #
# Stand-ins for what their code imports but the compared paths never run.
# --------------------------------------------------------------------------- #

class _InertType(type):
  """Attributes of an inert class are inert classes (one per name)."""
  made: dict = {}

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    key = (cls.__name__, name)
    if key not in _InertType.made:
      _InertType.made[key] = _InertType(name, (Inert,), {})
    return _InertType.made[key]


class Inert(metaclass=_InertType):
  """Stands for any torchvision name timm or FacT's vtab.py touch at import."""

  def __init__(self, *a, **k):
    pass

  def __getattr__(self, name):
    return Inert


class InertTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `torchvision` and its submodules as inert modules."""

  def find_spec(self, name, path, target=None):
    if name == 'torchvision' or name.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = types.ModuleType(spec.name)
    module.__path__ = []

    def attribute(attr):
      if attr.startswith('__'):
        raise AttributeError(attr)
      return getattr(Inert, attr)
    module.__getattr__ = attribute
    return module

  def exec_module(self, module):
    pass


def install_stand_ins() -> None:
  """torchvision (if the real one does not load), avalanche and einops."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n.split('.')[0] == 'torchvision']:
      del sys.modules[name]
    if not any(isinstance(f, InertTorchvision) for f in sys.meta_path):
      sys.meta_path.insert(0, InertTorchvision())
  stubs = {'avalanche': {}, 'avalanche.evaluation': {}, 'avalanche.evaluation.metrics': {},
           'avalanche.evaluation.metrics.accuracy': {'Accuracy': Inert}}
  try:
    import einops  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    stubs['einops'] = {'rearrange': Inert}
  for name, attrs in stubs.items():
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__path__ = []
      module.__dict__.update(attrs)
      sys.modules[name] = module


def load_file(name: str, path: str, *, extra_path: Optional[str] = None,
              modules: Optional[dict] = None) -> types.ModuleType:
  """Imports the file at `path` as module `name`.

  `extra_path` is on sys.path and `modules` in sys.modules only while it runs
  (their own sibling imports, our stubs), so nothing of theirs shadows a name
  later (e.g. SNF's stub `model` against PYRA's `model` package).
  """
  saved_path = list(sys.path)
  saved = {k: sys.modules.get(k) for k in (modules or {})}
  try:
    if extra_path:
      sys.path.insert(0, extra_path)
    sys.modules.update(modules or {})
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
      spec.loader.exec_module(module)
    return module
  finally:
    sys.path[:] = saved_path
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


# --------------------------------------------------------------------------- #
# Shared: weights, images, our model on their weights.
# --------------------------------------------------------------------------- #

def randomize(model, base_keys: set[str], seed: int) -> None:
  """Every parameter of `model` random: LayerNorm scales 1 + 0.1·N, the backbone
  (names in `base_keys`) N(0, BACKBONE_STD²) (position embedding and class
  token N(0, 0.5²)), the modules' N(0, MODULE_STD²)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # each tensor once (aliases skipped)
      z = torch.randn(p.shape, generator=g)
      if name in base_keys and 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.1 * z)
      elif name in ('pos_embed', 'cls_token'):
        p.copy_(0.5 * z)
      else:
        p.copy_((BACKBONE_STD if name in base_keys else MODULE_STD) * z)


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """(B, H, W, 3) float32, NHWC (ours); theirs get the NCHW transpose."""
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def their_logits(model, x: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().astype(np.float64)


def module_effect(model, x: np.ndarray, logits: np.ndarray,
                  silences: Callable[[str], bool]) -> float:
  """max |logits − logits with the module silenced|: how much the module
  moves the logits, so a small max |ours − theirs| means something.
  `silences(name)` picks the parameters whose zeroing turns the module into
  the identity (Adapter/Convpass `up`, FacT's V, SNF's μ, log σ and u); they
  are restored afterwards."""
  import torch  # pylint: disable=g-import-not-at-top
  saved = {n: p.detach().clone() for n, p in model.named_parameters() if silences(n)}
  if not saved:
    raise ValueError('no parameter silences the module')
  with torch.no_grad():
    for n, p in model.named_parameters():
      if n in saved:
        p.zero_()
    bare = their_logits(model, x)
    for n, p in model.named_parameters():
      if n in saved:
        p.copy_(saved[n])
  return float(np.abs(logits - bare).max())


def state(model, keys: Optional[set[str]] = None) -> dict[str, np.ndarray]:
  """Their state dict as numpy (only `keys` if given)."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
          if keys is None or k in keys}


def our_model_config(*, width: int, depth: int, heads: int, image_size: int, patch: int,
                     **fields: Any):
  """A `model` section of ours: a ViT of this shape, no merging, the given fields."""
  from pyra_jax.configs.common import get_base_config  # pylint: disable=g-import-not-at-top
  m = get_base_config().model
  m.update(variant='B/16', width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
           patch_size=patch, image_size=image_size, num_classes=NUM_CLASSES,
           method='peft', schedule='none', drop_path=0.0)
  m.update(fields)
  return m


def our_logits(model_config, backbone_state: dict[str, np.ndarray],
               module_params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  """Our model on their backbone (converted by our timm/pyra_torch reader)
  with the module's parameters set from `module_params` ('/'-joined paths)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import CheckpointWarning, fit_to_model  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import torch_formats  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import build_model  # pylint: disable=g-import-not-at-top
  model = build_model(model_config)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))['params']
  conv = torch_formats.convert_torch_vit(backbone_state, model_config.num_heads,
                                         fmt='pyra_torch')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', CheckpointWarning)
    params = fit_to_model(conv, params, model_config)
  flat = traverse_util.flatten_dict(params, sep='/')
  for k, v in module_params.items():
    if k not in flat or tuple(flat[k].shape) != tuple(v.shape):
      raise ValueError(f'{k}: ours {getattr(flat.get(k), "shape", None)}, theirs {v.shape}')
    flat[k] = jnp.asarray(v, jnp.float32)
  # Every parameter of a module set here must come from theirs (the Adapter's
  # come through the reader above, from their names).
  missing = [k for k in flat if re.search(r'(^|/)(convpass|fact|snf)/', k)
             and k not in module_params]
  if missing:
    raise ValueError(f'no value of theirs for {missing[:4]}')
  params = traverse_util.unflatten_dict(flat, sep='/')
  out = model.apply({'params': params}, jnp.asarray(x), train=False)
  return np.asarray(out, np.float64)


def timm_vit(*, width: int, depth: int, heads: int, image_size: int, patch: int):
  """timm's plain ViT (their modules are installed on it), qkv bias on."""
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  return VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width,
                           depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                           num_classes=NUM_CLASSES)


def max_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
  if not np.isfinite(theirs).all() or not np.isfinite(ours).all():
    raise FloatingPointError('non-finite logits')
  return float(np.abs(ours - theirs).max())


# --------------------------------------------------------------------------- #
# The modules.
# --------------------------------------------------------------------------- #

def _import_pyra_models(repo: str):
  if repo not in sys.path:
    sys.path.insert(0, repo)
  with contextlib.redirect_stdout(io.StringIO()):
    import model as pyra_models  # pylint: disable=g-import-not-at-top
  where = os.path.dirname(os.path.abspath(pyra_models.__file__))
  if os.path.realpath(where) != os.path.realpath(os.path.join(repo, 'model')):
    raise UsageError(f'`import model` found {where}, not {repo}/model: run from a '
                     'directory without a `model` package of its own.')
  return pyra_models


def compare_adapter(repo: str, out: dict[str, float]) -> None:
  """Their ViT with their Adapter (k = 8) built by their constructor, all
  weights random; ours peft='adapter' on the same weights."""
  pyra_models = _import_pyra_models(repo)
  their_vit_cls = pyra_models.vision_transformer_timm.VisionTransformer
  shape = dict(width=96, depth=3, heads=3, image_size=32, patch=8)
  with contextlib.redirect_stdout(io.StringIO()):
    theirs = their_vit_cls(
        img_size=32, patch_size=8, num_classes=NUM_CLASSES, embed_dim=96, depth=3,
        num_heads=3, qkv_bias=True, drop_path_rate=0.1, prompt_tuning_dim=0, LoRA_dim=0,
        adapter_dim=8, prefix_dim=0, drop_rate_adapter=0.1)
  base = {k for k in theirs.state_dict() if '.adapter.' not in k}
  randomize(theirs, base, seed=1)
  x = images(2, 32)
  want = their_logits(theirs, x)
  ours = our_logits(our_model_config(**shape, peft='adapter', peft_dim=8), state(theirs),
                    {}, x)  # the Adapter comes through our pyra_torch reader
  out['adapter'], out['scale/adapter'] = max_diff(ours, want), float(np.abs(want).max())
  out['effect/adapter'] = module_effect(theirs, x, want, lambda n: '.adapter.ln2.' in n)

  # Their initialisation, as their train.py builds ViT-B/16 with the Adapter.
  with contextlib.redirect_stdout(io.StringIO()):
    built = pyra_models.vit_base_patch16_224_in21k(
        img_size=224, drop_rate=0.0, drop_path_rate=0.1, prompt_tuning_dim=0, LoRA_dim=0,
        adapter_dim=8, prefix_dim=0, drop_rate_LoRA=0.1, drop_rate_prompt=0.0,
        drop_rate_adapter=0.1, IS_not_position_VPT=False, pyra_r=None)
  sd = state(built)
  kernels = np.concatenate([v.ravel() for k, v in sd.items()
                            if '.adapter.' in k and k.endswith('weight')])
  biases = np.concatenate([v.ravel() for k, v in sd.items()
                           if '.adapter.' in k and k.endswith('bias')])
  _init_stats('theirs', kernels, biases, out)
  ours_k, ours_b = _our_adapter_init(768, 8, 12)
  _init_stats('ours', ours_k, ours_b, out)


def _our_adapter_init(dim: int, k: int, blocks: int) -> tuple[np.ndarray, np.ndarray]:
  """Our Adapter's kernels and biases with adapter_init='trunc_normal', `blocks` draws."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from pyra_jax.models.adapter import Adapter  # pylint: disable=g-import-not-at-top
  module = Adapter(dim=k, dropout=0.0, init_scheme='trunc_normal', dtype=jnp.float32)
  kern, bias = [], []
  for i in range(blocks):
    p = traverse_util.flatten_dict(module.init(jax.random.PRNGKey(i), jnp.zeros((1, 1, dim)),
                                               train=False)['params'], sep='/')
    kern += [np.asarray(v).ravel() for n, v in p.items() if n.endswith('kernel')]
    bias += [np.asarray(v).ravel() for n, v in p.items() if n.endswith('bias')]
  return np.concatenate(kern), np.concatenate(bias)


def _init_stats(side: str, kernels: np.ndarray, biases: np.ndarray,
                out: dict[str, float]) -> None:
  out[f'adapter_init/{side}_kernel_std'] = float(kernels.std())
  out[f'adapter_init/{side}_kernel_absmax'] = float(np.abs(kernels).max())
  # A normal has 4.55 % beyond 2 std; a cut at ±2 std (flax's) has none.
  out[f'adapter_init/{side}_beyond_0.04'] = float((np.abs(kernels) > 0.04).mean())
  out[f'adapter_init/{side}_bias_absmax'] = float(np.abs(biases).max())


def compare_convpass(repo: str, out: dict[str, float]) -> None:
  """Their Convpass (k = 8, s = 0.7, both bypasses) on a 2-block timm ViT at
  their fixed width 768 and 14 x 14 grid."""
  cp = load_file('convpass_original', os.path.join(repo, 'convpass', 'vtab', 'convpass.py'))
  shape = dict(width=768, depth=2, heads=12, image_size=224, patch=16)
  theirs = timm_vit(**shape)
  base = set(theirs.state_dict())
  cp.set_Convpass(theirs, 'convpass', dim=8, s=0.7, xavier_init=False)
  randomize(theirs, base, seed=2)
  sd = state(theirs)
  mod = {}
  for i in range(shape['depth']):
    for src, dst in (('adapter_attn', 'attn'), ('adapter_mlp', 'mlp')):
      s, t = f'blocks.{i}.{src}.', f'Transformer/encoderblock_{i}/convpass/{dst}/'
      mod[t + 'down/kernel'] = sd[s + 'adapter_down.weight'].T
      mod[t + 'down/bias'] = sd[s + 'adapter_down.bias']
      mod[t + 'conv/kernel'] = sd[s + 'adapter_conv.weight'].transpose(2, 3, 1, 0)  # HWIO
      mod[t + 'conv/bias'] = sd[s + 'adapter_conv.bias']
      mod[t + 'up/kernel'] = sd[s + 'adapter_up.weight'].T
      mod[t + 'up/bias'] = sd[s + 'adapter_up.bias']
  x = images(2, 224)
  want = their_logits(theirs, x)
  ours = our_logits(our_model_config(**shape, peft='convpass', peft_dim=8, convpass_scale=0.7),
                    state(theirs, base), mod, x)
  out['convpass'], out['scale/convpass'] = max_diff(ours, want), float(np.abs(want).max())
  out['effect/convpass'] = module_effect(theirs, x, want, lambda n: '.adapter_up.' in n)


def _fact_model(repo: str, variant: str, rank: int, scale: float, depth: int):
  """Their FacT-`variant` on a timm ViT (width 768, as their code fixes it)."""
  fact = load_file(f'fact_{variant}_original', os.path.join(repo, 'FacT', f'fact_{variant}.py'),
                   extra_path=os.path.join(repo, 'FacT'))
  theirs = timm_vit(width=768, depth=depth, heads=12, image_size=32, patch=16)
  base = set(theirs.state_dict())
  fact.vit = theirs  # their set_FacT and forwards read the module-level `vit`
  fact.set_FacT(theirs, dim=rank, s=scale)
  for blk in theirs.blocks:  # timm 0.4.12's Mlp.drop is 0.5.4's drop1 (module doc)
    if not hasattr(blk.mlp, 'drop'):
      blk.mlp.drop = blk.mlp.drop1
  return theirs, base


def compare_fact(repo: str, out: dict[str, float]) -> None:
  """FacT-TT (r = 8) and FacT-TK (r = 8), s = 0.7, on a 2-block ViT."""
  depth, r, m, s = 2, 8, 4, 0.7
  shape = dict(width=768, depth=depth, heads=12, image_size=32, patch=16)
  x = images(2, 32)

  theirs, base = _fact_model(repo, 'tt', r, s, depth)
  randomize(theirs, base, seed=3)
  sd = state(theirs)
  mod = {'Transformer/fact/u': sd['FacTu.weight'].T, 'Transformer/fact/v': sd['FacTv.weight'].T}
  for i in range(depth):
    t = f'Transformer/encoderblock_{i}/fact/'
    for src, dst in (('q', 'query'), ('k', 'key'), ('v', 'value'), ('proj', 'out')):
      mod[t + dst] = sd[f'blocks.{i}.attn.{src}_FacTs.weight'].T  # Linear(r, r): x Wᵀ
    # fc1: Linear(r, m·r), output p·r + q is slice p's q: core_p[a, q] = W[p·r + q, a].
    mod[t + 'fc1'] = sd[f'blocks.{i}.mlp.fc1_FacTs.weight'].reshape(m, r, r).transpose(0, 2, 1)
    # fc2: Linear(m·r, r), input p·r + q is slice p's q: core_p[q, a] = W[a, p·r + q].
    mod[t + 'fc2'] = sd[f'blocks.{i}.mlp.fc2_FacTs.weight'].reshape(r, m, r).transpose(1, 2, 0)
  want = their_logits(theirs, x)
  ours = our_logits(our_model_config(**shape, peft='fact', fact_variant='tt', fact_rank=r,
                                     fact_scale=s), state(theirs, base), mod, x)
  out['fact_tt'], out['scale/fact_tt'] = max_diff(ours, want), float(np.abs(want).max())
  out['effect/fact_tt'] = module_effect(theirs, x, want, lambda n: n == 'FacTv.weight')

  theirs, base = _fact_model(repo, 'tk', r, s, depth)
  randomize(theirs, base, seed=4)
  sd = state(theirs)
  mod = {'Transformer/fact/u': sd['FacTu.weight'].T, 'Transformer/fact/v': sd['FacTv.weight'].T,
         'Transformer/fact/core': sd['FacTc'],
         # Their P is (r, 144) for 12 layers; ours (12·depth, r): the columns used.
         'Transformer/fact/factors': sd['FacTp'][:, :12 * depth].T}
  want = their_logits(theirs, x)
  for layout, key in (('authors', 'fact_tk'), ('paper', 'fact_tk (paper layout)')):
    ours = our_logits(our_model_config(**shape, peft='fact', fact_variant='tk', fact_rank=r,
                                       fact_scale=s, fact_tk_layout=layout),
                      state(theirs, base), mod, x)
    out[key] = max_diff(ours, want)
  out['scale/fact_tk'] = float(np.abs(want).max())
  out['effect/fact_tk'] = module_effect(theirs, x, want, lambda n: n == 'FacTv.weight')


def compare_snf(repo: str, out: dict[str, float]) -> None:
  """Their SNF (K = 16 planar steps, their default) on a 14-block timm ViT:
  their set_snf adapts the first 12 blocks; ours with snf_blocks=12."""
  clip = types.ModuleType('model.clip')
  clip.ResidualAttentionBlock = type('ResidualAttentionBlock', (), {})
  model_pkg = types.ModuleType('model')
  model_pkg.__path__ = []
  model_pkg.clip = clip
  eva = types.ModuleType('eva_clip')
  eva.__path__ = []
  eva.eva_vit_model = types.SimpleNamespace(Block=type('Block', (), {}))
  eva.transformer = types.SimpleNamespace(
      ResidualAttentionBlock=type('ResidualAttentionBlock', (), {}))
  flow = load_file('flow', os.path.join(repo, 'flow.py'))
  snf = load_file('snf_original', os.path.join(repo, 'snf.py'), modules={
      'model': model_pkg, 'model.clip': clip, 'eva_clip': eva, 'flow': flow})
  depth, k = 14, 16
  shape = dict(width=64, depth=depth, heads=4, image_size=32, patch=8)
  theirs = timm_vit(**shape)
  base = set(theirs.state_dict())
  snf.set_snf(theirs, 'normalization_flow', flow_dim=64, flow_length=k)
  adapted = [i for i, blk in enumerate(theirs.blocks) if hasattr(blk, 'flow')]
  for i in adapted:  # CLIP's block names for timm's submodules (module doc)
    blk = theirs.blocks[i]
    blk.attention, blk.ln_1, blk.ln_2 = blk.attn, blk.norm1, blk.norm2
  randomize(theirs, base, seed=5)
  sd = state(theirs)
  mod = {}
  for i in adapted:
    for src, dst in (('flow', 'attn'), ('flow2', 'mlp')):
      s, t = f'blocks.{i}.{src}.', f'Transformer/encoderblock_{i}/snf/{dst}/'
      mod[t + 'mu'] = sd[s + 'affine_transform.mu']
      mod[t + 'log_sigma'] = sd[s + 'affine_transform.logsigma']
      mod[t + 'planar_w'] = np.stack([sd[s + f'transforms.{j}.weight'][0] for j in range(k)])
      mod[t + 'planar_u'] = np.stack([sd[s + f'transforms.{j}.scale'][0] for j in range(k)])
      mod[t + 'planar_b'] = np.stack([sd[s + f'transforms.{j}.bias'][0] for j in range(k)])
  x = images(2, 32)
  want = their_logits(theirs, x)
  ours = our_logits(our_model_config(**shape, peft='snf', snf_flow_length=k,
                                     snf_blocks=len(adapted)), state(theirs, base), mod, x)
  out['snf'], out['scale/snf'] = max_diff(ours, want), float(np.abs(want).max())
  out['effect/snf'] = module_effect(
      theirs, x, want, lambda n: '.flow' in n and n.endswith(('.mu', '.logsigma', '.scale')))
  out['snf/blocks_adapted_by_theirs'] = float(len(adapted))


# --------------------------------------------------------------------------- #
# Entry points.
# --------------------------------------------------------------------------- #

def check_paths(paths: dict[str, str]) -> dict[str, str]:
  """The given repositories, each checked to hold its original file."""
  given = {k: os.path.abspath(v) for k, v in paths.items() if v}
  unknown = sorted(set(given) - set(REQUIRED))
  if unknown:
    raise UsageError(f'unknown repository key(s) {unknown}: use {sorted(REQUIRED)}.')
  if not given:
    raise UsageError('give at least one of --pyra_repo, --petl_repo, --snf_repo '
                     '(checkouts of the original repositories).')
  for key, path in given.items():
    want, url = REQUIRED[key]
    if not os.path.isfile(os.path.join(path, want)):
      raise UsageError(f'--{key}_repo={path} has no {want}: give a checkout of {url}.')
  return given


def compare(paths: dict[str, str]) -> dict[str, float]:
  """Max |ours − theirs| over the logits per module (and the init statistics).

  `paths`: {'pyra': PYRA checkout, 'petl': PETL-ViT checkout, 'snf': SNF
  checkout}; modules of a repository not given are skipped. Keys of the
  result: 'adapter', 'convpass', 'fact_tt', 'fact_tk', 'fact_tk (paper
  layout)', 'snf' (the differences), 'scale/<module>' (max |theirs|),
  'effect/<module>' (`module_effect`), 'snf/blocks_adapted_by_theirs', and
  'adapter_init/{theirs,ours}_{kernel_std,kernel_absmax,beyond_0.04,
  bias_absmax}'.
  """
  given = check_paths(paths)
  install_stand_ins()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # a shared machine: one core is enough for these sizes
  torch.manual_seed(0)  # their constructors' inits (the Adapter statistics)
  out: dict[str, float] = {}
  steps: list[tuple[str, Callable[[str, dict], None]]] = [
      ('pyra', compare_adapter), ('petl', compare_convpass), ('petl', compare_fact),
      ('snf', compare_snf)]
  for key, fn in steps:
    if key in given:
      fn(given[key], out)
  return out


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pyra_repo', default='', help='checkout of THU-MIG/PYRA')
  parser.add_argument('--petl_repo', default='', help='checkout of JieShibo/PETL-ViT')
  parser.add_argument('--snf_repo', default='', help='checkout of Wang-Yaoming/SNF')
  parser.add_argument('--json', default='', help='also write the results to this file')
  args = parser.parse_args(argv)
  try:
    res = compare({'pyra': args.pyra_repo, 'petl': args.petl_repo, 'snf': args.snf_repo})
  except UsageError as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  print(f'{"module":<24} {"max |ours - theirs|":>20} {"max |theirs|":>14} '
        f'{"module effect":>14}')
  for name in ('adapter', 'convpass', 'fact_tt', 'fact_tk', 'fact_tk (paper layout)', 'snf'):
    if name in res:
      base = name.split(' ')[0]
      print(f'{name:<24} {res[name]:>20.3g} {res.get("scale/" + base, math.nan):>14.3g} '
            f'{res.get("effect/" + base, math.nan):>14.3g}')
  print('(module effect: max |their logits - their logits with the module silenced|)')
  if 'adapter_init/theirs_kernel_std' in res:
    print('\nAdapter init (ViT-B/16, k = 8, 12 blocks): kernel std, max |kernel|, '
          'fraction beyond 0.04, max |bias|')
    for side in ('theirs', 'ours'):
      v = [res[f'adapter_init/{side}_{s}'] for s in
           ('kernel_std', 'kernel_absmax', 'beyond_0.04', 'bias_absmax')]
      print(f'  {side:<7} {v[0]:.5f}  {v[1]:.4f}  {v[2]:.4f}  {v[3]:.3g}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1, sort_keys=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
