r"""Input-pipeline throughput, in images per second (no model involved).

  python -m pyra_jax.experiments.input_benchmark \
      --root=data/vtab1k/cifar10 --image_size=224 --batch_size=64

Training iteration is timed in two phases: the first epoch (decode + resize,
filling the in-memory cache) and the steady state after it (cached uint8 ->
shuffle -> batch -> normalise -> numpy), which is what a 100-epoch run sees.
`--eval_split test` also times one evaluation pass (never cached).
`--root` is either a VTAB-1k root (then give --task) or a task folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from absl import flags

from pyra_jax import cli


def _rate(iterator, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(images/s, seconds) for pulling num_batches batches."""
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return num_batches * batch_size / seconds, seconds


# The command's flags, in their own FlagValues (main(argv) runs in-process too).
FLAGS = flags.FlagValues()
flags.DEFINE_string('root', None, 'VTAB-1k folder root, or one task folder',
                    required=True, flag_values=FLAGS)
flags.DEFINE_string('task', '', 'task name; default: the --root folder name',
                    flag_values=FLAGS)
flags.DEFINE_enum('source', 'folder', ('folder', 'tfds', 'mnist'), 'data source',
                  flag_values=FLAGS)
flags.DEFINE_string('split', 'train800val200', 'the training split', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'image size (px)', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 64, 'images per batch', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer('steps', 200, 'steady-state training batches to time',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('normalization', 'imagenet', 'config.data.normalization',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_parallel_calls', -1, 'tf.data parallelism (-1: autotune)',
                     flag_values=FLAGS)
flags.DEFINE_string('eval_split', '', "also time one eval pass over this split, e.g. 'test'",
                    flag_values=FLAGS)
cli.define_verbosity(FLAGS)


def main(argv: list[str] | None = None) -> None:
  """The command (argv without the program name; None: sys.argv[1:])."""
  cli.parse(FLAGS, argv, prog='python -m pyra_jax.experiments.input_benchmark',
            doc=__doc__)
  if FLAGS.source == 'folder' and not Path(FLAGS.root).is_dir():
    cli.fail(f'--root {FLAGS.root} is not a directory: pass a VTAB-1k '
             'root (with --task) or one task folder.', cli.USAGE_EXIT)
  # An unknown task or split, a missing folder: one sentence (cli.call).
  cli.call(lambda: _time_pipeline(FLAGS))


def _time_pipeline(args: Any) -> None:
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
