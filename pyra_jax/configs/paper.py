"""The paper's settings, shared by the configs/<setting>.py files.

ViT-B/16 at low and high merging are the paper's Tables 2 and 3; the per-backbone
recipe is Tables 10-12, the schedules Table 13.

Each setting file is `get_config(arg)` -> `paper_config(backbone, level, arg)`.

The argument (after ':' in --config) is a comma-separated list of key=value
pairs, e.g. `configs/vitb_high.py:task=dtd,method=tome`:

  task=NAME        data.task, a VTAB-1k task (default cifar100), or
                   folder:NAME for a dataset of one's own (source=folder), or
                   tfds:NAME for any TFDS dataset, or imagefolder:NAME
                   (source=imagefolder; configs/common.py, data)
  method=M         model.method: peft (no merging) | tome | pyra (default) |
                   evit | tofu | ats (Table 14's competitors: at a level, EViT's
                   keep rate is solved to match the level's FLOPs; tofu and ats
                   use the level's schedule; configs/vitb_evit.py is EViT's own) |
                   ltmp | diffrate (their FLOPs targets are the level's) |
                   spvit | rap (Tables 2-5's competitors, in three stages; their
                   budget is the level's FLOPs)
  peft=P           model.peft, the trainable module: lora (default) | adapter |
                   convpass | fact | snf (Tables 18-20; any but lora turns LoRA
                   off; docs/methods.md "PEFT modules"); the adapter/convpass bottleneck
                   is the backbone's peft_dim below. The module is set up as its
                   authors' code runs it (`AUTHORS_MODULE_SETTINGS`): adapter gets
                   adapter_init='trunc_normal', fact gets fact_tk_layout='authors'
                   (a later --config.model.<field> still wins)
  modulation=F     model.modulation, the ablations of Tables 6-8 (pyra only)
  pyra_lr=X        learning rate of the PYRA generators (the paper tunes it
                   per task in {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3})
  lr=X             learning rate of LoRA + head
  source=S         data.source: tfds | folder | imagefolder | mnist
  data_dir=DIR     data.data_dir (TFDS data_dir, the VTAB-1k folder root or
                   the image tree)
  init=PATH        model_init, the pretrained weights (format auto-detected),
                   a file or a Hub name, e.g. hf-hub:timm/vit_base_patch16_224.orig_in21k
  teacher=WORKDIR  distil from this training run (PE-Dist): sets
                   distill.enabled and distill.teacher_workdir
  teacher_export=DIR  the same from an export of the teacher
  recipe=R         config.recipe: paper (default, the method as the paper
                   defines it) | authors_code (every choice where the authors'
                   code differs from the paper set to the code's: lr schedule,
                   LoRA/Adapter init, DeiT heads, evaluation epochs, headline
                   = max over evaluations, PE-Dist's loss; docs/algorithm.md §8)
  finetune=F       peft (default: LoRA or the PEFT module on a frozen backbone) |
                   full (every parameter trains, LoRA off: `full_finetune`)

Everything else: `--config.<field>=<value>` (see configs/common.py).
"""

from __future__ import annotations

import ml_collections

from pyra_jax import registry

from pyra_jax import recipe as recipe_lib
from pyra_jax.configs import common

# backbone -> settings that differ from common.get_base_config() (Tables 10-12).
# peft_dim is the Adapter / Convpass bottleneck: the authors' Adapter configs use
# 8 (ViT-B), 4 (ViT-S), 12 (ViT-L), the same numbers as their LoRA ranks.
BACKBONES = {
    # ViT-B/16 pretrained on ImageNet-21k: LoRA rank 8, batch 64.
    'vitb': dict(variant='B/16', lora_rank=8, peft_dim=8, batch_size=64, sched='vitb'),
    # ViT-L/16 (ImageNet-21k): rank 12, batch 32.
    # ToFu prunes in the first quarter of the layers (3 of 12, 6 of 24).
    'vitl': dict(variant='L/16', lora_rank=12, peft_dim=12, batch_size=32, sched='vitl',
                 tofu_prune_layers=6),
    # ViT-L/16 pretrained with MAE: as ViT-L, but the PYRA lr is tuned in the
    # much lower range {1e-6, 3e-6, 1e-5, 3e-5}; 1e-5 is its middle.
    'vitl_mae': dict(variant='L/16', lora_rank=12, peft_dim=12, batch_size=32,
                     sched='vitl', pyra_lr=1e-5, pyra_lr_grid=(1e-6, 3e-6, 1e-5, 3e-5),
                     tofu_prune_layers=6),
    # DeiT-B/16 distilled: distillation token, rank 8, batch 128.
    'deitb': dict(variant='B/16', lora_rank=8, peft_dim=8, batch_size=128, sched='deitb',
                  distilled=True),
    # The smaller-model references (PEFT only): ViT-S/16 and DeiT-S, rank 4.
    'vits': dict(variant='S/16', lora_rank=4, peft_dim=4, batch_size=64, sched=None),
    'deits': dict(variant='S/16', lora_rank=4, peft_dim=4, batch_size=128, sched=None,
                  distilled=True),
}
LEVELS = ('low', 'high')
ARG_KEYS = ('task', 'method', 'peft', 'modulation', 'pyra_lr', 'lr', 'source',
            'data_dir', 'init', 'teacher', 'teacher_export', 'recipe', 'finetune')
