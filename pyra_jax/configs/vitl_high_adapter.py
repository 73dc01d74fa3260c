"""ViT-L/16 + the authors' Adapter (width 12) + PYRA, high merging: Table 19 (method=tome: its ToMe row).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitl_high_adapter.py:task=dtd,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitl', 'high', 'peft=adapter,' + (arg or ''))
