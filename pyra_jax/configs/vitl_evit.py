"""ViT-L/16 + LoRA + EViT at EViT's own setting: keep rate 0.7 at layers 6, 12, 18 (0-based; 3, 6, 9 of 12 scaled).

The FLOPs-matched EViT of the paper's low/high settings is
`configs/vitl_low.py:method=evit` / `configs/vitl_high.py:method=evit`.
Argument: key=value pairs (configs/paper.py), e.g. `configs/vitl_evit.py:task=dtd,init=WEIGHTS.npz`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.evit_own_config('vitl', arg)
