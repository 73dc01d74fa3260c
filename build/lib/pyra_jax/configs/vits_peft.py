"""ViT-S/16 + LoRA h=4, no merging: the paper's smaller-model reference for ViT-B.

Argument: key=value pairs (configs/paper.py), e.g. `configs/vits_peft.py:task=dtd,init=WEIGHTS.npz`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vits', None, arg)
