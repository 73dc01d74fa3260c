"""ViT-B/16 with FacT (FacT-TT, rank 8, s = 1) instead of LoRA, PYRA at high compression (Table 20).

  python -m pyra_jax.main --config=configs/vitb_high_fact.py:task=dtd,init=vitb16_in21k.npz ...

The paper's Table 20 row (VTAB-1k mean, ToMe / PYRA): 71.48 / 72.48.
`method=tome` gives the ToMe column. Same key=value argument as configs/paper.py.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.paper_config('vitb', 'high', ','.join(filter(None, ['peft=fact', arg])))