FINETUNE = ('peft', 'full')
PEFT_MODULES = tuple(registry.PEFT_MODULES)
# What `peft=` sets besides model.peft: the module as the code behind the
# published numbers builds it (docs/algorithm.md §13-14). The base config keeps
# the other choice, which is what runs stored before these fields existed used.
AUTHORS_MODULE_SETTINGS = {
    # The PYRA authors' model as built (Tables 18-19): trunc-normal kernels.
    'adapter': {'adapter_init': 'trunc_normal'},
    # The FacT code's FacT-TK layout (its published numbers; Table 20).
    'fact': {'fact_tk_layout': 'authors'},
}


def parse_arg(arg: str | None) -> dict[str, str]:
  """'a=1,b=x' -> {'a': '1', 'b': 'x'}; rejects unknown keys by name."""
  out = {}
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition('=')
    key = key.strip()
    if not eq or key not in ARG_KEYS:
      raise ValueError(
          f'Bad config argument {item!r}: use key=value pairs separated by '
          f'commas, with keys from {", ".join(ARG_KEYS)} '
          '(other fields: --config.<field>=<value>).')
    out[key] = value.strip()
  return out


def apply_arg(config: ml_collections.ConfigDict, arg: str | None
              ) -> ml_collections.ConfigDict:
  """Applies the key=value argument to a config (see the module doc)."""
  kv = parse_arg(arg)
  if 'task' in kv:
    config.data.task = kv['task']
  if 'method' in kv:
    set_method(config, kv['method'])
  if 'peft' in kv:
    if kv['peft'] not in PEFT_MODULES:
      raise ValueError(f"peft={kv['peft']!r}: use one of {', '.join(PEFT_MODULES)}.")
    config.model.peft = kv['peft']
    config.model.update(AUTHORS_MODULE_SETTINGS.get(kv['peft'], {}))
  if 'modulation' in kv:
    config.model.modulation = kv['modulation']
  for key in ('pyra_lr', 'lr'):
    if key in kv:
      try:
        config[key] = float(kv[key])
      except ValueError:
        raise ValueError(f'Config argument {key}={kv[key]!r} is not a number.') from None
  if 'source' in kv:
    config.data.source = kv['source']
  if 'data_dir' in kv:
    config.data.data_dir = kv['data_dir']
  if 'init' in kv:
    config.model_init = kv['init']
  if 'recipe' in kv:
    if kv['recipe'] not in recipe_lib.RECIPES:
      raise ValueError(f"recipe={kv['recipe']!r}: use one of {', '.join(recipe_lib.RECIPES)}.")
    config.recipe = kv['recipe']  # Resolved when the run starts (pyra_jax/recipe.py).
  if 'finetune' in kv:
    if kv['finetune'] not in FINETUNE:
      raise ValueError(f"finetune={kv['finetune']!r}: use one of {', '.join(FINETUNE)}.")
    if kv['finetune'] == 'full':
      full_finetune(config)
  for key, field in (('teacher', 'teacher_workdir'),
                     ('teacher_export', 'teacher_export')):
    if key in kv:
      config.distill.enabled = True
      config.distill[field] = kv[key]
  return config


