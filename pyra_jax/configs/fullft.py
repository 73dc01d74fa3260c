"""Full fine-tuning with merging, MAE's recipe (the paper's Table 21, appendix F).

The paper fully fine-tunes MAE-pretrained ViT-B/16 and ViT-L/16 on ImageNet-1k
with ToMe or PYRA merging at its high compression, with MAE's fine-tuning
recipe. The recipe's values, from facebookresearch/mae (FINETUNE.md's commands
and main_finetune.py's defaults), both backbones unless noted:

  epochs 100 (ViT-B) / 50 (ViT-L)         FINETUNE.md --epochs
  batch 1024 (32 per GPU x 32 GPUs)       FINETUNE.md
  lr = blr * 1024 / 256, blr 5e-4 (ViT-B) / 1e-3 (ViT-L)   FINETUNE.md --blr
  layer_decay 0.65 (ViT-B) / 0.75 (ViT-L) FINETUNE.md --layer_decay
  weight_decay 0.05                       FINETUNE.md
  drop_path 0.1 (ViT-B) / 0.2 (ViT-L)     FINETUNE.md --drop_path
  mixup 0.8, cutmix 1.0                   FINETUNE.md --mixup --cutmix
  mixup_prob 1.0, switch 0.5, mode batch  main_finetune.py defaults
  label smoothing 0.1                     main_finetune.py --smoothing
  RandAugment rand-m9-mstd0.5-inc1        main_finetune.py --aa
  random erasing 0.25, mode pixel         FINETUNE.md --reprob, --remode
  warm-up 5 epochs from 0, cosine to 1e-6 main_finetune.py --warmup_epochs,
                                          --min_lr; util/lr_sched.py, per step
  global pool + fc_norm                   main_finetune.py --global_pool (True),
                                          models_vit.py
  head init trunc normal std 2e-5         main_finetune.py
  AdamW (0.9, 0.999), no clipping         main_finetune.py (torch defaults)
  crop, flip, bicubic                     util/datasets.py (timm create_transform)

Merging: model.prop_attn = False, as ToMe's MAE patch (tome/patch/mae.py) says
for MAE models; its global pool weights tokens by size, which model.pool='gap'
does. Not reproduced: MAE evaluates on a 224/256 centre crop; we resize the
whole image (the repository's evaluation everywhere).

ImageNet-1k comes from TFDS (`tfds:imagenet2012`, which needs its files
downloaded by hand: the error says where to put them); `task=` runs the recipe
on any other task (a folder, another TFDS dataset).
"""

from __future__ import annotations

import ml_collections

from pyra_jax.configs import common
from pyra_jax.configs import paper

# backbone -> (variant, epochs, blr, layer_decay, drop_path, schedule), FINETUNE.md.
MAE_RECIPES = {
    'vitb_mae': ('B/16', 100, 5e-4, 0.65, 0.1, 'vitb_high'),
    'vitl_mae': ('L/16', 50, 1e-3, 0.75, 0.2, 'vitl_high'),
}
MAE_BATCH = 1024


def apply_mae_recipe(config: ml_collections.ConfigDict, *, epochs: float, lr: float,
                     layer_decay: float, drop_path: float) -> ml_collections.ConfigDict:
  """Sets MAE's fine-tuning recipe (module doc) on `config`, full fine-tuning on."""
  paper.full_finetune(config)
  m = config.model
  m.pool = 'gap'
  m.drop_path = drop_path
  m.head_init_std = 2e-5
  config.num_epochs, config.warmup_epochs = epochs, 5
  config.lr, config.min_lr, config.warmup_init_lr = lr, 1e-6, 0.0
  config.weight_decay = 0.05
  config.layer_decay = layer_decay
  config.label_smoothing = 0.1
  config.mixup.mixup_alpha, config.mixup.cutmix_alpha = 0.8, 1.0
  config.mixup.prob, config.mixup.switch_prob = 1.0, 0.5
  d = config.data
  d.random_resized_crop, d.flip = True, True
  d.randaugment = 'rand-m9-mstd0.5-inc1'
  d.random_erasing = 0.25
  return config


def mae_fullft_config(backbone: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """MAE `backbone` ('vitb_mae' | 'vitl_mae') fully fine-tuned on ImageNet-1k with
  PYRA (or `method=tome`) at the paper's high compression."""
  variant, epochs, blr, decay, drop_path, schedule = MAE_RECIPES[backbone]
  config = common.get_base_config()
  config.model.variant = variant
  config.model.schedule = schedule
  config.model.prop_attn = False  # ToMe's MAE patch (module doc)
  config.batch_size = config.eval_batch_size = MAE_BATCH
  apply_mae_recipe(config, epochs=epochs, lr=blr * MAE_BATCH / 256,
                   layer_decay=decay, drop_path=drop_path)
  d = config.data
  d.source, d.task = 'tfds', 'tfds:imagenet2012'
  d.train_split, d.eval_split = 'train', 'validation'
  d.shuffle_buffer = 10_000
  config.log_every_steps = 100
  config.eval_every_epochs = 10
  config.checkpoint_every_steps = 1000
  return paper.apply_arg(config, arg)
