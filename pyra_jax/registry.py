"""The names pyra_jax knows, each kind listed once: methods, PEFT modules, tasks, settings.

Configs, the command lines, the benchmark and the VTAB protocol read their
lists from here (tests/test_registry.py checks every other list agrees). The
token-reduction methods are named with the class that implements them, as
'module:Class' strings imported on first use, so this module (and the configs,
which validate names with it) load without JAX.

Adding a token-reduction method: a module under `pyra_jax/methods/` with a
`methods.base.TokenReducer` subclass, one line in METHODS, its config fields in
`configs/common.py`, its tests (docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import importlib
from typing import Any

# model.method -> the TokenReducer that implements it.
METHODS: dict[str, str] = {
    'peft': 'pyra_jax.methods.none:NoReduction',  # no reduction: the PEFT-only model
    'tome': 'pyra_jax.methods.tome:ToMe',         # ToMe merging (Bolya et al. 2023)
    'pyra': 'pyra_jax.methods.tome:Pyra',         # ToMe + PYRA's generators (the paper)
    'evit': 'pyra_jax.methods.evit:EViT',         # Table 14 (Liang et al. 2022)
    'tofu': 'pyra_jax.methods.tofu:ToFu',         # Table 14 (Kim et al. 2024)
    'ats': 'pyra_jax.methods.ats:ATS',            # Table 14 (Fayyaz et al. 2022)
    'ltmp': 'pyra_jax.methods.ltmp:LTMP',         # Table 14 (Bonnaerens & Dambre 2023)
    'diffrate': 'pyra_jax.methods.diffrate:DiffRate',  # Table 14 (Chen et al. 2023)
    'spvit': 'pyra_jax.methods.spvit:SPViT',      # Tables 2-5 (Kong et al. 2022)
    'rap': 'pyra_jax.methods.rap:RaP',            # Tables 2-5 (Li et al. 2022)
}

# model.peft -> what it is (docs/algorithm.md §13-15). Any module but 'lora'
# turns LoRA off.
PEFT_MODULES: dict[str, str] = {
    'lora': 'LoRA on q/k/v (Hu et al. 2022), folded into the kernels for deployment',
    'adapter': "the PYRA authors' bottleneck Adapter after the MLP (Tables 18-19)",
    'convpass': 'convolutional bypasses beside attention and the MLP (Jie & Deng 2022)',
    'fact': 'FacT factor-tuning, TT or TK (Jie & Deng 2023), folded for deployment',
    'snf': 'shortcuts as normalizing flows (Wang et al. 2023)',
}

# The 19 VTAB-1k tasks by group, in the paper's column order (docs/algorithm.md §5).
VTAB_GROUPS: dict[str, tuple[str, ...]] = {
    'Natural': ('caltech101', 'cifar100', 'dtd', 'oxford_flowers102',
                'oxford_iiit_pet', 'svhn', 'sun397'),
    'Specialized': ('patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy'),
    'Structured': ('clevr_count', 'clevr_dist', 'dmlab', 'kitti_dist',
                   'dsprites_loc', 'dsprites_ori', 'smallnorb_azi', 'smallnorb_ele'),
}
VTAB_TASKS: tuple[str, ...] = tuple(t for g in VTAB_GROUPS.values() for t in g)
# Tasks beyond VTAB-1k in the same layout: CIFAR-10 (folder or TFDS) and the
# offline MNIST digits (their own source).
EXTRA_TASKS: tuple[str, ...] = ('cifar10', 'mnist')

# The packaged settings (pyra_jax/configs/<name>.py), runnable by name.
SETTINGS: tuple[str, ...] = (
    'demo', 'tiny',
    'vitb_low', 'vitb_high', 'vitl_low', 'vitl_high', 'vitl_mae_low', 'vitl_mae_high',
    'deitb_low', 'deitb_high',
    'vitb_evit', 'vitl_evit',
    'vitb_high_adapter', 'vitl_high_adapter', 'vits_peft', 'vits_peft_adapter',
    'deits_peft', 'vitb_pedist', 'vits_pedist',
    'vitb_low_convpass', 'vitb_high_convpass', 'vitb_low_fact', 'vitb_high_fact',
    'vitb_low_snf', 'vitb_high_snf',
    'vitb_mae_fullft', 'vitl_mae_fullft', 'demo_fullft',
)


def method(name: str) -> Any:
  """The TokenReducer class of model.method `name` (imports its module)."""
  if name not in METHODS:
    from pyra_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f'model.method must be one of {tuple(METHODS)}, got {name!r}.')
  module, _, cls = METHODS[name].partition(':')
  return getattr(importlib.import_module(module), cls)


def methods() -> dict[str, Any]:
  """Every method's TokenReducer class, by name."""
  return {name: method(name) for name in METHODS}
