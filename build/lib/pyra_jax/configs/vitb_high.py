"""ViT-B/16 (ImageNet-21k) + LoRA h=8 + PYRA, high merging (schedule vitb_high, ~3.2x faster).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitb_high.py:task=dtd,init=WEIGHTS.npz,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'high', arg)
