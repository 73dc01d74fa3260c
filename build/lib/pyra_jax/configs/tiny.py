"""A tiny ViT on the offline MNIST task: seconds on a CPU, for tests and smoke runs.

Random init (no pretrained weights), width 32, depth 2, 32 px images with 8 px
patches (16 patches + class token), PYRA merging 4 then 2 tokens, 2 epochs on
train800val200 (1,000 digits), tested on the other 4,000. Takes the same
key=value argument as the paper settings (configs/paper.py), e.g.
`configs/tiny.py:method=tome`.
"""

from pyra_jax.configs import common
from pyra_jax.configs import paper


def get_config(arg=None):
  config = common.get_base_config()
  m = config.model
  m.variant, m.image_size, m.patch_size = 'Ti/8', 32, 8
  m.width, m.depth, m.num_heads, m.mlp_dim = 32, 2, 2, 64
  m.lora_rank, m.schedule = 4, '4,2'
  config.model_init = 'random'  # No pretrained tiny ViT exists: random on purpose.
  config.data.source, config.data.task = 'mnist', 'mnist'
  config.batch_size, config.eval_batch_size = 40, 200  # Divisible by 1, 2, 4, 8 devices.
  config.num_epochs, config.warmup_epochs = 2, 1
  config.lr = 3e-2  # Random frozen features: the head needs a large lr.
  config.log_every_steps, config.eval_every_epochs = 5, 1
  config.checkpoint_every_steps = 25  # Mid-run (25 steps per epoch).
  return paper.apply_arg(config, arg)
