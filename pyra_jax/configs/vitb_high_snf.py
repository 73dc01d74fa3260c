"""ViT-B/16 with SNF (affine shortcut flows) instead of LoRA, PYRA at high compression (Table 20).

  python -m pyra_jax.main --config=configs/vitb_high_snf.py:task=dtd,init=vitb16_in21k.npz ...

The paper's Table 20 row (VTAB-1k mean, ToMe / PYRA): 58.01 / 62.49.
`method=tome` gives the ToMe column. Same key=value argument as configs/paper.py.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'high', ','.join(filter(None, ['peft=snf', arg])))
