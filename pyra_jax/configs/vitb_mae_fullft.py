"""MAE ViT-B/16 fully fine-tuned on ImageNet-1k with PYRA merging (high), MAE's recipe.

The paper's Table 21 (configs/fullft.py cites every value). `method=tome` for its
ToMe row, e.g. `configs/vitb_mae_fullft.py:method=tome,init=WEIGHTS.npz,data_dir=DIR`.
"""

from pyra_jax.configs import fullft


def get_config(arg=None):
  return fullft.mae_fullft_config('vitb_mae', arg)
