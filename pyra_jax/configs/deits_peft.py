"""DeiT-S/16 distilled + LoRA h=4, no merging: the smaller-model reference for DeiT-B.

Argument: key=value pairs (configs/paper.py), e.g. `configs/deits_peft.py:task=dtd,init=WEIGHTS.npz`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('deits', None, arg)
