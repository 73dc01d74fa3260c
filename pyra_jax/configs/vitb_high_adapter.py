"""ViT-B/16 + the authors' Adapter (width 8) + PYRA, high merging: Table 18 (method=tome: its ToMe row; method=peft: Table 19's ViT-B PEFT reference).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitb_high_adapter.py:task=dtd,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'high', 'peft=adapter,' + (arg or ''))
