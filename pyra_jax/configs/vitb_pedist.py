"""PE-Dist for ViT-L/16 (Table 15): ViT-B/16 + LoRA h=8 distilled from a ViT-L/16 PEFT run.

The student is ViT-B/16 with LoRA and no merging (the ViT-B/16 PEFT setting); the
teacher is a finished ViT-L/16 LoRA run of ours on the same task, given by its
workdir (or export). Train the teacher first, then the student:

  python -m pyra_jax.main --config=configs/vitl_high.py:task=dtd,method=peft,init=L16.npz \
      --workdir=runs/vitl_peft_dtd
  python -m pyra_jax.main --config=configs/vitb_pedist.py:task=dtd,init=B16.npz,teacher=runs/vitl_peft_dtd \
      --workdir=runs/vitb_pedist_dtd

Argument: key=value pairs (configs/paper.py); teacher=WORKDIR or teacher_export=DIR
is required. Loss: CE + distill.weight·T²·KL (configs/common.py, `distill`).
"""

from pyra_jax.configs import paper


def get_config(arg=None):
  config = paper.paper_config('vitb', None, arg)
  config.distill.enabled = True  # A teacher must be given (teacher=... in the argument).
  return config
