"""ViT-S/16 + the authors' Adapter (width 4), no merging: Table 18's smaller-model PEFT reference.

Argument: key=value pairs (configs/paper.py), e.g. `configs/vits_peft_adapter.py:task=dtd,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vits', None, 'peft=adapter,' + (arg or ''))
