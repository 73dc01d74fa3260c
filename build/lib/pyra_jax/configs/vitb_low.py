"""ViT-B/16 (ImageNet-21k) + LoRA h=8 + PYRA, low merging (schedule vitb_low, ~1.7x faster).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitb_low.py:task=dtd,init=WEIGHTS.npz,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'low', arg)
