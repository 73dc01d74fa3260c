"""ViT-B/16 + LoRA + EViT at EViT's own setting: keep rate 0.7 at layers 3, 6, 9 (0-based).

The FLOPs-matched EViT of the paper's low/high settings is
`configs/vitb_low.py:method=evit` / `configs/vitb_high.py:method=evit`.
Argument: key=value pairs (configs/paper.py), e.g. `configs/vitb_evit.py:task=dtd,init=WEIGHTS.npz`.
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  return paper.evit_own_config('vitb', arg)
