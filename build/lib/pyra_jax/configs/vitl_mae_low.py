"""ViT-L/16 (MAE) + LoRA h=12 + PYRA, low merging; PYRA lr 1e-5 (tuned in {1e-6..3e-5}).

Argument: key=value pairs (configs/paper.py), e.g. `configs/vitl_mae_low.py:task=dtd,init=WEIGHTS.npz,method=tome`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitl_mae', 'low', arg)
