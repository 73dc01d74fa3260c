"""DeiT-B/16 distilled + LoRA h=8 + PYRA, low merging (schedule deitb_low), batch 128.

Argument: key=value pairs (configs/paper.py), e.g. `configs/deitb_low.py:task=dtd,init=WEIGHTS.npz,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('deitb', 'low', arg)
