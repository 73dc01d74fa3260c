"""PE-Dist for ViT-B/16 (Table 15): ViT-S/16 + LoRA h=4 distilled from a ViT-B/16 PEFT run.

The student is the ViT-S/16 PEFT setting (configs/vits_peft.py); the teacher is a
finished ViT-B/16 LoRA run of ours on the same task, given by its workdir (or
export). Train the teacher first, then the student:

  python -m pyra_jax.main --config=configs/vitb_high.py:task=dtd,method=peft,init=B16.npz \
      --workdir=runs/vitb_peft_dtd
  python -m pyra_jax.main --config=configs/vits_pedist.py:task=dtd,init=S16.npz,teacher=runs/vitb_peft_dtd \
      --workdir=runs/vits_pedist_dtd

Argument: key=value pairs (configs/paper.py); teacher=WORKDIR or teacher_export=DIR
is required. Loss: CE + distill.weight·T²·KL (configs/common.py, `distill`).
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  config = paper.paper_config('vits', None, arg)
  config.distill.enabled = True  # A teacher must be given (teacher=... in the argument).
  return config
