"""ViT-B/16 with SNF (affine shortcut flows) instead of LoRA, PYRA at low compression (Table 20).

  python -m pyra_jax.main --config=configs/vitb_low_snf.py:task=dtd,init=vitb16_in21k.npz ...

The paper's Table 20 row (VTAB-1k mean, ToMe / PYRA): 62.65 / 65.25.
`method=tome` gives the ToMe column. Same key=value argument as configs/paper.py.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'low', ','.join(filter(None, ['peft=snf', arg])))
