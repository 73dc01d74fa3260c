r"""Input-pipeline throughput, in images per second (no model involved).

  python -m pyra_jax.experiments.input_benchmark \
      --root /work/shared/data/vtab1k/cifar10 --image_size 224 --batch_size 64

Training iteration is timed in two phases: the first epoch (decode + resize,
filling the in-memory cache) and the steady state after it (cached uint8 ->
shuffle -> batch -> normalise -> numpy), which is what a 100-epoch run sees.
`--eval_split test` also times one evaluation pass (never cached).
`--root` is either a VTAB-1k root (then give --task) or a task folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pyra_jax import errors


def _rate(iterator, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(images/s, seconds) for pulling num_batches batches."""
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return num_batches * batch_size / seconds, seconds


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True,
                      help='VTAB-1k folder root, or one task folder')
  parser.add_argument('--task', default='',
                      help='task name; default: the --root folder name')
  parser.add_argument('--source', default='folder',
                      choices=('folder', 'tfds', 'mnist'))
  parser.add_argument('--split', default='train800val200')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--steps', type=int, default=200,
                      help='steady-state training batches to time')
  parser.add_argument('--normalization', default='imagenet')
  parser.add_argument('--num_parallel_calls', type=int, default=-1)
  parser.add_argument('--eval_split', default='',
                      help="also time one eval pass over this split, e.g. 'test'")
  args = parser.parse_args(argv)
  if args.source == 'folder' and not Path(args.root).is_dir():
    raise SystemExit(f'error: --root {args.root} is not a directory: pass a VTAB-1k '
                     'root (with --task) or one task folder.')
  try:
    _time_pipeline(args)
  except errors.PyraError as e:  # An unknown task or split, a missing folder: one sentence.
    raise SystemExit(f'error: {e}') from None


def _time_pipeline(args: argparse.Namespace) -> None:
  """Prints the training (first epoch, steady state) and eval rates."""
  # TensorFlow loads only here, so a wrong command line is answered at once.
  from pyra_jax.data.input_pipeline import get_data  # pylint: disable=g-import-not-at-top
  config = {'source': args.source, 'task': args.task or Path(args.root).name,
            'data_dir': args.root, 'normalization': args.normalization,
            'shuffle_buffer': 1000,
            'num_parallel_calls': args.num_parallel_calls}
  bs = args.batch_size
  data = get_data(config, args.split, bs, image_size=args.image_size,
                  train=True, seed=0)
  print(f'task {data.task} split {data.split}: {data.num_examples} images, '
        f'{data.image_size} px, batch {bs}, {data.steps_per_epoch} steps/epoch')
  it = iter(data)
  rate, seconds = _rate(it, data.steps_per_epoch, bs)
  print(f'train, first epoch (decode + resize + cache): {rate:,.0f} images/s '
        f'({seconds:.1f} s)')
  rate, seconds = _rate(it, args.steps, bs)
  print(f'train, steady state ({args.steps} batches): {rate:,.0f} images/s '
        f'({seconds:.1f} s)')
  if args.eval_split:
    data = get_data(config, args.eval_split, bs, image_size=args.image_size,
                    train=False, seed=0)
    rate, seconds = _rate(iter(data), data.steps_per_epoch, bs)
    print(f'eval {args.eval_split} ({data.num_examples} images, padded to '
          f'{data.steps_per_epoch * bs}): {rate:,.0f} images/s '
          f'({seconds:.1f} s)')


if __name__ == '__main__':
  main()
