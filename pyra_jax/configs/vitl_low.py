"""ViT-L/16 (ImageNet-21k) + LoRA h=12 + PYRA, low merging (schedule vitl_low), batch 32.

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitl_low.py:task=dtd,init=WEIGHTS.npz,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitl', 'low', arg)