def full_finetune(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Trains every parameter: the backbone, the head and the method's own.

  Adds the group `trainable.backbone = '.*'` after the default groups (so PYRA's
  generators keep pyra_lr, LTMP's and DiffRate's parameters theirs) and turns
  LoRA off (model.lora_rank = 0): a fully trained backbone needs no low-rank
  increment, and there is nothing to fold at export.
  """
  config.trainable.backbone = r'.*'
  config.model.lora_rank = 0
  return config


METHODS = tuple(registry.METHODS)


def set_method(config: ml_collections.ConfigDict, method: str) -> None:
  """peft trains LoRA + head without merging; tome merges; pyra also modulates;
  evit/tofu/ats/ltmp/diffrate are the competitors of Table 14 (docs/algorithm.md §16-17).

  evit at a compression setting (a schedule) matches that setting's FLOPs with
  its keep rate; its own setting (keep rate 0.7 at layers 3, 6, 9) is
  `evit_own_config`. ltmp and diffrate learn their compression and aim at the
  setting's FLOPs (`match_flops`).
  """
  if method not in METHODS:
    raise ValueError(f'method={method!r}: use one of {", ".join(METHODS)}.')
  config.model.method = method
  if method == 'peft':
    config.model.schedule = 'none'
  if method == 'evit':
    config.model.evit_match_flops = config.model.schedule != 'none'
  if method in ('ltmp', 'diffrate'):
    match_flops(config)


# width, depth, mlp_dim of the variants the settings use (= models.vit.VARIANTS,
# repeated so that configs load without importing JAX).
_DIMS = {'Ti': (192, 12, 768), 'S': (384, 12, 1536), 'B': (768, 12, 3072),
         'L': (1024, 24, 4096), 'H': (1280, 32, 5120)}


def match_flops(config: ml_collections.ConfigDict) -> None:
  """LTMP's and DiffRate's FLOPs targets = those of the setting's schedule.

  They learn their compression instead of following `model.schedule`; at a
  paper setting (low/high) they aim at the FLOPs the schedule gives ToMe and
  PYRA: `model.ltmp_flops_target` = compressed / full, and
  `model.diffrate_flops_ratio` = full / compressed. A schedule that cannot be
  resolved here leaves the targets as they are (the model reports it).
  """
  from pyra_jax import schedules  # pylint: disable=g-import-not-at-top
  m = config.model
  name, _, patch = (m.variant or '').partition('/')
  if name not in _DIMS or not patch.isdigit():
    return
  width, depth, mlp = _DIMS[name]
  width, depth, mlp = m.width or width, m.depth or depth, m.mlp_dim or mlp
  patch = m.patch_size or int(patch)
  num_patches = (m.image_size // patch) ** 2
  prefix = 1 + int(m.distilled)
  try:
    sched = schedules.resolve_schedule(m.schedule, depth=depth, num_patches=num_patches,
                                       num_protected=prefix, width=width,
                                       mlp_ratio=mlp / width)
  except ValueError:
    return
  full = schedules.vit_flops([0] * depth, num_tokens=num_patches + prefix, width=width,
                             mlp_ratio=mlp / width)
  flops = schedules.vit_flops(sched, num_tokens=num_patches + prefix, width=width,
                              mlp_ratio=mlp / width)
  m.ltmp_flops_target = round(flops / full, 4)
  m.diffrate_flops_ratio = round(full / flops, 4)


def paper_config(backbone: str, level: str | None, arg: str | None = None
                 ) -> ml_collections.ConfigDict:
  """The setting `backbone` at merging `level` ('low' | 'high' | None: PEFT)."""
  b = BACKBONES[backbone]
  config = common.get_base_config()
  config.model.variant = b['variant']
  config.model.lora_rank = b['lora_rank']
  config.model.peft_dim = b['peft_dim']
  config.batch_size = b['batch_size']
  if 'distilled' in b:
    config.model.distilled = b['distilled']
  if 'pyra_lr' in b:
    config.pyra_lr = b['pyra_lr']
  if 'pyra_lr_grid' in b:  # The selection grid of `python -m pyra_jax.vtab`.
    config.vtab.pyra_lr_grid = b['pyra_lr_grid']
  config.vtab.backbone = backbone  # The paper's row in the vtab summary.
  if 'tofu_prune_layers' in b:
    config.model.tofu_prune_layers = b['tofu_prune_layers']
  if level is None or b['sched'] is None:
    set_method(config, 'peft')
  else:
    if level not in LEVELS:
      raise ValueError(f'level {level!r}: use one of {LEVELS}.')
    config.model.schedule = f'{b["sched"]}_{level}'
  return apply_arg(config, arg)


def evit_own_config(backbone: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """EViT at its own setting on `backbone`'s recipe: keep rate 0.7 at layers
  3, 6, 9 of 12 (scaled to the depth: 6, 12, 18 of 24), whatever FLOPs that gives."""
  config = paper_config(backbone, 'high')
  config.model.method = 'evit'
  config.model.evit_match_flops = False
  config.model.evit_keep_rate = 0.7
  config.model.evit_layers = ''
  return apply_arg(config, arg)
