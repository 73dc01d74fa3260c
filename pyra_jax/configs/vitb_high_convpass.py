"""ViT-B/16 + Convpass (width 8) + PYRA, high merging: Table 20 (method=tome: its ToMe row).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitb_high_convpass.py:task=dtd,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'high', 'peft=convpass,' + (arg or ''))
